//! The raw formats: each coding's framing bytes (headers, ends, raw and
//! stored blocks, uncompressed meta-blocks, zstd's repeat-offset reset),
//! events compressed alone as self-contained units, and whole bodies. See
//! the module above for why each format can be cut into units. Pure bytes.

use std::cell::RefCell;
use std::io::Write;

use bytes::{BufMut, Bytes, BytesMut};

use crate::coding::Codec;
use crate::event::Event;

/// Level for events compressed alone: small inputs, compressed once.
const ALONE_DEFLATE_LEVEL: u32 = 6;
pub(super) const ZSTD_LEVEL: i32 = 3;
/// brotli quality of events compressed alone (and of the topics' chains).
/// Not 5 to 9: with a 64 KiB window those take the brotli crate's H40
/// hasher, which allocates 33 MiB per compressor (measured).
const ALONE_BROTLI_QUALITY: i32 = 4;
/// The window of every brotli stream and unit (log2 bytes): what a unit
/// may refer back to, and what a browser's decoder allocates per stream.
pub(super) const BROTLI_LGWIN: i32 = 16;

pub(super) type BrotliWriter = brotli::CompressorWriter<Vec<u8>>;

/// A brotli compressor whose output can follow any byte-aligned point of
/// any brotli stream: `catable` (no reference to anything before its
/// start, no static dictionary, its first two bytes stored so literal
/// contexts never look before it, distance cache unused until it has
/// distances of its own), `bare_stream` (no window-size header, no final
/// meta-block) and byte-aligned at every flush. `size_hint`: the input's
/// size when known (0: unknown), so a small input gets small tables.
pub(super) fn brotli_catable(quality: i32, size_hint: usize) -> BrotliWriter {
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
pub(super) fn brotli_flushed(writer: &mut BrotliWriter, input: &[u8]) -> std::io::Result<Bytes> {
    writer.write_all(input)?;
    writer.flush()?;
    Ok(Bytes::from(std::mem::take(writer.get_mut())))
}

/// Compresses `input` and sync-flushes: the output ends on a byte
/// boundary between blocks.
pub(super) fn deflate(compress: &mut flate2::Compress, input: &[u8]) -> std::io::Result<Bytes> {
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

pub(super) const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// The window of every zstd stream (log2 bytes): what any unit may refer
/// back, and, with at most 128 KiB, the largest block.
pub(super) const ZSTD_WINDOW_LOG: u32 = 16;
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
pub(super) fn zstd_without_header(frame: &[u8]) -> Option<usize> {
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
pub(super) fn zstd_bare_blocks(frame: &[u8]) -> Option<Vec<u8>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::Decompressor;
    use crate::compress::tests::{strict, unreset};

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
}
