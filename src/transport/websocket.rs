//! The WebSocket transport: the engine's items as frames.
//!
//! Each event is one text frame holding a JSON object,
//! `{"id","type":"event","topic","seq","event"?,"data"}`, made once per
//! event and shared by every single-topic socket (multi-topic sockets put
//! their own `id` in front of the same bytes). Control items are text
//! frames told apart by `type` (`open`, `reset`, `reauth`, `farewell`);
//! heartbeats are pings; each way a stream ends has its close code.
//!
//! Long-poll answers carry the same JSON objects (`crate::transport::poll`).

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use bytes::{Bytes, BytesMut};
use serde_json::json;

use crate::compress::Chained;
use crate::event::{Event, JSON_UNIT};
use crate::metrics::StreamEnd;
use crate::subscription::{Control, Wire};

/// Close codes (RFC 6455 §7.4.1, and the IANA registry for 1012/1013).
pub mod close {
    /// The node restarts or drains: reconnect (elsewhere) and resume.
    pub const RESTART: u16 = 1012;
    /// The socket fell behind the live feed: reconnect and resume.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The credentials expired, or a frame broke the protocol's rules.
    pub const POLICY: u16 = 1008;
    /// The server could not go on (the store refuses the stream's work,
    /// or the peer stopped answering pings).
    pub const INTERNAL: u16 = 1011;
    /// A frame over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// A frame that is not the JSON of a client frame.
    pub const INVALID: u16 = 1007;
    /// A binary frame: only text frames are understood.
    pub const UNSUPPORTED: u16 = 1003;
}

/// The JSON of `event` under its own id (`SEQ.EPOCH`): made on first use,
/// then shared by every socket and long-poll answer that carries it.
pub fn event_json(event: &Event) -> Bytes {
    event.unit(JSON_UNIT, || encode_event(event))
}

/// The JSON of `event` under a stream's own `id` (multi-topic streams): the
/// shared JSON with its id replaced.
pub fn event_json_with_id(id: &str, event: &Event) -> Bytes {
    let shared = event_json(event);
    // `{"id":"SEQ.EPOCH"` — a position needs no escaping.
    let own_id_end = 6 + 2 + event.position().to_string().len();
    let id = serde_json::Value::from(id).to_string();
    let mut json = BytesMut::with_capacity(shared.len() + id.len());
    json.extend_from_slice(b"{\"id\":");
    json.extend_from_slice(id.as_bytes());
    json.extend_from_slice(&shared[own_id_end.min(shared.len())..]);
    json.freeze()
}

/// Builds an event's JSON from its SSE frame (the only form an event is
/// kept in): the name from its `event:` line, the data from its `data:`
/// lines joined with LF, exactly as an EventSource sees them.
fn encode_event(event: &Event) -> Bytes {
    let body = event.body();
    let text = String::from_utf8_lossy(&body);
    let (name, data) = crate::sse::read_back(&text);
    let mut json = String::with_capacity(body.len() + 64);
    json.push_str("{\"id\":\"");
    json.push_str(&event.position().to_string());
    json.push_str("\",\"type\":\"event\",\"topic\":");
    json.push_str(&serde_json::Value::from(event.topic.as_str()).to_string());
    json.push_str(",\"seq\":");
    json.push_str(&event.seq.to_string());
    if let Some(name) = name {
        json.push_str(",\"event\":");
        json.push_str(&serde_json::Value::from(name).to_string());
    }
    json.push_str(",\"data\":");
    json.push_str(&serde_json::Value::from(data).to_string());
    json.push('}');
    Bytes::from(json)
}

/// The JSON of a control item, as a text frame or a long-poll entry.
pub fn control_json(control: &Control) -> Bytes {
    let value = match control {
        Control::Open { retry, start } => match start {
            Some(id) => json!({ "type": "open", "id": id, "retry": retry.as_millis() as u64 }),
            None => json!({ "type": "open", "retry": retry.as_millis() as u64 }),
        },
        Control::Reset { id, data } => {
            let mut value = json!({ "type": "reset", "id": id });
            if let (Some(object), Some(fields)) = (value.as_object_mut(), data.as_object()) {
                for (key, field) in fields {
                    object.insert(key.clone(), field.clone());
                }
            }
            value
        }
        Control::Reauth => {
            let mut value = json!({ "type": "reauth" });
            if let (Some(object), Some(fields)) =
                (value.as_object_mut(), Control::reauth_data().as_object())
            {
                for (key, field) in fields {
                    object.insert(key.clone(), field.clone());
                }
            }
            value
        }
        Control::Farewell { retry } => {
            json!({ "type": "farewell", "retry": retry.as_millis() as u64 })
        }
    };
    Bytes::from(value.to_string())
}

