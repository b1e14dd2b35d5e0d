//! Idempotency keys: what lets a publisher retry any failure without
//! storing an event twice.
//!
//! A client's key is parsed once at the edge ([`IdempotencyKey`]), then
//! scoped to its publisher and hashed ([`KeyDigest`]): stores, Redis keys,
//! logs and errors never see the client's string, and two publishers cannot
//! collide or probe each other's keys. What a key was first used for is
//! remembered as a [`Fingerprint`] (SHA-256 of topic, name and data), never
//! as the body.

use ring::digest::{Context, SHA256};

use super::NewEvent;

/// Longest idempotency key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 128;

/// A client's idempotency key: 1 to 128 bytes of visible ASCII (`!` to `~`).
/// Its `Debug` hides the key: it is never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct IdempotencyKey(Box<[u8]>);

impl std::fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdempotencyKey(..)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "an idempotency key has 1 to {MAX_KEY_LEN} visible ASCII characters (`!` to `~`, no spaces)"
)]
pub struct InvalidIdempotencyKey;

impl IdempotencyKey {
    pub fn parse(key: &[u8]) -> Result<IdempotencyKey, InvalidIdempotencyKey> {
        if key.is_empty() || key.len() > MAX_KEY_LEN || !key.iter().all(u8::is_ascii_graphic) {
            return Err(InvalidIdempotencyKey);
        }
        Ok(IdempotencyKey(key.into()))
    }

    /// The key as stores see it: hashed with the publisher's scope (the
    /// token's subject, or one shared scope; see `Principal::key_scope`).
    pub fn scoped(&self, scope: &str) -> KeyDigest {
        let mut hash = Context::new(&SHA256);
        hash.update(b"crier idempotency key\0");
        put(&mut hash, scope.as_bytes());
        put(&mut hash, &self.0);
        KeyDigest(digest(hash))
    }
}

/// A scoped, hashed idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyDigest(pub [u8; 32]);

impl KeyDigest {
    pub fn hex(&self) -> String {
        hex(&self.0)
    }
}

/// What an event was: SHA-256 of its topic, name and data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(event: &NewEvent) -> Fingerprint {
        let mut hash = Context::new(&SHA256);
        hash.update(b"crier event\0");
        put(&mut hash, event.topic.as_str().as_bytes());
        match &event.name {
            Some(name) => {
                hash.update(b"n");
                put(&mut hash, name.as_str().as_bytes());
            }
            None => hash.update(b"-"),
        }
        put(&mut hash, event.data.as_bytes());
        Fingerprint(digest(hash))
    }

    pub fn hex(&self) -> String {
        hex(&self.0)
    }
}

/// An event's key and fingerprint, handed to a store with the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Once {
    pub key: KeyDigest,
    pub fingerprint: Fingerprint,
}

impl Once {
    pub fn new(key: &IdempotencyKey, scope: &str, event: &NewEvent) -> Once {
        Once {
            key: key.scoped(scope),
            fingerprint: Fingerprint::of(event),
        }
    }
}

/// The first event of `events` whose key an earlier one of them carries
/// with another fingerprint: such a request is refused before any store
/// sees it. (The same key with the same fingerprint twice is a retry within
/// the request: the later one replays the earlier.)
pub fn conflict_within(events: &[Option<Once>]) -> Option<usize> {
    let mut seen = std::collections::HashMap::with_capacity(events.len());
    events.iter().enumerate().find_map(|(i, once)| {
        let once = once.as_ref()?;
        let first = seen.entry(once.key).or_insert(once.fingerprint);
        (*first != once.fingerprint).then_some(i)
    })
}

/// Hashes `bytes` with their length first, so fields cannot run together.
fn put(hash: &mut Context, bytes: &[u8]) {
    hash.update(&(bytes.len() as u64).to_be_bytes());
    hash.update(bytes);
}

fn digest(hash: Context) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(hash.finish().as_ref());
    out
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventName, Topic};

    fn event(topic: &str, name: Option<&str>, data: &str) -> NewEvent {
        NewEvent {
            topic: Topic::parse(topic, 128).unwrap(),
            name: name.map(|n| EventName::parse(n).unwrap()),
            data: data.into(),
        }
    }

    #[test]
    fn keys_are_visible_ascii_of_1_to_128_bytes() {
        assert!(IdempotencyKey::parse(b"a").is_ok());
        assert!(IdempotencyKey::parse(&[b'~'; 128]).is_ok());
        assert!(IdempotencyKey::parse(b"\"8e03978e-40d5\"").is_ok());
        for bad in [
            &b""[..],
            &[b'x'; 129],
            b"has space",
            b"tab\t",
            b"caf\xc3\xa9",
            b"\x7f",
        ] {
            assert_eq!(IdempotencyKey::parse(bad), Err(InvalidIdempotencyKey));
        }
    }

    #[test]
    fn a_key_means_something_else_in_another_scope() {
        let key = IdempotencyKey::parse(b"k1").unwrap();
        assert_eq!(key.scoped("sub:a"), key.scoped("sub:a"));
        assert_ne!(key.scoped("sub:a"), key.scoped("sub:b"));
        assert_ne!(
            key.scoped(""),
            IdempotencyKey::parse(b"k2").unwrap().scoped("")
        );
        assert_eq!(key.scoped("").hex().len(), 64);
    }

    #[test]
    fn fingerprints_tell_topic_name_and_data_apart() {
        let base = Fingerprint::of(&event("t", None, "x"));
        assert_eq!(base, Fingerprint::of(&event("t", None, "x")));
        for other in [
            event("u", None, "x"),
            event("t", Some("n"), "x"),
            event("t", None, "y"),
            event("t", None, ""),
        ] {
            assert_ne!(base, Fingerprint::of(&other));
        }
        // Fields cannot run into each other.
        assert_ne!(
            Fingerprint::of(&event("ab", None, "c")),
            Fingerprint::of(&event("a", None, "bc"))
        );
    }

    #[test]
    fn a_key_twice_in_one_request_conflicts_only_with_another_event() {
        let key = IdempotencyKey::parse(b"k").unwrap();
        let (a, b) = (event("t", None, "a"), event("t", None, "b"));
        let once = |e: &NewEvent| Some(Once::new(&key, "", e));
        assert_eq!(conflict_within(&[once(&a), None, once(&a)]), None);
        assert_eq!(conflict_within(&[once(&a), None, once(&b)]), Some(2));
        assert_eq!(conflict_within(&[None, None]), None);
    }
}
