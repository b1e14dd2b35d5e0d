//! A compressed SSE stream's writer: [`SharedUnits`] writes the units the
//! hub compressed once per event (`crate::compress`), choosing per event
//! between the topic's chained unit and the event's self-contained one,
//! and its own bytes (preamble, heartbeats, control events, id lines)
//! uncompressed, with each format's framing around them.

use std::sync::LazyLock;

use bytes::{BufMut, Bytes, BytesMut};

use crate::coding::{Codec, SHARED_CODINGS};
use crate::compress::{
    BROTLI_END, Chained, DEFLATE_END, GZIP_HEADER, ZSTD_END_OF_FRAME, ZSTD_REPEATS_RESET,
    ZSTD_REPEATS_RESET_LINE, ZSTD_STREAM_HEADER, brotli_stream_start, self_contained, uncompressed,
};
use crate::event::Event;
use crate::sse;
use crate::subscription::{Control, Wire};

/// The heartbeat, precomputed per shared coding.
static HEARTBEAT_UNITS: LazyLock<[Bytes; SHARED_CODINGS]> = LazyLock::new(|| {
    [Codec::Zstd, Codec::Gzip, Codec::Brotli].map(|codec| {
        let mut out = BytesMut::new();
        uncompressed(codec, &mut out, sse::HEARTBEAT);
        out.freeze()
    })
});

/// One stream's wire in a shared coding (zstd or gzip): it writes the
/// hub's units, choosing per event between the topic's chained unit and the
/// event's self-contained one, and its own bytes uncompressed. A few dozen
/// bytes of state, whatever the coding.
pub struct SharedUnits {
    codec: Codec,
    slot: usize,
    /// Whether this stream may write the hub's chained units (single-topic
    /// streams, registered with the hub for them).
    chains: bool,
    /// The bytes of the next write: a lone unit as the shared `Bytes` it
    /// is, several copied into `buf`.
    single: Option<Bytes>,
    buf: BytesMut,
    /// Uncompressed bytes in the next write.
    pending: usize,
    /// Whether the gzip header (brotli: the window size) went out.
    started: bool,
    /// The chained unit this stream may write next: (segment, index).
    chain: Option<(u64, u32)>,
    /// zstd: whether the decoder's repeat offsets may differ from a fresh
    /// frame's (a compressed unit went out since the stream's start or the
    /// last [`ZSTD_REPEATS_RESET`]).
    repeats_moved: bool,
    /// gzip: CRC-32 and length of everything written, for the trailer.
    crc: flate2::Crc,
}

impl SharedUnits {
    /// A wire for `codec`, which must be a shared one. `chains`: whether the
    /// stream has one topic, so it may write that topic's chained units.
    pub fn new(codec: Codec, chains: bool) -> SharedUnits {
        SharedUnits {
            codec,
            slot: codec.shared_slot().unwrap_or_default(),
            chains,
            single: None,
            buf: BytesMut::new(),
            pending: 0,
            started: false,
            chain: None,
            repeats_moved: false,
            crc: flate2::Crc::new(),
        }
    }

    fn spill(&mut self) {
        if let Some(single) = self.single.take() {
            self.buf.extend_from_slice(&single);
        }
    }

    fn push(&mut self, unit: &Bytes) {
        if self.single.is_none() && self.buf.is_empty() {
            self.single = Some(unit.clone());
        } else {
            self.spill();
            self.buf.extend_from_slice(unit);
        }
    }

    /// The gzip header, brotli's window size, or the zstd frame's header,
    /// before anything else.
    fn start(&mut self) {
        if self.started {
            return;
        }
        self.started = true;
        self.spill();
        match self.codec {
            Codec::Gzip => self.buf.put_slice(&GZIP_HEADER),
            Codec::Brotli => self.buf.put_slice(&brotli_stream_start()),
            Codec::Zstd => self.buf.put_slice(&ZSTD_STREAM_HEADER),
        }
    }

    /// Leaves the topic's chain.
    fn leave_chain(&mut self) {
        self.chain = None;
    }

    /// Writes a unit compressed as a fresh start (a segment's first, one
    /// compressed alone): in zstd, after resetting the repeat offsets it
    /// may take for a fresh frame's.
    fn push_fresh(&mut self, unit: &Bytes) {
        if self.codec == Codec::Zstd {
            if self.repeats_moved {
                self.spill();
                self.buf.put_slice(&ZSTD_REPEATS_RESET);
                self.sent(ZSTD_REPEATS_RESET_LINE);
            }
            self.repeats_moved = true;
        }
        self.push(unit);
    }

