//! A subscription over a WebSocket, and publishing over the same socket.
//!
//! The handshake went through everything an SSE request does (origin,
//! limits, tokens, tickets, cookies, start position); this module serves the
//! socket: the engine's frames out, pings as heartbeats (a peer that has
//! not answered one by the next heartbeat is closed), and `publish` frames
//! in, each stored the way an HTTP publish is and answered with an `ack` or
//! a `problem`. A frame over the size limit, one that is not UTF-8 or not a
//! client frame's JSON, or a binary one closes the socket with its code;
//! nothing of it is stored.
//!
//! axum checks the handshake ([`WebSocketUpgrade`]) but crier answers it and
//! runs the socket on tokio-tungstenite itself: axum's socket can neither
//! send pre-built frames nor hand its connection to [`Inflating`], which
//! inflates compressed client messages before tungstenite (which refuses
//! them) reads them. tungstenite reads, answers pings, and sends replies
//! and the close frame; a batch of the engine's frames (already the bytes
//! of the wire, `transport::websocket::Batch`) is written to the
//! connection directly, once tungstenite has nothing pending: through
//! tungstenite each frame cost a message and a copy into its buffer. The
//! batches are written inside one poll ([`Pump`]), as crier's own HTTP/1.1
//! writes an SSE stream's; the socket's async loop wakes only for what
//! needs tungstenite or the handler. Over plain HTTP/1.1 the socket runs on
//! its `TcpStream`, taken back from hyper's upgrade ([`Conn`]).

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::{ConnectionNotUpgradable, WebSocketUpgradeRejection};
use axum::http::header::{self, HeaderValue};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::response::Response;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use bytes::{Buf, Bytes};
use futures_util::{SinkExt, Stream, StreamExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tungstenite::Message;
use tungstenite::protocol::{Role, WebSocketConfig};

use super::client_slot::HeldSlot;
use super::publish::{Published, item_event, store_one};
use super::{ApiError, AppState};
use crate::auth::Principal;
use crate::metrics::BytesWritten;
use crate::server::Prefixed;
use crate::server::connection::{ConnectionHold, StreamActivity};
use crate::store::{Appended, IdempotencyKey};
use crate::subscription::{StreamSettings, Subscription};
use crate::transport::permessage_deflate::{Inflating, negotiate};
use crate::transport::websocket::{Batch, Frames, close, close_frame};

/// A WebSocket handshake that passed axum's checks, with what crier needs
/// to answer it: the connection's upgrade, the key (HTTP/1.1), and the
/// answer to the client's permessage-deflate offers if one is acceptable.
pub struct Handshake {
    on_upgrade: OnUpgrade,
    key: Option<HeaderValue>,
    deflate: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Handshake {
    type Rejection = WebSocketUpgradeRejection;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // axum's checks take the upgrade away; a clone shares it.
        let on_upgrade = parts.extensions.get::<OnUpgrade>().cloned();
        let _checked = WebSocketUpgrade::from_request_parts(parts, state).await?;
        let on_upgrade = on_upgrade.ok_or(WebSocketUpgradeRejection::ConnectionNotUpgradable(
            ConnectionNotUpgradable::default(),
        ))?;
        let key = (parts.method != Method::CONNECT)
            .then(|| parts.headers.get(header::SEC_WEBSOCKET_KEY).cloned())
            .flatten();
        let offers = parts.headers.get_all(header::SEC_WEBSOCKET_EXTENSIONS);
        let deflate = negotiate(offers.iter().filter_map(|value| value.to_str().ok()));
        Ok(Handshake {
            on_upgrade,
            key,
            deflate,
        })
    }
}

/// What a socket needs besides its subscription.
pub struct Socket {
    state: AppState,
    /// Who publishes on this socket, or why no one may (as problem fields).
    publisher: Result<Principal, serde_json::Value>,
    /// The client, for publish rates.
    client: String,
    /// The socket's share of its client's cap, held until it closes.
    _slot: Option<HeldSlot>,
    /// Over HTTP/2, the socket's stream, open while the socket lives and
    /// noted each time a write goes through (see `connection::Activity`): a
    /// socket whose peer stopped reading ends its connection like a starved
    /// SSE stream.
    stream: Option<StreamActivity>,
    /// Over HTTP/1.1, the connection's hold on the server's shutdown: the
    /// server waits for the socket as for any connection, so a drain closes
    /// it at its moment of the window, with a `farewell`, like an SSE
    /// stream.
    _hold: Option<ConnectionHold>,
}

impl Socket {
    pub fn new(
        state: AppState,
        publisher: Result<Principal, serde_json::Value>,
        client: String,
        slot: Option<HeldSlot>,
        stream: Option<StreamActivity>,
        hold: Option<ConnectionHold>,
    ) -> Socket {
        Socket {
            state,
            publisher,
            client,
            _slot: slot,
            stream,
            _hold: hold,
        }
    }
}

/// A frame a client sends. Only `publish` is understood.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFrame {
    #[serde(rename = "type")]
    _kind: ClientFrameKind,
    topic: String,
    data: serde_json::Value,
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
    /// The client's own tag, echoed in the answer.
    #[serde(default, rename = "ref")]
    reference: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ClientFrameKind {
    Publish,
}

/// Bytes a socket reads at a time, allocated when the socket opens: a
/// client sends pongs and small publishes (a larger frame is read whole
/// all the same), so an idle socket costs little more than an SSE stream.
const READ_BUFFER: usize = 512;
/// Frames are gathered up to this size before a write (and always written
/// at the end of a batch).
const WRITE_BUFFER: usize = 16 * 1024;

/// Answers the handshake and serves the socket. Frames (and messages) are
/// limited to what an HTTP publish body may be (`--max-batch-bytes`).
/// permessage-deflate is accepted when offered acceptably and
/// `--ws-deflate` is on.
pub fn upgrade(
    handshake: Handshake,
    subscription: Subscription,
    settings: StreamSettings,
    socket: Socket,
) -> Response {
    let limit = socket.state.config.limits.max_batch_bytes;
    let deflate = handshake
        .deflate
        .filter(|_| socket.state.config.transports.ws_deflate);
    // tungstenite's defaults (128 KiB each, the read buffer allocated up
    // front) would cost an idle socket ~8 times an idle SSE stream. A
    // write of several frames still goes out as one.
    let config = WebSocketConfig::default()
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit))
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER);
    let compressed = deflate.is_some();
    let on_upgrade = handshake.on_upgrade;
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                tracing::debug!(%error, "a WebSocket handshake did not upgrade");
                return;
            }
        };
        let io = Inflating::new(Conn::of(upgraded), compressed.then_some(limit));
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        serve(ws, subscription, settings, socket, compressed).await;
    });
    let mut response = Response::new(Body::empty());
    let headers = response.headers_mut();
    // Over HTTP/2 (RFC 8441) a 200 with no key; over HTTP/1.1 a 101.
    if let Some(key) = handshake.key {
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        if let Ok(accept) = HeaderValue::try_from(accept) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        }
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    }
    if let Some(answer) = deflate.and_then(|answer| HeaderValue::try_from(answer).ok()) {
        response
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_EXTENSIONS, answer);
    }
    response
}

