//! Accepting connections and speaking HTTP on them.
//!
//! A plain listener serves HTTP/1.1, and HTTP/2 to clients that start with
//! its preface (h2c with prior knowledge, for service-to-service
//! subscribers). With a certificate, the listener serves TLS instead and
//! offers `h2` and `http/1.1` by ALPN: browsers speak HTTP/2 only over TLS,
//! and over HTTP/1.1 they allow just six connections, hence six
//! EventSources, per origin.
//!
//! This file is the accept loop: it admits each connection through
//! `Limits::admit` before anything else (a refused one is turned away by
//! `refuse.rs`), reports failing accepts once per interval and backs off,
//! sets TCP_NODELAY and TCP_USER_TIMEOUT, hands the connection to
//! `protocol.rs`, and shuts down gracefully within bounds: on shutdown, or
//! once a drain's delay has passed, it stops accepting and has connections
//! finish (HTTP/2: `GOAWAY`), waiting at most `--shutdown-timeout` past the
//! drain window. The parts:
//! - `protocol.rs` — TLS, the protocol choice (ALPN, or a peek at a plain
//!   connection's first bytes), and serving a connection with it;
//! - `http1.rs` — crier's own HTTP/1.1 for subscribe requests;
//! - `connection.rs` — what a connection tells its requests (peer, HTTP/2
//!   activity, the hold a WebSocket keeps);
//! - `streams.rs` — an HTTP/2 connection's streams, run in its own task;
//! - `refuse.rs` — the canned answer to a connection turned away;
//! - `metrics_listener.rs` — the `--metrics-listen` listener.
//!
//! Never parses a request path: that is the router's.

pub mod connection;
mod http1;
mod metrics_listener;
mod protocol;
mod refuse;
mod streams;

/// The connection hyper serves after crier's own HTTP/1.1, which a
/// WebSocket takes back from hyper's upgrade.
pub use http1::Prefixed;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use axum::Router;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::{AccessConfig, LimitsConfig, ListenConfig, ShutdownConfig, TransportsConfig};
use crate::drain::Drain;
use crate::limits::Limits;
use crate::metrics::Metrics;

pub use metrics_listener::{METRICS_CONNECTION_LIFETIME, METRICS_MAX_CONNECTIONS, serve_metrics};
use protocol::{Conn, Protocols, logged, serve_plain, serve_tls};
pub use protocol::{PeerService, tls_acceptor};
use refuse::refuse;

/// How often a failing accept is reported (with a count), at most.
const ACCEPT_ERROR_REPORT: Duration = Duration::from_secs(10);

/// The areas of the configuration the server reads: what it listens with,
/// holds connections to, paces streams by and stops by; and whether tokens
/// are required (for the line that says it listens).
#[derive(Clone, Copy)]
pub struct ServerSettings<'a> {
    pub listen: &'a ListenConfig,
    pub limits: &'a LimitsConfig,
    pub transports: &'a TransportsConfig,
    pub shutdown: &'a ShutdownConfig,
    pub access: &'a AccessConfig,
}

