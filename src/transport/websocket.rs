//! The WebSocket transport: the engine's items as frames.
//!
//! Each event is one text frame holding a JSON object,
//! `{"id","type":"event","topic","seq","event"?,"data"}`. The whole frame,
//! header and JSON, is made once per event ([`event_frame`]) and shared by
//! every single-topic socket, as an SSE frame is (multi-topic sockets put
//! their own `id` in front of the same JSON). Control items are text
//! frames told apart by `type` (`open`, `reset`, `reauth`, `farewell`);
//! heartbeats are pings; each way a stream ends has its close code.
//!
//! A batch of frames is the bytes that go on the wire, written to the
//! connection as one: a lone shared frame as the shared `Bytes` it is (no
//! copy, as `Plain` passes an SSE frame on), several copied into one
//! buffer; only the close frame goes through tungstenite, which must know
//! the socket is closing.
//!
//! A socket that negotiated permessage-deflate gets each event's message
//! compressed once per event and its frame (RSV1 set) shared the same way
//! ([`event_deflated_frame`]); its control items go plain (the extension
//! lets each message choose).
//!
//! Long-poll answers carry the same JSON objects (`crate::transport::poll`).

use bytes::{Bytes, BytesMut};
use serde_json::json;
use tungstenite::Message;
use tungstenite::Utf8Bytes;
use tungstenite::protocol::CloseFrame;

use super::permessage_deflate::{message_of, stored_block};
use crate::coding::Codec;
use crate::compress::Chained;
use crate::event::{DEFLATED_REST_UNIT, DEFLATED_UNIT, Event, JSON_UNIT};
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

/// The text frame of `event` under its own id (`SEQ.EPOCH`), header and
/// JSON: made on first use, then shared by every single-topic socket.
pub fn event_frame(event: &Event) -> Bytes {
    event.unit(JSON_UNIT, || text_frame(event))
}

fn text_frame(event: &Event) -> Bytes {
    frame_of(FIN | TEXT, &encode_event(event))
}

/// The JSON of `event` under its own id (`SEQ.EPOCH`): its frame's payload,
/// shared by every long-poll answer that carries it.
pub fn event_json(event: &Event) -> Bytes {
    let frame = event_frame(event);
    frame.slice(header_len(&frame)..)
}

/// The JSON of `event` under a stream's own `id` (multi-topic streams): the
/// shared JSON with its id replaced.
pub fn event_json_with_id(id: &str, event: &Event) -> Bytes {
    let (shared, rest) = json_rest(event);
    let prefix = id_prefix(id);
    let mut json = BytesMut::with_capacity(prefix.len() + shared.len() - rest);
    json.extend_from_slice(prefix.as_bytes());
    json.extend_from_slice(&shared[rest..]);
    json.freeze()
}

/// The event's shared JSON, and where what follows its own id starts.
fn json_rest(event: &Event) -> (Bytes, usize) {
    let shared = event_json(event);
    // `{"id":"SEQ.EPOCH"` — a position needs no escaping.
    let own_id_end = 6 + 2 + event.position().to_string().len();
    let rest = own_id_end.min(shared.len());
    (shared, rest)
}

/// `{"id":` and the JSON string of `id`.
fn id_prefix(id: &str) -> String {
    format!("{{\"id\":{}", serde_json::Value::from(id))
}

/// The permessage-deflate frame of `event` under its own id (RSV1 set):
/// its JSON compressed alone (no context before it, as
/// `server_no_context_takeover` promises), made on first use, then shared
/// by every single-topic socket that negotiated the extension.
pub fn event_deflated_frame(event: &Event) -> Bytes {
    event.unit(DEFLATED_UNIT, || deflated_frame(event))
}

fn deflated_frame(event: &Event) -> Bytes {
    let message = message_of(crate::compress::alone(Codec::Gzip, &event_json(event)));
    frame_of(FIN | RSV1 | TEXT, &message)
}

