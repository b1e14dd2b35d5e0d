//! Accepting connections and speaking HTTP on them.
//!
//! A plain listener serves HTTP/1.1, and HTTP/2 to clients that start with
//! its preface (h2c with prior knowledge, for service-to-service
//! subscribers). With a certificate, the listener serves TLS instead and
//! offers `h2` and `http/1.1` by ALPN: browsers speak HTTP/2 only over TLS,
//! and over HTTP/1.1 they allow just six connections, hence six
//! EventSources, per origin.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// How long a client may take to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send its request headers (HTTP/1.1).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds the TLS acceptor for `--tls-cert` and `--tls-key`.
pub fn tls_acceptor(cert: &Path, key: &Path) -> io::Result<TlsAcceptor> {
    let bad = |what: &Path, e: &dyn std::fmt::Display| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot load {}: {e}", what.display()),
        )
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, &e))?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| bad(cert, &e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The HTTP protocol settings, chosen for many long-lived streams.
fn http_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        // Many EventSources share one connection; each is one stream.
        .max_concurrent_streams(config.http2_max_streams)
        // Pings find dead peers on connections that only ever receive.
        .keep_alive_interval(Some(config.http2_keepalive))
        .keep_alive_timeout(config.http2_keepalive)
        // Windows for what clients send us (publishes); streams to clients
        // are paced by the client's window and bounded by the send buffer.
        .initial_stream_window_size(256 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .max_send_buf_size(128 * 1024);
    builder
}

/// Serves `router` on `listener` until `shutdown` is cancelled; then stops
/// accepting, lets open connections finish (streams end themselves on the
/// same signal) and returns, waiting at most `config.shutdown_timeout`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: &Config,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
        (None, None) => None,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "--tls-cert and --tls-key go together",
            ));
        }
    };
    let builder = Arc::new(http_builder(config));
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors, most likely: wait instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // SSE is small writes that must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let result = match tls {
                None => {
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(error)) => {
                                tracing::debug!(%error, %peer, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        };
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => Ok(()),
        () = tokio::time::sleep(config.shutdown_timeout) => {
            tracing::warn!(grace = ?config.shutdown_timeout, "shutdown timeout reached; closing remaining connections");
            Ok(())
        }
    }
}
