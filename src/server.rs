//! Accepting connections and speaking HTTP on them.
//!
//! A plain listener serves HTTP/1.1, and HTTP/2 to clients that start with
//! its preface (h2c with prior knowledge, for service-to-service
//! subscribers). With a certificate, the listener serves TLS instead and
//! offers `h2` and `http/1.1` by ALPN: browsers speak HTTP/2 only over TLS,
//! and over HTTP/1.1 they allow just six connections, hence six
//! EventSources, per origin.
//!
//! The accept loop: admits each connection through `Limits::admit` before
//! anything else (a refused plain connection gets a canned 503 or 429 written
//! once; a refused TLS one is closed before its handshake), reports failing
//! accepts once per interval, sets TCP_NODELAY, TLS (rustls, ALPN `h2` and
//! `http/1.1`) when a certificate is configured, and graceful, time-bounded
//! shutdown. Each connection is served as HTTP/1.1 (`http1.rs` first, then
//! hyper's HTTP/1.1 with upgrades, for WebSockets) or by hyper's HTTP/2
//! builder directly (and counted open, by protocol and TLS, while it is),
//! chosen by ALPN over TLS or by a peek at a plain connection's first bytes
//! (h2c prior knowledge), looked at again (after 10 ms, then less and less
//! often) while they are only a prefix of the HTTP/2 preface. (hyper-util's
//! sniffing builder would cost every connection an extra 8 KiB of read
//! buffer.) On shutdown, or once a drain's delay has passed, it stops
//! accepting and has connections finish (HTTP/2: `GOAWAY`), waiting at most
//! `--shutdown-timeout` past the drain window. An HTTP/1.1 connection's
//! graceful-shutdown watcher is a `ConnectionHold` that an upgrade request
//! carries and its WebSocket keeps: hyper's connection ends when it hands the
//! socket over, and the server must still wait for the socket, which the
//! drain closes at its own moment like any stream. Every request carries its
//! `Peer`; an HTTP/2 connection also carries its `Activity` (open streams,
//! and when hyper last polled each one's body) and closes itself after
//! `--idle-timeout` without a stream, or when a stream has not been polled
//! for the stall timeout (hyper polls a body only when its stream has window,
//! so the client stopped reading it). The connection task holds its
//! `ConnectionPermit`, so caps are released when it ends. Header size and
//! read timeouts are hyper's settings, which `http1.rs` applies too.
//! `serve_metrics` serves the `--metrics-listen` listener on its own:
//! HTTP/1.1, a few connections of bounded life.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http2;

use crate::http1;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::connection::{Activity, ConnectionHold, Peer};
use crate::drain::Drain;
use crate::limits::{ConnectionPermit, Limits, Refusal};
use crate::metrics::{ConnectionRefusal, Metrics};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

type Service = TowerToHyperService<PeerService>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How soon the first bytes of a plain connection are first looked at again
/// while they do not yet tell its protocol (then ever less often).
const TRICKLE_POLL: Duration = Duration::from_millis(10);
/// How often a failing accept is reported (with a count), at most.
const ACCEPT_ERROR_REPORT: Duration = Duration::from_secs(10);
/// Refused connections that may wait at once for their client to read the
/// refusal; past that, they are just closed.
const MAX_LINGERING: usize = 64;

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
    http1: hyper::server::conn::http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    max_header_bytes: usize,
    header_timeout: Duration,
    tls_handshake_timeout: Duration,
    idle_timeout: Duration,
    /// An HTTP/2 stream whose body hyper has not asked for more in this
    /// long is starved of flow-control window (see [`Activity::stalled`]).
    stall_timeout: Duration,
}

/// HTTP/1.1 as both listeners serve it: the header timeout and size limit.
fn http1_builder(config: &Config) -> hyper::server::conn::http1::Builder {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        // Also how long a keep-alive connection may idle between
        // requests: hyper starts the timer as soon as it waits for one.
        .header_read_timeout(config.header_timeout)
        // Bounds the request head, and the read buffer a connection
        // keeps for its whole life.
        .max_buf_size(config.max_header_bytes.max(8192))
        .keep_alive(true);
    http1
}

