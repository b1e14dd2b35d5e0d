//! Per-topic chains: one compressor per coding and topic whose units carry
//! context from event to event within a segment, and the node-wide cap on
//! how many such compressors exist ([`ChainPermits`]). Pure bytes: never
//! writes to a stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use zstd::stream::raw::Operation;

use super::format::{
    BrotliWriter, ZSTD_LEVEL, ZSTD_WINDOW_LOG, brotli_catable, brotli_flushed, deflate,
    zstd_without_header,
};
use crate::coding::SHARED_CODINGS;
use crate::event::Event;
use crate::metrics::Metrics;

/// Events per segment of a topic's chained units: a stream that joins
/// mid-segment writes self-contained units (larger) for at most this many
/// events; a longer segment keeps more context for those in it.
pub const SEGMENT_EVENTS: u32 = 128;

/// The chained units the hub compressed for one event of a topic, one per
/// shared coding that some stream of the topic uses.
#[derive(Debug)]
pub struct Chained {
    pub event: Arc<Event>,
    /// Which segment of the topic's chain (never reused within a topic).
    pub segment: u64,
    /// The unit's place in its segment: 0 refers to nothing before it.
    pub index: u32,
    pub units: [Option<Bytes>; SHARED_CODINGS],
}

/// How many chained compressors the node may hold at once
/// (`--max-compression-chains`): each is one topic's compressor for one
/// coding, 0.3–0.7 MiB. A topic that gets none has its streams write each
/// event compressed alone (larger on the wire, as correct). Counts what it
/// holds, by coding, and each refusal, in the node's metrics.
pub struct ChainPermits {
    held: AtomicUsize,
    max: usize,
    metrics: Metrics,
}

impl std::fmt::Debug for ChainPermits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainPermits")
            .field("held", &self.held)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl ChainPermits {
    pub fn new(max: usize, metrics: Metrics) -> Arc<ChainPermits> {
        Arc::new(ChainPermits {
            held: AtomicUsize::new(0),
            max,
            metrics,
        })
    }

    /// A place for a compressor of the coding in `slot`, if one is free.
    fn take(self: &Arc<Self>, slot: usize) -> Option<ChainPermit> {
        let before = self.held.fetch_add(1, Ordering::Relaxed);
        if before >= self.max {
            self.held.fetch_sub(1, Ordering::Relaxed);
            self.metrics.chain_refused(slot);
            return None;
        }
        self.metrics.chain_held(slot, 1.0);
        Some(ChainPermit {
            permits: self.clone(),
            slot,
        })
    }
}

/// One chained compressor's place in [`ChainPermits`], given back on drop.
#[derive(Debug)]
struct ChainPermit {
    permits: Arc<ChainPermits>,
    slot: usize,
}

impl Drop for ChainPermit {
    fn drop(&mut self) {
        self.permits.held.fetch_sub(1, Ordering::Relaxed);
        self.permits.metrics.chain_held(self.slot, -1.0);
    }
}

/// A topic's chained compressors, one per shared coding in use (see the
/// module docs). Events go through it in the topic's order.
pub struct Chain {
    /// A topic quiet this long starts a new segment at its next event: a
    /// stream that sent a heartbeat meanwhile rejoins there.
    quiet: Duration,
    /// The current segment's number, unique in the process (so a chain
    /// made anew never repeats one).
    segment: u64,
    /// The index of the next unit in the segment.
    index: u32,
    last: Option<Instant>,
    zstd: Option<Box<zstd::stream::raw::Encoder<'static>>>,
    deflate: Option<Box<flate2::Compress>>,
    /// brotli has no reset: a new compressor per segment.
    brotli: Option<Box<BrotliWriter>>,
    permits: Arc<ChainPermits>,
    /// The permit of each coding's compressor, while it has one.
    held: [Option<ChainPermit>; SHARED_CODINGS],
}

impl Chain {
    pub fn new(quiet: Duration, permits: Arc<ChainPermits>) -> Chain {
        Chain {
            permits,
            held: Default::default(),
            quiet,
            segment: 0,
            index: 0,
            last: None,
            zstd: None,
            deflate: None,
            brotli: None,
        }
    }

