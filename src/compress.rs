//! Compression of event streams: each event compressed once per coding,
//! and the same compressed bytes written to every subscriber.
//!
//! A generic HTTP compressor waits for enough input to fill a block, which
//! would hold events back; and a compressor per stream costs its memory
//! (zstd ~100 KiB, gzip ~200 KiB, brotli ~670 KiB) and its CPU (every event
//! compressed once per subscriber). Here the hub compresses each event of a
//! topic once per coding, and every stream of that coding writes those same
//! bytes: its `SharedUnits` (in `crate::transport::compressed`) keeps only
//! a few dozen bytes of state.
//!
//! Each format can be cut into units that decode on their own terms:
//!
//! - zstd (RFC 8878): a frame is a header and then blocks, and a block may
//!   refer back (by distance) into anything the frame produced before it.
//!   Each stream writes one frame: its header once (a 64 KiB window, no
//!   size, no checksum), then shared units as bare blocks (a unit is
//!   compressed as a frame, its header cut off and its last block not
//!   marked last), its own bytes as raw blocks, and the last block when it
//!   ends. One frame, not a frame per unit: some decoders read only the
//!   first frame of a response (Python's httpx, so `httpx-sse`). What a
//!   block inherits from the blocks before it besides the history is the
//!   decoder's three repeat offsets, which a fresh frame starts at 1, 4, 8
//!   and a unit compressed as a fresh frame may use: before such a unit,
//!   unless nothing compressed came since the stream's start, a stream
//!   writes [`ZSTD_REPEATS_RESET`], two tiny blocks whose matches set them
//!   back to 1, 4, 8 and that decode to a comment line
//!   ([`ZSTD_REPEATS_RESET_LINE`]), which SSE clients ignore.
//! - gzip: a member is a 10-byte header, deflate blocks and a trailer. After
//!   a sync flush the output ends on a byte boundary between blocks, and
//!   blocks from a fresh compressor refer to nothing before them. Each
//!   stream writes its own header once, then shared blocks, and keeps the
//!   CRC-32 and length of what it wrote for its trailer.
//! - brotli (RFC 7932): a stream is a window size, then meta-blocks, the
//!   last one marked. The brotli crate's *catable* mode makes output that
//!   may follow any byte-aligned point of another stream: it never refers
//!   before its own start (nor to the static dictionary, whose references
//!   are distances past the decoder's position), stores its first two bytes
//!   uncompressed (literal contexts look at the two bytes before), and uses
//!   no remembered distance until it has made its own; with `bare_stream`
//!   it has no window-size header and no last meta-block, and a flush ends
//!   it on a byte boundary. Each stream writes the window size (64 KiB, the
//!   units' own) and an empty metadata block once, then shared units, its
//!   own bytes as uncompressed meta-blocks, and the last (empty) meta-block
//!   when it ends. Checked with the brotli crate's decoder, Node's zlib and
//!   Chromium's, event by event (tests/compression.rs, tests/browser.rs).
//!
//! An event compressed alone loses what repetitive JSON gains from the
//! events before it, so each topic also has a [`Chain`]: one compressor per
//! coding whose output carries context from event to event within a
//! *segment* (a zstd frame's blocks; deflate blocks since a reset; a catable brotli
//! compressor's output), started anew every [`SEGMENT_EVENTS`] events and
//! when the topic was quiet for a heartbeat interval. Back-references are
//! distances into what the decoder produced (and brotli's remembered
//! distances and literal contexts are the decoder's state too), so a stream
//! may write a segment's chained unit only if everything it wrote since the
//! segment began is exactly that segment's earlier units. A stream that
//! joined mid-segment, or wrote anything of its own since (its preamble, a
//! heartbeat, a `reset`, a replayed event), writes each event's
//! self-contained unit instead (compressed once per event and coding, on
//! first use, and cached on the event) until the next segment begins. Its
//! own bytes go out uncompressed: raw zstd blocks, a stored deflate block,
//! an uncompressed brotli meta-block. Multi-topic streams, whose `id:` lines
//! differ per stream, write their id line that way and then the shared
//! self-contained unit of the event's body.
//!
//! Every unit ends flushed, so every event decodes the moment it arrives.
//!
//! Memory: the node holds at most `--max-compression-chains` chained
//! compressors ([`ChainPermits`]); a topic past it has its streams write
//! self-contained units. Units cached on events retained by the embedded
//! store count against `--max-retained-bytes` (see `Event::unit`).