impl Protocols {
    fn new(config: &Config) -> Protocols {
        let http1 = http1_builder(config);
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
            .max_send_buf_size(128 * 1024)
            .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX))
            // WebSockets over HTTP/2 (RFC 8441): a stream opened with an
            // extended CONNECT carries one socket.
            .enable_connect_protocol();
        Protocols {
            http1,
            http2,
            max_header_bytes: config.max_header_bytes,
            header_timeout: config.header_timeout,
            tls_handshake_timeout: config.tls_handshake_timeout,
            idle_timeout: config.idle_timeout,
            // A healthy stream is asked for more at least every heartbeat:
            // its heartbeat timer wakes it. Twice that leaves room for a
            // busy machine.
            stall_timeout: config.write_timeout.max(config.heartbeat * 2),
        }
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
struct Conn {
    protocols: Arc<Protocols>,
    router: Router,
    watcher: Watcher,
    /// Watched connections hear of shutdown from `watcher`; before a
    /// connection is watched (TLS handshake, first bytes) it hears here,
    /// and HTTP/2 connections, which close themselves when idle, too.
    shutdown: CancellationToken,
    peer: SocketAddr,
    /// This connection's share of the caps, released when its task ends.
    _permit: ConnectionPermit,
    /// Counts the connection open (by protocol, once known) while served.
    metrics: Metrics,
    tls: bool,
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
        let _open = self
            .metrics
            .connection(crate::metrics::Protocol::Http1, self.tls);
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
        let _open = self
            .metrics
            .connection(crate::metrics::Protocol::Http2, self.tls);
        let activity = Arc::new(Activity::new());
        let conn = self
            .protocols
            .http2
            .serve_connection(TokioIo::new(io), self.service(Some(activity.clone())));
        // Holding the watcher keeps graceful shutdown waiting for this task;
        // the connection hears of shutdown from `self.shutdown`.
        let _watcher = self.watcher;
        // Boxed: HTTP/2 carries many streams on one connection, and its
        // larger state would otherwise be carried by every HTTP/1.1
        // connection's task.
        let mut conn = Box::pin(conn);
        let idle = activity.idle_for(self.protocols.idle_timeout);
        tokio::pin!(idle);
        let stalled = activity.stalled(self.protocols.stall_timeout);
        tokio::pin!(stalled);
        tokio::select! {
            result = conn.as_mut() => return Ok(result?),
            () = self.shutdown.cancelled() => {}
            () = &mut idle => tracing::debug!(peer = %self.peer, "closing an idle HTTP/2 connection"),
            () = &mut stalled => {
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
        conn.as_mut().graceful_shutdown();
        Ok(conn.await?)
    }
}

/// The router for one connection: it adds the peer (and, on HTTP/2, the
/// connection's activity; on HTTP/1.1, to an upgrade, its hold) to every
/// request.
#[derive(Clone)]
pub struct PeerService {
    router: Router,
    peer: Peer,
    activity: Option<Arc<Activity>>,
    hold: Option<ConnectionHold>,
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
async fn logged(peer: SocketAddr, connection: impl Future<Output = Result<(), BoxError>>) {
    if let Err(error) = connection.await {
        tracing::debug!(%error, %peer, "connection ended with an error");
    }
}

/// Serves one plain connection: HTTP/1.1, or HTTP/2 with prior knowledge.
async fn serve_plain(stream: TcpStream, c: Conn) -> Result<(), BoxError> {
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
async fn serve_tls(stream: TcpStream, acceptor: TlsAcceptor, c: Conn) -> Result<(), BoxError> {
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

/// Turns a refused connection away as cheaply as possible: on a plain
/// listener with the canned HTTP/1.1 answer, written once without waiting;
/// over TLS by closing it (answering would cost a handshake). A few refused
/// connections wait briefly for the client to send its request, so the
/// close does not destroy the answer (a close with unread data resets).
fn refuse(stream: TcpStream, refusal: Refusal, tls: bool, lingering: &Arc<AtomicUsize>) {
    if tls {
        return;
    }
    let _ = stream.try_write(canned(refusal));
    if lingering.fetch_add(1, Ordering::Relaxed) >= MAX_LINGERING {
        lingering.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let lingering = lingering.clone();
    tokio::spawn(async move {
        let mut stream = stream;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
        // Read what the client sends (its request) until it pauses, at most
        // half a second, then close with nothing unread.
        let mut sink = [0u8; 4096];
        let drain = async {
            loop {
                let read = tokio::io::AsyncReadExt::read(&mut stream, &mut sink);
                match tokio::time::timeout(Duration::from_millis(50), read).await {
                    Ok(Ok(n)) if n > 0 => continue,
                    _ => break,
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
        lingering.fetch_sub(1, Ordering::Relaxed);
    });
}

/// The whole HTTP/1.1 answer to a refused connection, made once.
fn canned(refusal: Refusal) -> &'static [u8] {
    static FULL: LazyLock<Vec<u8>> = LazyLock::new(|| {
        answer(
            503,
            "Service Unavailable",
            "over-capacity",
            "the hub holds all the connections it may; try again shortly",
            5,
        )
    });
    static CLIENT: LazyLock<Vec<u8>> = LazyLock::new(|| {
        answer(
            429,
            "Too Many Requests",
            "too-many-connections",
            "this client has too many connections open, or opens them too fast",
            1,
        )
    });
    match refusal {
        Refusal::Full => &FULL,
        Refusal::ClientConnections | Refusal::ConnectionRate => &CLIENT,
    }
}

fn answer(status: u16, title: &str, kind: &str, detail: &str, retry_after: u32) -> Vec<u8> {
    let body = serde_json::json!({
        "type": format!("urn:crier:problem:{kind}"),
        "title": title,
        "status": status,
        "detail": detail,
    })
    .to_string();
    format!(
        "HTTP/1.1 {status} {title}\r\ncontent-type: application/problem+json\r\nretry-after: {retry_after}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
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

/// Serves `router` on `listener` until `shutdown` is cancelled, or until
/// the drain delay has passed once `drain` began; then stops accepting, lets
/// open connections finish (streams end themselves: at once on shutdown,
/// spread over the drain window when draining) and returns, waiting at most
/// `config.shutdown_timeout` past the window (past now, on shutdown).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Arc<Limits>,
    metrics: Metrics,
    config: &Config,
    shutdown: CancellationToken,
    drain: Drain,
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
                tracing::info!(delay = ?config.drain_delay, window = ?config.drain_window, "draining: not ready; closing streams after the delay, spread over the window");
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
                metrics.connection_refused(match refusal {
                    Refusal::Full => ConnectionRefusal::Capacity,
                    Refusal::ClientConnections => ConnectionRefusal::ClientConnections,
                    Refusal::ConnectionRate => ConnectionRefusal::ConnectionRate,
                });
                refuse(stream, refusal, tls.is_some(), &lingering);
                continue;
            }
        };
        // SSE is small writes that must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        set_write_timeout(&stream, config.write_timeout);
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
        Some(end) if !shutdown.is_cancelled() => end + config.shutdown_timeout,
        _ => tokio::time::Instant::now() + config.shutdown_timeout,
    };
    loop {
        tokio::select! {
            () = &mut finished => return Ok(()),
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(grace = ?config.shutdown_timeout, "shutdown timeout reached; closing remaining connections");
                return Ok(());
            }
            // Ctrl-C or a second SIGTERM while draining: streams end now.
            () = shutdown.cancelled(), if !shutdown.is_cancelled() => {
                tracing::info!("draining cut short");
                deadline = deadline.min(tokio::time::Instant::now() + config.shutdown_timeout);
            }
        }
    }
}

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
    config: &Config,
    shutdown: CancellationToken,
) {
    let http1 = http1_builder(config);
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
            refuse(stream, Refusal::Full, false, &lingering);
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