    /// Compresses the next event's `frame` for the codings `wanted` (by
    /// [`Codec::shared_slot`]), dropping the compressors of the others.
    /// `None` when no coding is wanted.
    pub fn units(
        &mut self,
        event: &Arc<Event>,
        wanted: [bool; SHARED_CODINGS],
        now: Instant,
    ) -> Option<Arc<Chained>> {
        if !wanted.contains(&true) {
            self.zstd = None;
            self.deflate = None;
            self.brotli = None;
            self.release_idle();
            return None;
        }
        let mut boundary = self.index >= SEGMENT_EVENTS
            || self
                .last
                .is_none_or(|last| now.duration_since(last) >= self.quiet);
        // A compressor made now has no context: its first unit starts a
        // segment, for every coding.
        if !wanted[0] {
            self.zstd = None;
        } else if self.zstd.is_none() && self.permit(0) {
            self.zstd = chained_zstd().ok().map(Box::new);
            boundary = true;
        }
        if !wanted[1] {
            self.deflate = None;
        } else if self.deflate.is_none() && self.permit(1) {
            let level = flate2::Compression::new(CHAINED_DEFLATE_LEVEL);
            self.deflate = Some(Box::new(flate2::Compress::new(level, false)));
            boundary = true;
        }
        if !wanted[2] {
            self.brotli = None;
        } else if self.brotli.is_none() && self.permit(2) {
            boundary = true;
        }
        if boundary {
            self.segment = NEXT_SEGMENT.fetch_add(1, Ordering::Relaxed);
            self.index = 0;
            if let Some(zstd) = &mut self.zstd
                && zstd.reinit().is_err()
            {
                self.zstd = None;
            }
            if let Some(deflate) = &mut self.deflate {
                deflate.reset();
            }
            if wanted[2] && self.held[2].is_some() {
                self.brotli = Some(Box::new(brotli_catable(CHAINED_BROTLI_QUALITY, 0)));
            }
        }
        // A compressor that failed is dropped: the next event makes a new
        // one and starts a segment; this event goes out self-contained.
        let frame = event.frame();
        let fresh = self.index == 0;
        let zstd = self.zstd.as_mut().map(|e| {
            let unit = zstd_flushed(e, frame)?;
            // A segment's first unit opens its frame: a stream writes the
            // blocks into its own.
            match fresh {
                true => zstd_without_header(&unit)
                    .map(|at| unit.slice(at..))
                    .ok_or_else(|| std::io::Error::other("no zstd frame header")),
                false => Ok(unit),
            }
        });
        let zstd = match zstd {
            Some(Ok(unit)) => Some(unit),
            Some(Err(error)) => {
                tracing::warn!(%error, "zstd failed on a topic's chain");
                self.zstd = None;
                None
            }
            None => None,
        };
        let gzip = self.deflate.as_mut().map(|c| deflate(c, frame));
        let gzip = match gzip {
            Some(Ok(unit)) => Some(unit),
            Some(Err(error)) => {
                tracing::warn!(%error, "deflate failed on a topic's chain");
                self.deflate = None;
                None
            }
            None => None,
        };
        let brotli = self.brotli.as_mut().map(|w| brotli_flushed(w, frame));
        let brotli = match brotli {
            Some(Ok(unit)) => Some(unit),
            Some(Err(error)) => {
                tracing::warn!(%error, "brotli failed on a topic's chain");
                self.brotli = None;
                None
            }
            None => None,
        };
        let chained = Chained {
            event: event.clone(),
            segment: self.segment,
            index: self.index,
            units: [zstd, gzip, brotli],
        };
        self.index += 1;
        self.last = Some(now);
        self.release_idle();
        Some(Arc::new(chained))
    }

    /// Whether the coding in `slot` holds a permit for a compressor, taken
    /// now if need be.
    fn permit(&mut self, slot: usize) -> bool {
        if self.held[slot].is_none() {
            self.held[slot] = self.permits.take(slot);
        }
        self.held[slot].is_some()
    }

    /// Gives back the permits of codings without a compressor.
    fn release_idle(&mut self) {
        let idle = [
            self.zstd.is_none(),
            self.deflate.is_none(),
            self.brotli.is_none(),
        ];
        for (held, idle) in self.held.iter_mut().zip(idle) {
            if idle {
                *held = None;
            }
        }
    }