use std::cell::RefCell;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use zstd::stream::raw::Operation;

use crate::coding::{Codec, SHARED_CODINGS};
use crate::event::Event;
use crate::metrics::Metrics;

/// One stream's compressor.
pub struct Compressor {
    encoder: Encoder,
}

enum Encoder {
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
}

impl Compressor {
    pub fn new(codec: Codec) -> std::io::Result<Compressor> {
        let encoder = match codec {
            // Every compressed stream owns its compressor for as long as it
            // is open, so memory weighs more than the last few percent of
            // ratio: a 32 KiB window still holds some 150 recent events.
            // zstd with its default tables for level 3 took ~820 KiB per
            // stream; these ~90 KiB, for ~5 % more bytes on the wire.
            Codec::Zstd => {
                use zstd::zstd_safe::CParameter;
                let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3)?;
                encoder.window_log(15)?;
                encoder.set_parameter(CParameter::HashLog(12))?;
                encoder.set_parameter(CParameter::ChainLog(12))?;
                encoder.include_checksum(false)?;
                Encoder::Zstd(encoder)
            }
            // brotli's encoder is the hungriest: quality 4 halves quality
            // 5's memory (~1 MiB allocated, ~460 KiB resident per stream).
            Codec::Brotli => Encoder::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                4,
                15,
            ))),
            Codec::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(5),
            )),
        };
        Ok(Compressor { encoder })
    }

    /// Compresses `chunk` and flushes: the returned bytes decode to all of
    /// `chunk` without waiting for more input.
    pub fn compress(&mut self, chunk: &[u8]) -> std::io::Result<Bytes> {
        let out = match &mut self.encoder {
            Encoder::Zstd(e) => {
                e.write_all(chunk)?;
                e.flush()?;
                e.get_mut()
            }
            Encoder::Brotli(e) => {
                e.write_all(chunk)?;
                e.flush()?;
                e.get_mut()
            }
            Encoder::Gzip(e) => {
                e.write_all(chunk)?;
                e.flush()?;
                e.get_mut()
            }
        };
        Ok(Bytes::from(std::mem::take(out)))
    }
}

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
/// Level for events compressed alone: small inputs, compressed once.
const ALONE_DEFLATE_LEVEL: u32 = 6;
const ZSTD_LEVEL: i32 = 3;
/// brotli quality of the topics' chains and of events compressed alone.
/// Not 5 to 9: with a 64 KiB window those take the brotli crate's H40
/// hasher, which allocates 33 MiB per compressor (measured).
const CHAINED_BROTLI_QUALITY: i32 = 4;
const ALONE_BROTLI_QUALITY: i32 = 4;
/// The window of every brotli stream and unit (log2 bytes): what a unit
/// may refer back to, and what a browser's decoder allocates per stream.
const BROTLI_LGWIN: i32 = 16;

type BrotliWriter = brotli::CompressorWriter<Vec<u8>>;

/// A brotli compressor whose output can follow any byte-aligned point of
/// any brotli stream: `catable` (no reference to anything before its
/// start, no static dictionary, its first two bytes stored so literal
/// contexts never look before it, distance cache unused until it has
/// distances of its own), `bare_stream` (no window-size header, no final
/// meta-block) and byte-aligned at every flush. `size_hint`: the input's
/// size when known (0: unknown), so a small input gets small tables.
fn brotli_catable(quality: i32, size_hint: usize) -> BrotliWriter {
    let params = brotli::enc::BrotliEncoderParams {
        quality,
        lgwin: BROTLI_LGWIN,
        size_hint,
        catable: true,
        appendable: true,
        use_dictionary: false,
        bare_stream: true,
        byte_align: true,
        ..Default::default()
    };
    brotli::CompressorWriter::with_params(Vec::new(), 1024, &params)
}

/// Compresses `input` and flushes: the output ends on a byte boundary
/// between meta-blocks.
fn brotli_flushed(writer: &mut BrotliWriter, input: &[u8]) -> std::io::Result<Bytes> {
    writer.write_all(input)?;
    writer.flush()?;
    Ok(Bytes::from(std::mem::take(writer.get_mut())))
}

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

