//! Per-node fan-out: topic → live subscribers.
//!
//! The hub knows nothing of HTTP or storage. A store hands it every event it
//! learns of, in sequence order per topic, and the hub passes the same
//! `Arc<Event>` (already encoded once) to every subscriber of that topic.
//!
//! Each topic is a broadcast ring shared by its subscribers: a slow
//! subscriber never holds up the others, costs no memory beyond the shared
//! ring, and once it falls further behind than the backlog it is told it
//! lagged, and its stream ends so the client resumes from its Last-Event-ID.
//! The ring holds only what some subscriber has yet to see, so it grows with
//! lag, not with the backlog setting: a topic that a client subscribes to
//! but that carries no events costs a few hundred bytes, however many topics
//! a client names. A topic with no subscribers has no entry at all.
//!
//! Per-node fan-out: topic → a broadcast ring of its own (a `VecDeque` under
//! a mutex, where receivers that took everything leave their wakers for the
//! next send to wake (registered in the same lock as the take; a receiver
//! polled again before the next send reads one atomic), and the topic's
//! compression `Chain`, run at delivery for the shared codings its streams
//! use) of `Live` items that holds only what some subscriber has yet to take,
//! so an idle subscribed topic costs a few hundred bytes instead of a
//! preallocated backlog; items (`Event(Arc<Event>)`; `Chained`, the event
//! with the units its chain compressed, while a zstd or gzip single-topic
//! stream is subscribed; `Resync` or `StoreBack`), each numbered in node-wide
//! delivery order so `Feeds` can merge a multi-topic subscription's feeds in
//! that order. Knows nothing of HTTP or storage. A subscriber that falls more
//! than `--subscriber-backlog` events behind gets `Lagged` and its stream
//! ends; a topic without subscribers has no entry.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use smallvec::SmallVec;

use crate::coding::{Codec, SHARED_CODINGS};
use crate::compress::{Chain, ChainPermits, Chained};
use crate::event::{Event, Topic};
use crate::metrics::Metrics;

/// What a topic's live feed carries.
#[derive(Clone, Debug)]
pub enum Live {
    /// The next event of the topic.
    Event(Arc<Event>),
    /// The next event of the topic, with the units its chain compressed for
    /// it (when some stream of the topic wants them).
    Chained(Arc<Chained>),
    /// Live delivery may have missed events (the store lost its connection,
    /// or the topic's history changed): check the store.
    Resync,
    /// The store can be reached again: store work put off after a failure
    /// is worth trying now rather than after its backoff.
    StoreBack,
}

#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    topics: RwLock<HashMap<Topic, Arc<Channel>>>,
    backlog: usize,
    /// How long a topic must be quiet for its chained compression to start
    /// a new segment (the heartbeat interval, see `compress`).
    quiet: Duration,
    /// The topics' chained compressors held at once, against
    /// `--max-compression-chains`.
    chain_permits: Arc<ChainPermits>,
    /// Numbers every delivery on this node, so that a subscription to several
    /// topics can merge their feeds in the order events were delivered.
    next_order: AtomicU64,
    /// The node's metrics: the hub counts deliveries and subscriptions, and
    /// hands them to the stores and streams that join it.
    metrics: Metrics,
}

/// One item of a topic's feed, numbered in node-wide delivery order.
#[derive(Clone, Debug)]
struct Delivery {
    order: u64,
    live: Live,
}

impl Hub {
    /// `backlog` is how many events a subscriber may fall behind before it is
    /// disconnected.
    pub fn new(backlog: usize) -> Hub {
        Hub::with_metrics(backlog, Duration::from_secs(15), 256, Metrics::new())
    }

