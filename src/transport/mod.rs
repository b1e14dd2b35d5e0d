//! One face per transport. Each wraps the same engine
//! ([`crate::subscription`]) and encodes its items: the same events, ids,
//! resets and ends, whichever way they travel.
//!
//! - [`plain`]: uncompressed `text/event-stream` bytes; [`compressed`]: the
//!   same in a content coding, written from the units `crate::compress` made once.
//! - [`websocket`]: one JSON text frame per event or control item; pings for
//!   heartbeats; a close code for each way a stream ends.
//!   [`permessage_deflate`]: the extension's handshake answer, and client
//!   messages inflated for tungstenite.
//! - [`poll`]: the entries of one long-poll answer.
//! - [`grpc`]: one `crier.v1.Item` message per event or control item.
//!
//! An event's JSON (what WebSocket frames and long-poll entries carry) is
//! made once per event and shared, like its SSE frame.

pub mod compressed;
pub mod grpc;
pub mod permessage_deflate;
pub mod plain;
pub mod poll;
pub mod websocket;

/// Which transport a stream travels by: the `transport` label of the
/// stream metrics (`crate::metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sse,
    WebSocket,
    LongPoll,
    Grpc,
}

impl Kind {
    /// Every kind, in label order.
    pub const ALL: [Kind; 4] = [Kind::Sse, Kind::WebSocket, Kind::LongPoll, Kind::Grpc];

    /// Its place in [`Kind::ALL`].
    pub fn index(self) -> usize {
        match self {
            Kind::Sse => 0,
            Kind::WebSocket => 1,
            Kind::LongPoll => 2,
            Kind::Grpc => 3,
        }
    }

    /// The value of the `transport` label.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Sse => "sse",
            Kind::WebSocket => "websocket",
            Kind::LongPoll => "longpoll",
            Kind::Grpc => "grpc",
        }
    }
}
