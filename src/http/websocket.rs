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

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;

use super::limits::HeldSlot;
use super::publish::{Published, item_event, store_one};
use super::{ApiError, AppState};
use crate::auth::Principal;
use crate::connection::{ConnectionHold, StreamActivity};
use crate::store::{Appended, IdempotencyKey};
use crate::subscription::{StreamSettings, Subscription};
use crate::transport::websocket::{Frames, close, close_frame};

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

/// Bytes a socket reads at a time.
const READ_BUFFER: usize = 4 * 1024;
/// Frames are gathered up to this size before a write (and always written
/// at the end of a batch).
const WRITE_BUFFER: usize = 16 * 1024;

/// Answers the handshake and serves the socket. Frames (and messages) are
/// limited to what an HTTP publish body may be (`--max-batch-bytes`).
pub fn upgrade(
    upgrade: WebSocketUpgrade,
    subscription: Subscription,
    settings: StreamSettings,
    socket: Socket,
) -> Response {
    let limit = socket.state.config.max_batch_bytes;
    upgrade
        .max_message_size(limit)
        .max_frame_size(limit)
        // tungstenite's defaults (128 KiB each, the read buffer allocated up
        // front) would cost an idle socket ~8 times an idle SSE stream. A
        // client sends pongs and small publishes; larger frames take more
        // reads. A write of several frames still goes out as one.
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .on_upgrade(move |ws| serve(ws, subscription, settings, socket))
}

async fn serve(
    ws: WebSocket,
    subscription: Subscription,
    settings: StreamSettings,
    socket: Socket,
) {
    let heartbeat = settings.heartbeat;
    let written = socket
        .state
        .metrics
        .written(crate::transport::Kind::WebSocket, None);
    let frames = subscription.into_stream(settings, Frames::default());
    tokio::pin!(frames);
    // Not split: both halves would take a lock on every poll. Reading is
    // cancel-safe, so a read pending when a batch is ready is dropped, and
    // the socket written, between two turns.
    let mut ws = ws;
    // Set when a ping goes out unanswered: the peer must have answered by
    // then (any frame counts).
    let mut answer_by: Option<tokio::time::Instant> = None;
    loop {
        let silence = async {
            match answer_by {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            batch = frames.next() => {
                // The stream ended: its last batch carried the close frame.
                let Some(batch) = batch else { break };
                for message in batch {
                    match &message {
                        Message::Ping(_) if answer_by.is_none() => {
                            answer_by = Some(tokio::time::Instant::now() + heartbeat);
                        }
                        Message::Text(text) => written.add(text.len()),
                        _ => {}
                    }
                    if ws.feed(message).await.is_err() {
                        return;
                    }
                }
                if ws.flush().await.is_err() {
                    return;
                }
                if let Some(stream) = &socket.stream {
                    stream.polled();
                }
            }
            message = ws.recv() => {
                answer_by = None;
                let reply = match message {
                    None | Some(Ok(Message::Close(_))) => break,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Binary(_))) => {
                        close_frame(close::UNSUPPORTED, "binary frames are not understood")
                    }
                    Some(Ok(Message::Text(text))) => match serde_json::from_str(&text) {
                        Ok(frame) => Message::Text(socket.publish(frame).await.into()),
                        Err(_) => close_frame(close::INVALID, "not a client frame"),
                    },
                    Some(Err(error)) => match cause(&error) {
                        Some(tungstenite::Error::Capacity(_)) => {
                            close_frame(close::TOO_BIG, "frame over the size limit")
                        }
                        // RFC 6455 §8.1: close with 1007, not a cut.
                        Some(tungstenite::Error::Utf8(_)) => {
                            close_frame(close::INVALID, "a text frame is not UTF-8")
                        }
                        _ => {
                            tracing::debug!(%error, "a WebSocket failed");
                            return;
                        }
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
            () = silence => {
                tracing::debug!("closing a WebSocket whose peer answers no pings");
                let _ = ws.send(close_frame(close::INTERNAL, "no pong")).await;
                break;
            }
        }
    }
    let _ = SinkExt::close(&mut ws).await;
}

/// The WebSocket library's error behind a failed read (a frame over the
/// size limit, a text frame that is not UTF-8), if it was one.
fn cause(error: &axum::Error) -> Option<&tungstenite::Error> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = source {
        if let Some(cause) = error.downcast_ref::<tungstenite::Error>() {
            return Some(cause);
        }
        source = error.source();
    }
    None
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
        let event = item_event(config, &frame.topic, frame.event.as_deref(), frame.data)
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