    /// A hub that counts into `metrics`; `heartbeat` is the streams'
    /// heartbeat interval, `max_chains` the most chained compressors its
    /// topics hold at once.
    pub fn with_metrics(
        backlog: usize,
        heartbeat: Duration,
        max_chains: usize,
        metrics: Metrics,
    ) -> Hub {
        Hub {
            inner: Arc::new(Inner {
                topics: RwLock::new(HashMap::new()),
                backlog: backlog.max(1),
                quiet: heartbeat,
                chain_permits: ChainPermits::new(max_chains, metrics.clone()),
                next_order: AtomicU64::new(1),
                metrics,
            }),
        }
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Hands an event to every current subscriber of its topic.
    ///
    /// Callers deliver each topic's events in sequence order; subscribers
    /// still check, so a gap is filled from the store rather than skipped.
    /// Deliveries are counted here, once per event: one add of the number of
    /// subscribers, not one per subscriber.
    pub fn deliver(&self, event: &Arc<Event>) {
        let topics = self.inner.topics.read().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = topics.get(&event.topic) {
            let live = match tx.chained(event) {
                Some(chained) => Live::Chained(chained),
                None => Live::Event(event.clone()),
            };
            let subscribers = tx.send(self.numbered(live));
            self.inner.metrics.delivered(subscribers);
        }
    }

    /// Tells every subscriber of every topic that the store is back.
    pub fn store_back(&self) {
        let topics = self.inner.topics.read().unwrap_or_else(|e| e.into_inner());
        for tx in topics.values() {
            tx.send(self.numbered(Live::StoreBack));
        }
    }

    /// Tells every subscriber of `topic` to check the store.
    pub fn resync(&self, topic: &Topic) {
        let topics = self.inner.topics.read().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = topics.get(topic) {
            tx.send(self.numbered(Live::Resync));
        }
    }

    fn numbered(&self, live: Live) -> Delivery {
        Delivery {
            order: self.inner.next_order.fetch_add(1, Ordering::Relaxed),
            live,
        }
    }

    /// Joins the live feeds of several topics at once, merged in delivery
    /// order.
    pub fn subscribe_all(&self, topics: &[Topic]) -> Feeds {
        Feeds {
            feeds: topics.iter().map(|t| self.subscribe(t)).collect(),
            share: None,
        }
    }

    /// The topics with at least one live subscriber on this node.
    pub fn watched(&self) -> Vec<Topic> {
        let topics = self.inner.topics.read().unwrap_or_else(|e| e.into_inner());
        topics.keys().cloned().collect()
    }

    /// Joins a topic's live feed. Events delivered from now on are queued for
    /// the returned feed, up to the backlog.
    pub fn subscribe(&self, topic: &Topic) -> LiveFeed {
        let mut topics = self.inner.topics.write().unwrap_or_else(|e| e.into_inner());
        let mut new_topic = false;
        let channel = topics.entry(topic.clone()).or_insert_with(|| {
            new_topic = true;
            Arc::new(Channel::new(self.inner.backlog))
        });
        self.inner.metrics.subscription(1.0, new_topic);
        LiveFeed {
            events: Receiver::new(channel.clone()),
            head: None,
            _membership: Membership {
                hub: self.clone(),
                topic: topic.clone(),
            },
        }
    }

    /// Whether anyone on this node is subscribed to `topic`.
    pub fn is_watched(&self, topic: &Topic) -> bool {
        let topics = self.inner.topics.read().unwrap_or_else(|e| e.into_inner());
        topics.contains_key(topic)
    }

    fn leave(&self, topic: &Topic) {
        let mut topics = self.inner.topics.write().unwrap_or_else(|e| e.into_inner());
        let last = topics.get(topic).is_some_and(|tx| tx.receiver_count() == 0);
        if last {
            topics.remove(topic);
        }
        self.inner.metrics.subscription(-1.0, last);
    }
}

/// One subscriber's view of one topic's live events.
pub struct LiveFeed {
    /// Declared first so the receiver is dropped before `Membership` checks
    /// whether it was the last one.
    events: Receiver,
    /// The next item, once taken, while a merge waits for other topics'.
    head: Option<Result<Delivery, Lagged>>,
    _membership: Membership,
}

/// The subscriber fell further behind than the backlog holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lagged;

/// The live feeds of a subscription's topics, merged: items come out in the
/// order the hub delivered them, whichever topic they belong to.
pub struct Feeds {
    /// In place for a single topic: no allocation to reach per event.
    feeds: SmallVec<[LiveFeed; 1]>,
    /// The shared coding these feeds count in their topics' `Compression`.
    share: Option<u8>,
}

impl Feeds {
    /// Asks the topics' chains for units in `codec` (a shared coding) for
    /// as long as these feeds live.
    pub fn share(&mut self, codec: Codec) {
        let Some(slot) = codec.shared_slot() else {
            return;
        };
        if self.share.is_some() {
            return;
        }
        for feed in &self.feeds {
            let inner = &feed._membership.hub.inner;
            let compression = feed
                .events
                .channel
                .compression(inner.quiet, &inner.chain_permits);
            compression.shared[slot].fetch_add(1, Ordering::Relaxed);
        }
        self.share = Some(slot as u8);
    }

