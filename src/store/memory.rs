//! The embedded store: each topic's recent history in process memory.
//!
//! Appending and handing the event to the hub happen under the topic's lock,
//! so the hub sees each topic's events in sequence order and a reader never
//! sees an event the hub has not been given. History is gone when the process
//! exits; topics then start a new epoch, which is how returning subscribers
//! learn that their position no longer exists.
//!
//! The embedded default. A map of topic → `Log` (epoch, head, a `VecDeque` of
//! recent events), split into 256 shards (index maps); the sweeper walks a
//! shard 128 entries per hold of its lock, from the last to the first index,
//! so removals and concurrent inserts neither skip nor repeat an entry. A
//! budget (`--max-retained-bytes`, `--max-topics`) is checked before a
//! publish stores anything; the retained-bytes count holds each retained
//! event's frame and the compressed units cached on it (added as they are
//! made, a unit past the budget not cached), and every removal gives both
//! back. A publish past the bytes makes room (`make_room`): the oldest
//! retained events go first, those of the oldest topic among 16 sampled from
//! the shards (Redis's approximate LRU: an exact order of all retained events
//! would be one lock every append takes), down to the next oldest of the
//! sample, round after round; a topic so emptied that no one watches is
//! forgotten at once, so that samples keep finding the topics that hold the
//! budget. Why drop rather than refuse: retention is a cache for resumers,
//! who get `reset` when their position is gone, while a refused publish is
//! lost to everyone; refusing let one publisher without a rate limit stop
//! every other one until retention freed room (up to `--retention-age`). A
//! per-publisher share of the budget was the alternative: it would need every
//! retained event attributed to its publisher in every store, and still lets
//! many identities share the budget out; dropping the oldest bounds memory
//! with no state per publisher, and `--publish-rate` remains what limits one
//! publisher. Past `--max-topics` a new topic makes room the same way
//! (`evict_topic`): the topic least recently published to (`Log::touched`)
//! among 16 sampled that no one watches on the node is forgotten, as the
//! sweeper forgets an idle one, so its next event starts a new epoch; all
//! watched, the publish is refused. The durable store makes room for bytes
//! through its memory copy (its writer deletes from disk what memory dropped,
//! at its next tick); for topics its writer does it (`make_topic_room`),
//! since it alone numbers events: only once memory holds every group written,
//! never for a topic the group being planned numbers, deleting it from disk
//! before the new topic is written. Appending and delivering to the hub
//! happen under the topic's lock, so the hub sees each topic in order and a
//! reader never sees an event the hub has not. Retention trims on every
//! append and read; a sweeper task drops expired events and forgets topics
//! with no events and no subscribers. A forgotten or restarted topic starts a
//! new epoch. Idempotency records (`OnceRecords`: a hash map by key digest,
//! and a queue of keys in expiry order, one window for all, so expired
//! records are dropped from its front without a scan) sit behind one lock
//! that a keyed append holds from its check, through the topics' own locks
//! and the append, to its record: keyed appends are one after the other,
//! keyless ones never take it. At `--idempotency-max-keys` live records a new
//! key is `Full` (507).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use indexmap::IndexMap;
use tokio_util::sync::CancellationToken;

use super::sweep::{Sweep, sweep_map};
use super::{
    Appended, Fingerprint, History, KeyDigest, MAX_SEQ, NewEvent, Once, Receipt, Retention, Store,
    StoreError,
};
use crate::event::{Epoch, Event, RetainedBytes, Topic};
use crate::hub::Hub;

