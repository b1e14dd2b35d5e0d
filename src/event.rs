//! The domain's nouns: topics, event names, epochs, positions and stored
//! events. Everything a client sends is parsed into these types once, at the
//! edge, so the rest of the crate never sees an unchecked string.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;

/// A topic name: 1 to `max_len` characters from `A-Z a-z 0-9 . _ - ~ :`.
///
/// The charset keeps names safe in a URL path segment, in a Redis key and in
/// an SSE `id:` line without escaping, and it excludes `/` and `,`, which the
/// event id format uses as separators.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Arc<str>);

impl Topic {
    pub fn parse(name: &str, max_len: usize) -> Result<Topic, InvalidTopic> {
        if name.is_empty() || name.len() > max_len {
            return Err(InvalidTopic::Length { max_len });
        }
        if !name.bytes().all(is_topic_byte) {
            return Err(InvalidTopic::Charset);
        }
        Ok(Topic(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_topic_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'~' | b':')
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTopic {
    #[error("a topic name has 1 to {max_len} characters")]
    Length { max_len: usize },
    #[error("a topic name may contain only A-Z a-z 0-9 . _ - ~ :")]
    Charset,
}

/// The SSE event type a publisher chose (`event=NAME`).
///
/// 1 to 64 characters from `A-Z a-z 0-9 . _ - :`, so it can never carry a
/// line break into the stream. `reset` and `reauth` are reserved for the
/// hub's own control events.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct EventName(Arc<str>);

/// The control event sent when a subscriber's position cannot be honoured.
pub const RESET_EVENT: &str = "reset";
/// The control event sent when a stream's credentials expire, just before
/// it closes: the client reconnects with fresh ones and resumes.
pub const REAUTH_EVENT: &str = "reauth";
const MAX_EVENT_NAME_LEN: usize = 64;

impl EventName {
    pub fn parse(name: &str) -> Result<EventName, InvalidEventName> {
        let charset_ok = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'));
        if name.is_empty() || name.len() > MAX_EVENT_NAME_LEN || !charset_ok {
            return Err(InvalidEventName::Syntax);
        }
        if name == RESET_EVENT || name == REAUTH_EVENT {
            return Err(InvalidEventName::Reserved);
        }
        Ok(EventName(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEventName {
    #[error("an event name has 1 to 64 characters from A-Z a-z 0-9 . _ - :")]
    Syntax,
    #[error("the event names `reset` and `reauth` are reserved for the hub's control events")]
    Reserved,
}

/// Identifies one incarnation of a topic's history.
///
/// A topic's sequence starts again at 1 whenever its history is lost (the
/// process restarted, or the topic expired and was created anew). Positions
/// carry the epoch so that an old position is never replayed against new
/// data. Written in base 36.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Epoch(pub u64);

impl Epoch {
    /// A fresh, unpredictable epoch. 32 bits keep ids short; a collision
    /// needs the same topic to be recreated with the same draw.
    pub fn random() -> Epoch {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        Epoch(h.finish() & 0xffff_ffff)
    }

    fn parse(s: &str) -> Option<Epoch> {
        if s.is_empty()
            || s.len() > 13
            || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'z'))
        {
            return None;
        }
        u64::from_str_radix(s, 36).ok().map(Epoch)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut digits = [0u8; 13];
        let mut n = self.0;
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize];
            n /= 36;
            if n == 0 {
                break;
            }
        }
        f.write_str(std::str::from_utf8(&digits[i..]).map_err(|_| fmt::Error)?)
    }
}

/// A place in one topic's history: "everything up to and including `seq`".
///
/// Written `SEQ.EPOCH` (`57.kq3z1`); `SEQ` alone means "in whatever epoch is
/// current", which is convenient for hand-written `lastEventId=57`, and `0`
/// means "before the first event".
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Position {
    pub seq: u64,
    pub epoch: Option<Epoch>,
}

impl Position {
    pub fn new(seq: u64, epoch: Epoch) -> Position {
        Position {
            seq,
            epoch: Some(epoch),
        }
    }

    fn parse(s: &str) -> Option<Position> {
        let (seq, epoch) = match s.split_once('.') {
            Some((seq, epoch)) => (seq, Some(Epoch::parse(epoch)?)),
            None => (s, None),
        };
        if seq.is_empty() || seq.len() > 20 || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Position {
            seq: seq.parse().ok()?,
            epoch,
        })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.epoch {
            Some(epoch) => write!(f, "{}.{}", self.seq, epoch),
            None => write!(f, "{}", self.seq),
        }
    }
}

/// Where a subscription stands in each of its topics, in the order of its
/// (sorted) topic list. This is what a client sends back as `Last-Event-ID`.
///
/// Grammar: `[TOPIC "/"] POSITION ("," POSITION)*`. The optional topic prefix
/// is how multi-topic streams say which topic an event belongs to; it is
/// ignored when parsing.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Cursor(pub Vec<Position>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "expected {expected} comma-separated position(s) of the form SEQ or SEQ.EPOCH, optionally after `TOPIC/`"
)]
pub struct InvalidCursor {
    pub expected: usize,
}