    /// Waits for the next item: the index of its topic and what it carries.
    pub async fn next(&mut self) -> (usize, Result<Live, Lagged>) {
        std::future::poll_fn(|cx| match self.poll_heads(Some(cx)) {
            Some(item) => Poll::Ready(item),
            None => Poll::Pending,
        })
        .await
    }

    /// The next item if one is ready now (without waiting for more).
    pub fn try_next(&mut self) -> Option<(usize, Result<Live, Lagged>)> {
        self.poll_heads(None)
    }

    /// Fills every empty head that is ready, then takes the earliest one (a
    /// lag first: the stream ends anyway). With `cx`, a feed that has
    /// nothing wakes its task on the next send.
    fn poll_heads(
        &mut self,
        mut cx: Option<&mut Context<'_>>,
    ) -> Option<(usize, Result<Live, Lagged>)> {
        for feed in &mut self.feeds {
            if feed.head.is_none() {
                feed.head = feed.events.recv(cx.as_deref_mut());
            }
        }
        let i = self
            .feeds
            .iter()
            .enumerate()
            .filter_map(|(i, feed)| match &feed.head {
                Some(Ok(delivery)) => Some((delivery.order, i)),
                Some(Err(Lagged)) => Some((0, i)),
                None => None,
            })
            .min()?
            .1;
        let item = self.feeds[i].head.take()?;
        Some((i, item.map(|delivery| delivery.live)))
    }
}

impl Drop for Feeds {
    fn drop(&mut self) {
        let Some(slot) = self.share.map(usize::from) else {
            return;
        };
        for feed in &self.feeds {
            let Some(compression) = feed.events.channel.compression.get() else {
                continue;
            };
            if compression.shared[slot].fetch_sub(1, Ordering::Relaxed) == 1 {
                // The last stream of this coding left: free its compressor.
                // (One that joins meanwhile gets a new one, which starts a
                // segment.)
                let mut chain = compression.chain.lock().unwrap_or_else(|e| e.into_inner());
                chain.drop_coding(slot);
            }
        }
    }
}

struct Membership {
    hub: Hub,
    topic: Topic,
}

/// One topic's broadcast ring.
///
/// Items stay until every receiver that was there when they were sent has
/// taken them (then they are dropped from the front), or until the ring
/// holds `backlog` of them (then the oldest is dropped and whoever had not
/// taken it lagged). A receiver that finds nothing leaves its waker in the
/// ring; the next send wakes them all.
struct Channel {
    ring: Mutex<Ring>,
    /// [`Ring::end`], readable without the lock: a receiver that has taken
    /// everything and is already waiting learns that here.
    end: AtomicU64,
    backlog: usize,
    /// Made when a stream of a shared coding first subscribes, so a topic
    /// without one pays a pointer.
    compression: OnceLock<Box<Compression>>,
}

/// A topic's compression for the streams that share units.
struct Compression {
    /// Streams that want chained units, per shared coding.
    shared: [AtomicUsize; SHARED_CODINGS],
    /// The chained compressors, used by whoever delivers (one at a time,
    /// in the topic's order).
    chain: Mutex<Chain>,
}

struct Ring {
    /// Items some receiver has yet to take, oldest first.
    items: VecDeque<Posted>,
    /// The index of `items[0]`; indexes only grow.
    first: u64,
    receivers: usize,
    /// The wakers of receivers that took everything, for the next send to
    /// wake. A receiver's entry is valid while [`Ring::end`] is what it
    /// was when it registered (every send moves it, and takes them all);
    /// a receiver that leaves before empties its entry.
    waiting: Vec<Option<Waker>>,
    /// Emptied entries of `waiting`, reused before it grows.
    vacant: Vec<usize>,
}

/// One delivery in the ring, with how many receivers have yet to take it.
struct Posted {
    delivery: Delivery,
    /// Receivers that have yet to take it.
    unseen: usize,
}

impl Ring {
    fn end(&self) -> u64 {
        self.first + self.items.len() as u64
    }

