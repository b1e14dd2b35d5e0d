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
//!   Chromium's, event by event (tests/it/compression.rs, tests/it/browser.rs).
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
//!
//! The parts: `chain.rs` (per-topic chains and their cap), `format.rs` (each
//! format's raw bytes, units compressed alone, whole bodies), `stream.rs`
//! (one stream's own compressor and decompressor: the bench's baseline and
//! every test's decoder).

mod chain;
mod format;
mod stream;

pub use chain::{Chain, ChainPermits, Chained, SEGMENT_EVENTS};
pub use format::{
    BROTLI_END, DEFLATE_END, GZIP_HEADER, ZSTD_END_OF_FRAME, ZSTD_REPEATS_RESET,
    ZSTD_REPEATS_RESET_LINE, ZSTD_STREAM_HEADER, alone, brotli_stream_start, brotli_uncompressed,
    self_contained, stored_blocks, uncompressed, whole, zstd_raw_blocks,
};
pub use stream::{Compressor, Decompressor};

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use crate::coding::Codec;
    use crate::event::Event;

    use super::format::{ZSTD_MAGIC, ZSTD_REPEATS_RESET_LINE};

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
}
