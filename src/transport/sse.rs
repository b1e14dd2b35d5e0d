//! The SSE transport: the engine's items as `text/event-stream` bytes,
//! uncompressed here ([`Plain`]), in content codings in `crate::compress`.

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
        if let Some(single) = self.single.take() {
            self.buf.extend_from_slice(&single);
        }
    }
}

impl Wire for Plain {
    type Out = std::io::Result<Bytes>;

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
        if let Some(single) = self.single.take() {
            debug_assert!(self.buf.is_empty());
            return Some(Ok(single));
        }
        (!self.buf.is_empty()).then(|| Ok(self.buf.split().freeze()))
    }

    fn finish(&mut self) -> Option<std::io::Result<Bytes>> {
        self.take()
    }
}