    /// Drops the items every receiver has taken, and gives memory back once
    /// a burst has passed.
    fn trim(&mut self) {
        while self.items.front().is_some_and(|slot| slot.unseen == 0) {
            self.items.pop_front();
            self.first += 1;
        }
        if self.items.capacity() > 64 && self.items.len() < self.items.capacity() / 8 {
            self.items.shrink_to(self.items.len() * 2);
        }
    }
}

impl Channel {
    fn new(backlog: usize) -> Channel {
        Channel {
            ring: Mutex::new(Ring {
                items: VecDeque::new(),
                first: 0,
                receivers: 0,
                waiting: Vec::new(),
                vacant: Vec::new(),
            }),
            end: AtomicU64::new(0),
            backlog,
            compression: OnceLock::new(),
        }
    }

    /// The next event's chained units, for the codings some receiver wants;
    /// `None` (without a lock) when none does.
    fn chained(&self, event: &Arc<Event>) -> Option<Arc<Chained>> {
        let compression = self.compression.get()?;
        let wanted: [bool; SHARED_CODINGS] =
            std::array::from_fn(|slot| compression.shared[slot].load(Ordering::Relaxed) > 0);
        if !wanted.contains(&true) {
            return None;
        }
        let mut chain = compression.chain.lock().unwrap_or_else(|e| e.into_inner());
        chain.units(event, wanted, std::time::Instant::now())
    }

    /// The topic's compression, made now if need be; `quiet` and
    /// `permits` as in [`Chain::new`].
    fn compression(&self, quiet: Duration, permits: &Arc<ChainPermits>) -> &Compression {
        self.compression.get_or_init(|| {
            Box::new(Compression {
                shared: Default::default(),
                chain: Mutex::new(Chain::new(quiet, permits.clone())),
            })
        })
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `delivery` for every receiver and wakes those waiting;
    /// returns how many receivers there are.
    fn send(&self, delivery: Delivery) -> usize {
        let (unseen, waiting) = {
            let mut ring = self.lock();
            if ring.receivers == 0 {
                return 0;
            }
            let unseen = ring.receivers;
            ring.items.push_back(Posted { delivery, unseen });
            if ring.items.len() > self.backlog {
                ring.items.pop_front();
                ring.first += 1;
            }
            self.end.store(ring.end(), Ordering::Release);
            ring.vacant.clear();
            // Room for as many as waited this time, in one allocation.
            let room = Vec::with_capacity(ring.waiting.len());
            (unseen, std::mem::replace(&mut ring.waiting, room))
        };
        // Woken outside the lock, which receivers take to register again.
        for waker in waiting.into_iter().flatten() {
            waker.wake();
        }
        unseen
    }

    fn receiver_count(&self) -> usize {
        self.lock().receivers
    }
}

/// One subscriber's place in a topic's ring.
struct Receiver {
    channel: Arc<Channel>,
    /// The index of the next item to take.
    next: u64,
    /// Where this receiver's waker waits in [`Ring::waiting`], the waker,
    /// and the ring's end when it was put there.
    registered: Option<Registration>,
}

struct Registration {
    entry: usize,
    waker: Waker,
    at: u64,
}

impl Receiver {
    fn new(channel: Arc<Channel>) -> Receiver {
        let next = {
            let mut ring = channel.lock();
            ring.receivers += 1;
            ring.end()
        };
        Receiver {
            channel,
            next,
            registered: None,
        }
    }