/// A text frame of JSON this module made (UTF-8 by construction).
fn text(json: Bytes) -> Message {
    match Utf8Bytes::try_from(json) {
        Ok(text) => Message::Text(text),
        Err(error) => {
            tracing::error!(%error, "a frame of crier's own is not UTF-8");
            Message::Text(Utf8Bytes::from_static("{}"))
        }
    }
}

/// A close frame.
pub fn close_frame(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

/// One socket's frames, handed out a batch per write.
#[derive(Default)]
pub struct Frames {
    frames: Vec<Message>,
    pending: usize,
    close: Option<Message>,
}

impl Frames {
    fn push(&mut self, json: Bytes) {
        self.pending += json.len();
        self.frames.push(text(json));
    }
}

impl Wire for Frames {
    type Out = Vec<Message>;
    const TRANSPORT: super::Kind = super::Kind::WebSocket;

    fn control(&mut self, control: &Control) {
        self.push(control_json(control));
        match control {
            Control::Reauth => {
                self.close = Some(close_frame(close::POLICY, "token-expired"));
            }
            Control::Farewell { .. } => {
                self.close = Some(close_frame(close::RESTART, "draining"));
            }
            Control::Open { .. } | Control::Reset { .. } => {}
        }
    }

    fn heartbeat(&mut self) {
        self.frames.push(Message::Ping(Bytes::new()));
    }

    fn event(&mut self, event: &Event, _: Option<&Chained>) {
        self.push(event_json(event));
    }

    fn event_with_id(&mut self, id: &str, event: &Event) {
        self.push(event_json_with_id(id, event));
    }

    fn pending(&self) -> usize {
        self.pending
    }

    fn take(&mut self) -> Option<Vec<Message>> {
        self.pending = 0;
        (!self.frames.is_empty()).then(|| std::mem::take(&mut self.frames))
    }

    fn ended(&mut self, end: StreamEnd) {
        if self.close.is_some() {
            return;
        }
        self.close = match end {
            StreamEnd::ClientGone => None,
            StreamEnd::SlowConsumer => Some(close_frame(close::TRY_AGAIN_LATER, "slow-consumer")),
            StreamEnd::Shutdown => Some(close_frame(close::RESTART, "shutdown")),
            StreamEnd::TokenExpired => Some(close_frame(close::POLICY, "token-expired")),
            StreamEnd::StoreError => Some(close_frame(close::INTERNAL, "store-error")),
        };
    }

    fn finish(&mut self) -> Option<Vec<Message>> {
        let mut frames = self.take().unwrap_or_default();
        frames.extend(self.close.take());
        (!frames.is_empty()).then_some(frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Epoch, EventName, Topic};

    fn event(name: Option<&str>, data: &str) -> Event {
        let name = name.map(|n| EventName::parse(n).unwrap());
        Event::new(
            Topic::parse("news", 64).unwrap(),
            7,
            Epoch(46),
            name.as_ref(),
            data,
        )
    }

    #[test]
    fn an_events_json_carries_what_an_event_source_sees() {
        let plain = event(None, "hello");
        assert_eq!(
            &event_json(&plain)[..],
            br#"{"id":"7.1a","type":"event","topic":"news","seq":7,"data":"hello"}"#
        );
        let named = event(Some("update"), "a\r\nb \"q\"\n");
        assert_eq!(
            &event_json(&named)[..],
            br#"{"id":"7.1a","type":"event","topic":"news","seq":7,"event":"update","data":"a\nb \"q\"\n"}"#
        );
        assert_eq!(
            &event_json_with_id("news/7.1a,3.e2", &named)[..],
            br#"{"id":"news/7.1a,3.e2","type":"event","topic":"news","seq":7,"event":"update","data":"a\nb \"q\"\n"}"#
        );
    }

    #[test]
    fn control_items_are_told_apart_by_type() {
        let reset = Control::Reset {
            id: "4.e1".into(),
            data: json!({"topic": "news", "reason": "trimmed"}),
        };
        assert_eq!(
            &control_json(&reset)[..],
            br#"{"type":"reset","id":"4.e1","topic":"news","reason":"trimmed"}"#
        );
        assert_eq!(
            &control_json(&Control::Reauth)[..],
            br#"{"type":"reauth","reason":"token-expired"}"#
        );
    }
}
