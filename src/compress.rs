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
/// A coding named in the header takes its own q-value, `*` stands for the
/// others, and q=0 refuses (RFC 9110, 12.5.3).
pub fn negotiate(accept_encoding: Option<&HeaderValue>, enabled: &[Codec]) -> Option<Codec> {
    let header = accept_encoding?.to_str().ok()?;
    // Each enabled codec's q-value by its own name, and the wildcard's.
    let mut named: Vec<Option<f32>> = vec![None; enabled.len()];
    let mut wildcard: Option<f32> = None;
    for item in header.split(',') {
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| {
                let (key, value) = p.split_once('=')?;
                key.trim().eq_ignore_ascii_case("q").then(|| value.trim())
            })
            .find_map(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        if name == "*" {
            wildcard = Some(q);
        } else if let Some(rank) = enabled.iter().position(|c| c.token() == name) {
            named[rank] = Some(q);
        }
    }
    let mut best: Option<(f32, usize)> = None;
    for (rank, q) in named.iter().enumerate() {
        let q = q.or(wildcard).unwrap_or(0.0);
        if q > 0.0 && best.is_none_or(|(best_q, _)| q > best_q) {
            best = Some((q, rank));
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
        // A refusal by name holds against the wildcard, in any case.
        assert_eq!(pick("zstd;q=0, *"), Some(Codec::Brotli));
        assert_eq!(pick("zstd;Q=0, br;q=0, *;q=0.5"), Some(Codec::Gzip));
        assert_eq!(pick("gzip;q=0.2, *;q=0.1"), Some(Codec::Gzip));
        assert_eq!(pick("*;q=0"), None);
        assert_eq!(negotiate(None, &[Codec::Gzip]), None);
        let gzip = HeaderValue::from_static("gzip");
        assert_eq!(negotiate(Some(&gzip), &[]), None);
    }

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

    mod properties {
        use proptest::prelude::*;

        use super::*;

        const ALL: [Codec; 3] = [Codec::Zstd, Codec::Brotli, Codec::Gzip];

        /// An `Accept-Encoding` item: a coding and maybe its q-value.
        type Item = (String, Option<&'static str>);

        /// One item: a coding (in any case), maybe a q-value.
        fn item() -> impl Strategy<Value = Item> {
            let name = prop_oneof![
                Just("zstd"),
                Just("br"),
                Just("gzip"),
                Just("*"),
                Just("identity"),
                Just("deflate"),
                Just("compress"),
            ];
            let q = proptest::option::of(prop_oneof![
                Just("0"),
                Just("0.0"),
                Just("0.000"),
                Just("0.001"),
                Just("0.5"),
                Just("0.9"),
                Just("1"),
                Just("1.000"),
            ]);
            (name, any::<bool>(), q).prop_map(|(name, upper, q)| {
                let name = if upper {
                    name.to_ascii_uppercase()
                } else {
                    name.to_owned()
                };
                (name, q)
            })
        }

        /// A header naming each coding at most once, and the codecs the hub
        /// offers, in its order of preference.
        fn case() -> impl Strategy<Value = (Vec<Item>, String, Vec<Codec>)> {
            let items = proptest::collection::vec(item(), 0..8).prop_map(|mut items| {
                let mut seen = std::collections::HashSet::new();
                items.retain(|(name, _)| seen.insert(name.to_ascii_lowercase()));
                items
            });
            let spacing =
                proptest::collection::vec(prop_oneof![Just(""), Just(" "), Just("  ")], 8);
            let enabled = Just(ALL.to_vec())
                .prop_shuffle()
                .prop_flat_map(|all| (0..=all.len()).prop_map(move |n| all[..n].to_vec()));
            (items, spacing, enabled).prop_map(|(items, spacing, enabled)| {
                let header = items
                    .iter()
                    .enumerate()
                    .map(|(i, (name, q))| {
                        let pad = spacing[i % spacing.len()];
                        match q {
                            Some(q) => format!("{pad}{name}{pad};{pad}q={q}"),
                            None => format!("{pad}{name}"),
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(",");
                (items, header, enabled)
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]

            #[test]
            fn negotiation_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
                if let Ok(value) = HeaderValue::from_bytes(&bytes) {
                    for n in 0..=ALL.len() {
                        let _ = negotiate(Some(&value), &ALL[..n]);
                    }
                }
            }

            /// RFC 9110, 12.5.3: each coding's weight is its own q-value if
            /// named, else the wildcard's; q=0 refuses. The hub picks the
            /// heaviest it offers, on a tie its own first choice, and never
            /// one of weight 0.
            #[test]
            fn negotiation_picks_the_heaviest_offered_coding_and_never_a_refused_one(
                (items, header, enabled) in case(),
            ) {
                let value = HeaderValue::from_str(&header).unwrap();
                let weight_of = |token: &str| -> f32 {
                    let q = |item: &Item| item.1.map_or(1.0, |q| q.parse().unwrap());
                    let named = items.iter().find(|i| i.0.eq_ignore_ascii_case(token));
                    let wildcard = items.iter().find(|i| i.0 == "*");
                    named.or(wildcard).map_or(0.0, q)
                };
                let picked = negotiate(Some(&value), &enabled);
                let best = enabled.iter().map(|c| weight_of(c.token())).fold(0.0f32, f32::max);
                match picked {
                    None => prop_assert_eq!(best, 0.0, "nothing picked from {:?}", header),
                    Some(codec) => {
                        let weight = weight_of(codec.token());
                        prop_assert!(weight > 0.0, "{:?} picked from {:?}, which refuses it", codec, header);
                        prop_assert_eq!(weight, best);
                        let first_best = enabled.iter().find(|c| weight_of(c.token()) == best);
                        prop_assert_eq!(Some(&codec), first_best);
                    }
                }
            }
        }
    }
}