pub struct MemoryStore {
    /// Topic → log, split into shards so that no lock covers every topic:
    /// appends to different shards do not contend. Index maps, so the
    /// sweeper can walk a shard a slice at a time (see [`sweep_map`]).
    shards: Box<[Shard]>,
    hub: Hub,
    retention: Retention,
    budget: Budget,
    /// Bytes of the events retained, all topics together, with the
    /// compressed units cached on them.
    retained_bytes: Arc<RetainedBytes>,
    /// Topics with a log.
    topic_count: AtomicUsize,
    /// Tickets by digest: record and expiry. Expired ones are swept.
    tickets: Mutex<IndexMap<String, (String, Instant)>>,
    /// Idempotency records. A keyed append holds this lock from its check
    /// to its record, around the topics' own locks: concurrent appends with
    /// one key are thereby one after the other.
    once: Mutex<OnceRecords>,
    /// Whether the sweeper forgets idle topics. The durable store's writer
    /// forgets them itself (from memory and disk together), since it alone
    /// numbers events.
    forget_idle: bool,
}

/// Idempotency records by key, and their keys in order of expiry (one
/// window for all: the order they were made), so expired ones are dropped
/// from the front as new ones come, without a scan.
#[derive(Default)]
struct OnceRecords {
    by_key: std::collections::HashMap<KeyDigest, OnceRecord>,
    expiry: VecDeque<(Instant, KeyDigest)>,
}

struct OnceRecord {
    fingerprint: Fingerprint,
    receipt: Receipt,
    expires: Instant,
}

impl OnceRecords {
    /// Forgets records past their window.
    fn prune(&mut self, now: Instant) -> usize {
        let mut pruned = 0;
        while let Some(&(expires, key)) = self.expiry.front() {
            if expires > now {
                break;
            }
            self.expiry.pop_front();
            // A key recorded again since has a later expiry of its own.
            if self.by_key.get(&key).is_some_and(|r| r.expires == expires) {
                self.by_key.remove(&key);
                pruned += 1;
            }
        }
        pruned
    }

    fn live(&self, key: &KeyDigest, now: Instant) -> Option<&OnceRecord> {
        self.by_key.get(key).filter(|r| r.expires > now)
    }
}

/// How much the store may hold. Past the bytes, the oldest retained events
/// make room (see [`MemoryStore::make_room`]): retention is a cache for
/// resumers, and one publisher filling it must not stop the others from
/// publishing. Past the topics or keys, a publish is refused.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub max_bytes: usize,
    pub max_topics: usize,
    /// Idempotency records kept at once (`--idempotency-max-keys`).
    pub max_keys: usize,
}

const SHARDS: usize = 256;

/// Topics looked at for the oldest event each time room is made: the
/// oldest of a sample, as Redis's approximate LRU, since an exact order of
/// every retained event would be a lock all appends share.
const EVICTION_SAMPLE: usize = 16;

/// Rounds of eviction one publish may run before it is refused after all
/// (a budget held by events in flight, or a batch larger than a round can
/// free): bounds the work a publish does for others.
const EVICTION_ROUNDS: usize = 4096;

type Shard = Mutex<IndexMap<Topic, Arc<Mutex<Log>>>>;

/// One topic's history in one epoch.
struct Log {
    epoch: Epoch,
    head: u64,
    events: VecDeque<(Instant, Arc<Event>)>,
    /// Set when the sweeper removed this log from the map; an appender that
    /// raced with it starts over with a fresh log.
    removed: bool,
    /// When the log was made or last appended to: the topic least recently
    /// published to goes first when topics make room.
    touched: Instant,
    /// The store's count of retained bytes, kept by every removal.
    retained_bytes: Arc<RetainedBytes>,
}

/// What an event counts against the budget when stored: its encoded
/// frame. The compressed units cached on it later count as they are made
/// ([`Event::unit`]), and are given back with it.
fn cost(event: &Event) -> usize {
    event.frame().len()
}

impl Log {
    fn new(retained_bytes: Arc<RetainedBytes>) -> Log {
        Log {
            epoch: Epoch::random(),
            head: 0,
            events: VecDeque::new(),
            removed: false,
            touched: Instant::now(),
            retained_bytes,
        }
    }

    fn oldest(&self) -> u64 {
        self.events
            .front()
            .map_or(self.head.saturating_add(1), |(_, e)| e.seq)
    }