/// Compresses `input` and sync-flushes: the output ends on a byte
/// boundary between blocks.
fn deflate(compress: &mut flate2::Compress, input: &[u8]) -> std::io::Result<Bytes> {
    let mut out: Vec<u8> = Vec::with_capacity(input.len() / 2 + 64);
    let start = compress.total_in();
    loop {
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(256));
        }
        let consumed = (compress.total_in() - start) as usize;
        compress
            .compress_vec(&input[consumed..], &mut out, flate2::FlushCompress::Sync)
            .map_err(std::io::Error::other)?;
        let consumed = (compress.total_in() - start) as usize;
        if consumed == input.len() && out.len() < out.capacity() {
            break;
        }
    }
    Ok(Bytes::from(out))
}

thread_local! {
    /// Compressors for events compressed alone, one per worker thread.
    static ALONE_ZSTD: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static ALONE_DEFLATE: RefCell<Option<flate2::Compress>> = const { RefCell::new(None) };
}

/// `data` compressed alone, as a unit that refers to nothing before it:
/// the blocks of a zstd frame (see [`zstd_bare_blocks`]), or deflate blocks
/// (sync-flushed) from a fresh compressor. Should compression fail, the
/// bytes go out uncompressed (raw blocks, stored blocks), which is as valid.
pub fn alone(codec: Codec, data: &[u8]) -> Bytes {
    let compressed = match codec {
        Codec::Zstd => ALONE_ZSTD.with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.is_none() {
                *cell = alone_zstd().ok();
            }
            let compressor = cell.as_mut()?;
            let frame = compressor.compress(data).ok()?;
            zstd_bare_blocks(&frame).map(Bytes::from)
        }),
        Codec::Gzip => ALONE_DEFLATE.with(|cell| {
            let mut cell = cell.borrow_mut();
            let compress = cell.get_or_insert_with(|| {
                flate2::Compress::new(flate2::Compression::new(ALONE_DEFLATE_LEVEL), false)
            });
            compress.reset();
            let out = deflate(compress, data).ok()?;
            Some(Bytes::copy_from_slice(&out))
        }),
        Codec::Brotli => {
            let mut writer = brotli_catable(ALONE_BROTLI_QUALITY, data.len());
            brotli_flushed(&mut writer, data)
                .ok()
                .map(|out| Bytes::copy_from_slice(&out))
        }
    };
    compressed.unwrap_or_else(|| {
        let mut out = BytesMut::new();
        uncompressed(codec, &mut out, data);
        out.freeze()
    })
}

/// The compressor of zstd units compressed alone: no checksum (a stream's
/// frame has none), and a stream frame's window, so that neither a match
/// nor a block is larger than the frame allows.
fn alone_zstd() -> std::io::Result<zstd::bulk::Compressor<'static>> {
    use zstd::zstd_safe::CParameter;
    let mut compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL)?;
    compressor.set_parameter(CParameter::WindowLog(ZSTD_WINDOW_LOG))?;
    compressor.set_parameter(CParameter::ChecksumFlag(false))?;
    Ok(compressor)
}

/// A whole answer (a long-poll's JSON) compressed in `codec`, as one
/// complete body: a zstd frame, a gzip member, a brotli stream.
pub fn whole(codec: Codec, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let out = Vec::with_capacity(data.len() / 2 + 64);
    match codec {
        Codec::Zstd => zstd::bulk::compress(data, ZSTD_LEVEL),
        Codec::Gzip => {
            let level = flate2::Compression::new(ALONE_DEFLATE_LEVEL);
            let mut encoder = flate2::write::GzEncoder::new(out, level);
            encoder.write_all(data)?;
            encoder.finish()
        }
        Codec::Brotli => {
            let quality = ALONE_BROTLI_QUALITY as u32;
            let mut writer = brotli::CompressorWriter::new(out, 4096, quality, BROTLI_LGWIN as u32);
            writer.write_all(data)?;
            Ok(writer.into_inner())
        }
    }
}