/// The permessage-deflate message of `event` under a stream's own `id`
/// (multi-topic streams): the id in a stored block, in front of the rest
/// of the JSON compressed once per event and shared. `None` for an id too
/// long for one stored block (the frame then goes plain).
pub fn event_deflated_with_id(id: &str, event: &Event) -> Option<Bytes> {
    let mut message = stored_block(id_prefix(id).as_bytes())?;
    let rest = event.unit(DEFLATED_REST_UNIT, || {
        let (shared, rest) = json_rest(event);
        message_of(crate::compress::alone(Codec::Gzip, &shared[rest..]))
    });
    message.extend_from_slice(&rest);
    Some(Bytes::from(message))
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

/// A frame's first byte: FIN, RSV1 for a compressed message, the opcode.
const FIN: u8 = 0x80;
const RSV1: u8 = 0x40;
const TEXT: u8 = 0x1;
/// A ping with no payload.
const PING: [u8; 2] = [0x89, 0x00];

/// A server frame (unmasked, RFC 6455 §5.2) of `payload`, alone.
fn frame_of(first: u8, payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::new();
    put_frame(&mut frame, first, payload);
    frame.freeze()
}

/// The length of a server frame's header: 2 bytes, then 2 or 8 more for
/// a payload of 126 bytes or more.
fn header_len(frame: &[u8]) -> usize {
    match frame.get(1).map(|len| len & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => frame.len(),
    }
}

/// Puts a server frame (unmasked, RFC 6455 §5.2) of `payload` in `out`.
fn put_frame(out: &mut BytesMut, first: u8, payload: &[u8]) {
    out.reserve(payload.len() + 10);
    match payload.len() {
        n if n < 126 => out.extend_from_slice(&[first, n as u8]),
        n => match u16::try_from(n) {
            Ok(n) => {
                out.extend_from_slice(&[first, 126]);
                out.extend_from_slice(&n.to_be_bytes());
            }
            Err(_) => {
                out.extend_from_slice(&[first, 127]);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        },
    }
    out.extend_from_slice(payload);
}

/// A close frame.
pub fn close_frame(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: code.into(),
        reason: Utf8Bytes::from_static(reason),
    }))
}

/// One write's frames: the bytes of its event and control frames (and
/// pings), then the close frame if the stream ends with this batch.
#[derive(Debug, Default)]
pub struct Batch {
    pub bytes: Bytes,
    /// A ping is among the frames: the peer must answer by the next
    /// heartbeat.
    pub pings: bool,
    pub close: Option<Message>,
}

/// One socket's frames, handed out a batch per write.
#[derive(Default)]
pub struct Frames {
    /// A lone ready frame since the last batch, the shared bytes it is.
    single: Option<Bytes>,
    /// The frames since the last batch, as they go on the wire, when
    /// there are several or they were made for this socket alone.
    wire: BytesMut,
    /// Bytes said to come before the next batch ([`Wire::reserve`]): room
    /// made for them at once when a second frame comes.
    expected: usize,
    pings: bool,
    close: Option<Message>,
    /// The socket negotiated permessage-deflate: events go compressed.
    deflate: bool,
}

impl Frames {
    /// A socket's frames; `deflate` if it negotiated permessage-deflate.
    pub fn new(deflate: bool) -> Frames {
        Frames {
            deflate,
            ..Frames::default()
        }
    }

    /// Gathers what waits into `wire`, before a frame goes in behind it.
    fn spill(&mut self) {
        let single = self.single.take();
        let expected = std::mem::take(&mut self.expected);
        self.wire
            .reserve(single.as_ref().map_or(0, Bytes::len) + expected);
        if let Some(single) = single {
            self.wire.extend_from_slice(&single);
        }
    }

    /// Adds a frame made for this socket alone.
    fn put(&mut self, first: u8, payload: &[u8]) {
        self.spill();
        put_frame(&mut self.wire, first, payload);
    }
}

