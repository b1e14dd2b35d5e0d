//! Compression of event streams, flushed chunk by chunk.
//!
//! A generic HTTP compressor waits for enough input to fill a block, which
//! would hold events back. Here each chunk a stream writes (events,
//! heartbeats) goes through the compressor and is flushed at once (deflate
//! sync flush, brotli flush, zstd end of block), so the client can decode it
//! the moment it arrives, while the compression context carries over from
//! event to event, which is where the savings on repetitive JSON come from.
//! The window sizes are kept modest because every compressed stream owns
//! one compressor.

use std::io::Write;
use std::str::FromStr;

use axum::http::HeaderValue;
use bytes::Bytes;

/// A content coding the hub can produce.
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

/// Picks the codec for a request: the one the client values most among
/// `enabled`; on a tie, the earlier in `enabled`. `None` means identity.
pub fn negotiate(accept_encoding: Option<&HeaderValue>, enabled: &[Codec]) -> Option<Codec> {
    let header = accept_encoding?.to_str().ok()?;
    let mut best: Option<(f32, usize)> = None;
    for item in header.split(',') {
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        if q <= 0.0 {
            continue;
        }
        for (rank, codec) in enabled.iter().enumerate() {
            if name == codec.token() || name == "*" {
                let better = match best {
                    None => true,
                    Some((best_q, best_rank)) => q > best_q || (q == best_q && rank < best_rank),
                };
                if better {
                    best = Some((q, rank));
                }
            }
        }
    }
    best.map(|(_, rank)| enabled[rank])
}

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
            Codec::Zstd => {
                let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3)?;
                encoder.window_log(17)?;
                encoder.include_checksum(false)?;
                Encoder::Zstd(encoder)
            }
            Codec::Brotli => Encoder::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                4096,
                5,
                17,
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
    Brotli(Box<brotli::DecompressorWriter<Vec<u8>>>),
    Gzip(flate2::write::GzDecoder<Vec<u8>>),
}

impl Decompressor {
    pub fn new(codec: Codec) -> std::io::Result<Decompressor> {
        let decoder = match codec {
            Codec::Zstd => Decoder::Zstd(zstd::stream::write::Decoder::new(Vec::new())?),
            Codec::Brotli => {
                Decoder::Brotli(Box::new(brotli::DecompressorWriter::new(Vec::new(), 4096)))
            }
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
                d.write_all(wire)?;
                d.flush()?;
                d.get_mut()
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

    fn pick(header: &str) -> Option<Codec> {
        let value = HeaderValue::from_str(header).unwrap();
        negotiate(Some(&value), &[Codec::Zstd, Codec::Brotli, Codec::Gzip])
    }

    #[test]
    fn negotiation_prefers_the_clients_best_then_ours() {
        assert_eq!(pick("gzip"), Some(Codec::Gzip));
        assert_eq!(pick("gzip, deflate, br"), Some(Codec::Brotli));
        assert_eq!(pick("gzip, deflate, br, zstd"), Some(Codec::Zstd));
        assert_eq!(pick("zstd;q=0.5, gzip;q=0.9"), Some(Codec::Gzip));
        assert_eq!(pick("br;q=0, gzip;q=0"), None);
        assert_eq!(pick("identity"), None);
        assert_eq!(pick("*"), Some(Codec::Zstd));
        assert_eq!(negotiate(None, &[Codec::Gzip]), None);
        let gzip = HeaderValue::from_static("gzip");
        assert_eq!(negotiate(Some(&gzip), &[]), None);
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
