//! One stream's own compressor and decompressor, with no sharing: the
//! per-stream compression the hub's chains replace (kept as the bench's
//! baseline) and the decoder `crier bench` and the tests read streams
//! with, chunk by chunk, as a browser does. Pure bytes.

use std::io::Write;

use bytes::Bytes;

use crate::coding::Codec;

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
mod tests {
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
}