/// The self-contained unit of an event (its whole frame, or its body
/// without the `id:` line), made once per event and coding.
pub fn self_contained(event: &Event, codec: Codec, body: bool) -> Bytes {
    let slot = codec.shared_slot().unwrap_or_default() * 2 + usize::from(body);
    event.unit(slot, || {
        if body {
            alone(codec, &event.body())
        } else {
            alone(codec, event.frame())
        }
    })
}

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// The window of every zstd stream (log2 bytes): what any unit may refer
/// back, and, with at most 128 KiB, the largest block.
const ZSTD_WINDOW_LOG: u32 = 16;
/// Largest zstd block in a stream's frame: its window, under 128 KiB.
const ZSTD_BLOCK_MAX: usize = 1 << ZSTD_WINDOW_LOG;
/// A stream's frame header (RFC 8878, 3.1.1.1): the magic number, a
/// descriptor saying no content size, not single-segment, no checksum, no
/// dictionary; then the window descriptor: 2^(10 + 6) = 64 KiB.
pub const ZSTD_STREAM_HEADER: [u8; 6] = [
    0x28,
    0xb5,
    0x2f,
    0xfd,
    0x00,
    (ZSTD_WINDOW_LOG as u8 - 10) << 3,
];
/// A zstd block header closing a frame: last block, raw, empty.
pub const ZSTD_END_OF_FRAME: [u8; 3] = [0x01, 0x00, 0x00];

/// Two compressed blocks, written by hand, that set the decoder's repeat
/// offsets back to a fresh frame's 1, 4, 8 (RFC 8878, 3.1.1.5: every real
/// offset pushes itself in front of them) whatever they were, and decode to
/// [`ZSTD_REPEATS_RESET_LINE`]. Each has raw literals and sequences whose
/// three codes are each one RLE symbol, so no FSE state is read: only the
/// offsets' extra bits, in one byte under its end marker.
///
/// 1. 8 literals `:-------`, one sequence: 8 literals, offset 8 (offset
///    code 3, extra bits 3), match 3 (code 0): `:--`.
/// 2. One literal `\n`, two sequences of no literals and match 3: offset 4
///    (code 2, extra bits 3: `-:-`), then offset 1 (code 2, extra bits 0:
///    `---`); then the literal.
#[rustfmt::skip]
pub const ZSTD_REPEATS_RESET: [u8; 29] = [
    // Block header: not last, compressed, 15 bytes.
    0x7c, 0x00, 0x00,
    // Raw literals, 8 of them.
    0x40, b':', b'-', b'-', b'-', b'-', b'-', b'-', b'-',
    // 1 sequence; literal lengths, offsets, match lengths RLE: 8, 3, 0.
    0x01, 0x54, 0x08, 0x03, 0x00,
    // End marker, then 3 bits: 0b011.
    0x0b,
    // Block header: not last, compressed, 8 bytes.
    0x44, 0x00, 0x00,
    // Raw literals, 1 of them.
    0x08, b'\n',
    // 2 sequences; RLE: 0, 2, 0.
    0x02, 0x54, 0x00, 0x02, 0x00,
    // End marker, then 2 bits (first sequence) 0b11, 2 bits 0b00.
    0x1c,
];

/// What [`ZSTD_REPEATS_RESET`] decodes to: an SSE comment line.
pub const ZSTD_REPEATS_RESET_LINE: &[u8] = b":-------:---:----\n";