/// Serves `router` on `listener` until `shutdown` is cancelled, or until
/// the drain delay has passed once `drain` began; then stops accepting, lets
/// open connections finish (streams end themselves: at once on shutdown,
/// spread over the drain window when draining) and returns, waiting at most
/// `--shutdown-timeout` past the window (past now, on shutdown).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Arc<Limits>,
    metrics: Metrics,
    settings: ServerSettings<'_>,
    shutdown: CancellationToken,
    drain: Drain,
) -> io::Result<()> {
    let tls = match (&settings.listen.tls_cert, &settings.listen.tls_key) {
        (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
        (None, None) => None,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "--tls-cert and --tls-key go together",
            ));
        }
    };
    // Said once the certificate is loaded: the hub serves from here on.
    match listener.local_addr() {
        Ok(addr) => {
            let scheme = if tls.is_some() { "https" } else { "http" };
            if settings.access.jwt.enabled() {
                tracing::info!("crier listening on {scheme}://{addr} (tokens required)");
            } else if addr.ip().is_loopback() {
                tracing::info!(
                    "crier listening on {scheme}://{addr} (open: no token key configured)"
                );
            } else {
                tracing::warn!(
                    "crier listening on {scheme}://{addr} with no token key configured: anyone who reaches it may publish to and read every topic (see docs/SECURITY.md)"
                );
            }
        }
        Err(error) => tracing::warn!(%error, "listening on an unknown address"),
    }
    let protocols = Arc::new(Protocols::new(
        settings.listen,
        settings.limits,
        settings.transports,
    ));
    let graceful = GracefulShutdown::new();
    let mut accept_errors = AcceptErrors::new();
    let lingering = Arc::new(AtomicUsize::new(0));
    let mut sweep = tokio::time::interval(Duration::from_secs(60));
    // Connections hear from here that they should finish: on shutdown, or
    // when a drain stops accepting. (HTTP/2 ones then send GOAWAY, so no new
    // stream opens on them, and end once their open streams have.)
    let closing = shutdown.child_token();
    let stop_accepting = async {
        drain.signal().cancelled().await;
        match drain.stop_accepting_at() {
            Some(at) => {
                tracing::info!(delay = ?settings.shutdown.drain_delay, window = ?settings.shutdown.drain_window, "draining: not ready; closing streams after the delay, spread over the window");
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = shutdown.cancelled() => {}
                }
            }
            None => shutdown.cancelled().await,
        }
    };
    tokio::pin!(stop_accepting);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut stop_accepting => break,
            _ = sweep.tick() => {
                limits.sweep();
                continue;
            }
            accepted = accept_errors.accept(&listener) => accepted,
        };
        let permit = match limits.admit(peer.ip()) {
            Ok(permit) => permit,
            Err(refusal) => {
                tracing::debug!(%peer, ?refusal, "refusing a connection");
                metrics.connection_refused(refusal);
                refuse(stream, refusal, tls.is_some(), &lingering);
                continue;
            }
        };
        // SSE is small writes that must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        set_write_timeout(&stream, settings.limits.write_timeout);
        let conn = Conn {
            protocols: protocols.clone(),
            router: router.clone(),
            watcher: graceful.watcher(),
            shutdown: closing.clone(),
            peer,
            _permit: permit,
            metrics: metrics.clone(),
            tls: tls.is_some(),
        };
        match tls.clone() {
            None => tokio::spawn(logged(peer, serve_plain(stream, conn))),
            Some(acceptor) => tokio::spawn(logged(peer, serve_tls(stream, acceptor, conn))),
        };
    }
    drop(listener);
    closing.cancel();
    let finished = graceful.shutdown();
    tokio::pin!(finished);
    // Draining: streams close until the window ends; then the timeout runs.
    let mut deadline = match drain.window_end() {
        Some(end) if !shutdown.is_cancelled() => end + settings.shutdown.shutdown_timeout,
        _ => tokio::time::Instant::now() + settings.shutdown.shutdown_timeout,
    };
    loop {
        tokio::select! {
            () = &mut finished => return Ok(()),
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(grace = ?settings.shutdown.shutdown_timeout, "shutdown timeout reached; closing remaining connections");
                return Ok(());
            }
            // Ctrl-C or a second SIGTERM while draining: streams end now.
            () = shutdown.cancelled(), if !shutdown.is_cancelled() => {
                tracing::info!("draining cut short");
                deadline = deadline.min(tokio::time::Instant::now() + settings.shutdown.shutdown_timeout);
            }
        }
    }
}

/// Accept failures (out of descriptors, mostly) are reported once per
/// interval with a count, not once per try.
struct AcceptErrors {
    count: u64,
    last_report: Option<tokio::time::Instant>,
    pause: Duration,
}

impl AcceptErrors {
    fn new() -> AcceptErrors {
        AcceptErrors {
            count: 0,
            last_report: None,
            pause: Duration::from_millis(5),
        }
    }

    /// Records a failure; returns how long to wait before accepting again
    /// (doubling up to a second, so a lasting shortage does not spin).
    fn failed(&mut self, error: &io::Error) -> Duration {
        self.count += 1;
        let now = tokio::time::Instant::now();
        if self
            .last_report
            .is_none_or(|t| now >= t + ACCEPT_ERROR_REPORT)
        {
            tracing::warn!(%error, failures = self.count, "accepting connections fails");
            self.count = 0;
            self.last_report = Some(now);
        }
        let pause = self.pause;
        self.pause = (self.pause * 2).min(Duration::from_secs(1));
        pause
    }

    fn succeeded(&mut self) {
        self.pause = Duration::from_millis(5);
    }

    /// The next connection of `listener`; failing accepts are reported and
    /// waited out meanwhile. Cancel-safe: dropped mid-pause, it only skips
    /// the rest of the pause.
    async fn accept(&mut self, listener: &TcpListener) -> (TcpStream, SocketAddr) {
        loop {
            match listener.accept().await {
                Ok(accepted) => {
                    self.succeeded();
                    return accepted;
                }
                Err(error) => tokio::time::sleep(self.failed(&error)).await,
            }
        }
    }
}

/// Has the kernel close the connection when what it sends stays
/// unacknowledged, or the client's window stays shut, for `timeout`
/// (TCP_USER_TIMEOUT): a subscriber that stops reading is cut off in bounded
/// time without a timer of our own per stream. Idle connections are not
/// affected.
fn set_write_timeout(stream: &TcpStream, timeout: Duration) {
    use std::os::fd::AsRawFd;
    let ms = libc::c_uint::try_from(timeout.as_millis()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: a valid socket descriptor and a c_uint option of its size.
    let result = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&ms as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if result != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "cannot set TCP_USER_TIMEOUT");
    }
}