impl Wire for Frames {
    type Out = Batch;
    const TRANSPORT: super::Kind = super::Kind::WebSocket;

    fn control(&mut self, control: &Control) {
        self.put(FIN | TEXT, &control_json(control));
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
        if self.pending() == 0 {
            self.single = Some(Bytes::from_static(&PING));
        } else {
            self.spill();
            self.wire.extend_from_slice(&PING);
        }
        self.pings = true;
    }

    fn event(&mut self, event: &Event, _: Option<&Chained>) {
        let (slot, make): (usize, fn(&Event) -> Bytes) = if self.deflate {
            (DEFLATED_UNIT, deflated_frame)
        } else {
            (JSON_UNIT, text_frame)
        };
        if self.pending() == 0 {
            self.single = Some(event.unit(slot, || make(event)));
        } else {
            // Copied from the cached frame, borrowed: no reference count.
            self.spill();
            let wire = &mut self.wire;
            event.with_unit(slot, || make(event), |frame| wire.extend_from_slice(frame));
        }
    }

    fn event_with_id(&mut self, id: &str, event: &Event) {
        match self.deflate.then(|| event_deflated_with_id(id, event)) {
            Some(Some(message)) => self.put(FIN | RSV1 | TEXT, &message),
            Some(None) | None => self.put(FIN | TEXT, &event_json_with_id(id, event)),
        }
    }

    fn pending(&self) -> usize {
        self.single.as_ref().map_or(0, Bytes::len) + self.wire.len()
    }

    fn take(&mut self) -> Option<Batch> {
        self.expected = 0;
        let bytes = match self.single.take() {
            Some(single) => single,
            // Taken whole: an idle socket keeps no buffer.
            None if !self.wire.is_empty() => std::mem::take(&mut self.wire).freeze(),
            None => return None,
        };
        Some(Batch {
            bytes,
            pings: std::mem::take(&mut self.pings),
            close: None,
        })
    }

