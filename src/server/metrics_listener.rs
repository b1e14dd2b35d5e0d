//! The `--metrics-listen` listener: the metrics router on a listener of
//! its own, HTTP/1.1 only, a few connections of bounded life. Never serves
//! the main router.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::AcceptErrors;
use super::connection::Peer;
use super::protocol::{PeerService, http1_builder};
use super::refuse::refuse;
use crate::config::LimitsConfig;
use crate::metrics::ConnectionRefusal;

/// Connections the `--metrics-listen` listener serves at once: a scraper
/// needs one, a few operators' curls a few more. Past it a connection gets
/// the canned 503.
pub const METRICS_MAX_CONNECTIONS: usize = 16;
/// How long a connection to the metrics listener may stay open at all: a
/// scrape takes milliseconds, and keep-alive between scrapes (every 15 s or
/// so) fits well within.
pub const METRICS_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serves the metrics router on its own listener until `shutdown`: HTTP/1.1
/// only, with the main listener's header size and header timeout, at most
/// [`METRICS_MAX_CONNECTIONS`] connections, each for at most
/// [`METRICS_CONNECTION_LIFETIME`]. It carries no token, so it is meant for
/// a private network; these bounds keep whoever reaches it anyway from
/// holding descriptors or memory there.
pub async fn serve_metrics(
    listener: TcpListener,
    router: Router,
    limits: &LimitsConfig,
    shutdown: CancellationToken,
) {
    let http1 = http1_builder(limits);
    let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_MAX_CONNECTIONS));
    let lingering = Arc::new(AtomicUsize::new(0));
    let mut accept_errors = AcceptErrors::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = accept_errors.accept(&listener) => accepted,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "refusing a metrics connection: all slots taken");
            refuse(stream, ConnectionRefusal::Capacity, false, &lingering);
            continue;
        };
        let service = TowerToHyperService::new(PeerService {
            router: router.clone(),
            peer: Peer(peer),
            activity: None,
            hold: None,
        });
        let conn = http1.serve_connection(TokioIo::new(stream), service);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                () = tokio::time::sleep(METRICS_CONNECTION_LIFETIME) => {}
                () = shutdown.cancelled() => {}
            }
            // Let an answer being written finish, briefly.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        });
    }
}