    fn sent(&mut self, plain: &[u8]) {
        if self.codec == Codec::Gzip {
            self.crc.update(plain);
        }
        self.pending += plain.len();
    }
}

impl Wire for SharedUnits {
    type Out = std::io::Result<Bytes>;
    const TRANSPORT: super::Kind = super::Kind::Sse;

    fn control(&mut self, control: &Control) {
        let bytes = &crate::transport::plain::encode(control);
        self.start();
        self.leave_chain();
        self.spill();
        uncompressed(self.codec, &mut self.buf, bytes);
        self.sent(bytes);
    }

    fn heartbeat(&mut self) {
        self.start();
        self.leave_chain();
        let unit = HEARTBEAT_UNITS[self.slot].clone();
        self.push(&unit);
        self.sent(sse::HEARTBEAT);
    }

    fn event(&mut self, event: &Event, chained: Option<&Chained>) {
        self.start();
        let slot = self.slot;
        let chained = chained
            .filter(|_| self.chains)
            .and_then(|c| Some((c, c.units[slot].as_ref()?)));
        match chained {
            Some((c, unit)) if c.index == 0 || self.chain == Some((c.segment, c.index)) => {
                self.chain = Some((c.segment, c.index + 1));
                match c.index {
                    0 => self.push_fresh(unit),
                    _ => self.push(unit),
                }
            }
            _ => {
                self.leave_chain();
                let unit = self_contained(event, self.codec, false);
                self.push_fresh(&unit);
            }
        }
        self.sent(event.frame());
    }

    fn event_with_id(&mut self, id: &str, event: &Event) {
        self.start();
        self.leave_chain();
        let mut line = BytesMut::with_capacity(id.len() + 5);
        sse::put_id(&mut line, id);
        self.spill();
        uncompressed(self.codec, &mut self.buf, &line);
        self.sent(&line);
        let unit = self_contained(event, self.codec, true);
        self.push_fresh(&unit);
        self.sent(&event.body());
    }

    fn pending(&self) -> usize {
        self.pending
    }

    fn take(&mut self) -> Option<std::io::Result<Bytes>> {
        self.pending = 0;
        if let Some(single) = self.single.take() {
            return Some(Ok(single));
        }
        // The buffer goes with the write, so an idle stream holds none.
        (!self.buf.is_empty()).then(|| Ok(std::mem::take(&mut self.buf).freeze()))
    }

    fn finish(&mut self) -> Option<std::io::Result<Bytes>> {
        self.start();
        self.leave_chain();
        match self.codec {
            Codec::Gzip => {
                self.spill();
                self.buf.put_slice(&DEFLATE_END);
                self.buf.put_u32_le(self.crc.sum());
                self.buf.put_u32_le(self.crc.amount());
            }
            Codec::Brotli => {
                self.spill();
                self.buf.put_u8(BROTLI_END);
            }
            Codec::Zstd => {
                self.spill();
                self.buf.put_slice(&ZSTD_END_OF_FRAME);
            }
        }
        self.take()
    }