/// The length of a zstd frame's header (magic, descriptor, window,
/// dictionary id, content size), if `frame` starts with one.
fn zstd_without_header(frame: &[u8]) -> Option<usize> {
    let descriptor = *frame.strip_prefix(&ZSTD_MAGIC)?.first()?;
    let single_segment = descriptor & 0x20 != 0;
    let window = usize::from(!single_segment);
    let dictionary = [0, 1, 2, 4][usize::from(descriptor & 0x03)];
    let content_size = match descriptor >> 6 {
        0 => usize::from(single_segment),
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let len = 4 + 1 + window + dictionary + content_size;
    (frame.len() >= len).then_some(len)
}

/// A complete zstd frame's blocks, as a unit to write into a stream's
/// frame: without the header, the last block not marked last, without a
/// checksum. `None` if `frame` is not one complete frame of blocks no
/// larger than a stream's frame allows.
fn zstd_bare_blocks(frame: &[u8]) -> Option<Vec<u8>> {
    let start = zstd_without_header(frame)?;
    let checksum = if frame[4] & 0x04 != 0 { 4 } else { 0 };
    let blocks = &frame[start..];
    let mut at = 0;
    loop {
        let header = blocks.get(at..at + 3)?;
        let header = u32::from_le_bytes([header[0], header[1], header[2], 0]);
        let (last, kind, size) = (header & 1 != 0, (header >> 1) & 3, (header >> 3) as usize);
        if size > ZSTD_BLOCK_MAX {
            return None;
        }
        // Raw and compressed blocks hold `size` bytes, an RLE block one.
        let content = match kind {
            0 | 2 => size,
            1 => 1,
            _ => return None,
        };
        let end = at + 3 + content;
        if last {
            if blocks.len() != end + checksum {
                return None;
            }
            let mut out = blocks[..end].to_vec();
            out[at] &= !1;
            return Some(out);
        }
        at = end;
    }
}

/// Appends `data` as raw zstd blocks (RFC 8878, 3.1.1.2), none marked
/// last: bytes of a stream's own inside its frame.
pub fn zstd_raw_blocks(out: &mut BytesMut, data: &[u8]) {
    for block in data.chunks(ZSTD_BLOCK_MAX) {
        // Block_Header: Last_Block (bit 0) 0, Block_Type 0 = raw (bits
        // 1-2), Block_Size (bits 3-23), little-endian.
        let header = (block.len() as u32) << 3;
        out.put_slice(&header.to_le_bytes()[..3]);
        out.put_slice(block);
    }
}

/// Appends `data` as stored (uncompressed) deflate blocks, not final. The
/// output must be at a byte boundary between blocks, and stays there.
pub fn stored_blocks(out: &mut BytesMut, data: &[u8]) {
    for block in data.chunks(usize::from(u16::MAX)) {
        // BFINAL 0, BTYPE 00, then padding to the byte boundary.
        out.put_u8(0x00);
        let len = block.len() as u16;
        out.put_u16_le(len);
        out.put_u16_le(!len);
        out.put_slice(block);
    }
}

/// `data` uncompressed in `codec`'s shared format.
pub fn uncompressed(codec: Codec, out: &mut BytesMut, data: &[u8]) {
    match codec {
        Codec::Zstd => zstd_raw_blocks(out, data),
        Codec::Gzip => stored_blocks(out, data),
        Codec::Brotli => brotli_uncompressed(out, data),
    }
}

/// Appends `data` as uncompressed brotli meta-blocks (RFC 7932, 9.2), not
/// last. The output must be at a byte boundary, and stays there.
pub fn brotli_uncompressed(out: &mut BytesMut, data: &[u8]) {
    for block in data.chunks(1 << 16) {
        // ISLAST 0 (bit 0), MNIBBLES 4 (bits 1-2: 0), MLEN-1 (bits 3-18),
        // ISUNCOMPRESSED 1 (bit 19), then zero bits to the byte boundary.
        let header = ((block.len() as u32 - 1) << 3) | (1 << 19);
        out.put_slice(&header.to_le_bytes()[..3]);
        out.put_slice(block);
    }
}

/// A brotli stream's start: the window size (RFC 7932, 9.1), then an empty
/// metadata meta-block (ISLAST 0, MNIBBLES 0b11, reserved 0, MSKIPBYTES 0)
/// and zero bits to the byte boundary, where every unit may begin.
pub fn brotli_stream_start() -> Vec<u8> {
    let lgwin = BROTLI_LGWIN as u32;
    let (bits, len): (u32, u32) = match lgwin {
        16 => (0, 1),
        17 => (0b000_0001, 7),
        18.. => (1 | ((lgwin - 17) << 1), 4),
        _ => (1 | ((lgwin - 8) << 4), 7),
    };
    let all = bits | (0b0110 << len);
    let bytes = (len + 6).div_ceil(8) as usize;
    all.to_le_bytes()[..bytes].to_vec()
}

/// The end of a brotli stream: ISLAST 1, ISLASTEMPTY 1, then zero bits.
pub const BROTLI_END: u8 = 0x03;

/// A gzip member header: deflate, no name, no time, unknown OS.
pub const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, 0, 0xff];
/// The last deflate block: final, fixed Huffman codes, empty.
pub const DEFLATE_END: [u8; 2] = [0x03, 0x00];

/// The other end of a [`Compressor`]: decodes a stream chunk by chunk, as a
/// browser does (used by `crier bench`).
pub struct Decompressor {
    decoder: Decoder,
}

