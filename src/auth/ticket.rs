//! Single-use tickets: a short-lived, opaque, random string a page puts in
//! a subscription URL instead of a token (EventSource cannot send headers,
//! and URLs end up in logs, so what goes there must be worthless once used).
//!
//! A ticket is 256 random bits, hex-encoded. The store keeps only its
//! SHA-256 digest, with the topics it opens and the expiry of the token that
//! minted it, and hands the record out once (`Store::take_ticket`).

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::event::Topic;

/// What a ticket opens, as kept by the store under the ticket's digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketRecord {
    pub topics: Vec<String>,
    /// When the minting token expires (seconds since the Unix epoch); the
    /// stream the ticket opens ends then.
    pub expires_at: u64,
}

impl TicketRecord {
    /// Whether the ticket names `topic`.
    pub fn names(&self, topic: &Topic) -> bool {
        self.topics.iter().any(|t| t == topic.as_str())
    }
}

/// A fresh ticket string.
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the operating system's random source works");
    hex(&bytes)
}

/// The key under which a store keeps a ticket: its digest, so neither a
/// store dump nor a key listing gives away a usable ticket.
pub fn digest(ticket: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, ticket.as_bytes()).as_ref())
}

/// Whether `s` looks like a ticket at all (cheap refusal of garbage).
pub fn well_formed(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_are_random_and_well_formed() {
        let (a, b) = (generate(), generate());
        assert_ne!(a, b);
        assert!(well_formed(&a));
        assert!(!well_formed("abc"));
        assert_eq!(digest(&a).len(), 64);
        assert_ne!(digest(&a), a);
    }
}