    /// Drops the oldest event; returns the bytes that gave back.
    fn pop_oldest(&mut self) -> usize {
        let Some((_, event)) = self.events.pop_front() else {
            return 0;
        };
        let bytes = cost(&event) + event.release();
        self.retained_bytes.sub(bytes);
        bytes
    }

    fn trim(&mut self, retention: &Retention, now: Instant) {
        while self.events.len() > retention.max_events {
            self.pop_oldest();
        }
        while self
            .events
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > retention.max_age)
        {
            self.pop_oldest();
        }
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        while !self.events.is_empty() {
            self.pop_oldest();
        }
    }
}

/// What one look for a topic to forget found.
enum Eviction {
    Forgot(Topic),
    /// The topic chosen was forgotten meanwhile by another publish.
    Raced,
    /// No topic of the sample may go (all watched or spared).
    Nothing,
}

/// A number below `bound` (not 0), different on each call: a keyed hash of
/// a counter, enough to pick which topics to sample.
fn random(bound: u64) -> u64 {
    use std::hash::{BuildHasher, RandomState};
    static KEY: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    KEY.get_or_init(RandomState::new).hash_one(n) % bound.max(1)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemoryStore {
    pub fn new(hub: Hub, retention: Retention, budget: Budget) -> MemoryStore {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::new(IndexMap::new())).collect(),
            hub,
            retention,
            budget,
            retained_bytes: Arc::new(RetainedBytes::new(budget.max_bytes)),
            topic_count: AtomicUsize::new(0),
            tickets: Mutex::new(IndexMap::new()),
            once: Mutex::new(OnceRecords::default()),
            forget_idle: true,
        }
    }

    /// The in-memory copy of a durable store: appends go through
    /// [`MemoryStore::tip`] and [`MemoryStore::commit`] only, and idle
    /// topics are forgotten by [`MemoryStore::forget_if_idle`].
    pub(crate) fn for_durable(hub: Hub, retention: Retention, budget: Budget) -> MemoryStore {
        MemoryStore {
            forget_idle: false,
            ..MemoryStore::new(hub, retention, budget)
        }
    }

    /// The epoch and head of `topic`, whose log is created (with a fresh
    /// epoch) if missing, within the topic budget.
    pub(crate) fn tip(&self, topic: &Topic) -> Result<(Epoch, u64), StoreError> {
        let log = self.log(topic)?;
        let log = lock(&log);
        Ok((log.epoch, log.head))
    }

    /// The count events are retained under: an event made elsewhere (the
    /// durable store's) takes it with `Event::retained_under` before it is
    /// committed or restored, so its cached units count too.
    pub(crate) fn retained_bytes(&self) -> Arc<RetainedBytes> {
        self.retained_bytes.clone()
    }

    /// Makes `event`, numbered after [`MemoryStore::tip`], visible to
    /// readers and hands it to the hub. Events of a topic come in sequence
    /// order, each once.
    pub(crate) fn commit(&self, event: Arc<Event>, at: Instant) {
        let Ok(log) = self.log(&event.topic) else {
            return;
        };
        let mut log = lock(&log);
        if log.epoch != event.epoch || event.seq != log.head + 1 {
            tracing::error!(topic = %event.topic, seq = event.seq, head = log.head, "an event committed out of order was dropped");
            return;
        }
        log.head = event.seq;
        log.touched = at;
        self.retained_bytes.add(cost(&event));
        log.events.push_back((at, event.clone()));
        log.trim(&self.retention, Instant::now());
        event.stamp_live();
        self.hub.deliver(&event);
    }

    /// Puts back a topic read from disk at start-up: its epoch, head and
    /// retained events (oldest first, each with when it was stored).
    pub(crate) fn restore(
        &self,
        topic: &Topic,
        epoch: Epoch,
        head: u64,
        events: Vec<(Instant, Arc<Event>)>,
    ) -> Result<(), StoreError> {
        let log = self.log(topic)?;
        let mut log = lock(&log);
        log.epoch = epoch;
        log.head = head;
        for (at, event) in events {
            self.retained_bytes.add(cost(&event));
            log.events.push_back((at, event));
        }
        log.trim(&self.retention, Instant::now());
        Ok(())
    }

    /// The oldest retained sequence number of `topic` after trimming, or
    /// `None` when the store does not know the topic.
    pub(crate) fn oldest(&self, topic: &Topic) -> Option<u64> {
        let log = lock(self.shard(topic)).get(topic).cloned()?;
        let mut log = lock(&log);
        log.trim(&self.retention, Instant::now());
        Some(log.oldest())
    }

    /// Forgets `topic` if it has no events left and no subscriber on this
    /// node; true when it is (now) unknown.
    pub(crate) fn forget_if_idle(&self, topic: &Topic) -> bool {
        let mut topics = lock(self.shard(topic));
        let Some(log) = topics.get(topic).cloned() else {
            return true;
        };
        let mut log = lock(&log);
        log.trim(&self.retention, Instant::now());
        if !log.events.is_empty() || self.hub.is_watched(topic) {
            return false;
        }
        log.removed = true;
        topics.swap_remove(topic);
        self.topic_count.fetch_sub(1, Ordering::Relaxed);
        true
    }

    /// Makes room for `bytes` more in the budget (see `make_room`).
    pub(crate) fn room(&self, bytes: usize) -> Result<(), StoreError> {
        self.make_room(bytes)
    }

    fn shard(&self, topic: &Topic) -> &Shard {
        use std::hash::{BuildHasher, RandomState};
        static HASHER: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
        let hash = HASHER.get_or_init(RandomState::new).hash_one(topic);
        &self.shards[(hash % SHARDS as u64) as usize]
    }

    /// Runs until `stop`: periodically drops expired events, and forgets
    /// topics that have no events left and no subscriber on this node, so
    /// idle topics cost nothing.
    pub async fn sweep_until(self: Arc<Self>, stop: CancellationToken) {
        let period =
            (self.retention.max_age / 2).clamp(Duration::from_millis(50), Duration::from_secs(30));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.sweep().await,
            }
        }
    }

    /// A slice of a shard at a time, letting other tasks run in between, so
    /// no lock is held for long however many topics there are.
    async fn sweep(&self) {
        let started = Instant::now();
        let now = started;
        let mut sweep = Sweep::default();
        let tickets = sweep_map(&self.tickets, |_, (_, expires)| *expires > now, &mut sweep).await;
        let keys_expired = lock(&self.once).prune(now);
        let mut topics = 0;
        for shard in self.shards.iter() {
            let removed = sweep_map(
                shard,
                |topic, log| {
                    let mut log = lock(log);
                    log.trim(&self.retention, now);
                    let keep =
                        !self.forget_idle || !log.events.is_empty() || self.hub.is_watched(topic);
                    log.removed = !keep;
                    keep
                },
                &mut sweep,
            )
            .await;
            self.topic_count.fetch_sub(removed, Ordering::Relaxed);
            topics += removed;
        }
        tracing::debug!(
            examined = sweep.examined,
            slices = sweep.slices,
            slow_holds = sweep.slow_holds,
            topics_forgotten = topics,
            tickets_expired = tickets,
            keys_expired,
            longest_hold_us = sweep.longest_hold.as_micros() as u64,
            took_ms = started.elapsed().as_millis() as u64,
            "swept the store"
        );
    }

    /// The log of `topic`, created if missing. Past the topic budget the
    /// store forgets the topic least recently published to that no one
    /// here watches (see [`MemoryStore::evict_topic`]) to make room; the
    /// durable store's copy does not (its writer does, from disk too), and
    /// refuses.
    fn log(&self, topic: &Topic) -> Result<Arc<Mutex<Log>>, StoreError> {
        for _ in 0..EVICTION_ROUNDS {
            {
                let mut topics = lock(self.shard(topic));
                if let Some(log) = topics.get(topic) {
                    return Ok(log.clone());
                }
                if self.topic_count.fetch_add(1, Ordering::Relaxed) < self.budget.max_topics {
                    let log = Arc::new(Mutex::new(Log::new(self.retained_bytes.clone())));
                    topics.insert(topic.clone(), log.clone());
                    return Ok(log);
                }
                self.topic_count.fetch_sub(1, Ordering::Relaxed);
            }
            if !self.forget_idle || self.evict_topic(|_| false).is_none() {
                break;
            }
        }
        Err(StoreError::Full(format!(
            "the hub holds {} topics, its limit (--max-topics)",
            self.budget.max_topics
        )))
    }

    /// Forgets, with its history, the topic least recently published to
    /// among a sample of those no one watches on this node and `spare`
    /// does not keep; returns it. A resumer from its history gets `reset`,
    /// and its next event starts a new epoch, as after the sweeper forgot
    /// it.
    pub(crate) fn evict_topic(&self, spare: impl Fn(&Topic) -> bool) -> Option<Topic> {
        // Another publish may forget the same topic first: sample again.
        for _ in 0..8 {
            match self.evict_sampled_topic(&spare) {
                Eviction::Forgot(topic) => return Some(topic),
                Eviction::Raced => continue,
                Eviction::Nothing => return None,
            }
        }
        None
    }

    fn evict_sampled_topic(&self, spare: &impl Fn(&Topic) -> bool) -> Eviction {
        let mut oldest: Option<(Instant, Topic, Arc<Mutex<Log>>)> = None;
        let (start, mut sampled) = (random(SHARDS as u64) as usize, 0);
        for n in 0..SHARDS {
            if sampled == EVICTION_SAMPLE {
                break;
            }
            let candidate = {
                let topics = lock(&self.shards[(start + n) % SHARDS]);
                if topics.is_empty() {
                    continue;
                }
                let at = random(topics.len() as u64) as usize;
                topics
                    .get_index(at)
                    .map(|(topic, log)| (topic.clone(), log.clone()))
            };
            let Some((topic, log)) = candidate else {
                continue;
            };
            sampled += 1;
            // Held by more than the map and this sample: a publish in flight
            // (see `append_now`) or a reader has it.
            if spare(&topic) || self.hub.is_watched(&topic) || Arc::strong_count(&log) > 2 {
                continue;
            }
            let touched = lock(&log).touched;
            if oldest.as_ref().is_none_or(|(at, _, _)| touched < *at) {
                oldest = Some((touched, topic, log));
            }
        }
        let Some((_, topic, log)) = oldest else {
            return Eviction::Nothing;
        };
        let mut topics = lock(self.shard(&topic));
        // Under the shard's lock no publish can take the log anew.
        if !topics.get(&topic).is_some_and(|l| Arc::ptr_eq(l, &log)) || Arc::strong_count(&log) > 2
        {
            return Eviction::Raced;
        }
        let mut log = lock(&log);
        log.removed = true;
        while !log.events.is_empty() {
            log.pop_oldest();
        }
        topics.swap_remove(&topic);
        self.topic_count.fetch_sub(1, Ordering::Relaxed);
        Eviction::Forgot(topic)
    }

    fn append_one(&self, new: NewEvent) -> Result<Arc<Event>, StoreError> {
        loop {
            let log = self.log(&new.topic)?;
            let mut log = lock(&log);
            if log.removed {
                continue;
            }
            let now = Instant::now();
            // Out of reach in practice; checked all the same, since a
            // number handed out twice would break resuming.
            let seq = log.head + 1;
            if seq > MAX_SEQ {
                return Err(StoreError::Rejected(format!(
                    "topic {} has run out of numbers",
                    new.topic
                )));
            }
            let event = Arc::new(
                Event::new(new.topic, seq, log.epoch, new.name.as_ref(), &new.data)
                    .retained_under(self.retained_bytes.clone()),
            );
            log.head = seq;
            log.touched = now;
            self.retained_bytes.add(cost(&event));
            log.events.push_back((now, event.clone()));
            log.trim(&self.retention, now);
            event.stamp_live();
            self.hub.deliver(&event);
            return Ok(event);
        }
    }

    /// Numbers and stores `events`, all or none.
    fn append_now(&self, events: Vec<NewEvent>) -> Result<Vec<Arc<Event>>, StoreError> {
        // All or none: room for the whole batch, and every topic it names,
        // is checked before anything is stored.
        let bytes = events
            .iter()
            .map(|e| crate::sse::encoded_data_len(&e.data) + 64)
            .sum();
        self.make_room(bytes)?;
        // Each log is held until the batch is stored: a log held by anyone
        // but the map is never evicted, so no topic of the batch can be
        // forgotten between this check and its event.
        let _held = events
            .iter()
            .map(|event| self.log(&event.topic))
            .collect::<Result<Vec<_>, _>>()?;
        events.into_iter().map(|e| self.append_one(e)).collect()
    }

    /// Makes room for `bytes` more in the budget by dropping the oldest
    /// retained events, of any topic: a resumer whose position was among
    /// them gets `reset` (reason `trimmed`), as after retention by age.
    /// Refused only when `bytes` could never fit, or nothing of what holds
    /// the budget can be found to drop. Concurrent publishes may each pass
    /// before the other is stored, so the budget can be exceeded by the
    /// batches in flight at one moment, never more.
    fn make_room(&self, bytes: usize) -> Result<(), StoreError> {
        let full = || {
            StoreError::Full(format!(
                "the events retained would exceed {} bytes (--max-retained-bytes)",
                self.budget.max_bytes
            ))
        };
        if bytes > self.budget.max_bytes {
            return Err(full());
        }
        for _ in 0..EVICTION_ROUNDS {
            let retained = self.retained_bytes.get();
            let over = retained
                .saturating_add(bytes)
                .saturating_sub(self.budget.max_bytes);
            if over == 0 {
                return Ok(());
            }
            if self.evict_oldest(over) == 0 {
                break;
            }
        }
        Err(full())
    }

    /// Drops the oldest retained events of a sample of topics, up to
    /// `bytes` of them (an event at least), oldest first; returns the
    /// events dropped.
    fn evict_oldest(&self, bytes: usize) -> usize {
        let mut sample: Vec<(Instant, Topic, Arc<Mutex<Log>>)> =
            Vec::with_capacity(EVICTION_SAMPLE);
        // From a random shard on, a topic with events of each that has one
        // (a few random tries): with few topics, every shard is looked at
        // (a short lock each).
        let start = random(SHARDS as u64) as usize;
        for n in 0..SHARDS {
            if sample.len() == EVICTION_SAMPLE {
                break;
            }
            for _ in 0..4 {
                let candidate = {
                    let topics = lock(&self.shards[(start + n) % SHARDS]);
                    if topics.is_empty() {
                        break;
                    }
                    let at = random(topics.len() as u64) as usize;
                    topics
                        .get_index(at)
                        .map(|(topic, log)| (topic.clone(), log.clone()))
                };
                let Some((topic, log)) = candidate else { break };
                let front = lock(&log).events.front().map(|(at, _)| *at);
                if let Some(front) = front {
                    sample.push((front, topic, log));
                    break;
                }
            }
        }
        sample.sort_by_key(|(at, _, _)| *at);
        let Some((_, topic, oldest)) = sample.first() else {
            return 0;
        };
        // Down to the next oldest of the sample, or until there is room.
        let until = sample.get(1).map(|(at, _, _)| *at);
        let mut log = lock(oldest);
        let (mut dropped, mut freed) = (0, 0);
        while let Some((at, _)) = log.events.front() {
            let next_is_older = until.is_some_and(|until| *at > until);
            if dropped > 0 && (freed >= bytes || next_is_older) {
                break;
            }
            freed += log.pop_oldest();
            dropped += 1;
        }
        let emptied = log.events.is_empty();
        drop(log);
        // An emptied topic no one watches goes now rather than at the next
        // sweep, so samples keep finding the topics that hold the budget.
        // (The durable store's writer forgets its own, within a second.)
        if emptied && self.forget_idle {
            self.forget_if_idle(topic);
        }
        dropped
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Arc<Event>>, StoreError> {
        self.append_now(events)
    }

    async fn append_once(
        &self,
        events: Vec<(NewEvent, Option<Once>)>,
        window: Duration,
    ) -> Result<Vec<Appended>, StoreError> {
        if events.iter().all(|(_, once)| once.is_none()) {
            let stored = self.append_now(events.into_iter().map(|(e, _)| e).collect())?;
            return Ok(stored.into_iter().map(Appended::Stored).collect());
        }
        let mut records = lock(&self.once);
        let now = Instant::now();
        records.prune(now);
        // What each event is: a replay of a record, of an earlier event of
        // this call, or new. A key used for another event refuses it all.
        enum Plan {
            Replay(Receipt),
            SameAs(usize),
            New,
        }
        let mut plans = Vec::with_capacity(events.len());
        let mut new_keys = 0;
        for (i, (_, once)) in events.iter().enumerate() {
            let Some(once) = once else {
                plans.push(Plan::New);
                continue;
            };
            if let Some(record) = records.live(&once.key, now) {
                if record.fingerprint != once.fingerprint {
                    return Err(StoreError::KeyReused { item: i });
                }
                plans.push(Plan::Replay(record.receipt.clone()));
            } else if let Some(j) = events[..i]
                .iter()
                .position(|(_, o)| o.is_some_and(|o| o.key == once.key))
            {
                plans.push(Plan::SameAs(j));
            } else {
                new_keys += 1;
                plans.push(Plan::New);
            }
        }
        if records.by_key.len() + new_keys > self.budget.max_keys {
            return Err(StoreError::Full(format!(
                "the hub holds {} idempotency keys, its limit (--idempotency-max-keys)",
                self.budget.max_keys
            )));
        }
        let fresh: Vec<NewEvent> = events
            .iter()
            .zip(&plans)
            .filter(|(_, plan)| matches!(plan, Plan::New))
            .map(|((event, _), _)| event.clone())
            .collect();
        let mut stored = self.append_now(fresh)?.into_iter();
        let expires = now + window;
        let mut answers: Vec<Appended> = Vec::with_capacity(events.len());
        for ((_, once), plan) in events.iter().zip(plans) {
            let answer = match plan {
                Plan::Replay(receipt) => Appended::Replayed(receipt),
                Plan::SameAs(j) => Appended::Replayed(answers[j].receipt()),
                Plan::New => {
                    let event = stored.next().ok_or_else(|| {
                        StoreError::Rejected("the store stored fewer events than asked".into())
                    })?;
                    if let Some(once) = once {
                        let receipt = Receipt::from(&*event);
                        records.by_key.insert(
                            once.key,
                            OnceRecord {
                                fingerprint: once.fingerprint,
                                receipt,
                                expires,
                            },
                        );
                        records.expiry.push_back((expires, once.key));
                    }
                    Appended::Stored(event)
                }
            };
            answers.push(answer);
        }
        Ok(answers)
    }

    async fn read(&self, topic: &Topic, after: u64, limit: usize) -> Result<History, StoreError> {
        let Some(log) = lock(self.shard(topic)).get(topic).cloned() else {
            return Ok(History {
                oldest: 1,
                ..History::default()
            });
        };
        let mut log = lock(&log);
        log.trim(&self.retention, Instant::now());
        let oldest = log.oldest();
        let skip = after.saturating_add(1).saturating_sub(oldest);
        let events = log
            .events
            .iter()
            .skip(usize::try_from(skip).unwrap_or(usize::MAX))
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect();
        Ok(History {
            epoch: Some(log.epoch),
            oldest,
            head: log.head,
            events,
        })
    }

    async fn put_ticket(&self, key: &str, record: &str, ttl: Duration) -> Result<(), StoreError> {
        let expires = Instant::now() + ttl;
        lock(&self.tickets).insert(key.to_owned(), (record.to_owned(), expires));
        Ok(())
    }

    async fn take_ticket(&self, key: &str) -> Result<Option<String>, StoreError> {
        let taken = lock(&self.tickets).swap_remove(key);
        Ok(taken
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(record, _)| record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(max_bytes: usize, max_topics: usize) -> MemoryStore {
        let retention = Retention {
            max_events: 1000,
            max_age: Duration::from_secs(3600),
        };
        let budget = Budget {
            max_bytes,
            max_topics,
            max_keys: 10,
        };
        MemoryStore::new(Hub::new(16), retention, budget)
    }

    async fn publish(store: &MemoryStore, topic: &str, data: &str) -> u64 {
        let new = NewEvent {
            topic: Topic::parse(topic, 64).unwrap(),
            name: None,
            data: data.into(),
        };
        store.append(vec![new]).await.unwrap()[0].seq
    }

    /// The oldest retained sequence number of `topic`, and its head.
    async fn bounds(store: &MemoryStore, topic: &str) -> (u64, u64) {
        let history = store
            .read(&Topic::parse(topic, 64).unwrap(), 0, 100)
            .await
            .unwrap();
        (history.oldest, history.head)
    }

    #[tokio::test]
    async fn a_full_budget_drops_the_oldest_events_of_any_topic_first() {
        let data = "x".repeat(100);
        // Room for three events and a half (ids differ in length a little).
        let probe = store(usize::MAX, 10);
        publish(&probe, "a", &data).await;
        let cost = probe.retained_bytes().get();
        let store = store(3 * cost + cost / 2, 10);
        publish(&store, "a", &data).await;
        publish(&store, "b", &data).await;
        publish(&store, "a", &data).await;
        assert_eq!(bounds(&store, "a").await, (1, 2));
        // c1 takes the place of a1, the oldest; d1 that of b1, then.
        publish(&store, "c", &data).await;
        assert_eq!(bounds(&store, "a").await, (2, 2));
        assert_eq!(bounds(&store, "b").await, (1, 1));
        publish(&store, "d", &data).await;
        // b1 dropped, and b with it: no one watches it.
        assert_eq!(bounds(&store, "b").await, (1, 0));
        assert_eq!(bounds(&store, "a").await, (2, 2));
        assert!(store.retained_bytes().get() <= 3 * cost + cost / 2);
        // An event larger than the whole budget is refused, dropping nothing.
        let big = NewEvent {
            topic: Topic::parse("e", 64).unwrap(),
            name: None,
            data: "x".repeat(4 * cost),
        };
        assert!(matches!(
            store.append(vec![big]).await,
            Err(StoreError::Full(_))
        ));
        assert_eq!(bounds(&store, "a").await, (2, 2));
    }

    #[tokio::test]
    async fn past_the_topic_budget_the_topic_published_to_longest_ago_goes() {
        let store = store(usize::MAX, 2);
        publish(&store, "a", "a1").await;
        publish(&store, "b", "b1").await;
        publish(&store, "a", "a2").await;
        // b was published to longest ago: c takes its place.
        publish(&store, "c", "c1").await;
        assert_eq!(bounds(&store, "a").await, (1, 2));
        let b = store
            .read(&Topic::parse("b", 64).unwrap(), 0, 10)
            .await
            .unwrap();
        assert!(b.epoch.is_none(), "b is forgotten");
        // Numbering of a goes on; b comes back from 1.
        assert_eq!(publish(&store, "a", "a3").await, 3);
        assert_eq!(publish(&store, "b", "b again").await, 1);
    }
}