    fn shares(&self) -> Option<Codec> {
        self.chains.then_some(self.codec)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::compress::tests::{json_event, strict, unreset};
    use crate::compress::{Chain, ChainPermits, Decompressor, SEGMENT_EVENTS};
    use crate::metrics::Metrics;

    /// What a stream of the topic does at one step.
    #[derive(Clone, Copy, Debug)]
    enum Step {
        Event,
        Heartbeat,
        Own,
        Replayed,
    }

    /// Streams that join a topic's chain at different moments, write
    /// heartbeats, their own bytes and replayed events in between, all
    /// decode exactly what they were given, event by event on arrival and
    /// as a whole (gzip with its trailer checked); and a stream in the chain
    /// writes the hub's very bytes.
    #[test]
    fn streams_joining_a_chain_at_any_moment_decode_exactly_what_they_were_sent() {
        for codec in [Codec::Zstd, Codec::Gzip, Codec::Brotli] {
            let slot = codec.shared_slot().unwrap();
            let mut chain = Chain::new(
                Duration::from_secs(3600),
                ChainPermits::new(8, Metrics::new()),
            );
            let mut wanted = [false; SHARED_CODINGS];
            wanted[slot] = true;
            // (wire, its writes, the plain text it was given, decoder)
            let mut streams: Vec<(SharedUnits, Vec<u8>, Vec<u8>, Decompressor)> = Vec::new();
            let mut shared_writes = 0;
            let total = 3 * SEGMENT_EVENTS as u64 + 10;
            for seq in 1..=total {
                // A new stream every 37 events, starting with its preamble.
                if seq % 37 == 1 {
                    let mut wire = SharedUnits::new(codec, true);
                    let preamble = Bytes::from_static(b"retry: 1000\n: crier stream open\n\n");
                    wire.control(&Control::Open {
                        retry: Duration::from_secs(1),
                        start: None,
                    });
                    let mut decoder = Decompressor::new(codec).unwrap();
                    let bytes = wire.take().unwrap().unwrap();
                    assert_eq!(decoder.decompress(&bytes).unwrap(), preamble);
                    streams.push((wire, bytes.to_vec(), preamble.to_vec(), decoder));
                }
                let event = json_event(seq);
                let chained = chain.units(&event, wanted, Instant::now()).unwrap();
                for (n, (wire, writes, plain, decoder)) in streams.iter_mut().enumerate() {
                    let step = match (seq + n as u64 * 11) % 150 {
                        0 => Step::Heartbeat,
                        1 => Step::Own,
                        2 => Step::Replayed,
                        _ => Step::Event,
                    };
                    let mut given = Vec::new();
                    match step {
                        Step::Heartbeat => {
                            wire.heartbeat();
                            given.extend_from_slice(sse::HEARTBEAT);
                        }
                        Step::Own => {
                            let own = Bytes::from(format!("id: {seq}\nevent: reset\ndata: 1\n\n"));
                            wire.control(&Control::Reset {
                                id: seq.to_string(),
                                data: 1.into(),
                            });
                            given.extend_from_slice(&own);
                        }
                        Step::Replayed => {
                            let old = json_event(seq / 2);
                            wire.event(&old, None);
                            given.extend_from_slice(old.frame());
                        }
                        Step::Event => {}
                    }
                    wire.event(&event, Some(&chained));
                    given.extend_from_slice(event.frame());
                    let bytes = wire.take().unwrap().unwrap();
                    if matches!(step, Step::Event)
                        && chained.units[slot]
                            .as_ref()
                            .is_some_and(|unit| unit.as_ptr() == bytes.as_ptr())
                    {
                        shared_writes += 1;
                    }
                    assert_eq!(
                        unreset(codec, decoder.decompress(&bytes).unwrap()),
                        given,
                        "{codec:?} stream {n} event {seq} ({step:?})"
                    );
                    writes.extend_from_slice(&bytes);
                    plain.extend_from_slice(&given);
                }
            }
            for (n, (mut wire, mut writes, plain, _)) in streams.into_iter().enumerate() {
                if let Some(last) = wire.finish() {
                    writes.extend_from_slice(&last.unwrap());
                }
                assert_eq!(
                    unreset(codec, strict(codec, &writes)),
                    plain,
                    "{codec:?} stream {n} whole"
                );
            }
            // Many writes were the chained units themselves (streams join
            // mid-segment, and leave the chain at every heartbeat, own
            // bytes or replayed event, until the next segment).
            let writes: u64 = (0..=(total - 1) / 37).map(|k| total - k * 37).sum();
            assert!(
                shared_writes * 5 > writes,
                "{codec:?}: {shared_writes} of {writes} writes shared"
            );
        }
    }

    /// A multi-topic stream's events (its own id line, then the shared body)
    /// decode exactly, and the body unit is made once per event.
    #[test]
    fn events_under_a_streams_own_id_decode_and_share_the_body_unit() {
        for codec in [Codec::Zstd, Codec::Gzip, Codec::Brotli] {
            let events: Vec<Arc<Event>> = (1..=20).map(json_event).collect();
            let (mut a, mut b) = (
                SharedUnits::new(codec, false),
                SharedUnits::new(codec, false),
            );
            let (mut wire_a, mut wire_b) = (Vec::new(), Vec::new());
            let mut want = Vec::new();
            for (n, event) in events.iter().enumerate() {
                let id = format!("t/{n}.7,0");
                a.event_with_id(&id, event);
                b.event_with_id(&id, event);
                wire_a.extend_from_slice(&a.take().unwrap().unwrap());
                wire_b.extend_from_slice(&b.take().unwrap().unwrap());
                want.extend_from_slice(format!("id: {id}\n").as_bytes());
                want.extend_from_slice(&event.body());
            }
            // Same ids, same bytes.
            assert_eq!(wire_a, wire_b, "{codec:?}");
            if let Some(last) = a.finish() {
                wire_a.extend_from_slice(&last.unwrap());
            }
            assert_eq!(unreset(codec, strict(codec, &wire_a)), want, "{codec:?}");
            let unit = self_contained(&events[0], codec, true);
            assert_eq!(
                unit.as_ptr(),
                self_contained(&events[0], codec, true).as_ptr()
            );
        }
    }
}
