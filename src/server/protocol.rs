//! TLS and the protocol choice, and serving a connection with it: ALPN
//! over TLS (RFC 9113, 3.2: HTTP/2 over TLS is negotiated, never sniffed),
//! a peek at a plain connection's first bytes otherwise (h2c prior
//! knowledge), looked at again (after 10 ms, then less and less often)
//! while they are only a prefix of the HTTP/2 preface. (hyper-util's
//! sniffing builder would cost every connection an extra 8 KiB of read
//! buffer.) HTTP/1.1 goes to `http1.rs` first, then to hyper's HTTP/1.1
//! with upgrades, for WebSockets; HTTP/2 to hyper's builder directly.
//!
//! An HTTP/1.1 connection's graceful-shutdown watcher is a `ConnectionHold`
//! that an upgrade request carries and its WebSocket keeps: hyper's
//! connection ends when it hands the socket over, and the server must
//! still wait for the socket, which the drain closes at its own moment like
//! any stream. Every request carries its `Peer`; an HTTP/2 connection also
//! carries its `Activity` and closes itself after `--idle-timeout` without
//! a stream, or when a stream has not been polled for the stall timeout
//! (hyper polls a body only when its stream has window, so the client
//! stopped reading it). The connection task holds its `ConnectionPermit`,
//! so caps are released when it ends. Header size and read timeouts are
//! hyper's settings, which `http1.rs` applies too. Never accepts.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::Watcher;
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::connection::{Activity, ConnectionHold, Peer};
use super::http1;
use super::streams::{Running, Streams};
use crate::config::{LimitsConfig, ListenConfig, TransportsConfig};
use crate::drain::WokenOnly;
use crate::limits::ConnectionPermit;
use crate::metrics::{Metrics, Protocol};

type Service = TowerToHyperService<PeerService>;
pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How soon the first bytes of a plain connection are first looked at again
/// while they do not yet tell its protocol (then ever less often).
const TRICKLE_POLL: Duration = Duration::from_millis(10);

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
pub(super) struct Protocols {
    http1: hyper::server::conn::http1::Builder,
    /// HTTP/2's settings; each connection gets a builder of its own, whose
    /// executor runs the connection's streams in its task (`streams.rs`).
    http2: Http2Settings,
    max_header_bytes: usize,
    header_timeout: Duration,
    tls_handshake_timeout: Duration,
    idle_timeout: Duration,
    /// An HTTP/2 stream whose body hyper has not asked for more in this
    /// long is starved of flow-control window (see [`Activity::stalled`]).
    stall_timeout: Duration,
}

/// HTTP/1.1 as both listeners serve it: the header timeout and size limit.
pub(super) fn http1_builder(limits: &LimitsConfig) -> hyper::server::conn::http1::Builder {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        // Also how long a keep-alive connection may idle between
        // requests: hyper starts the timer as soon as it waits for one.
        .header_read_timeout(limits.header_timeout)
        // Bounds the request head, and the read buffer a connection
        // keeps for its whole life.
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    http1
}

impl Protocols {
    pub(super) fn new(
        listen: &ListenConfig,
        limits: &LimitsConfig,
        transports: &TransportsConfig,
    ) -> Protocols {
        let http1 = http1_builder(limits);
        Protocols {
            http1,
            http2: Http2Settings {
                max_streams: listen.http2_max_streams,
                keepalive: listen.http2_keepalive,
                max_header_bytes: limits.max_header_bytes,
            },
            max_header_bytes: limits.max_header_bytes,
            header_timeout: limits.header_timeout,
            tls_handshake_timeout: limits.tls_handshake_timeout,
            idle_timeout: limits.idle_timeout,
            // A healthy stream is asked for more at least every heartbeat:
            // its heartbeat timer wakes it. Twice that leaves room for a
            // busy machine.
            stall_timeout: limits.write_timeout.max(transports.heartbeat * 2),
        }
    }
}

/// What an HTTP/2 connection's builder is made with.
struct Http2Settings {
    max_streams: u32,
    keepalive: Duration,
    max_header_bytes: usize,
}

