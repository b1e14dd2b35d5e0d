//! The content codings a subscriber may ask for, and their decoders: each
//! stream is decoded read by read, as a browser does.
//!
//! The bench's own, not the hub's: it checks the hub's output with decoders
//! the hub does not share (the same crates, the same care with brotli).

use std::io::Write;
use std::str::FromStr;

/// A content coding a stream may come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Zstd,
    Brotli,
    Gzip,
}

impl Codec {
    /// The `Content-Encoding` token.
    pub fn token(self) -> &'static str {
        match self {
            Codec::Zstd => "zstd",
            Codec::Brotli => "br",
            Codec::Gzip => "gzip",
        }
    }
}

impl FromStr for Codec {
    type Err = String;

    fn from_str(s: &str) -> Result<Codec, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "zstd" => Ok(Codec::Zstd),
            "br" | "brotli" => Ok(Codec::Brotli),
            "gzip" => Ok(Codec::Gzip),
            other => Err(format!("unknown codec `{other}` (zstd, br, gzip or none)")),
        }
    }
}

/// Decodes a stream chunk by chunk, as a browser does.
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

/// A whole stream in `codec`, flushed after each chunk as a hub writes it:
/// what the tests feed the decoders.
#[cfg(test)]
pub fn compress_chunks(codec: Codec, chunks: &[Vec<u8>]) -> Vec<u8> {
    let mut wire = Vec::new();
    match codec {
        Codec::Gzip => {
            let mut e = flate2::write::GzEncoder::new(&mut wire, flate2::Compression::fast());
            for chunk in chunks {
                e.write_all(chunk).unwrap();
                e.flush().unwrap();
            }
            e.finish().unwrap();
        }
        Codec::Zstd => {
            let mut e = zstd::stream::write::Encoder::new(&mut wire, 3).unwrap();
            for chunk in chunks {
                e.write_all(chunk).unwrap();
                e.flush().unwrap();
            }
            e.finish().unwrap();
        }
        Codec::Brotli => {
            let mut e = brotli::CompressorWriter::new(&mut wire, 4096, 5, 22);
            for chunk in chunks {
                e.write_all(chunk).unwrap();
                e.flush().unwrap();
            }
        }
    }
    wire
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A long stream decodes whole however its bytes are cut: chunk by
    /// chunk, or all at once (where brotli's own writer lost output).
    #[test]
    fn a_long_stream_decodes_whole_chunked_or_at_once() {
        for codec in [Codec::Zstd, Codec::Brotli, Codec::Gzip] {
            let chunks: Vec<Vec<u8>> = (0..1200)
                .map(|n| {
                    format!(
                        "id: {n}\ndata: {{\"host\":\"web-{:02}\",\"p99\":{},\"seq\":{n}}}\n\n",
                        n % 24,
                        180 + (n * 13) % 400
                    )
                    .into_bytes()
                })
                .collect();
            let plain = chunks.concat();
            let wire = compress_chunks(codec, &chunks);
            let mut chunked = Decompressor::new(codec).unwrap();
            let mut decoded = Vec::new();
            for piece in wire.chunks(97) {
                decoded.extend(chunked.decompress(piece).unwrap());
            }
            assert_eq!(decoded, plain, "{codec:?} piece by piece");
            let at_once = Decompressor::new(codec).unwrap().decompress(&wire).unwrap();
            assert_eq!(at_once, plain, "{codec:?} all at once");
        }
    }
}