    fn reserve(&mut self, bytes: usize) {
        self.expected = bytes;
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

    fn finish(&mut self) -> Option<Batch> {
        let mut batch = self.take().unwrap_or_default();
        batch.close = self.close.take();
        (!batch.bytes.is_empty() || batch.close.is_some()).then_some(batch)
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

    /// permessage-deflate's payload of `message`, inflated as a browser
    /// does (the sync flush's tail put back).
    fn inflated(message: &[u8]) -> Vec<u8> {
        let mut compressed = message.to_vec();
        compressed.extend_from_slice(&crate::transport::permessage_deflate::SYNC_TAIL);
        let mut inflater = flate2::Decompress::new(false);
        let mut out = Vec::with_capacity(4096);
        inflater
            .decompress_vec(&compressed, &mut out, flate2::FlushDecompress::Sync)
            .unwrap();
        out
    }

    /// Every single-topic socket of a topic writes the frame made once per
    /// event: a lone frame goes out as the cached bytes themselves (no
    /// copy, no buffer), plain or compressed.
    #[test]
    fn a_lone_event_frame_is_written_as_the_shared_bytes_it_is() {
        let event = event(Some("update"), "shared shared shared");
        for deflate in [false, false, true, true] {
            let mut frames = Frames::new(deflate);
            frames.reserve(4096);
            frames.event(&event, None);
            let batch = frames.take().expect("a batch");
            let cached = if deflate {
                event_deflated_frame(&event)
            } else {
                event_frame(&event)
            };
            assert_eq!(batch.bytes, cached);
            assert_eq!(batch.bytes.as_ptr(), cached.as_ptr(), "copied");
            assert_eq!(frames.wire.capacity(), 0, "room was made for nothing");
            assert!(frames.take().is_none());
        }
        let json = event_json(&event);
        let mut plain = vec![FIN | TEXT, json.len() as u8];
        plain.extend_from_slice(&json);
        assert_eq!(event_frame(&event), plain);
        let compressed = event_deflated_frame(&event);
        assert_eq!(compressed[0], FIN | RSV1 | TEXT);
        assert_eq!(usize::from(compressed[1]), compressed.len() - 2);
        assert_eq!(inflated(&compressed[2..]), json.to_vec());
    }

    /// Several frames (a ping, events, a control item) go out as one
    /// batch, in order, and the batch takes its buffer with it: an idle
    /// socket keeps none.
    #[test]
    fn gathered_frames_go_out_in_one_batch_that_takes_its_buffer() {
        let events: Vec<Event> = (1..=3)
            .map(|seq| Event::new(Topic::parse("news", 64).unwrap(), seq, Epoch(46), None, "x"))
            .collect();
        for deflate in [false, true] {
            let mut frames = Frames::new(deflate);
            frames.heartbeat();
            for event in &events {
                frames.event(event, None);
            }
            let farewell = Control::Farewell {
                retry: std::time::Duration::from_millis(1500),
            };
            frames.control(&farewell);
            let batch = frames.take().expect("a batch");
            let mut expected = PING.to_vec();
            for event in &events {
                let frame = if deflate {
                    event_deflated_frame(event)
                } else {
                    event_frame(event)
                };
                expected.extend_from_slice(&frame);
            }
            let control = control_json(&farewell);
            expected.extend_from_slice(&[FIN | TEXT, control.len() as u8]);
            expected.extend_from_slice(&control);
            assert_eq!(batch.bytes, expected);
            assert!(batch.pings);
            assert_eq!(frames.wire.capacity(), 0, "the socket kept the buffer");
            assert!(frames.take().is_none());
            let last = frames.finish().expect("the close frame");
            assert_eq!(last.close, Some(close_frame(close::RESTART, "draining")));
            assert!(last.bytes.is_empty());
        }
    }

    /// The JSON a long-poll answer carries is the frame's payload, after a
    /// header of each of its three sizes.
    #[test]
    fn an_events_json_is_its_frame_after_the_header() {
        for (len, header) in [(10, 2), (200, 4), (70_000, 10)] {
            let event = event(None, &"x".repeat(len));
            let frame = event_frame(&event);
            let json = event_json(&event);
            assert_eq!(header_len(&frame), header, "{len}");
            assert_eq!(&frame[header..], &json[..]);
            let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
            assert_eq!(value["data"].as_str().map(str::len), Some(len));
            let mut out = BytesMut::new();
            put_frame(&mut out, FIN | TEXT, &json);
            assert_eq!(out, frame);
        }
    }

    #[test]
    fn a_frame_header_carries_the_payload_length_in_its_three_sizes() {
        for (len, header) in [
            (125, vec![0x81, 125]),
            (126, vec![0x81, 126, 0, 126]),
            (65_535, vec![0x81, 126, 0xff, 0xff]),
            (65_536, vec![0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
        ] {
            let mut out = BytesMut::new();
            put_frame(&mut out, FIN | TEXT, &vec![b'x'; len]);
            assert_eq!(&out[..header.len()], &header[..], "{len}");
            assert_eq!(out.len(), header.len() + len);
        }
    }

    /// A multi-topic socket's compressed frame inflates to its own id in
    /// front of the event's JSON: the same bytes as its plain frame.
    #[test]
    fn a_multi_topic_sockets_compressed_frame_carries_its_own_id() {
        let event = event(None, "rest rest rest");
        let id = "news/7.1a,other/3.e2";
        let message = event_deflated_with_id(id, &event).unwrap();
        assert_eq!(inflated(&message), event_json_with_id(id, &event).to_vec());
        let again = event_deflated_with_id("news/7.1a", &event).unwrap();
        assert_eq!(
            inflated(&again),
            event_json_with_id("news/7.1a", &event).to_vec()
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