enum Decoder {
    Zstd(zstd::stream::write::Decoder<'static, Vec<u8>>),
    Brotli(Box<BrotliDecoder>),
    Gzip(flate2::write::GzDecoder<Vec<u8>>),
}

type BrotliState = brotli::BrotliState<
    brotli::enc::StandardAlloc,
    brotli::enc::StandardAlloc,
    brotli::enc::StandardAlloc,
>;

/// brotli's streaming decoder, fed small slices so that the output of one
/// call always fits its buffer: when a call runs out of output space, the
/// crate's decoder (and its `DecompressorWriter`) drops output (seen with
/// brotli-decompressor 5 and 6 on valid streams that zlib decodes whole).
/// Should a slice ever decode to more than the buffer, it is an error, never
/// a silent loss.
struct BrotliDecoder {
    state: BrotliState,
    out: Vec<u8>,
}

impl BrotliDecoder {
    /// Compressed bytes per call.
    const SLICE: usize = 256;
    /// Decoded bytes one call may produce.
    const OUT: usize = 1 << 20;

    fn new() -> BrotliDecoder {
        let alloc = brotli::enc::StandardAlloc::default;
        BrotliDecoder {
            state: BrotliState::new(alloc(), alloc(), alloc()),
            out: vec![0; Self::OUT],
        }
    }

    fn decode(&mut self, wire: &[u8], decoded: &mut Vec<u8>) -> std::io::Result<()> {
        let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        for slice in wire.chunks(Self::SLICE) {
            let (mut avail_in, mut in_offset) = (slice.len(), 0);
            let (mut avail_out, mut out_offset) = (self.out.len(), 0);
            let mut total_out = 0;
            let result = brotli::BrotliDecompressStream(
                &mut avail_in,
                &mut in_offset,
                slice,
                &mut avail_out,
                &mut out_offset,
                &mut self.out,
                &mut total_out,
                &mut self.state,
            );
            decoded.extend_from_slice(&self.out[..out_offset]);
            match result {
                brotli::BrotliResult::NeedsMoreInput | brotli::BrotliResult::ResultSuccess => {}
                brotli::BrotliResult::NeedsMoreOutput => {
                    return Err(bad("brotli: a slice decoded to more than 1 MiB"));
                }
                brotli::BrotliResult::ResultFailure => return Err(bad("invalid brotli stream")),
            }
        }
        Ok(())
    }
}

impl Decompressor {
    pub fn new(codec: Codec) -> std::io::Result<Decompressor> {
        let decoder = match codec {
            Codec::Zstd => Decoder::Zstd(zstd::stream::write::Decoder::new(Vec::new())?),
            Codec::Brotli => Decoder::Brotli(Box::new(BrotliDecoder::new())),
            Codec::Gzip => Decoder::Gzip(flate2::write::GzDecoder::new(Vec::new())),
        };
        Ok(Decompressor { decoder })
    }