impl Cursor {
    pub fn parse(s: &str, topics: usize) -> Result<Cursor, InvalidCursor> {
        let err = InvalidCursor { expected: topics };
        let list = match s.split_once('/') {
            Some((prefix, list)) if !prefix.is_empty() && prefix.bytes().all(is_topic_byte) => list,
            Some(_) => return Err(err),
            None => s,
        };
        let positions = list
            .split(',')
            .map(Position::parse)
            .collect::<Option<Vec<_>>>()
            .ok_or(err.clone())?;
        if positions.len() != topics {
            return Err(err);
        }
        Ok(Cursor(positions))
    }
}

/// The positions, comma-separated, without a topic prefix: what
/// [`Cursor::parse`] reads back.
impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, position) in self.0.iter().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            write!(f, "{position}")?;
        }
        Ok(())
    }
}

/// When a live event was numbered, in microseconds since the process's
/// first stamp, wrapping (about every 71 minutes; latencies are far
/// shorter). Never 0: an event holds 0 once its sample was taken, or when it
/// was never live.
pub struct LiveStamp;

impl LiveStamp {
    pub fn now() -> u32 {
        static START: OnceLock<Instant> = OnceLock::new();
        let micros = START.get_or_init(Instant::now).elapsed().as_micros();
        (micros as u32).max(1)
    }
}

/// One stored event, as every store hands it out.
///
/// The event is kept only in its encoded SSE form: `frame` is the complete
/// frame for a single-topic stream (`id:` line first), and `body()` is the
/// same bytes without the `id:` line, for streams that write their own id.
/// Both are slices of one allocation shared by every subscriber.
#[derive(Debug)]
pub struct Event {
    pub topic: Topic,
    pub seq: u64,
    pub epoch: Epoch,
    frame: Bytes,
    id_line_len: u32,
    /// When a store handed this event to the hub live ([`LiveStamp`]); 0
    /// when it never was, or once the first stream wrote it and the
    /// publish-to-write latency was sampled. (With `id_line_len` as `u32`,
    /// the event is no larger than without it.)
    ///
    live_at: AtomicU32,
    /// The event compressed alone, per shared coding, whole and as its body
    /// (`crate::compress::self_contained`): made on first use, then written
    /// by every stream that needs it. One pointer until then.
    units: OnceLock<Box<[OnceLock<Bytes>; UNIT_SLOTS]>>,
    /// The budget the event is retained under (the memory store's), which
    /// its cached units count against while it is retained.
    budget: Option<Arc<RetainedBytes>>,
    /// Bytes of the units cached and counted against `budget`; the top bit
    /// ([`RELEASED`]) once the store let the event go.
    unit_bytes: AtomicUsize,
}

/// Set in [`Event::unit_bytes`] once the store no longer retains the event.
const RELEASED: usize = 1 << (usize::BITS - 1);

/// The memory store's count of the bytes it retains, against its budget
/// (`--max-retained-bytes`): each retained event's frame and the compressed
/// units cached on it.
#[derive(Debug)]
pub struct RetainedBytes {
    bytes: AtomicUsize,
    max: usize,
}

impl RetainedBytes {
    pub fn new(max: usize) -> RetainedBytes {
        RetainedBytes {
            bytes: AtomicUsize::new(0),
            max,
        }
    }