    /// The next item, if there is one. With `cx`, when this takes the
    /// last one or finds none, the task is woken by the next send; the
    /// lock is taken only to take an item or to register, so a receiver
    /// polled again before the next send pays a load.
    fn recv(&mut self, cx: Option<&mut Context<'_>>) -> Option<Result<Delivery, Lagged>> {
        let end = self.channel.end.load(Ordering::Acquire);
        if self.next == end {
            let waiting = self.registered.as_ref().is_some_and(|registered| {
                registered.at == end
                    && cx
                        .as_ref()
                        .is_none_or(|cx| registered.waker.will_wake(cx.waker()))
            });
            if waiting || cx.is_none() {
                return None;
            }
        }
        let mut ring = self.channel.lock();
        let item = take(&mut ring, &mut self.next);
        if let Some(cx) = cx
            && self.next == ring.end()
        {
            register(&mut self.registered, &mut ring, cx.waker());
        }
        item
    }
}

/// Leaves `waker` in the ring for the next send to wake (in place of an
/// earlier one of the same receiver, still there).
fn register(registered: &mut Option<Registration>, ring: &mut Ring, waker: &Waker) {
    let end = ring.end();
    if let Some(current) = registered
        && current.at == end
    {
        if !current.waker.will_wake(waker) {
            current.waker.clone_from(waker);
            ring.waiting[current.entry] = Some(waker.clone());
        }
        return;
    }
    let entry = match ring.vacant.pop() {
        Some(entry) => {
            ring.waiting[entry] = Some(waker.clone());
            entry
        }
        None => {
            // A topic's first waiter makes room for one: most idle topics
            // have a single subscriber.
            if ring.waiting.capacity() == 0 {
                ring.waiting.reserve_exact(1);
            }
            ring.waiting.push(Some(waker.clone()));
            ring.waiting.len() - 1
        }
    };
    *registered = Some(Registration {
        entry,
        waker: waker.clone(),
        at: end,
    });
}

/// Takes the item at `next` from the ring, if it is there yet.
fn take(ring: &mut Ring, next: &mut u64) -> Option<Result<Delivery, Lagged>> {
    if *next < ring.first {
        return Some(Err(Lagged));
    }
    let i = usize::try_from(*next - ring.first).ok()?;
    let slot = ring.items.get_mut(i)?;
    let delivery = slot.delivery.clone();
    slot.unseen -= 1;
    *next += 1;
    if i == 0 {
        ring.trim();
    }
    Some(Ok(delivery))
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut ring = self.channel.lock();
        if let Some(registered) = &self.registered
            && registered.at == ring.end()
        {
            ring.waiting[registered.entry] = None;
            ring.vacant.push(registered.entry);
        }
        ring.receivers -= 1;
        let from = usize::try_from(self.next.saturating_sub(ring.first)).unwrap_or(usize::MAX);
        for slot in ring.items.iter_mut().skip(from) {
            slot.unseen -= 1;
        }
        ring.trim();
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.hub.leave(&self.topic);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Epoch;

    #[test]
    fn a_topic_without_subscribers_costs_nothing() {
        let hub = Hub::new(8);
        let t = Topic::parse("t", 10).unwrap();
        let a = hub.subscribe(&t);
        let b = hub.subscribe(&t);
        assert!(hub.is_watched(&t));
        drop(a);
        assert!(hub.is_watched(&t));
        drop(b);
        assert!(!hub.is_watched(&t));
        assert!(hub.watched().is_empty());
        // Delivering to an unwatched topic is a no-op.
        hub.deliver(&Arc::new(Event::new(t, 1, Epoch(1), None, "x")));
    }

    fn event(t: &Topic, seq: u64) -> Arc<Event> {
        Arc::new(Event::new(t.clone(), seq, Epoch(1), None, "x"))
    }

    fn seq_of(item: Option<(usize, Result<Live, Lagged>)>) -> Option<Result<u64, Lagged>> {
        item.map(|(_, r)| {
            r.map(|live| match live {
                Live::Event(e) => e.seq,
                other => panic!("{other:?}"),
            })
        })
    }

    fn ring_len(hub: &Hub, t: &Topic) -> (usize, usize) {
        let topics = hub.inner.topics.read().unwrap();
        let ring = topics[t].lock();
        (ring.items.len(), ring.items.capacity())
    }

    #[test]
    fn the_ring_holds_only_what_someone_has_yet_to_take() {
        let hub = Hub::new(1024);
        let t = Topic::parse("t", 10).unwrap();
        let mut a = hub.subscribe_all(std::slice::from_ref(&t));
        // An idle subscribed topic allocates no ring at all.
        assert_eq!(ring_len(&hub, &t), (0, 0));
        hub.deliver(&event(&t, 1));
        let mut b = hub.subscribe_all(std::slice::from_ref(&t));
        hub.deliver(&event(&t, 2));
        assert_eq!(ring_len(&hub, &t).0, 2);
        assert_eq!(seq_of(a.try_next()), Some(Ok(1)));
        assert_eq!(ring_len(&hub, &t).0, 1, "1 is dropped once a took it");
        // b joined after 1: it starts at 2.
        assert_eq!(seq_of(b.try_next()), Some(Ok(2)));
        assert_eq!(ring_len(&hub, &t).0, 1, "a has yet to take 2");
        drop(a);
        assert_eq!(ring_len(&hub, &t).0, 0, "a leaving releases its share");
        assert_eq!(seq_of(b.try_next()), None);
    }

    #[test]
    fn a_receiver_past_the_backlog_lags_and_the_others_go_on() {
        let hub = Hub::new(4);
        let t = Topic::parse("t", 10).unwrap();
        let mut slow = hub.subscribe_all(std::slice::from_ref(&t));
        let mut fast = hub.subscribe_all(std::slice::from_ref(&t));
        for seq in 1..=6 {
            hub.deliver(&event(&t, seq));
            assert_eq!(seq_of(fast.try_next()), Some(Ok(seq)));
        }
        assert!(ring_len(&hub, &t).0 <= 4);
        assert_eq!(seq_of(slow.try_next()), Some(Err(Lagged)));
        drop(slow);
        assert_eq!(ring_len(&hub, &t).0, 0);
        hub.deliver(&event(&t, 7));
        assert_eq!(seq_of(fast.try_next()), Some(Ok(7)));
    }

    /// A waker that counts its wake-ups.
    #[derive(Default)]
    struct Counting(AtomicUsize);

    impl std::task::Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll_with(feeds: &mut Feeds, waker: &Arc<Counting>) -> Option<Result<u64, Lagged>> {
        let waker = Waker::from(waker.clone());
        seq_of(feeds.poll_heads(Some(&mut Context::from_waker(&waker))))
    }

    #[test]
    fn a_send_wakes_the_waker_a_receiver_was_last_polled_with_once() {
        let hub = Hub::new(8);
        let t = Topic::parse("t", 10).unwrap();
        let mut feeds = hub.subscribe_all(std::slice::from_ref(&t));
        let (first, second) = (Arc::default(), Arc::default());
        assert_eq!(poll_with(&mut feeds, &first), None);
        assert_eq!(poll_with(&mut feeds, &first), None);
        // The stream moved to another task.
        assert_eq!(poll_with(&mut feeds, &second), None);
        hub.deliver(&event(&t, 1));
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        // Taking the last item leaves the waker for the next send at once;
        // polling again before it costs no second registration.
        assert_eq!(poll_with(&mut feeds, &second), Some(Ok(1)));
        assert_eq!(poll_with(&mut feeds, &second), None);
        assert_eq!(feeds.try_next().map(|(_, item)| item.is_ok()), None);
        hub.deliver(&event(&t, 2));
        assert_eq!(second.0.load(Ordering::SeqCst), 2);
        assert_eq!(feeds.try_next().map(|(_, item)| item.is_ok()), Some(true));
    }

    #[test]
    fn receivers_that_wait_and_leave_without_a_send_leave_nothing_behind() {
        let hub = Hub::new(8);
        let t = Topic::parse("t", 10).unwrap();
        let _stays = hub.subscribe_all(std::slice::from_ref(&t));
        let waker = Arc::default();
        for _ in 0..1000 {
            let mut feeds = hub.subscribe_all(std::slice::from_ref(&t));
            assert_eq!(poll_with(&mut feeds, &waker), None);
        }
        let topics = hub.inner.topics.read().unwrap();
        let ring = topics[&t].lock();
        assert!(ring.waiting.len() <= 1, "{} entries", ring.waiting.len());
        drop(ring);
        drop(topics);
        hub.deliver(&event(&t, 1));
        assert_eq!(waker.0.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_the_next_send() {
        let hub = Hub::new(8);
        let t = Topic::parse("t", 10).unwrap();
        let mut feeds = hub.subscribe_all(std::slice::from_ref(&t));
        let waiter = tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..3 {
                got.push(seq_of(Some(feeds.next().await)));
            }
            got
        });
        for seq in 1..=3 {
            tokio::task::yield_now().await;
            hub.deliver(&event(&t, seq));
        }
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, vec![Some(Ok(1)), Some(Ok(2)), Some(Ok(3))]);
    }

