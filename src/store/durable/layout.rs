//! The key/value layout on disk: how an event, a topic and an idempotency
//! record become fjall keys and values, and back. Pure bytes; it never
//! touches the database, so it is unit-tested on slices.
//!
//! - `events`: `topic \0 seq` (big-endian) → stored-at, name, data; a
//!   topic's keys sort by number and share a prefix, so resuming and
//!   loading seek by key, never scan;
//! - `topics`: `topic` → epoch and head;
//! - `once`: idempotency key digest → fingerprint, expiry and receipt;
//! - `state`: the boot id of the running machine and a clean-stop mark.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::event::{Epoch, EventName, Topic};
use crate::store::{Fingerprint, Receipt};

/// An idempotency record, as the writer keeps it.
#[derive(Clone)]
pub(super) struct KeyRecord {
    pub(super) fingerprint: Fingerprint,
    pub(super) receipt: Receipt,
    /// Wall-clock milliseconds: records outlive the process.
    pub(super) expires_ms: u64,
}

/// Now, in wall-clock milliseconds: times on disk outlive the process.
pub(super) fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The instant a wall-clock time of the past corresponds to.
pub(super) fn instant_of(at_ms: u64, now: Instant, now_ms: u64) -> Instant {
    now.checked_sub(Duration::from_millis(now_ms.saturating_sub(at_ms)))
        .unwrap_or(now)
}

/// An event's key: its topic's prefix, then its number big-endian, so
/// keys sort by topic, then number.
pub(super) fn event_key(topic: &Topic, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(topic.as_str().len() + 9);
    key.extend_from_slice(topic.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// What every event key of `topic` starts with, and no other topic's.
pub(super) fn event_prefix(topic: &Topic) -> Vec<u8> {
    let mut key = topic.as_str().as_bytes().to_vec();
    key.push(0);
    key
}

/// An event's value: stored-at (ms), its name if any, its data.
pub(super) fn event_value(at_ms: u64, name: Option<&EventName>, data: &str) -> Vec<u8> {
    let mut value = Vec::with_capacity(data.len() + 16);
    value.extend_from_slice(&at_ms.to_be_bytes());
    match name {
        Some(name) => {
            value.push(1);
            value.extend_from_slice(&(name.as_str().len() as u32).to_be_bytes());
            value.extend_from_slice(name.as_str().as_bytes());
        }
        None => value.push(0),
    }
    value.extend_from_slice(data.as_bytes());
    value
}

/// Stored-at, name and data of an event record; `None` when malformed.
pub(super) fn parse_event(value: &[u8]) -> Option<(u64, Option<EventName>, String)> {
    let at = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
    let (name, rest) = match value.get(8)? {
        0 => (None, value.get(9..)?),
        1 => {
            let len = u32::from_be_bytes(value.get(9..13)?.try_into().ok()?) as usize;
            let name = std::str::from_utf8(value.get(13..13 + len)?).ok()?;
            (Some(EventName::parse(name).ok()?), value.get(13 + len..)?)
        }
        _ => return None,
    };
    Some((at, name, String::from_utf8(rest.to_vec()).ok()?))
}

/// A topic's value: its epoch and head.
pub(super) fn topic_value(epoch: Epoch, head: u64) -> [u8; 16] {
    let mut value = [0; 16];
    value[..8].copy_from_slice(&epoch.0.to_be_bytes());
    value[8..].copy_from_slice(&head.to_be_bytes());
    value
}

/// Epoch and head of a topic record; `None` when malformed.
pub(super) fn parse_topic_value(value: &[u8]) -> Option<(Epoch, u64)> {
    let epoch = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
    let head = u64::from_be_bytes(value.get(8..16)?.try_into().ok()?);
    Some((Epoch(epoch), head))
}

/// An idempotency record's value: fingerprint, expiry, receipt.
pub(super) fn record_value(record: &KeyRecord) -> Vec<u8> {
    let mut value = Vec::with_capacity(96);
    value.extend_from_slice(&record.fingerprint.0);
    value.extend_from_slice(&record.expires_ms.to_be_bytes());
    value.extend_from_slice(&record.receipt.epoch.0.to_be_bytes());
    value.extend_from_slice(&record.receipt.seq.to_be_bytes());
    value.extend_from_slice(record.receipt.topic.as_str().as_bytes());
    value
}

/// An idempotency record; `None` when malformed.
pub(super) fn parse_record(value: &[u8]) -> Option<KeyRecord> {
    let fingerprint = Fingerprint(value.get(..32)?.try_into().ok()?);
    let expires_ms = u64::from_be_bytes(value.get(32..40)?.try_into().ok()?);
    let epoch = u64::from_be_bytes(value.get(40..48)?.try_into().ok()?);
    let seq = u64::from_be_bytes(value.get(48..56)?.try_into().ok()?);
    let topic = Topic::parse(std::str::from_utf8(value.get(56..)?).ok()?, usize::MAX).ok()?;
    Some(KeyRecord {
        fingerprint,
        receipt: Receipt {
            topic,
            seq,
            epoch: Epoch(epoch),
        },
        expires_ms,
    })
}

/// The number an event key ends with; `None` when it is too short.
pub(super) fn seq_of_key(key: &[u8]) -> Option<u64> {
    key.get(key.len().checked_sub(8)?..)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_records_read_back_as_written() {
        let name = EventName::parse("update").unwrap();
        for (name, data) in [
            (None, ""),
            (Some(&name), "line one\nline two"),
            (None, "ünïcødé"),
        ] {
            let value = event_value(1_700_000_000_123, name, data);
            let (at, read_name, read_data) = parse_event(&value).unwrap();
            assert_eq!(at, 1_700_000_000_123);
            assert_eq!(
                read_name.as_ref().map(EventName::as_str),
                name.map(EventName::as_str)
            );
            assert_eq!(read_data, data);
        }
        assert!(parse_event(b"short").is_none());
        assert!(parse_event(&[0, 0, 0, 0, 0, 0, 0, 0, 7]).is_none());
    }

    #[test]
    fn event_keys_sort_by_topic_then_number_and_a_prefix_holds_one_topic() {
        let (a, ab) = (
            Topic::parse("a", 128).unwrap(),
            Topic::parse("ab", 128).unwrap(),
        );
        assert!(event_key(&a, 9) < event_key(&a, 10));
        assert!(event_key(&a, u64::MAX) < event_key(&ab, 1));
        assert!(event_key(&a, 3).starts_with(&event_prefix(&a)));
        assert!(!event_key(&ab, 3).starts_with(&event_prefix(&a)));
        assert_eq!(seq_of_key(&event_key(&ab, 1 << 40)), Some(1 << 40));
        assert_eq!(seq_of_key(b"short"), None);
    }

    #[test]
    fn topic_and_idempotency_records_read_back_as_written() {
        assert_eq!(
            parse_topic_value(&topic_value(Epoch(42), 7)),
            Some((Epoch(42), 7))
        );
        let record = KeyRecord {
            fingerprint: Fingerprint([3; 32]),
            receipt: Receipt {
                topic: Topic::parse("orders", 128).unwrap(),
                seq: 17,
                epoch: Epoch(99),
            },
            expires_ms: 123_456,
        };
        let read = parse_record(&record_value(&record)).unwrap();
        assert_eq!(read.fingerprint, record.fingerprint);
        assert_eq!(read.receipt, record.receipt);
        assert_eq!(read.expires_ms, 123_456);
        assert!(parse_record(&[0; 20]).is_none());
    }
}