    /// Everything `wire` decodes to, now.
    pub fn decompress(&mut self, wire: &[u8]) -> std::io::Result<Vec<u8>> {
        let out = match &mut self.decoder {
            Decoder::Zstd(d) => {
                d.write_all(wire)?;
                d.flush()?;
                d.get_mut()
            }
            Decoder::Brotli(d) => {
                let mut decoded = Vec::new();
                d.decode(wire, &mut decoded)?;
                return Ok(decoded);
            }
            Decoder::Gzip(d) => {
                d.write_all(wire)?;
                d.flush()?;
                d.get_mut()
            }
        };
        Ok(std::mem::take(out))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A long stream decodes whole however its bytes are cut: chunk by
    /// chunk, or all at once (where brotli's own writer lost output).
    #[test]
    fn a_long_stream_decodes_whole_chunked_or_at_once() {
        for codec in [Codec::Zstd, Codec::Brotli, Codec::Gzip] {
            let mut compressor = Compressor::new(codec).unwrap();
            let (mut plain, mut wire) = (Vec::new(), Vec::new());
            let mut chunked = Decompressor::new(codec).unwrap();
            let mut decoded = Vec::new();
            for batch in 0..1200 {
                let mut chunk = String::new();
                for n in 0..(batch % 7 + 1) {
                    chunk.push_str(&format!(
                        "id: {batch}.{n}\ndata: {{\"host\":\"web-{:02}\",\"p99\":{},\"seq\":{batch}}}\n\n",
                        (batch * 7 + n) % 24,
                        180 + (batch * 13 + n) % 400
                    ));
                }
                plain.extend_from_slice(chunk.as_bytes());
                let bytes = compressor.compress(chunk.as_bytes()).unwrap();
                decoded.extend(chunked.decompress(&bytes).unwrap());
                wire.extend_from_slice(&bytes);
            }
            assert_eq!(decoded, plain, "{codec:?} chunk by chunk");
            let at_once = Decompressor::new(codec).unwrap().decompress(&wire).unwrap();
            assert_eq!(at_once, plain, "{codec:?} all at once");
        }
    }

    #[test]
    fn every_chunk_decodes_on_its_own_arrival() {
        for codec in [Codec::Zstd, Codec::Brotli, Codec::Gzip] {
            let mut compressor = Compressor::new(codec).unwrap();
            let mut decompressor = Decompressor::new(codec).unwrap();
            let mut decoded = |wire: &[u8]| decompressor.decompress(wire).unwrap();
            for n in 0..50 {
                let chunk = format!("id: {n}\ndata: {{\"n\":{n},\"pad\":\"xxxxxxxx\"}}\n\n");
                let wire = compressor.compress(chunk.as_bytes()).unwrap();
                assert_eq!(decoded(&wire), chunk.as_bytes(), "{codec:?} chunk {n}");
            }
        }
    }

    pub(crate) fn json_event(seq: u64) -> Arc<Event> {
        let topic = crate::event::Topic::parse("t", 8).unwrap();
        let data = format!(
            r#"{{"metric":"cpu","host":"web-{:02}.eu-west","value":{}.{},"tags":{{"env":"production"}},"seq":{seq}}}"#,
            seq % 17,
            20 + seq % 60,
            seq % 10
        );
        Arc::new(Event::new(topic, seq, crate::event::Epoch(7), None, &data))
    }

    /// Decodes a whole body strictly: a complete gzip member (its CRC-32 and
    /// length checked), one complete zstd frame, or a complete brotli
    /// stream (its last meta-block read, nothing after it).
    pub(crate) fn strict(codec: Codec, wire: &[u8]) -> Vec<u8> {
        use std::io::Read;
        let mut plain = Vec::new();
        match codec {
            Codec::Gzip => {
                flate2::read::GzDecoder::new(wire)
                    .read_to_end(&mut plain)
                    .unwrap();
            }
            Codec::Brotli => {
                let mut input = wire;
                brotli::BrotliDecompress(&mut input, &mut plain).unwrap();
                assert!(input.is_empty(), "bytes after the brotli stream's end");
            }
            Codec::Zstd => {
                plain = zstd::stream::decode_all(wire).unwrap();
                let frames = wire.windows(4).filter(|w| *w == ZSTD_MAGIC).count();
                assert_eq!(frames, 1, "one zstd frame");
            }
        }
        plain
    }

    /// What a zstd stream decodes to without its repeat-offset resets'
    /// comment lines; any other coding's as it is.
    pub(crate) fn unreset(codec: Codec, decoded: Vec<u8>) -> Vec<u8> {
        if codec != Codec::Zstd {
            return decoded;
        }
        let line = ZSTD_REPEATS_RESET_LINE;
        let mut out = Vec::with_capacity(decoded.len());
        let mut rest = &decoded[..];
        while let Some(at) = rest.windows(line.len()).position(|w| w == line) {
            out.extend_from_slice(&rest[..at]);
            rest = &rest[at + line.len()..];
        }
        out.extend_from_slice(rest);
        out
    }

    /// A stream's frame made by hand: its header, raw blocks of every size
    /// around the 64 KiB block limit, units compressed alone (each after a
    /// repeat-offset reset, as a stream writes them), its end. One frame,
    /// which the zstd crate decodes exactly, as a whole and (by the
    /// streaming decoder) piece by piece.
    #[test]
    fn raw_blocks_and_units_compressed_alone_make_one_valid_zstd_frame() {
        let mut wire = BytesMut::from(&ZSTD_STREAM_HEADER[..]);
        let mut want = Vec::new();
        let mut pieces = Vec::new();
        for n in [1, 255, 256, 65535, 65536, 65537, 200_000] {
            let data: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
            let at = wire.len();
            zstd_raw_blocks(&mut wire, &data);
            want.extend_from_slice(&data);
            // Runs and repeats: matches at the fresh frame's repeat offsets.
            let unit = alone(
                Codec::Zstd,
                format!("data: {n} aaaaaaaa abcdabcd abcdefghabcdefgh {{\"n\":{n}}}\n\n")
                    .as_bytes(),
            );
            assert!(!unit.starts_with(&ZSTD_MAGIC), "bare blocks");
            if n > 1 {
                wire.extend_from_slice(&ZSTD_REPEATS_RESET);
                want.extend_from_slice(ZSTD_REPEATS_RESET_LINE);
            }
            wire.extend_from_slice(&unit);
            want.extend_from_slice(
                format!("data: {n} aaaaaaaa abcdabcd abcdefghabcdefgh {{\"n\":{n}}}\n\n")
                    .as_bytes(),
            );
            pieces.push(wire[at..].to_vec());
        }
        wire.extend_from_slice(&ZSTD_END_OF_FRAME);
        assert_eq!(zstd::stream::decode_all(&wire[..]).unwrap(), want);
        assert!(wire[4..].windows(4).all(|w| w != ZSTD_MAGIC), "one frame");
        let mut decoder = Decompressor::new(Codec::Zstd).unwrap();
        let mut decoded = decoder.decompress(&ZSTD_STREAM_HEADER).unwrap();
        for piece in pieces {
            decoded.extend(decoder.decompress(&piece).unwrap());
        }
        assert_eq!(decoded, want);
    }

    /// The reset decodes to its comment line and sets the repeat offsets
    /// back whatever they were: a unit compressed alone that leans on a
    /// fresh frame's offsets decodes right after it, and wrongly (or not at
    /// all) without it.
    #[test]
    fn the_repeat_offset_reset_lets_a_fresh_unit_follow_any_compressed_block() {
        let text = |n: usize| {
            format!("data: {{\"k\":\"{n}{n}{n}{n}{n}{n}\",\"pad\":\"....____....____\"}}\n\n")
        };
        let mut with = BytesMut::from(&ZSTD_STREAM_HEADER[..]);
        let mut without = with.clone();
        let mut want = Vec::new();
        for n in 0..40 {
            let unit = alone(Codec::Zstd, text(n).as_bytes());
            if n > 0 {
                with.extend_from_slice(&ZSTD_REPEATS_RESET);
                want.extend_from_slice(ZSTD_REPEATS_RESET_LINE);
            }
            with.extend_from_slice(&unit);
            without.extend_from_slice(&unit);
            want.extend_from_slice(text(n).as_bytes());
        }
        with.extend_from_slice(&ZSTD_END_OF_FRAME);
        without.extend_from_slice(&ZSTD_END_OF_FRAME);
        assert_eq!(zstd::stream::decode_all(&with[..]).unwrap(), want);
        assert_ne!(
            zstd::stream::decode_all(&without[..]).ok(),
            Some(unreset(Codec::Zstd, want)),
            "units relying on a fresh frame's repeat offsets"
        );
    }

    #[test]
    fn stored_blocks_between_compressed_units_make_a_valid_deflate_stream() {
        let mut wire = BytesMut::new();
        stored_blocks(&mut wire, b"own ");
        wire.extend_from_slice(&alone(Codec::Gzip, b"alone "));
        let big = vec![b'x'; 70_000];
        stored_blocks(&mut wire, &big);
        wire.extend_from_slice(&DEFLATE_END);
        let mut plain = Vec::new();
        use std::io::Read;
        flate2::read::DeflateDecoder::new(&wire[..])
            .read_to_end(&mut plain)
            .unwrap();
        let mut want = b"own alone ".to_vec();
        want.extend_from_slice(&big);
        assert_eq!(plain, want);
    }

    /// A brotli stream made by hand (its start, uncompressed meta-blocks of
    /// every length around 64 KiB, catable units, its end) is one complete
    /// stream to the brotli crate's decoder.
    #[test]
    fn uncompressed_meta_blocks_between_catable_units_make_a_valid_brotli_stream() {
        let mut wire = BytesMut::from(&brotli_stream_start()[..]);
        let mut want = Vec::new();
        for n in [1, 2, 255, 65535, 65536, 65537, 200_000] {
            let data: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
            brotli_uncompressed(&mut wire, &data);
            want.extend_from_slice(&data);
            let unit = alone(Codec::Brotli, b"data: {\"alone\":true}\n\n");
            wire.extend_from_slice(&unit);
            want.extend_from_slice(b"data: {\"alone\":true}\n\n");
        }
        wire.put_u8(BROTLI_END);
        assert_eq!(strict(Codec::Brotli, &wire), want);
    }

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
