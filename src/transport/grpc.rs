//! The gRPC transport: the engine's items as `crier.v1.Item` messages.
//!
//! Events, `reset`, `reauth`, `farewell` and heartbeats each become one
//! `Item`; the stream opens with an `Open` item (as a WebSocket opens with
//! its `open` frame). Each message is handed out already encoded
//! ([`Encoded`]): an event's message is made once per event and shared by
//! every single-topic call (cached on the `Event`, as its JSON is), so
//! tonic writes the same bytes to each. A stream that ends for any reason but the client's
//! leaving ends with a status after its last item: `UNAVAILABLE` when the
//! node drains or stops (reconnect and resume, elsewhere),
//! `UNAUTHENTICATED` when the credentials expired, `RESOURCE_EXHAUSTED`
//! when the subscriber fell behind, `INTERNAL` when the store refuses the
//! stream's work. This module does no I/O: tonic writes what it hands out.

use bytes::{BufMut, Bytes};
use prost::Message;
use tonic::Status;

use crate::compress::Chained;
use crate::event::{Event, PROTO_UNIT};
use crate::metrics::StreamEnd;
use crate::subscription::{Control, Wire};
use proto::item;

/// The code generated from the contract (`proto/crier/v1/crier.proto`):
/// messages, the server trait and a client. Here, below the handlers,
/// because this transport makes its messages.
pub mod proto {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("crier.v1");

    /// The contract's file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/crier_descriptor.bin"));
}

/// One write's messages (each `Ok`, but a last `Err` that ends the call).
pub type Batch = Vec<Result<Encoded, Status>>;

/// An `Item` message already encoded: written as it is (its `Message`
/// implementation copies the bytes; it is never decoded by the hub).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Encoded(pub Bytes);

impl Message for Encoded {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Bytes::new();
    }
}

/// A heartbeat `Item` (field 5, an empty message).
const HEARTBEAT: &[u8] = &[5 << 3 | 2, 0];

/// The encoded `Item` of `event` under its own id (`SEQ.EPOCH`): made on
/// first use, then shared by every single-topic call that carries it.
pub fn event_message(event: &Event) -> Bytes {
    event.unit(PROTO_UNIT, || {
        Bytes::from(event_item(event.position().to_string(), event).encode_to_vec())
    })
}

/// The message of `event` under `id`: its name and data as an EventSource
/// sees them, read back from its SSE frame (the only form an event is kept
/// in).
pub fn event_item(id: String, event: &Event) -> proto::Item {
    let body = event.body();
    let text = String::from_utf8_lossy(&body);
    let (name, data) = crate::sse::read_back(&text);
    proto::Item {
        item: Some(item::Item::Event(proto::Event {
            id,
            topic: event.topic.as_str().to_owned(),
            event: name.unwrap_or_default().to_owned(),
            data,
            seq: event.seq,
        })),
    }
}