    fn chained_of(item: Option<(usize, Result<Live, Lagged>)>) -> Option<Arc<Chained>> {
        match item {
            Some((_, Ok(Live::Event(_)))) => None,
            Some((_, Ok(Live::Chained(chained)))) => Some(chained),
            other => panic!("{other:?}"),
        }
    }

    /// A topic compresses its events only while a stream of a shared coding
    /// is subscribed, and frees its compressor when the last one leaves.
    #[test]
    fn a_topic_compresses_once_per_event_only_for_streams_that_share() {
        let hub = Hub::new(8);
        let t = Topic::parse("t", 10).unwrap();
        let mut plain = hub.subscribe_all(std::slice::from_ref(&t));
        hub.deliver(&event(&t, 1));
        assert!(chained_of(plain.try_next()).is_none());
        let mut zstd = hub.subscribe_all(std::slice::from_ref(&t));
        zstd.share(Codec::Zstd);
        zstd.share(Codec::Zstd); // counted once
        hub.deliver(&event(&t, 2));
        let to_plain = chained_of(plain.try_next()).expect("units for the topic");
        let to_zstd = chained_of(zstd.try_next()).expect("units for the topic");
        // The same units, compressed once, reach every subscriber.
        assert!(Arc::ptr_eq(&to_plain, &to_zstd));
        drop(zstd);
        hub.deliver(&event(&t, 3));
        assert!(chained_of(plain.try_next()).is_none());
        let topics = hub.inner.topics.read().unwrap();
        let compression = topics[&t].compression.get().unwrap();
        assert_eq!(compression.shared[0].load(Ordering::Relaxed), 0);
        assert!(
            compression.chain.lock().unwrap().is_empty(),
            "compressor freed"
        );
    }
}
