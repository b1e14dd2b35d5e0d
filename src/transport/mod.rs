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
pub mod plain;
pub mod permessage_deflate;
pub mod poll;
pub mod websocket;