/// The message of a control item.
pub fn control_item(control: &Control) -> proto::Item {
    let text = |data: &serde_json::Value, key: &str| {
        data.get(key)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    let item = match control {
        Control::Open { retry, start } => item::Item::Open(proto::Open {
            id: start.clone().unwrap_or_default(),
            retry_ms: retry.as_millis() as u64,
        }),
        Control::Reset { id, data } => item::Item::Reset(proto::Reset {
            id: id.clone(),
            topic: text(data, "topic").unwrap_or_default(),
            reason: text(data, "reason").unwrap_or_default(),
            requested: text(data, "requested").unwrap_or_default(),
            oldest: text(data, "oldest"),
        }),
        Control::Reauth => item::Item::Reauth(proto::Reauth {
            reason: text(&Control::reauth_data(), "reason").unwrap_or_default(),
        }),
        Control::Farewell { retry } => item::Item::Farewell(proto::Farewell {
            retry_ms: retry.as_millis() as u64,
        }),
    };
    proto::Item { item: Some(item) }
}

/// The status a stream ends with, after its last item (none when the
/// client left: nobody reads it).
pub fn end_status(end: StreamEnd) -> Option<Status> {
    match end {
        StreamEnd::ClientGone => None,
        StreamEnd::Shutdown => Some(Status::unavailable(
            "draining: reconnect (to another node) and resume with the last id",
        )),
        StreamEnd::TokenExpired => Some(Status::unauthenticated(
            "token-expired: reconnect with fresh credentials and the last id",
        )),
        StreamEnd::SlowConsumer => Some(Status::resource_exhausted(
            "slow-consumer: the subscriber fell behind the live feed; resume with the last id",
        )),
        StreamEnd::StoreError => Some(Status::internal(
            "store-error: the store refuses this stream's work",
        )),
    }
}

/// One call's messages, handed out a batch per write.
#[derive(Default)]
pub struct Items {
    items: Batch,
    pending: usize,
    end: Option<Status>,
}

impl Items {
    fn push(&mut self, message: Bytes) {
        self.pending += message.len();
        self.items.push(Ok(Encoded(message)));
    }
}

impl Wire for Items {
    type Out = Batch;
    const TRANSPORT: super::Kind = super::Kind::Grpc;

    fn control(&mut self, control: &Control) {
        self.push(Bytes::from(control_item(control).encode_to_vec()));
    }

    fn heartbeat(&mut self) {
        self.push(Bytes::from_static(HEARTBEAT));
    }

    fn event(&mut self, event: &Event, _: Option<&Chained>) {
        self.push(event_message(event));
    }

    fn event_with_id(&mut self, id: &str, event: &Event) {
        self.push(Bytes::from(
            event_item(id.to_owned(), event).encode_to_vec(),
        ));
    }

    fn pending(&self) -> usize {
        self.pending
    }

    fn take(&mut self) -> Option<Batch> {
        self.pending = 0;
        (!self.items.is_empty()).then(|| std::mem::take(&mut self.items))
    }

    fn ended(&mut self, end: StreamEnd) {
        self.end = end_status(end);
    }

    fn finish(&mut self) -> Option<Batch> {
        let mut items = self.take().unwrap_or_default();
        items.extend(self.end.take().map(Err));
        (!items.is_empty()).then_some(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Epoch, EventName, Topic};

    #[test]
    fn an_events_message_carries_what_an_event_source_sees() {
        let name = EventName::parse("update").unwrap();
        let event = Event::new(
            Topic::parse("news", 64).unwrap(),
            7,
            Epoch(46),
            Some(&name),
            "a\r\nb",
        );
        let item = event_item(event.position().to_string(), &event);
        assert_eq!(
            item.item,
            Some(item::Item::Event(proto::Event {
                id: "7.1a".into(),
                topic: "news".into(),
                event: "update".into(),
                data: "a\nb".into(),
                seq: 7,
            }))
        );
    }

    #[test]
    fn an_events_message_is_encoded_once_and_shared() {
        let event = Event::new(Topic::parse("news", 64).unwrap(), 7, Epoch(46), None, "hi");
        let first = event_message(&event);
        let second = event_message(&event);
        assert_eq!(first.as_ptr(), second.as_ptr(), "the same bytes");
        assert_eq!(
            proto::Item::decode(first).unwrap(),
            event_item("7.1a".into(), &event)
        );
        let heartbeat = proto::Item::decode(HEARTBEAT).unwrap();
        assert_eq!(
            heartbeat.item,
            Some(item::Item::Heartbeat(proto::Heartbeat {}))
        );
    }

    #[test]
    fn a_reset_carries_the_fields_of_the_sse_reset() {
        let reset = Control::Reset {
            id: "4.e1".into(),
            data: serde_json::json!({
                "topic": "news", "reason": "trimmed", "requested": "1.e1", "oldest": null,
            }),
        };
        assert_eq!(
            control_item(&reset).item,
            Some(item::Item::Reset(proto::Reset {
                id: "4.e1".into(),
                topic: "news".into(),
                reason: "trimmed".into(),
                requested: "1.e1".into(),
                oldest: None,
            }))
        );
    }
}