    pub fn get(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn add(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    pub fn sub(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::Relaxed);
    }

    /// Adds `n` if the total stays within the budget.
    fn try_add(&self, n: usize) -> bool {
        let before = self.bytes.fetch_add(n, Ordering::Relaxed);
        if before.saturating_add(n) > self.max {
            self.bytes.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }
}

/// Cached forms per event: three shared codings, whole frame and body; then
/// the event's JSON (WebSocket frames, long-poll entries); then its gRPC
/// message; then its permessage-deflate messages.
const UNIT_SLOTS: usize = 10;

/// The slot of [`Event::unit`] that holds the event's WebSocket text
/// frame, whose payload is its JSON
/// (`crate::transport::websocket::event_frame`, `event_json`).
pub const JSON_UNIT: usize = 6;

/// The slot of [`Event::unit`] that holds the event's gRPC `Item` message
/// (`crate::transport::grpc::event_message`).
pub const PROTO_UNIT: usize = 7;

/// The slot of [`Event::unit`] that holds the event's permessage-deflate
/// frame under its own id
/// (`crate::transport::websocket::event_deflated_frame`).
pub const DEFLATED_UNIT: usize = 8;

/// The slot of [`Event::unit`] that holds the event's JSON after its id,
/// compressed alone: multi-topic sockets put their own id in front of it
/// (`crate::transport::websocket::event_deflated_with_id`).
pub const DEFLATED_REST_UNIT: usize = 9;

impl Event {
    pub fn new(
        topic: Topic,
        seq: u64,
        epoch: Epoch,
        name: Option<&EventName>,
        data: &str,
    ) -> Event {
        let id = Position::new(seq, epoch).to_string();
        let (frame, id_line_len) = crate::sse::encode_event(&id, name.map(EventName::as_str), data);
        Event {
            topic,
            seq,
            epoch,
            frame,
            // An id line is `id: ` and a position: a few dozen bytes.
            id_line_len: u32::try_from(id_line_len).unwrap_or(u32::MAX),
            live_at: AtomicU32::new(0),
            units: OnceLock::new(),
            budget: None,
            unit_bytes: AtomicUsize::new(0),
        }
    }

    /// The event, with the units cached on it counted against `budget`
    /// until [`Event::release`] (the memory store's events).
    pub fn retained_under(mut self, budget: Arc<RetainedBytes>) -> Event {
        self.budget = Some(budget);
        self
    }

    /// The store no longer retains the event: the bytes of its cached units
    /// counted so far, which the store gives back with its frame's. Units
    /// made from now on are not cached.
    pub fn release(&self) -> usize {
        self.unit_bytes.fetch_or(RELEASED, Ordering::Relaxed) & !RELEASED
    }

    /// Counts a unit of `n` bytes against the budget, if it fits and the
    /// event is retained. The budget is added to before the event's count,
    /// and taken back after it, so a concurrent [`Event::release`] never
    /// takes it below zero.
    fn charge(&self, n: usize) -> bool {
        let Some(budget) = &self.budget else {
            return true;
        };
        if !budget.try_add(n) {
            return false;
        }
        if self.unit_bytes.fetch_add(n, Ordering::Relaxed) & RELEASED != 0 {
            budget.sub(n);
            return false;
        }
        true
    }

    /// Takes back a unit counted by [`Event::charge`] but not cached.
    fn refund(&self, n: usize) {
        if let Some(budget) = &self.budget
            && self.unit_bytes.fetch_sub(n, Ordering::Relaxed) & RELEASED == 0
        {
            budget.sub(n);
        }
    }

    /// Marks the event as going out live now: the first stream to write it
    /// samples the publish-to-write latency.
    pub fn stamp_live(&self) {
        self.live_at.store(LiveStamp::now(), Ordering::Relaxed);
    }

    /// The live stamp, taken by the first caller only: one sample per event
    /// and topic, whatever the number of subscribers. Others pay one
    /// relaxed load.
    pub fn take_live_stamp(&self) -> Option<u32> {
        if self.live_at.load(Ordering::Relaxed) == 0 {
            return None;
        }
        match self.live_at.swap(0, Ordering::Relaxed) {
            0 => None,
            stamp => Some(stamp),
        }
    }

    pub fn position(&self) -> Position {
        Position::new(self.seq, self.epoch)
    }

    /// The whole frame, including `id: SEQ.EPOCH`.
    pub fn frame(&self) -> &Bytes {
        &self.frame
    }

    /// The frame without its `id:` line.
    pub fn body(&self) -> Bytes {
        self.frame.slice(self.id_line_len as usize..)
    }

    /// The form in `slot` (`0..6` compressed, [`JSON_UNIT`], [`PROTO_UNIT`],
    /// [`DEFLATED_UNIT`], [`DEFLATED_REST_UNIT`]), made by
    /// `make` on first use and shared from then on, if it fits the budget
    /// the event is retained under (else made anew for each caller: CPU
    /// rather than memory).
    pub fn unit(&self, slot: usize, make: impl FnOnce() -> Bytes) -> Bytes {
        let units = self
            .units
            .get_or_init(|| Box::new(std::array::from_fn(|_| OnceLock::new())));
        let cell = &units[slot % UNIT_SLOTS];
        if let Some(unit) = cell.get() {
            return unit.clone();
        }
        let unit = make();
        if !self.charge(unit.len()) {
            return unit;
        }
        match cell.set(unit.clone()) {
            Ok(()) => unit,
            // Another caller cached it first.
            Err(_) => {
                self.refund(unit.len());
                cell.get().cloned().unwrap_or(unit)
            }
        }
    }

    /// What `f` makes of the form in `slot`: borrowed when it is cached (no
    /// reference count touched, which every subscriber of a busy topic
    /// would contend on), else made as [`Event::unit`] makes it.
    pub fn with_unit<R>(
        &self,
        slot: usize,
        make: impl FnOnce() -> Bytes,
        f: impl FnOnce(&[u8]) -> R,
    ) -> R {
        if let Some(unit) = self
            .units
            .get()
            .and_then(|units| units[slot % UNIT_SLOTS].get())
        {
            return f(unit);
        }
        f(&self.unit(slot, make))
    }

    /// Bytes this event holds in memory.
    pub fn size(&self) -> usize {
        self.frame.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Units count against the budget while the event is retained and fit;
    /// one that does not fit, or made after the event was let go, is made
    /// for its caller and not cached.
    #[test]
    fn cached_units_count_against_the_budget_until_the_event_is_released() {
        let budget = Arc::new(RetainedBytes::new(1000));
        let topic = Topic::parse("t", 8).unwrap();
        let event = Event::new(topic, 1, Epoch(1), None, "x").retained_under(budget.clone());
        let made = std::cell::Cell::new(0);
        let unit = |slot: usize, len: usize| {
            event.unit(slot, || {
                made.set(made.get() + 1);
                Bytes::from(vec![0; len])
            })
        };
        assert_eq!(unit(0, 300).len(), 300);
        assert_eq!(unit(0, 300).len(), 300);
        assert_eq!((made.get(), budget.get()), (1, 300), "cached, counted once");
        unit(1, 800);
        unit(1, 800);
        assert_eq!((made.get(), budget.get()), (3, 300), "too big: not cached");
        unit(2, 700);
        assert_eq!(budget.get(), 1000, "fits exactly");
        assert_eq!(event.release(), 1000);
        budget.sub(1000);
        unit(3, 10);
        unit(3, 10);
        assert_eq!((made.get(), budget.get()), (6, 0), "released: not cached");
        unit(0, 300);
        assert_eq!(made.get(), 6, "what was cached stays");
    }

    #[test]
    fn topic_charset_and_length() {
        assert!(Topic::parse("news.sport-1_a~b:c", 128).is_ok());
        assert_eq!(
            Topic::parse("", 128),
            Err(InvalidTopic::Length { max_len: 128 })
        );
        assert_eq!(
            Topic::parse("abc", 2),
            Err(InvalidTopic::Length { max_len: 2 })
        );
        for bad in ["a/b", "a,b", "a b", "é", "a\nb", "a%20"] {
            assert_eq!(
                Topic::parse(bad, 128),
                Err(InvalidTopic::Charset),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn event_names_cannot_inject_lines_or_spoof_reset() {
        assert!(EventName::parse("update").is_ok());
        assert_eq!(
            EventName::parse("a\ndata: x"),
            Err(InvalidEventName::Syntax)
        );
        assert_eq!(EventName::parse(""), Err(InvalidEventName::Syntax));
        assert_eq!(
            EventName::parse(&"a".repeat(65)),
            Err(InvalidEventName::Syntax)
        );
        assert_eq!(EventName::parse("reset"), Err(InvalidEventName::Reserved));
    }

    #[test]
    fn epoch_round_trips_in_base36() {
        for n in [0, 35, 36, 0xffff_ffff, u64::MAX] {
            assert_eq!(Epoch::parse(&Epoch(n).to_string()), Some(Epoch(n)));
        }
        assert_eq!(Epoch(36).to_string(), "10");
        assert_eq!(Epoch::parse("ABC"), None);
    }

    #[test]
    fn cursor_grammar() {
        let e = Epoch(46655);
        assert_eq!(
            Cursor::parse("57.zzz", 1),
            Ok(Cursor(vec![Position::new(57, e)]))
        );
        assert_eq!(
            Cursor::parse("news/57.zzz,0,3", 3),
            Ok(Cursor(vec![
                Position::new(57, e),
                Position::default(),
                Position {
                    seq: 3,
                    epoch: None
                }
            ]))
        );
        for bad in [
            "",
            "x",
            "-1",
            "1.",
            "1.A",
            "1,2",
            "/1",
            "a b/1",
            "1.2.3",
            "99999999999999999999999",
        ] {
            assert!(Cursor::parse(bad, 1).is_err(), "{bad:?}");
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        fn is_topic_char(c: char) -> bool {
            c.is_ascii_alphanumeric() || ".-_~:".contains(c)
        }

        fn position() -> impl Strategy<Value = Position> {
            (any::<u64>(), proptest::option::of(any::<u64>())).prop_map(|(seq, epoch)| Position {
                seq,
                epoch: epoch.map(Epoch),
            })
        }

        /// Strings near the grammars: mostly the characters they use.
        fn nearly(max: usize) -> impl Strategy<Value = String> {
            prop_oneof![
                proptest::string::string_regex(&format!("[0-9a-zA-Z.,/:_~ -]{{0,{max}}}")).unwrap(),
                proptest::string::string_regex(&format!("\\PC{{0,{max}}}")).unwrap(),
                any::<String>(),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]

            #[test]
            fn topic_parse_accepts_exactly_the_charset_and_length(name in nearly(40), max_len in 1usize..40) {
                let valid = !name.is_empty() && name.len() <= max_len && name.chars().all(is_topic_char);
                match Topic::parse(&name, max_len) {
                    Ok(topic) => {
                        prop_assert!(valid, "{name:?} accepted");
                        prop_assert_eq!(topic.as_str(), name.as_str());
                        prop_assert_eq!(topic.to_string(), name);
                    }
                    Err(_) => prop_assert!(!valid, "{name:?} refused"),
                }
            }

            #[test]
            fn event_name_parse_accepts_exactly_the_charset_and_length_and_never_a_control_name(
                name in prop_oneof![nearly(70), Just("reset".to_owned()), Just("reauth".to_owned())],
            ) {
                let valid = (1..=64).contains(&name.len())
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || ".-_:".contains(c))
                    && name != RESET_EVENT
                    && name != REAUTH_EVENT;
                match EventName::parse(&name) {
                    Ok(parsed) => {
                        prop_assert!(valid, "{name:?} accepted");
                        prop_assert_eq!(parsed.as_str(), name.as_str());
                    }
                    Err(_) => prop_assert!(!valid, "{name:?} refused"),
                }
            }

            #[test]
            fn a_cursor_written_out_parses_back_to_itself(
                positions in proptest::collection::vec(position(), 1..8),
                prefix in proptest::option::of("[a-zA-Z0-9._~:-]{1,20}"),
            ) {
                let cursor = Cursor(positions);
                let n = cursor.0.len();
                let text = match &prefix {
                    Some(topic) => format!("{topic}/{cursor}"),
                    None => cursor.to_string(),
                };
                prop_assert_eq!(Cursor::parse(&text, n), Ok(cursor.clone()));
                // A position alone is written the same way.
                for position in &cursor.0 {
                    prop_assert_eq!(Cursor::parse(&position.to_string(), 1), Ok(Cursor(vec![*position])));
                }
                // The count must match.
                prop_assert!(Cursor::parse(&text, n + 1).is_err());
                prop_assert!(Cursor::parse(&text, n - 1).is_err());
            }

            #[test]
            fn cursor_parse_never_panics_and_what_it_accepts_writes_back_the_same(
                text in nearly(60),
                topics in 0usize..5,
            ) {
                if let Ok(cursor) = Cursor::parse(&text, topics) {
                    prop_assert_eq!(cursor.0.len(), topics);
                    prop_assert_eq!(Cursor::parse(&cursor.to_string(), topics), Ok(cursor));
                }
            }
        }
    }
}