impl Http2Settings {
    /// The builder of one connection, whose streams `streams` runs.
    fn builder(&self, streams: Streams) -> http2::Builder<Streams> {
        let mut http2 = http2::Builder::new(streams);
        http2
            .timer(TokioTimer::new())
            // Many EventSources share one connection; each is one stream.
            .max_concurrent_streams(self.max_streams)
            // Pings find dead peers on connections that only ever receive.
            .keep_alive_interval(Some(self.keepalive))
            .keep_alive_timeout(self.keepalive)
            // Windows for what clients send us (publishes); streams to
            // clients are paced by the client's window and bounded by the
            // send buffer.
            .initial_stream_window_size(256 * 1024)
            .initial_connection_window_size(1024 * 1024)
            .max_send_buf_size(128 * 1024)
            .max_header_list_size(u32::try_from(self.max_header_bytes).unwrap_or(u32::MAX))
            // WebSockets over HTTP/2 (RFC 8441): a stream opened with an
            // extended CONNECT carries one socket.
            .enable_connect_protocol();
        http2
    }
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
async fn peek_protocol(stream: &TcpStream, timeout: Duration) -> Option<Protocol> {
    let deadline = tokio::time::Instant::now() + timeout;
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
pub(super) struct Conn {
    pub(super) protocols: Arc<Protocols>,
    pub(super) router: Router,
    pub(super) watcher: Watcher,
    /// Watched connections hear of shutdown from `watcher`; before a
    /// connection is watched (TLS handshake, first bytes) it hears here,
    /// and HTTP/2 connections, which close themselves when idle, too.
    pub(super) shutdown: CancellationToken,
    pub(super) peer: SocketAddr,
    /// This connection's share of the caps, released when its task ends.
    pub(super) _permit: ConnectionPermit,
    /// Counts the connection open (by protocol, once known) while served.
    pub(super) metrics: Metrics,
    pub(super) tls: bool,
}

impl Conn {
    /// The router, telling each request who its peer is.
    fn service(&self, activity: Option<Arc<Activity>>) -> Service {
        TowerToHyperService::new(PeerService {
            router: self.router.clone(),
            peer: Peer(self.peer),
            activity,
            hold: None,
        })
    }

    async fn serve_http1<I>(self, io: I) -> Result<(), BoxError>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let _open = self.metrics.connection(Protocol::Http1, self.tls);
        // Graceful shutdown waits for this task while it holds the watcher,
        // and for a WebSocket this connection upgrades to while that holds
        // it; the connection hears of shutdown from `self.shutdown`.
        let hold = ConnectionHold(Arc::new(self.watcher));
        let mut io = io;
        let header_timeout = spread(self.protocols.header_timeout);
        // Subscribe requests first: crier reads and answers them itself.
        let limits = http1::HeadLimits {
            timeout: header_timeout,
            max_bytes: self.protocols.max_header_bytes,
        };
        let mut service = PeerService {
            router: self.router.clone(),
            peer: Peer(self.peer),
            activity: None,
            hold: Some(hold),
        };
        let mut call = |request| tower::Service::call(&mut service, request);
        let read = match http1::serve(&mut io, &mut call, &limits, &self.shutdown).await {
            http1::After::Close => return Ok(()),
            http1::After::Hyper(read) => read,
        };
        let mut builder = self.protocols.http1.clone();
        builder.header_read_timeout(header_timeout);
        // With upgrades: a WebSocket handshake hands the connection over to
        // its socket task, after which this future ends. Boxed: hyper's
        // connection state would otherwise size every HTTP/1.1 task, the
        // event streams' too.
        let mut conn = Box::pin(
            builder
                .serve_connection(
                    TokioIo::new(http1::Prefixed::new(read, io)),
                    TowerToHyperService::new(service),
                )
                .with_upgrades(),
        );
        tokio::select! {
            result = conn.as_mut() => return Ok(result?),
            () = self.shutdown.cancelled() => {}
        }
        conn.as_mut().graceful_shutdown();
        Ok(conn.await?)
    }

    /// Serves HTTP/2 until the client leaves, the hub shuts down, no
    /// stream has been open for the idle timeout (pings alone do not keep a
    /// connection: a client that only answers them holds a descriptor for
    /// nothing), or a stream has been starved of window for the stall
    /// timeout.
    async fn serve_http2<I>(self, io: I) -> Result<(), BoxError>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let _open = self.metrics.connection(Protocol::Http2, self.tls);
        let activity = Arc::new(Activity::new());
        let streams = Streams::default();
        let conn = self
            .protocols
            .http2
            .builder(streams.clone())
            .serve_connection(TokioIo::new(io), self.service(Some(activity.clone())));
        // Holding the watcher keeps graceful shutdown waiting for this task;
        // the connection hears of shutdown from `self.shutdown`.
        let _watcher = self.watcher;
        // The connection boxed (HTTP/2 carries many streams on one
        // connection, and its larger state would otherwise be carried by
        // every HTTP/1.1 connection's task), its streams run beside it.
        let mut conn = Running::new(conn, &streams);
        // Polled only when one of them fired, not on each of the
        // connection's wake-ups (every delivery of every stream on it).
        // The stall check's ticks fire its waker, so from the first one on
        // every `WokenOnly` in the process also loads its own flag.
        let mut ends = WokenOnly::new(async {
            tokio::select! {
                () = self.shutdown.cancelled() => Ending::Shutdown,
                () = activity.idle_for(self.protocols.idle_timeout) => Ending::Idle,
                () = activity.stalled(self.protocols.stall_timeout) => Ending::Stalled,
            }
        });
        let ending = tokio::select! {
            biased;
            result = &mut conn => return Ok(result?),
            ending = &mut ends => ending,
        };
        match ending {
            Ending::Shutdown => {}
            Ending::Idle => {
                tracing::debug!(peer = %self.peer, "closing an idle HTTP/2 connection");
            }
            Ending::Stalled => {
                // A graceful close would wait for the starved stream, which
                // never ends: drop the connection, and every stream on it
                // resumes exactly when the client reconnects.
                tracing::info!(
                    peer = %self.peer,
                    "closing an HTTP/2 connection: a stream took nothing for {:?}",
                    self.protocols.stall_timeout
                );
                return Ok(());
            }
        }
        conn.connection().graceful_shutdown();
        Ok(conn.await?)
    }
}