/// The socket: the upgraded connection, through [`Inflating`].
type Ws = WebSocketStream<Inflating<Conn>>;

/// The connection a socket runs on. Over plain HTTP/1.1, the `TcpStream`
/// itself, taken back from hyper's upgrade: a batch goes to it with no
/// layer between, and a read is tried only when it is readable, as on an
/// SSE stream (through the upgrade's layers, and a gate of its own for
/// reads, each of the socket's turns touched two more allocations, which
/// thousands of sockets keep out of the cache). Otherwise (TLS, HTTP/2)
/// hyper's upgraded connection.
enum Conn {
    Tcp {
        /// Bytes read from the connection before the socket took it.
        unread: Bytes,
        tcp: TcpStream,
    },
    Upgraded(TokioIo<Upgraded>),
}

impl Conn {
    fn of(upgraded: Upgraded) -> Conn {
        match upgraded.downcast::<TokioIo<Prefixed<TcpStream>>>() {
            Ok(parts) => {
                // hyper read what it holds through the prefix, so any of
                // the prefix it left comes after it.
                let (rest, tcp) = parts.io.into_inner().into_parts();
                let mut unread = Vec::with_capacity(parts.read_buf.len() + rest.len());
                unread.extend_from_slice(&parts.read_buf);
                unread.extend_from_slice(&rest);
                Conn::Tcp {
                    unread: Bytes::from(unread),
                    tcp,
                }
            }
            Err(upgraded) => Conn::Upgraded(TokioIo::new(upgraded)),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp { unread, .. } if !unread.is_empty() => {
                let n = buf.remaining().min(unread.len());
                buf.put_slice(&unread.split_to(n));
                Poll::Ready(Ok(()))
            }
            Conn::Tcp { tcp, .. } => Pin::new(tcp).poll_read(cx, buf),
            Conn::Upgraded(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp { tcp, .. } => Pin::new(tcp).poll_write(cx, buf),
            Conn::Upgraded(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp { tcp, .. } => Pin::new(tcp).poll_flush(cx),
            Conn::Upgraded(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp { tcp, .. } => Pin::new(tcp).poll_shutdown(cx),
            Conn::Upgraded(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

/// How a socket learns that its connection may have something to read.
enum Reads {
    /// The `TcpStream`'s readiness, with the task's own waker.
    Tcp,
    /// A gate the connection's reads wake (hyper's upgraded connection).
    Gate { gate: Arc<ReadGate>, waker: Waker },
}

/// What the socket's loop must do besides writing the engine's batches,
/// which [`Pump`] does itself, without leaving its poll.
enum Turn {
    /// The peer sent something (or its side failed).
    Read(Option<Result<Message, tungstenite::Error>>),
    /// The stream's last batch is written: its close frame goes through
    /// tungstenite, which must know the socket is closing.
    Close(Message),
    /// The stream ended.
    Ended,
    /// A ping went out and the peer answered nothing by the next
    /// heartbeat.
    Silent,
    /// The connection failed under a write.
    Failed,
}

async fn serve(
    ws: Ws,
    subscription: Subscription,
    settings: StreamSettings,
    socket: Socket,
    deflate: bool,
) {
    let heartbeat = settings.heartbeat;
    let frames = subscription.into_stream(settings, Frames::new(deflate));
    tokio::pin!(frames);
    // Armed when a ping goes out unanswered: the peer must have answered
    // by then (any frame counts). Registered with the timer only then.
    let silence = tokio::time::sleep(heartbeat);
    tokio::pin!(silence);
    let mut ws = ws;
    let reads = match ws.get_ref().get_ref() {
        Conn::Tcp { .. } => Reads::Tcp,
        Conn::Upgraded(_) => {
            let gate = ReadGate::new().await;
            Reads::Gate {
                waker: Waker::from(gate.clone()),
                gate,
            }
        }
    };
    let mut pump = Pump {
        reads,
        // The first turn reads: bytes may have come with the handshake.
        more: true,
        unwritten: Bytes::new(),
        closing: None,
        read: false,
        answer_by: None,
        heartbeat,
        written: socket
            .state
            .metrics
            .written(crate::transport::Kind::WebSocket, None),
        stream: socket.stream.as_ref(),
    };
    loop {
        let turn = std::future::poll_fn(|cx| {
            pump.poll_turn(cx, &mut ws, frames.as_mut(), silence.as_mut())
        })
        .await;
        let reply = match turn {
            Turn::Ended => break,
            Turn::Failed => return,
            Turn::Close(close) => {
                if ws.send(close).await.is_err() {
                    return;
                }
                continue;
            }
            Turn::Silent => {
                tracing::debug!("closing a WebSocket whose peer answers no pings");
                let _ = ws.send(close_frame(close::INTERNAL, "no pong")).await;
                break;
            }
            Turn::Read(message) => match message {
                None | Some(Ok(Message::Close(_))) => break,
                // Raw frames are what the socket sends, never what it reads.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Binary(_))) => {
                    close_frame(close::UNSUPPORTED, "binary frames are not understood")
                }
                Some(Ok(Message::Text(text))) => match serde_json::from_str(&text) {
                    Ok(frame) => Message::Text(socket.publish(frame).await.into()),
                    Err(_) => close_frame(close::INVALID, "not a client frame"),
                },
                Some(Err(error)) => match error {
                    tungstenite::Error::Capacity(_) => {
                        close_frame(close::TOO_BIG, "frame over the size limit")
                    }
                    // RFC 6455 §8.1: close with 1007, not a cut.
                    tungstenite::Error::Utf8(_) => {
                        close_frame(close::INVALID, "a text frame is not UTF-8")
                    }
                    _ => {
                        tracing::debug!(%error, "a WebSocket failed");
                        return;
                    }
                },
            },
        };
        let closing = matches!(reply, Message::Close(_));
        if ws.send(reply).await.is_err() || closing {
            break;
        }
        if let Some(stream) = &socket.stream {
            stream.polled();
        }
    }
    let _ = SinkExt::close(&mut ws).await;
}

/// Writes a socket's batches as the engine makes them, in one poll, the
/// way crier's own HTTP/1.1 writes an SSE stream's: no turn of an async
/// loop, no `select!` re-armed, per batch; it stops only for what needs
/// tungstenite or the handler (a read, the close frame, a silent peer).
struct Pump<'a> {
    reads: Reads,
    /// The last read found a message: more may be buffered already, with
    /// no wake to come.
    more: bool,
    /// What is left to write of the last batch.
    unwritten: Bytes,
    /// The close frame that follows `unwritten`.
    closing: Option<Message>,
    /// A read went through tungstenite since the last batch: it may have
    /// frames of its own (a pong) not fully written.
    read: bool,
    /// When the peer must have answered the ping that went out.
    answer_by: Option<tokio::time::Instant>,
    heartbeat: std::time::Duration,
    written: BytesWritten,
    /// Over HTTP/2, noted on each write (see [`Socket::stream`]).
    stream: Option<&'a StreamActivity>,
}

impl Pump<'_> {
    fn poll_turn<F: Stream<Item = Batch>>(
        &mut self,
        cx: &mut Context<'_>,
        ws: &mut Ws,
        mut frames: Pin<&mut F>,
        mut silence: Pin<&mut tokio::time::Sleep>,
    ) -> Poll<Turn> {
        loop {
            // The last batch goes out whole before anything else: a reply
            // through tungstenite must not land inside it.
            if !self.unwritten.is_empty() {
                match self.poll_write(cx, ws) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(())) => return Poll::Ready(Turn::Failed),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if let Some(close) = self.closing.take() {
                return Poll::Ready(Turn::Close(close));
            }
            if let Poll::Ready(message) = self.poll_read(cx, ws) {
                self.read = true;
                self.answer_by = None;
                return Poll::Ready(Turn::Read(message));
            }
            match frames.as_mut().poll_next(cx) {
                Poll::Ready(Some(batch)) => {
                    if batch.pings && self.answer_by.is_none() {
                        let at = tokio::time::Instant::now() + self.heartbeat;
                        self.answer_by = Some(at);
                        silence.as_mut().reset(at);
                    }
                    self.written.add(batch.bytes.len());
                    self.unwritten = batch.bytes;
                    self.closing = batch.close;
                }
                // The stream ended: its last batch carried the close frame.
                Poll::Ready(None) => return Poll::Ready(Turn::Ended),
                Poll::Pending => break,
            }
        }
        if self.answer_by.is_some() && silence.poll(cx).is_ready() {
            return Poll::Ready(Turn::Silent);
        }
        Poll::Pending
    }

    /// The socket's next message, read when the connection may have
    /// something for it: a read that finds nothing still costs a pass
    /// through tungstenite and the I/O driver.
    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        ws: &mut Ws,
    ) -> Poll<Option<Result<Message, tungstenite::Error>>> {
        let polled = match &self.reads {
            Reads::Tcp => {
                let readable = match ws.get_ref().get_ref() {
                    Conn::Tcp { unread, tcp } => {
                        !unread.is_empty() || tcp.poll_read_ready(cx).is_ready()
                    }
                    Conn::Upgraded(_) => true,
                };
                if !self.more && !readable {
                    return Poll::Pending;
                }
                ws.poll_next_unpin(cx)
            }
            Reads::Gate { gate, waker } => {
                if !self.more && !gate.take() {
                    return Poll::Pending;
                }
                ws.poll_next_unpin(&mut Context::from_waker(waker))
            }
        };
        self.more = polled.is_ready();
        polled
    }

    /// Writes what is left of the batch to the connection.
    fn poll_write(&mut self, cx: &mut Context<'_>, ws: &mut Ws) -> Poll<Result<(), ()>> {
        // tungstenite's own frames (a pong a read queued) go out whole
        // first.
        if self.read {
            match ws.poll_flush_unpin(cx) {
                Poll::Ready(Ok(())) => self.read = false,
                Poll::Ready(Err(_)) => return Poll::Ready(Err(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        let io = ws.get_mut();
        while !self.unwritten.is_empty() {
            match Pin::new(&mut *io).poll_write(cx, &self.unwritten) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Err(())),
                Poll::Ready(Ok(n)) => self.unwritten.advance(n),
                Poll::Pending => return Poll::Pending,
            }
        }
        // Nothing held between batches.
        self.unwritten = Bytes::new();
        match Pin::new(io).poll_flush(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => return Poll::Ready(Err(())),
            Poll::Pending => return Poll::Pending,
        }
        if let Some(stream) = self.stream {
            stream.polled();
        }
        Poll::Ready(Ok(()))
    }
}

/// Wakes a socket's task for its reads through hyper's upgraded
/// connection and remembers that it did, so a read is tried only when the
/// connection may have something for it.
struct ReadGate {
    woken: AtomicBool,
    /// The socket's task, which alone polls the gate.
    task: Waker,
}

impl Wake for ReadGate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

impl ReadGate {
    /// A gate for the task polling this.
    async fn new() -> Arc<ReadGate> {
        let task = std::future::poll_fn(|cx| Poll::Ready(cx.waker().clone())).await;
        Arc::new(ReadGate {
            woken: AtomicBool::new(false),
            task,
        })
    }

    /// Whether the gate was woken since the last call.
    fn take(&self) -> bool {
        self.woken.load(Ordering::Relaxed) && self.woken.swap(false, Ordering::AcqRel)
    }
}

impl Socket {
    /// Publishes what `frame` asks for and says how it went: an `ack` with
    /// the event's id, or a `problem`.
    async fn publish(&self, frame: ClientFrame) -> String {
        let reference = frame.reference.clone();
        let mut answer = match self.store(frame).await {
            Ok(appended) => {
                let mut answer = json!({ "type": "ack", "ref": reference });
                let published =
                    serde_json::to_value(Published::from(&appended.receipt())).unwrap_or_default();
                if let (Some(answer), Some(fields)) =
                    (answer.as_object_mut(), published.as_object())
                {
                    for (key, value) in fields {
                        answer.insert(key.clone(), value.clone());
                    }
                    if matches!(appended, Appended::Replayed(_)) {
                        answer.insert("replayed".into(), true.into());
                    }
                }
                answer
            }
            Err(problem) => json!({ "type": "problem", "ref": reference, "problem": problem }),
        };
        if let Some(answer) = answer.as_object_mut()
            && answer.get("ref").is_some_and(serde_json::Value::is_null)
        {
            answer.remove("ref");
        }
        answer.to_string()
    }

    /// The checks and the store of an HTTP publish, in its order: who, the
    /// event, may they, the rate, then the store.
    async fn store(&self, frame: ClientFrame) -> Result<Appended, serde_json::Value> {
        let principal = self.publisher.as_ref().map_err(Clone::clone)?;
        let problem = |error: ApiError| error.problem();
        // The socket may outlive the token it was opened with (a public
        // topic's socket does not end when it expires): a publish counts
        // the token's expiry as an HTTP publish would.
        if let Principal::Token(verified) = principal
            && crate::auth::now_unix() > verified.expires_at
        {
            return Err(problem(ApiError::Auth(crate::auth::AuthError::Token(
                crate::auth::TokenError::Expired,
            ))));
        }
        let config = &self.state.config;
        let event = item_event(
            &config.limits,
            &frame.topic,
            frame.event.as_deref(),
            frame.data,
        )
        .map_err(|what| problem(ApiError::MalformedFrame(what)))?;
        let key = frame
            .idempotency_key
            .as_deref()
            .map(|key| IdempotencyKey::parse(key.as_bytes()))
            .transpose()
            .map_err(|reason| {
                problem(ApiError::InvalidIdempotencyKey {
                    place: "idempotency_key".into(),
                    reason,
                })
            })?;
        self.state
            .auth
            .may_publish(principal, [&event.topic])
            .map_err(|e| problem(e.into()))?;
        self.state
            .limits
            .publish(&principal.rate_key(&self.client), 1)
            .map_err(|e| problem(e.into()))?;
        store_one(&self.state, principal, event, key)
            .await
            .map_err(problem)
    }
}
