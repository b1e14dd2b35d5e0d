//! The plain SSE transport: the engine's items as uncompressed
//! `text/event-stream` bytes ([`Plain`]); `compressed.rs` writes them in a
//! content coding. The framing itself is `crate::sse`'s.

use bytes::{Bytes, BytesMut};

use crate::compress::Chained;
use crate::event::{Event, REAUTH_EVENT, RESET_EVENT};
use crate::sse;
use crate::subscription::{Control, Wire};

/// The SSE bytes of a control item: the preamble, a `reset` event (with
/// its `id:`), a `reauth` event (without one, so the client's
/// `Last-Event-ID` stays at its last real event), the drain's farewell.
pub fn encode(control: &Control) -> Bytes {
    match control {
        Control::Open { retry, start } => sse::preamble(retry.as_millis() as u64, start.as_deref()),
        Control::Reset { id, data } => sse::encode_control(id, RESET_EVENT, data),
        Control::Reauth => sse::encode_control_without_id(REAUTH_EVENT, &Control::reauth_data()),
        Control::Farewell { retry } => sse::farewell(retry.as_millis() as u64),
    }
}

/// Plain SSE. A single ready frame is passed on as the shared `Bytes` it
/// already is; several are copied into one buffer so the socket sees one
/// write.
#[derive(Default)]
pub struct Plain {
    single: Option<Bytes>,
    buf: BytesMut,
    /// Bytes said to come before the next write ([`Wire::reserve`]): room
    /// made for them at once when a second frame comes.
    expected: usize,
}

impl Plain {
    fn push_shared(&mut self, frame: &Bytes) {
        if self.single.is_none() && self.buf.is_empty() {
            self.single = Some(frame.clone());
        } else {
            self.spill();
            self.buf.extend_from_slice(frame);
        }
    }

    fn spill(&mut self) {
        let single = self.single.take();
        let expected = std::mem::take(&mut self.expected);
        self.buf
            .reserve(single.as_ref().map_or(0, Bytes::len) + expected);
        if let Some(single) = single {
            self.buf.extend_from_slice(&single);
        }
    }
}

impl Wire for Plain {
    type Out = std::io::Result<Bytes>;
    const TRANSPORT: super::Kind = super::Kind::Sse;

    fn control(&mut self, control: &Control) {
        self.push_shared(&encode(control));
    }

    fn heartbeat(&mut self) {
        self.push_shared(&Bytes::from_static(sse::HEARTBEAT));
    }

    fn event(&mut self, event: &Event, _: Option<&Chained>) {
        self.push_shared(event.frame());
    }

    fn event_with_id(&mut self, id: &str, event: &Event) {
        self.spill();
        sse::put_id(&mut self.buf, id);
        self.buf.extend_from_slice(&event.body());
    }

    fn pending(&self) -> usize {
        self.single.as_ref().map_or(0, Bytes::len) + self.buf.len()
    }

    fn take(&mut self) -> Option<std::io::Result<Bytes>> {
        self.expected = 0;
        if let Some(single) = self.single.take() {
            debug_assert!(self.buf.is_empty());
            return Some(Ok(single));
        }
        // The buffer goes with the write, so an idle stream holds none. (A
        // split would leave the stream holding the whole allocation, a
        // replay page's 32 KiB for as long as it lives.)
        (!self.buf.is_empty()).then(|| Ok(std::mem::take(&mut self.buf).freeze()))
    }

    fn reserve(&mut self, bytes: usize) {
        self.expected = bytes;
    }

    fn finish(&mut self) -> Option<std::io::Result<Bytes>> {
        self.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Epoch, Topic};

    fn event(seq: u64) -> Event {
        Event::new(Topic::parse("t", 64).unwrap(), seq, Epoch(1), None, "data")
    }

    #[test]
    fn a_gathered_write_takes_its_buffer_so_the_stream_keeps_none() {
        let events: Vec<Event> = (1..=3).map(event).collect();
        let mut plain = Plain::default();
        plain.reserve(events.iter().map(|e| e.frame().len()).sum());
        for e in &events {
            plain.event(e, None);
        }
        let write = plain.take().unwrap().unwrap();
        let expected: Vec<u8> = events.iter().flat_map(|e| e.frame().to_vec()).collect();
        assert_eq!(write, expected);
        assert_eq!(
            plain.buf.capacity(),
            0,
            "the stream still holds the write's buffer"
        );
        assert!(plain.take().is_none());
    }

    #[test]
    fn a_lone_frame_is_written_as_the_shared_bytes_it_is() {
        let e = event(1);
        let mut plain = Plain::default();
        plain.reserve(4096);
        plain.event(&e, None);
        let write = plain.take().unwrap().unwrap();
        assert_eq!(write.as_ptr(), e.frame().as_ptr());
        assert_eq!(plain.buf.capacity(), 0, "room was made for nothing");
    }
}