/// Why an HTTP/2 connection is closed before its client closes it.
enum Ending {
    Shutdown,
    Idle,
    Stalled,
}

/// The router for one connection: it adds the peer (and, on HTTP/2, the
/// connection's activity; on HTTP/1.1, to an upgrade, its hold) to every
/// request.
#[derive(Clone)]
pub struct PeerService {
    pub(super) router: Router,
    pub(super) peer: Peer,
    pub(super) activity: Option<Arc<Activity>>,
    pub(super) hold: Option<ConnectionHold>,
}

impl<B> tower::Service<axum::http::Request<B>> for PeerService
where
    B: axum::body::HttpBody<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = <Router as tower::Service<axum::http::Request<B>>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tower::Service::<axum::http::Request<B>>::poll_ready(&mut self.router, cx)
    }

    fn call(&mut self, mut request: axum::http::Request<B>) -> Self::Future {
        request.extensions_mut().insert(self.peer);
        if let Some(activity) = &self.activity {
            request.extensions_mut().insert(activity.clone());
        }
        if let Some(hold) = &self.hold
            && request.headers().contains_key(axum::http::header::UPGRADE)
        {
            request.extensions_mut().insert(hold.clone());
        }
        self.router.call(request)
    }
}

/// A connection's own share of a read timeout: between 80 and 100 % of it,
/// spread evenly over the connections in the order they arrive. Connections
/// that arrive together (a flood of slow or silent clients) would otherwise
/// all time out, and come back, in the same instant.
fn spread(timeout: Duration) -> Duration {
    /// The golden ratio's fractional part: its multiples spread over [0, 1)
    /// as evenly as any sequence can.
    const PHI_FRACTION: f64 = 0.618_033_988_749_894_9;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let fraction = (n as f64 * PHI_FRACTION).fract();
    timeout.mul_f64(1.0 - 0.2 * fraction)
}

/// Runs one connection to its end; how it ended matters only when debugging.
pub(super) async fn logged(
    peer: SocketAddr,
    connection: impl Future<Output = Result<(), BoxError>>,
) {
    if let Err(error) = connection.await {
        tracing::debug!(%error, %peer, "connection ended with an error");
    }
}

/// Serves one plain connection: HTTP/1.1, or HTTP/2 with prior knowledge.
pub(super) async fn serve_plain(stream: TcpStream, c: Conn) -> Result<(), BoxError> {
    let protocol = tokio::select! {
        protocol = peek_protocol(&stream, spread(c.protocols.header_timeout)) => protocol,
        () = c.shutdown.cancelled() => return Ok(()),
    };
    match protocol {
        // The client left or said nothing in time.
        None => Ok(()),
        Some(Protocol::Http1) => c.serve_http1(stream).await,
        Some(Protocol::Http2) => c.serve_http2(stream).await,
    }
}

/// Serves one TLS connection with the protocol ALPN chose (RFC 9113, 3.2:
/// HTTP/2 over TLS is negotiated, never sniffed).
pub(super) async fn serve_tls(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    c: Conn,
) -> Result<(), BoxError> {
    let handshake = tokio::time::timeout(
        spread(c.protocols.tls_handshake_timeout),
        acceptor.accept(stream),
    );
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
        c.serve_http2(stream).await
    } else {
        c.serve_http1(stream).await
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