    /// Drops the compressor of a coding no stream uses any more.
    pub fn drop_coding(&mut self, slot: usize) {
        match slot {
            0 => self.zstd = None,
            1 => self.deflate = None,
            _ => self.brotli = None,
        }
        self.release_idle();
    }

    /// Whether the chain holds no compressor.
    pub fn is_empty(&self) -> bool {
        self.zstd.is_none() && self.deflate.is_none() && self.brotli.is_none()
    }
}

/// Numbers segments across every chain of the process.
static NEXT_SEGMENT: AtomicU64 = AtomicU64::new(1);

/// Level of the topics' chained deflate (as the per-stream one was).
const CHAINED_DEFLATE_LEVEL: u32 = 5;
/// brotli quality of the topics' chains (see `format`'s `ALONE_BROTLI_QUALITY`).
const CHAINED_BROTLI_QUALITY: i32 = 4;

/// A topic's chained zstd compressor. One per topic (not per stream), so
/// a 64 KiB window (a stream frame's: [`ZSTD_WINDOW_LOG`]) is affordable;
/// small tables keep it near 200 KiB.
fn chained_zstd() -> std::io::Result<zstd::stream::raw::Encoder<'static>> {
    use zstd::zstd_safe::CParameter;
    let mut encoder = zstd::stream::raw::Encoder::new(ZSTD_LEVEL)?;
    encoder.set_parameter(CParameter::WindowLog(ZSTD_WINDOW_LOG))?;
    encoder.set_parameter(CParameter::HashLog(14))?;
    encoder.set_parameter(CParameter::ChainLog(14))?;
    encoder.set_parameter(CParameter::ChecksumFlag(false))?;
    Ok(encoder)
}

/// Compresses `input` into the encoder's current frame and flushes: the
/// output ends on a block boundary, the frame left open.
fn zstd_flushed(
    encoder: &mut zstd::stream::raw::Encoder<'static>,
    input: &[u8],
) -> std::io::Result<Bytes> {
    use zstd::stream::raw::{InBuffer, OutBuffer};
    let mut out: Vec<u8> = Vec::with_capacity(input.len() / 2 + 64);
    let mut source = InBuffer::around(input);
    loop {
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(256));
        }
        let pos = out.len();
        let mut sink = OutBuffer::around_pos(&mut out, pos);
        if source.pos() < input.len() {
            encoder.run(&mut source, &mut sink)?;
        } else if encoder.flush(&mut sink)? == 0 {
            break;
        }
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::tests::json_event;

    /// The chain starts a new segment after `SEGMENT_EVENTS` events and
    /// after a quiet spell, and at a compressor made anew.
    #[test]
    fn the_chain_starts_segments_by_count_by_quiet_and_anew() {
        let mut chain = Chain::new(
            Duration::from_millis(50),
            ChainPermits::new(8, Metrics::new()),
        );
        let mut now = Instant::now();
        let frame = json_event(1);
        let both = [true, true, true];
        let first = chain.units(&frame, both, now).unwrap();
        assert_eq!(first.index, 0);
        let mut last = first.segment;
        for n in 1..SEGMENT_EVENTS {
            let units = chain.units(&frame, both, now).unwrap();
            assert_eq!((units.segment, units.index), (last, n));
        }
        let next = chain.units(&frame, both, now).unwrap();
        assert_eq!(next.index, 0);
        assert!(next.segment > last);
        last = next.segment;
        now += Duration::from_millis(60);
        let quiet = chain.units(&frame, both, now).unwrap();
        assert_eq!(quiet.index, 0);
        assert!(quiet.segment > last);
        // zstd no longer wanted, then again: a new compressor, a new segment.
        let gzip_only = chain.units(&frame, [false, true, true], now).unwrap();
        assert!(gzip_only.units[0].is_none() && gzip_only.index == 1);
        let again = chain.units(&frame, both, now).unwrap();
        assert_eq!(again.index, 0);
        assert!(chain.units(&frame, [false; SHARED_CODINGS], now).is_none());
    }
}
