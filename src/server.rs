//! Accepting connections and speaking HTTP on them.
//!
//! A plain listener serves HTTP/1.1, and HTTP/2 to clients that start with
//! its preface (h2c with prior knowledge, for service-to-service
//! subscribers). With a certificate, the listener serves TLS instead and
//! offers `h2` and `http/1.1` by ALPN: browsers speak HTTP/2 only over TLS,
//! and over HTTP/1.1 they allow just six connections, hence six
//! EventSources, per origin.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

type Service = TowerToHyperService<Router>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a client may take to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How soon the first bytes of a plain connection are first looked at again
/// while they do not yet tell its protocol (then ever less often).
const TRICKLE_POLL: Duration = Duration::from_millis(10);
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

/// The HTTP builders, one per protocol, with settings chosen for many
/// long-lived streams.
///
/// A connection is served by its protocol's own builder once the protocol is
/// known (by ALPN over TLS, by a peek at the first bytes of a plain
/// connection), not by hyper-util's sniffing builder: that one hands hyper
/// the first 24 bytes in a read of their own, after which hyper grows its
/// read buffer from 8 to 16 KiB, on every connection.
struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Protocols {
    fn new(config: &Config) -> Protocols {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .keep_alive(true);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            // Many EventSources share one connection; each is one stream.
            .max_concurrent_streams(config.http2_max_streams)
            // Pings find dead peers on connections that only ever receive.
            .keep_alive_interval(Some(config.http2_keepalive))
            .keep_alive_timeout(config.http2_keepalive)
            // Windows for what clients send us (publishes); streams to
            // clients are paced by the client's window and bounded by the
            // send buffer.
            .initial_stream_window_size(256 * 1024)
            .initial_connection_window_size(1024 * 1024)
            .max_send_buf_size(128 * 1024);
        Protocols { http1, http2 }
    }
}

/// The protocol of a plain connection.
#[derive(Debug, PartialEq, Eq)]
enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
}

/// The client preface of HTTP/2 (RFC 9113, 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection's first bytes say; `None` while they are a strict
/// prefix of the HTTP/2 preface.
fn classify(first: &[u8]) -> Option<Protocol> {
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] != H2_PREFACE[..n] {
        Some(Protocol::Http1)
    } else if n == H2_PREFACE.len() {
        Some(Protocol::Http2)
    } else {
        None
    }
}

/// Looks at a plain connection's first bytes without consuming them. When
/// they are a strict prefix of the HTTP/2 preface (a client whose first
/// bytes trickle in; rare), it looks again shortly, until they tell.
/// `None` when the client leaves or does not tell within the header timeout.
async fn peek_protocol(stream: &TcpStream) -> Option<Protocol> {
    let deadline = tokio::time::Instant::now() + HEADER_READ_TIMEOUT;
    let mut first = [0u8; 24];
    let mut pause = TRICKLE_POLL;
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut first))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if let Some(protocol) = classify(&first[..n]) {
            return Some(protocol);
        }
        // A peek returns at once while any byte is there: wait before
        // looking again rather than spin, longer each time, so that a client
        // that stops mid-preface costs a handful of wake-ups, not a stream.
        tokio::time::timeout_at(deadline, tokio::time::sleep(pause))
            .await
            .ok()?;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// What a connection's task needs besides its socket.
struct Conn {
    protocols: Arc<Protocols>,
    service: Service,
    watcher: Watcher,
    /// Watched connections hear of shutdown from `watcher`; before a
    /// connection is watched (TLS handshake, first bytes) it hears here.
    shutdown: CancellationToken,
    peer: SocketAddr,
}

/// Runs one connection to its end; how it ended matters only when debugging.
async fn logged(peer: SocketAddr, connection: impl Future<Output = Result<(), BoxError>>) {
    if let Err(error) = connection.await {
        tracing::debug!(%error, %peer, "connection ended with an error");
    }
}

/// Serves one plain connection: HTTP/1.1, or HTTP/2 with prior knowledge.
async fn serve_plain(stream: TcpStream, c: Conn) -> Result<(), BoxError> {
    let protocol = tokio::select! {
        protocol = peek_protocol(&stream) => protocol,
        () = c.shutdown.cancelled() => return Ok(()),
    };
    match protocol {
        // The client left or said nothing in time.
        None => Ok(()),
        Some(Protocol::Http1) => {
            let conn = c
                .protocols
                .http1
                .serve_connection(TokioIo::new(stream), c.service);
            Ok(c.watcher.watch(conn).await?)
        }
        // Boxed: HTTP/2 carries many streams on one connection, and its
        // larger state would otherwise be carried by every HTTP/1.1
        // connection's task.
        Some(Protocol::Http2) => {
            let conn = c
                .protocols
                .http2
                .serve_connection(TokioIo::new(stream), c.service);
            Ok(Box::pin(c.watcher.watch(conn)).await?)
        }
    }
}

/// Serves one TLS connection with the protocol ALPN chose (RFC 9113, 3.2:
/// HTTP/2 over TLS is negotiated, never sniffed).
async fn serve_tls(stream: TcpStream, acceptor: TlsAcceptor, c: Conn) -> Result<(), BoxError> {
    let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream));
    let stream = tokio::select! {
        handshake = handshake => match handshake {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                tracing::debug!(%error, peer = %c.peer, "TLS handshake failed");
                return Ok(());
            }
            Err(_) => {
                tracing::debug!(peer = %c.peer, "TLS handshake timed out");
                return Ok(());
            }
        },
        () = c.shutdown.cancelled() => return Ok(()),
    };
    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        let conn = c
            .protocols
            .http2
            .serve_connection(TokioIo::new(stream), c.service);
        Ok(c.watcher.watch(conn).await?)
    } else {
        let conn = c
            .protocols
            .http1
            .serve_connection(TokioIo::new(stream), c.service);
        Ok(c.watcher.watch(conn).await?)
    }
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
    // Said once the certificate is loaded: the hub serves from here on.
    match listener.local_addr() {
        Ok(addr) => {
            let scheme = if tls.is_some() { "https" } else { "http" };
            if config.jwt.enabled() {
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
    let protocols = Arc::new(Protocols::new(config));
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
        let conn = Conn {
            protocols: protocols.clone(),
            service: TowerToHyperService::new(router.clone()),
            watcher: graceful.watcher(),
            shutdown: shutdown.clone(),
            peer,
        };
        match tls.clone() {
            None => tokio::spawn(logged(peer, serve_plain(stream, conn))),
            Some(acceptor) => tokio::spawn(logged(peer, serve_tls(stream, acceptor, conn))),
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_bytes_tell_the_protocol_as_soon_as_they_can() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"PO"), Some(Protocol::Http1));
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        let mut more = H2_PREFACE.to_vec();
        more.extend_from_slice(b"\0\0\0\x04");
        assert_eq!(classify(&more), Some(Protocol::Http2));
    }
}
