//! Content codings: which ones the hub speaks, and the choice of one for a
//! request from its `Accept-Encoding`. Names only: the bytes are made in
//! `compress`, which this module knows nothing of.

use std::str::FromStr;

use axum::http::HeaderValue;

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

    /// For codings whose compressed units streams share: its index in the
    /// per-coding arrays of this module.
    pub fn shared_slot(self) -> Option<usize> {
        match self {
            Codec::Zstd => Some(0),
            Codec::Gzip => Some(1),
            Codec::Brotli => Some(2),
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

/// How many codings share units ([`Codec::shared_slot`]).
pub const SHARED_CODINGS: usize = 3;

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
