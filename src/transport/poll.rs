//! The long-poll transport: the engine's items as the entries of one
//! answer, `{"events":[…],"next":ID}`. Entries are the JSON objects a
//! WebSocket carries (events, and `reset` where a position is gone);
//! `next` is the id to ask from next: the last entry's, or where the
//! stream started when there was none.

use bytes::{BufMut, Bytes, BytesMut};

use crate::compress::Chained;
use crate::event::Event;
use crate::metrics::StreamEnd;
use crate::subscription::{Control, Wire};
use crate::transport::websocket::{control_json, event_json, event_json_with_id};

/// What one write of a long-poll stream adds to the answer.
#[derive(Debug, Default)]
pub struct Entries {
    /// Events and control entries, in order.
    pub entries: Vec<Bytes>,
    /// The id to ask from next, if this write moved it.
    pub next: Option<String>,
    /// Whether the stream ended (drain, expiry, refusal): answer now.
    pub ended: bool,
}

/// A long-poll stream's wire.
#[derive(Default)]
pub struct Answer {
    out: Entries,
    pending: usize,
}

impl Answer {
    fn push(&mut self, json: Bytes, id: Option<String>) {
        self.pending += json.len();
        self.out.entries.push(json);
        if id.is_some() {
            self.out.next = id;
        }
    }
}

impl Wire for Answer {
    type Out = Entries;
    const TRANSPORT: super::Kind = super::Kind::LongPoll;

    fn control(&mut self, control: &Control) {
        match control {
            Control::Open { start, .. } => {
                if start.is_some() {
                    self.out.next.clone_from(start);
                }
            }
            Control::Reset { id, .. } => self.push(control_json(control), Some(id.clone())),
            Control::Reauth => {
                self.push(control_json(control), None);
                self.out.ended = true;
            }
            Control::Farewell { .. } => self.out.ended = true,
        }
    }

    fn heartbeat(&mut self) {}

    fn event(&mut self, event: &Event, _: Option<&Chained>) {
        self.push(event_json(event), Some(event.position().to_string()));
    }

    fn event_with_id(&mut self, id: &str, event: &Event) {
        self.push(event_json_with_id(id, event), Some(id.to_owned()));
    }

    fn pending(&self) -> usize {
        self.pending
    }

    fn take(&mut self) -> Option<Entries> {
        self.pending = 0;
        let out = &self.out;
        (!out.entries.is_empty() || out.next.is_some() || out.ended)
            .then(|| std::mem::take(&mut self.out))
    }

    fn ended(&mut self, _end: StreamEnd) {
        self.out.ended = true;
    }

    fn finish(&mut self) -> Option<Entries> {
        self.take()
    }
}

/// The body of an answer: its entries, and the id to ask from next
/// (`null` when the stream could not fix its start, the store being out of
/// reach: ask again as before).
pub fn body(entries: &[Bytes], next: Option<&str>) -> Bytes {
    let size: usize = entries.iter().map(|e| e.len() + 1).sum();
    let mut body = BytesMut::with_capacity(size + 64);
    body.put_slice(b"{\"events\":[");
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            body.put_u8(b',');
        }
        body.put_slice(entry);
    }
    body.put_slice(b"],\"next\":");
    let next = next.map_or(serde_json::Value::Null, serde_json::Value::from);
    body.put_slice(next.to_string().as_bytes());
    body.put_u8(b'}');
    body.freeze()
}
