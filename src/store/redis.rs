//! The Redis Streams store: history in Redis, so any number of nodes serve
//! one feed.
//!
//! Layout, per topic (the `{topic}` hash tag keeps a topic's keys in one
//! Redis Cluster slot; the prefix lets several hubs share one Redis):
//!
//! - `PREFIX{topic}:meta` — a hash: `epoch`, `seq` (the last number given),
//!   `expires` (when the oldest retained event expires, at the earliest:
//!   a publish reads the stream to trim by age only once that time came),
//!   `line` (the replication history it was written in), `renew` (when its
//!   keys' lifetimes are stretched next) and `pub` (how far its events were
//!   sent live, when publishes wait for replicas; none: all of them).
//! - `PREFIX{topic}:events` — a stream; entry id `SEQ-0`, fields `t` (ms),
//!   `e` (event name, may be empty), `d` (data). It may hold up to 15
//!   events more than `--retention-events` (single publishes trim it every
//!   16 events, a batch after its last); readers never see them.
//! - `PREFIX{topic}:live` — the pub/sub channel that carries new events.
//!
//! Publishing is one Lua script per topic: it numbers the events, appends
//! them, trims by count and age, and publishes each on the channel, all in
//! one atomic step and one round trip; a batch's events to one topic are
//! one call. The scripts are the `.lua` files in `redis/` beside this one,
//! compiled in; every key they touch comes in `KEYS`, and a topic's keys
//! share its hash tag. A missing `meta` hash means the
//! topic's history is gone (Redis restarted without persistence, keys
//! deleted by hand): the script then starts a new epoch, so no old position
//! is ever replayed against new data. History that only went back in time
//! (an older snapshot, a failover to a lagging replica) is noticed by the
//! nodes, which remember how far they saw each watched topic go: the topic
//! then gets a new epoch too (see [`Floor`]).
//!
//! Live delivery: each node keeps one pub/sub connection, subscribed to the
//! channels of the topics its subscribers watch, and hands each message to
//! its hub. Redis work grows with topics and nodes, never with subscribers.
//! Pub/sub is push, so latency does not depend on how many topics a node
//! watches. Pub/sub loses what is sent while a node is disconnected; the
//! dense sequence makes that visible, and after every reconnect the node
//! reads, once per watched topic, what it missed and delivers it to its hub
//! (`catch_up`); only where that cannot be done (history changed, no live
//! position yet) do the topic's subscribers check the stream themselves.
//!
//! A pub/sub connection can also stall without dropping (a frozen server, a
//! middlebox that stopped forwarding): commands still work, live events no
//! longer arrive. So each node sends itself a canary every few seconds, a
//! `PUBLISH` on a channel of its own, through the same path as events (the
//! command connection, then the pub/sub connection), and is not ready while
//! one is overdue (see [`Canary`]).
//!
//! This file is the store itself; beside it in `redis/`: `primary.rs`
//! (which server: one, Sentinel's primary, or a cluster), `keys.rs` (names,
//! and a cluster's partitions), `live.rs` (what the live feed carries),
//! `canary.rs`, `outbox.rs` (grouped publishes, and `WAIT`), `reply.rs`
//! (Redis's answers read as crier's), and the scripts, `*.lua`.

use std::collections::VecDeque;

use indexmap::{IndexMap, IndexSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::{Script, Value};
use tokio_util::sync::CancellationToken;

use super::sweep;
use super::{
    Appended, Fingerprint, History, KeyDigest, MAX_SEQ, NewEvent, Once, Retention, Store,
    StoreError,
};
use crate::event::{Epoch, Event, EventName, Topic};
use crate::hub::Hub;
use crate::metrics::Renewal;

mod canary;
mod keys;
mod live;
mod outbox;
mod primary;
mod reply;

use canary::Canary;
pub use canary::CanarySettings;
use keys::{Keys, partition_tags};
use live::{LiveMessage, LiveSink, Pushed, parse_live, pushed};
use outbox::{Confirmable, Outbox, ScriptRequest, Wait, publish_call, publish_head};
use primary::Primary;
pub use primary::RedisTarget;
use reply::{as_text, as_u64, is_empty_text, malformed, parse_receipt, store_error, unavailable};

// Lua numbers are doubles, exact only up to 2^53: the scripts never see a
// number past `MAX_SEQ`. The publish script refuses to number past it, and
// the read path answers positions beyond it in Rust, without running XRANGE.

/// Numbers, appends, trims and publishes one topic's events, and keeps
/// their idempotency records: for each of the call's requests (the outbox
/// sends what queued meanwhile as one call, so `TIME`, `INFO` and the
/// call's own cost are paid once for them all). The call's ARGV starts with
/// the number R of requests and R pairs of counts (a request's keys, its
/// arguments); then come the requests' KEYS, and their ARGV, in turn. The
/// answer has one entry per request: its answer, or its error alone.
///
/// A request's KEYS: meta, events, then the record key of every idempotency key of the
/// whole request (all topics), then, for a request of several topics, the
/// meta and events keys of each of its topics. ARGV: channel, max events,
/// max age ms, meta ttl ms, the epoch and number this node has already seen
/// for the topic (empty if none), the idempotency window ms, `1` when
/// publishes wait for replicas (a failover then keeps the epoch), the number K
/// of record keys, K fingerprints (hex), the number G of guarded topics, G
/// counts of their events, then per event: its record key's index (0:
/// none), name, data.
///
/// When publishes wait for replicas, the script sends nothing live: the
/// events go live only once `WAIT` confirmed them, by `CONFIRM`.
///
/// A number below what a node has already seen in the same epoch means the
/// history went back in time (a restored snapshot, a failover to a lagging
/// replica): the numbers from there on were handed out before, to other
/// events. The topic then gets a new epoch, keeping what is retained, so no
/// old position is taken for a position in the new events.
///
/// A topic whose number is not one the script could have written, or that
/// would pass `MAX_SEQ`, is refused before anything is written: a script's
/// earlier writes are not undone when a later command fails. Nor are an
/// earlier script's in a transaction, so in a request of several topics
/// every topic's script first checks every topic's keys (the guard): one
/// topic's corrupt keys refuse the whole batch in each script alike. So is a
/// request one of whose keys holds another fingerprint (`{'reused', k}`);
/// every topic's script of a batch checks every key of the batch, so they
/// all see the same records and agree, and a batch is stored whole or not
/// at all. An event whose key holds a record is not stored: its answer is
/// the record's `SEQ EPOCH`; a stored event's answer is empty. The answer's
/// header is {epoch, first number, renewal cause, the topic's head}.
/// A record is `FINGERPRINT SEQ EPOCH`, expiring after the window.
const PUBLISH: &str = concat!(
    include_str!("redis/fresh_epoch.lua"),
    include_str!("redis/first_kept.lua"),
    include_str!("redis/publish.lua")
);

/// Topics per UNSUBSCRIBE and per pipeline of PEXPIRE in housekeeping.
const HOUSEKEEPING_CHUNK: usize = 1000;

/// Events read per round trip when a node catches up after a reconnect.
const CATCH_UP_PAGE: usize = 256;

/// Gives a topic a new epoch if it still has `epoch`, keeping its retained
/// events and its numbering: a node saw its history go back in time.
/// KEYS: meta. ARGV: the epoch. Returns the topic's epoch afterwards.
const REEPOCH: &str = concat!(
    include_str!("redis/fresh_epoch.lua"),
    include_str!("redis/reepoch.lua")
);

/// Sends live, in order, what `WAIT` confirmed of topics published while
/// waiting for replicas: each topic's events from the meta's `pub` up to
/// the head its publish script answered, then notes `pub`. Live messages
/// keep the numbering's order whichever node confirms first, and an event
/// a failover could lose is never seen by a subscriber, so a failover to a
/// replica that confirmed everything needs no `reset`.
/// KEYS: meta and events of each topic. ARGV: the live command, then per
/// topic: its channel, the head of its live messages, its confirmed head.
const CONFIRM: &str = include_str!("redis/confirm.lua");

/// Reads a topic's bounds and up to `limit` events from a number on, in one
/// consistent snapshot. KEYS: meta, events. ARGV: the first number wanted
/// (at most `MAX_SEQ + 1`, worked out in Rust: no arithmetic on a client's
/// position happens here), limit, max age ms, max events (the stream may
/// hold a few more: single publishes trim it a few at a time). Returns {}
/// when the topic has no history, else {epoch, head, oldest, then seq,
/// name, data per event}; the head is the last event sent live (see
/// `CONFIRM`).
const READ: &str = concat!(
    include_str!("redis/first_kept.lua"),
    include_str!("redis/read.lua")
);

pub struct RedisStore {
    /// The server commands and the live feed go to.
    primary: Arc<Primary>,
    /// Replicas that must hold a publish before it is answered.
    wait_replicas: u32,
    keys: Keys,
    retention: Retention,
    timeout: Duration,
    publish: Arc<Script>,
    read: Script,
    reepoch: Script,
    confirm: Arc<Script>,
    /// On a cluster, its shards' slot ranges (see `learn_shards`).
    shards: std::sync::Mutex<Vec<(u16, u16)>>,
    /// Single-topic publish calls on their way to Redis.
    outbox: Arc<Outbox>,
    hub: Hub,
    /// How far this node has seen each watched topic go.
    floors: std::sync::Mutex<IndexMap<Topic, Floor>>,
    live: tokio::sync::Mutex<LiveLink>,
    /// Whether the pub/sub connection is up; `watch` waits for it.
    live_up: tokio::sync::watch::Sender<bool>,
    canary: Canary,
}

/// Everything the Redis store is built with.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub target: RedisTarget,
    /// A private certificate authority for `rediss://`.
    pub ca_cert: Option<std::path::PathBuf>,
    pub prefix: String,
    pub retention: Retention,
    /// Longest wait to connect or for an answer.
    pub timeout: Duration,
    pub canary: CanarySettings,
    /// Replicas that must hold a publish before it is answered.
    pub wait_replicas: u32,
}

/// The furthest a node has seen a topic go in one epoch. Within an epoch a
/// topic's number never goes down, and its live messages come in order; a
/// store that answers otherwise has lost part of its history (a restored
/// snapshot, a failover to a lagging replica), and the numbers from there on
/// may be handed out again.
#[derive(Debug, Clone)]
struct Floor {
    epoch: Epoch,
    /// The highest number seen anywhere: publish answers, reads, live.
    seen: u64,
    /// The highest number seen on the live channel.
    live: u64,
    /// The highest number delivered by the catch-up after a reconnect; live
    /// messages up to it are repeats, not a history going back.
    caught_up: u64,
    /// The last live messages, as (number, hash of the message): the same
    /// message again is a repeat (a cluster's client may hold a channel's
    /// subscription on two nodes for a moment after a failover), another
    /// message with the same number a history that went back.
    recent: VecDeque<(u64, u64)>,
}

/// Live messages remembered per watched topic to tell repeats.
const RECENT_LIVE: usize = 64;

/// What a number seen for a topic means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Not seen before (or a topic this node does not follow).
    New,
    /// A live message for an event the catch-up already delivered.
    Repeat,
    /// A live number not above the last live one: the history went back.
    WentBack,
}

/// This node's pub/sub connection and the channels it is subscribed to.
#[derive(Default)]
struct LiveLink {
    sink: Option<LiveSink>,
    topics: IndexSet<Topic>,
    /// Each channel subscribed for `topics`, with how many of them use it
    /// (one each outside a cluster; a partition's topics share one there).
    channels: std::collections::HashMap<String, usize>,
    /// On a cluster, the partitions' channels confirmed once: a second
    /// confirmation is a resubscription, after which the partition's
    /// topics are caught up.
    confirmed: std::collections::HashSet<String>,
}

impl LiveLink {
    /// Adds `topic`, on `channel`; true if no topic used that channel yet.
    fn add(&mut self, topic: &Topic, channel: String) -> bool {
        if !self.topics.insert(topic.clone()) {
            return false;
        }
        let users = self.channels.entry(channel).or_default();
        *users += 1;
        *users == 1
    }

    /// Removes `topic`, on `channel`.
    fn remove(&mut self, topic: &Topic, channel: &str) {
        if self.topics.swap_remove(topic)
            && let Some(users) = self.channels.get_mut(channel)
        {
            *users -= 1;
            if *users == 0 {
                self.channels.remove(channel);
            }
        }
    }
}

impl RedisStore {
    /// Prepares a store for `settings.target`. Connecting happens lazily
    /// and is retried with backoff; a malformed URL is an error now.
    pub fn new(settings: RedisSettings, hub: Hub) -> Result<RedisStore, StoreError> {
        let RedisSettings {
            target,
            ca_cert,
            prefix,
            retention,
            timeout,
            canary,
            wait_replicas,
        } = settings;
        let primary = Arc::new(Primary::new(&target, ca_cert.as_deref(), timeout)?);
        let partitions = primary.is_cluster().then(|| partition_tags().into());
        let prefix = prefix.as_str();
        let publish = Arc::new(Script::new(PUBLISH));
        let confirm = Arc::new(Script::new(CONFIRM));
        let keys = Keys {
            prefix: prefix.to_owned(),
            partitions,
        };
        let outbox = Arc::new(Outbox::new(
            primary.clone(),
            publish.clone(),
            Wait {
                replicas: wait_replicas,
                timeout,
                confirm: confirm.clone(),
                live_command: keys.live_command(),
            },
        ));
        // Shown (as down) from the start, not from the first connection.
        hub.metrics().redis().set_connected(false);
        Ok(RedisStore {
            primary,
            wait_replicas,
            keys,
            retention,
            timeout,
            publish,
            read: Script::new(READ),
            reepoch: Script::new(REEPOCH),
            confirm,
            shards: std::sync::Mutex::new(Vec::new()),
            outbox,
            hub,
            floors: std::sync::Mutex::new(IndexMap::new()),
            live: tokio::sync::Mutex::new(LiveLink::default()),
            live_up: tokio::sync::watch::Sender::new(false),
            canary: Canary::new(prefix, canary),
        })
    }

    /// `--redis-wait-replicas`, with what confirming publishes takes.
    fn wait(&self) -> Wait {
        Wait {
            replicas: self.wait_replicas,
            timeout: self.timeout,
            confirm: self.confirm.clone(),
            live_command: self.keys.live_command(),
        }
    }

    /// What `CONFIRM` needs of `topic`.
    fn confirmable(&self, topic: &Topic) -> Confirmable {
        Confirmable {
            meta: self.keys.meta(topic),
            events: self.keys.events(topic),
            channel: self.keys.channel(topic),
            live_head: self.keys.live_head(topic),
        }
    }

    fn max_age_ms(&self) -> u64 {
        u64::try_from(self.retention.max_age.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// How often a node drops channels nobody on it watches any more and
    /// refreshes the `meta` of the topics it does watch.
    fn housekeeping_period(&self) -> Duration {
        (self.retention.max_age / 3).clamp(Duration::from_millis(50), Duration::from_secs(30))
    }

    /// How long a topic's `meta` (its epoch and last number) outlives its
    /// last event. Watching nodes keep refreshing it, so an idle topic with
    /// subscribers keeps its numbering; one with neither events nor
    /// subscribers is forgotten, as in the embedded store.
    fn meta_ttl_ms(&self) -> u64 {
        let grace = self.housekeeping_period() * 3;
        self.max_age_ms()
            .saturating_add(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX))
    }

    /// Runs until `stop`: keeps the pub/sub connection up, delivers what it
    /// carries to the hub, and after every (re)connection resubscribes and
    /// asks subscribers to check for anything missed meanwhile.
    pub async fn run_until(self: Arc<Self>, stop: CancellationToken) {
        {
            let store = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let metrics = store.hub.metrics().redis();
                store.primary.clone().follow_until(metrics, stop).await
            });
        }
        let mut switches = self.primary.switches();
        tokio::spawn(self.clone().send_canaries_until(stop.clone()));
        let mut delay = Duration::from_millis(100);
        let mut housekeeping = tokio::time::interval(self.housekeeping_period());
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let metrics = self.hub.metrics().redis();
        metrics.set_connected(false);
        let mut was_up = false;
        loop {
            match self.connect_live().await {
                Ok(mut messages) => {
                    delay = Duration::from_millis(100);
                    tracing::info!("live feed from Redis connected");
                    metrics.set_connected(true);
                    if std::mem::replace(&mut was_up, true) {
                        metrics.reconnected();
                    }
                    self.catch_up().await;
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = housekeeping.tick() => self.housekeeping().await,
                            // Another primary: reconnect to it.
                            _ = switches.changed() => break,
                            message = messages.next() => match message {
                                Some(Pushed::Message(message)) => {
                                    if let Some((topic, epoch)) = self.on_message(&message) {
                                        self.history_went_back(&topic, epoch).await;
                                    }
                                }
                                Some(Pushed::Subscribed(channel)) => self.resubscribed(channel).await,
                                Some(Pushed::Other) => {}
                                None => break,
                            },
                        }
                    }
                    self.live.lock().await.sink = None;
                    self.live_up.send_replace(false);
                    metrics.set_connected(false);
                    tracing::warn!("live feed from Redis lost; reconnecting");
                }
                Err(error) => {
                    // Host and port only: the URL may carry a password.
                    let redis = self.primary.address();
                    tracing::warn!(%error, %redis, ?delay, "cannot reach Redis for the live feed")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
                // A primary named at last, or another: try it now.
                _ = switches.changed() => delay = Duration::from_millis(50),
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Sends a canary every interval while the live feed is up, and
    /// reports a stall when one is overdue. Its own task: a send that hangs
    /// (a frozen server) must not hold up live messages, and is itself a
    /// canary that does not come back.
    async fn send_canaries_until(self: Arc<Self>, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(self.canary.settings.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            self.canary.report();
            if !*self.live_up.borrow() {
                continue;
            }
            // Recorded before it is sent, so it cannot come back unrecorded.
            if self.primary.is_cluster() {
                self.send_shared_canaries().await;
                continue;
            }
            let n = self.canary.send(&self.canary.channel);
            let sent = match self.primary.commands().await {
                Ok(mut commands) => redis::cmd("PUBLISH")
                    .arg(&self.canary.channel)
                    .arg(n)
                    .query_async::<()>(&mut commands)
                    .await
                    .map_err(unavailable),
                Err(error) => Err(error),
            };
            if let Err(error) = sent {
                tracing::debug!(%error, "could not send a canary");
            }
        }
    }

    /// The shard a canary path goes through, as metrics and readiness name
    /// it: on a cluster the slot range of the shard that owns the channel's
    /// slot (stable across failovers), else `single`.
    fn shard_of(&self, path: &str) -> String {
        if !self.primary.is_cluster() {
            return "single".to_owned();
        }
        let slot = keys::slot_of(path);
        let shards = self.shards.lock().unwrap_or_else(|e| e.into_inner());
        match shards
            .iter()
            .find(|(first, last)| (*first..=*last).contains(&slot))
        {
            Some((first, last)) => format!("{first}-{last}"),
            None => "unknown".to_owned(),
        }
    }

    /// On a cluster: the slot ranges of its shards (`CLUSTER SLOTS`), for
    /// naming the canaries' paths; kept as they were when it cannot tell.
    async fn learn_shards(&self, connection: &mut redis::cluster_async::ClusterConnection) {
        let reply = tokio::time::timeout(
            self.canary.settings.timeout,
            redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<Vec<Value>>(connection),
        )
        .await;
        let Ok(Ok(entries)) = reply else {
            return;
        };
        let mut shards: Vec<(u16, u16)> = entries
            .iter()
            .filter_map(|entry| match entry {
                Value::Array(parts) => Some((
                    u16::try_from(as_u64(parts.first()?)?).ok()?,
                    u16::try_from(as_u64(parts.get(1)?)?).ok()?,
                )),
                _ => None,
            })
            .collect();
        shards.sort_unstable();
        *self.shards.lock().unwrap_or_else(|e| e.into_inner()) = shards;
    }

    /// On a cluster: a canary on every partition channel the node is
    /// subscribed to, sent through the live connection itself, so a shard
    /// that failed over is noticed there too (the cluster client then learns
    /// the new slot owners). A channel whose last canary is late is
    /// subscribed again first, on whichever node owns its slot now: the
    /// client's own resubscription does not always follow a failover, and
    /// the confirmation has the partition's topics caught up.
    async fn send_shared_canaries(&self) {
        let (connection, channels) = {
            let link = self.live.lock().await;
            let Some(LiveSink::Cluster(connection)) = &link.sink else {
                return;
            };
            let channels: Vec<String> = link.channels.keys().cloned().collect();
            (connection.clone(), channels)
        };
        self.learn_shards(&mut connection.clone()).await;
        let sends = channels.into_iter().map(|channel| {
            let mut connection = connection.clone();
            let late = self.canary.late(&channel);
            async move {
                if late {
                    let again = tokio::time::timeout(
                        self.canary.settings.timeout,
                        connection.ssubscribe(&channel),
                    )
                    .await;
                    if !matches!(again, Ok(Ok(()))) {
                        tracing::debug!(%channel, "could not subscribe a late channel again");
                    }
                }
                let n = self.canary.send(&channel);
                let message = self.canary.shared_message(n);
                let sent = tokio::time::timeout(
                    self.canary.settings.timeout,
                    redis::cmd("SPUBLISH")
                        .arg(&channel)
                        .arg(message)
                        .query_async::<()>(&mut connection),
                )
                .await;
                if !matches!(sent, Ok(Ok(()))) {
                    tracing::debug!(%channel, "could not send a canary");
                }
            }
        });
        futures_util::future::join_all(sends).await;
    }

    /// Opens a pub/sub connection and subscribes it to every watched topic.
    async fn connect_live(
        &self,
    ) -> Result<futures_util::stream::BoxStream<'static, Pushed>, StoreError> {
        let (mut sink, stream) = if self.primary.is_cluster() {
            let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
            let connection = self.primary.cluster_connection(Some(sender))?;
            let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(receiver).map(pushed);
            (LiveSink::Cluster(connection), stream.boxed())
        } else {
            let client = self.primary.client().await?;
            let pubsub = tokio::time::timeout(self.timeout, client.get_async_pubsub())
                .await
                .map_err(|_| unavailable("timed out connecting to Redis"))?
                .map_err(unavailable)?;
            let (sink, stream) = pubsub.split();
            let stream = stream.map(|message| {
                Pushed::Message(LiveMessage {
                    channel: message.get_channel_name().to_owned(),
                    payload: message.get_payload_bytes().to_vec(),
                })
            });
            (LiveSink::PubSub(sink), stream.boxed())
        };
        let mut link = self.live.lock().await;
        let mut channels: Vec<String> = link.channels.keys().cloned().collect();
        if !self.primary.is_cluster() {
            channels.push(self.canary.channel.clone());
        }
        tokio::time::timeout(self.timeout, sink.subscribe(&channels))
            .await
            .map_err(|_| unavailable("timed out subscribing"))?
            .map_err(unavailable)?;
        self.canary.reset();
        link.confirmed.clear();
        link.sink = Some(sink);
        self.live_up.send_replace(true);
        Ok(stream)
    }

    /// A cluster's live connection subscribed `channel`: the first time, as
    /// asked; again, after its slot moved (a failover, a resharding), when
    /// messages sent meanwhile were lost: the partition's topics are caught
    /// up.
    async fn resubscribed(&self, channel: String) {
        let topics: Vec<Topic> = {
            let mut link = self.live.lock().await;
            if link.confirmed.insert(channel.clone()) {
                return;
            }
            let Some(partition) = self.keys.partition_of(&channel) else {
                return;
            };
            link.topics
                .iter()
                .filter(|t| self.keys.partition(t) == partition)
                .cloned()
                .collect()
        };
        tracing::info!(%channel, topics = topics.len(), "a live channel of the cluster was subscribed again; catching up its topics");
        self.catch_up_topics(&topics).await;
    }

    /// A canary came back: accounted for, and its round trip measured.
    fn canary_back(&self, path: &str, n: u64) {
        if let Some(took) = self.canary.back(path, n) {
            self.hub
                .metrics()
                .redis_canary_back(&self.shard_of(path), took);
        }
    }

    /// Hands a live message to the hub. Returns the topic and epoch when
    /// the message shows that the topic's history went back in time.
    fn on_message(&self, message: &LiveMessage) -> Option<(Topic, Epoch)> {
        if message.channel == self.canary.channel {
            match std::str::from_utf8(&message.payload).map(str::parse::<u64>) {
                Ok(Ok(n)) => self.canary_back(&message.channel, n),
                _ => tracing::warn!("ignoring a malformed canary"),
            }
            return None;
        }
        if self.keys.partitions.is_some() && message.payload.starts_with(b"\n") {
            // A canary on a shared channel: this node's, or another's.
            if let Ok(n) = self.canary.parse_shared(&message.payload) {
                self.canary_back(&message.channel, n);
            }
            return None;
        }
        // A topic's own channel, or on a cluster its partition's, whose
        // messages start with the topic's name.
        let (topic, payload) = match self.keys.topic_of(&message.channel) {
            Some(topic) => (topic, &message.payload[..]),
            None if self.keys.partitions.is_some() => {
                let end = message.payload.iter().position(|b| *b == b'\n')?;
                let name = std::str::from_utf8(&message.payload[..end]).ok()?;
                (
                    Topic::parse(name, usize::MAX).ok()?,
                    &message.payload[end + 1..],
                )
            }
            None => return None,
        };
        let Some(event) = parse_live(topic, payload) else {
            tracing::warn!(
                channel = message.channel,
                "ignoring a malformed live message"
            );
            return None;
        };
        let hash = xxhash_rust::xxh3::xxh3_64(payload);
        let seen = self.saw(&event.topic, event.epoch, event.seq, Some(hash));
        if seen == Seen::Repeat {
            return None;
        }
        let event = Arc::new(event);
        event.stamp_live();
        self.hub.deliver(&event);
        (seen == Seen::WentBack).then(|| (event.topic.clone(), event.epoch))
    }

    /// Records a number seen for a watched topic: in a publish answer or a
    /// read, or (`live`) on the live channel.
    /// `live` is the hash of the live message, for one seen there.
    fn saw(&self, topic: &Topic, epoch: Epoch, seq: u64, live: Option<u64>) -> Seen {
        if !self.hub.is_watched(topic) {
            return Seen::New;
        }
        let mut floors = self.floors();
        match floors.get_mut(topic) {
            Some(floor) if floor.epoch == epoch => {
                floor.seen = floor.seen.max(seq);
                let Some(hash) = live else {
                    return Seen::New;
                };
                let seen = if seq <= floor.live {
                    match floor.recent.iter().find(|(s, _)| *s == seq) {
                        Some((_, h)) if *h == hash => Seen::Repeat,
                        _ => Seen::WentBack,
                    }
                } else if seq <= floor.caught_up {
                    Seen::Repeat
                } else {
                    Seen::New
                };
                if seq > floor.live {
                    if floor.recent.len() == RECENT_LIVE {
                        floor.recent.pop_front();
                    }
                    floor.recent.push_back((seq, hash));
                }
                floor.live = floor.live.max(seq);
                seen
            }
            _ => {
                let mut recent = VecDeque::new();
                if let Some(hash) = live {
                    recent.push_back((seq, hash));
                }
                floors.insert(
                    topic.clone(),
                    Floor {
                        epoch,
                        seen: seq,
                        live: if live.is_some() { seq } else { 0 },
                        caught_up: 0,
                        recent,
                    },
                );
                Seen::New
            }
        }
    }

    /// The furthest this node has seen `topic` go, as (epoch, number).
    fn floor(&self, topic: &Topic) -> Option<(Epoch, u64)> {
        self.floors().get(topic).map(|f| (f.epoch, f.seen))
    }

    fn floors(&self) -> std::sync::MutexGuard<'_, IndexMap<Topic, Floor>> {
        self.floors.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After the live feed (re)connected: for every watched topic, reads
    /// what was published since the last live event this node delivered and
    /// delivers it, so the subscribers that were in step get it as live
    /// events. One read per topic (and page), however many subscribers
    /// watch it; subscribers that owe the store work of their own are told
    /// the store is back. A topic this node has no live position for, whose
    /// history changed, or that cannot be read now, gets a resync: its
    /// subscribers check the store themselves.
    async fn catch_up(&self) {
        let topics: Vec<Topic> = self.live.lock().await.topics.iter().cloned().collect();
        self.catch_up_topics(&topics).await;
        self.hub.store_back();
    }

    /// Catches up each of `topics` this node's subscribers watch, or has
    /// them check the store themselves where that cannot be done.
    async fn catch_up_topics(&self, topics: &[Topic]) {
        let metrics = self.hub.metrics().redis();
        for topic in topics.iter().filter(|t| self.hub.is_watched(t)) {
            let caught_up = self.catch_up_topic(topic).await;
            metrics.caught_up(caught_up);
            if !caught_up {
                self.hub.resync(topic);
            }
        }
    }

    /// One page for the catch-up. The command connection may still be
    /// re-establishing itself when the live feed is back (its first command
    /// after a cut fails), so a failure is retried a few times first.
    async fn catch_up_read(&self, topic: &Topic, after: u64) -> Option<History> {
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=4 {
            match self.read(topic, after, CATCH_UP_PAGE).await {
                Ok(history) => return Some(history),
                Err(error) if attempt < 4 => {
                    tracing::debug!(%error, %topic, "catch-up read failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(error) => tracing::debug!(%error, %topic, "catch-up read failed"),
            }
        }
        None
    }

    /// Delivers what `topic` missed on the live channel; `false` when that
    /// cannot be done here.
    async fn catch_up_topic(&self, topic: &Topic) -> bool {
        let live = self.floors().get(topic).map(|f| (f.epoch, f.live));
        let Some((epoch, mut last)) = live.filter(|(_, live)| *live > 0) else {
            return false;
        };
        loop {
            let Some(history) = self.catch_up_read(topic, last).await else {
                return false;
            };
            if history.epoch != Some(epoch) || history.oldest > last.saturating_add(1) {
                return false;
            }
            let page = history.events.len();
            for event in history.events {
                if Some(event.seq) != last.checked_add(1) {
                    return false;
                }
                last = event.seq;
                self.hub.deliver(&event);
            }
            match self.floors().get_mut(topic) {
                Some(floor) if floor.epoch == epoch => floor.caught_up = floor.caught_up.max(last),
                _ => return false,
            }
            if page < CATCH_UP_PAGE {
                return true;
            }
        }
    }

    /// `topic`'s history in `epoch` went back in time: give it a new epoch
    /// (unless another node already did) and have its subscribers check the
    /// store, where they find the new epoch and are told with `reset`.
    async fn history_went_back(&self, topic: &Topic, epoch: Epoch) {
        tracing::warn!(%topic, ?epoch, "the topic's history in Redis went back in time; starting a new epoch");
        self.hub.metrics().redis().renewed(Renewal::WentBack);
        let result: Result<Option<String>, _> = match self.primary.commands().await {
            Ok(mut commands) => self
                .reepoch
                .key(self.keys.meta(topic))
                .arg(epoch.0)
                .invoke_async(&mut commands)
                .await
                .map_err(unavailable),
            Err(error) => Err(error),
        };
        if let Err(error) = result {
            // Subscribers still check; the next publish from a node that
            // saw the old numbers starts the new epoch instead.
            tracing::warn!(%error, %topic, "could not start a new epoch");
        }
        self.floors().swap_remove(topic);
        self.hub.resync(topic);
    }

    /// Unsubscribes from topics nobody on this node watches any more, and
    /// keeps the `meta` of watched topics alive. It works a slice at a time
    /// (the link's lock is what `watch` takes; the floors' is taken by every
    /// publish and live message), so it holds no lock for long whatever the
    /// number of topics.
    async fn housekeeping(&self) {
        // Topics of the link, a slice at a time, from the last index: new
        // ones go to the end and are left for the next round.
        let mut idle = Vec::new();
        let mut watched = Vec::new();
        let mut next = self.live.lock().await.topics.len();
        while next > 0 {
            {
                let link = self.live.lock().await;
                let end = next.min(link.topics.len());
                let start = end.saturating_sub(sweep::SWEEP_SLICE);
                for topic in (start..end).filter_map(|i| link.topics.get_index(i)) {
                    if self.hub.is_watched(topic) {
                        watched.push(topic.clone());
                    } else {
                        idle.push(topic.clone());
                    }
                }
                next = start;
            }
            tokio::task::yield_now().await;
        }
        for chunk in idle.chunks(HOUSEKEEPING_CHUNK) {
            let mut link = self.live.lock().await;
            // Looked at again under the lock: a subscriber that joined the
            // hub since then keeps its topic (its `watch` waits for this
            // lock, and subscribes again what was taken off the link).
            let idle: Vec<&Topic> = chunk.iter().filter(|t| !self.hub.is_watched(t)).collect();
            if idle.is_empty() || link.sink.is_none() {
                if link.sink.is_none() {
                    break;
                }
                continue;
            }
            // A channel stays while a topic that is kept uses it (on a
            // cluster, one channel serves a partition's topics).
            let idle: Vec<(&Topic, String)> = idle
                .into_iter()
                .filter(|t| link.topics.contains(*t))
                .map(|t| (t, self.keys.channel(t)))
                .collect();
            let mut leaving: IndexMap<&str, usize> = IndexMap::new();
            for (_, channel) in &idle {
                *leaving.entry(channel.as_str()).or_default() += 1;
            }
            let channels: Vec<String> = leaving
                .into_iter()
                .filter(|(channel, n)| link.channels.get(*channel) == Some(n))
                .map(|(channel, _)| channel.to_owned())
                .collect();
            let Some(sink) = link.sink.as_mut() else {
                break;
            };
            match tokio::time::timeout(self.timeout, sink.unsubscribe(&channels)).await {
                Ok(Ok(())) => {
                    for (topic, channel) in &idle {
                        link.remove(topic, channel);
                    }
                    for channel in &channels {
                        self.canary.forget(channel);
                        link.confirmed.remove(channel);
                    }
                }
                _ => {
                    tracing::warn!("could not unsubscribe idle topics; will retry");
                    break;
                }
            }
        }
        sweep::sweep_map(
            &self.floors,
            |topic, _| self.hub.is_watched(topic),
            &mut sweep::Sweep::default(),
        )
        .await;
        let Ok(mut commands) = self.primary.commands().await else {
            return;
        };
        // By partition: a pipeline to a cluster keeps to one slot.
        let mut parts: IndexMap<usize, Vec<Topic>> = IndexMap::new();
        for topic in watched {
            parts
                .entry(self.keys.partition(&topic))
                .or_default()
                .push(topic);
        }
        for chunk in parts
            .values()
            .flat_map(|part| part.chunks(HOUSEKEEPING_CHUNK))
        {
            let mut pipe = redis::pipe();
            for topic in chunk {
                pipe.cmd("PEXPIRE")
                    .arg(self.keys.meta(topic))
                    .arg(self.meta_ttl_ms())
                    .ignore();
            }
            if let Err(error) = pipe.query_async::<()>(&mut commands).await {
                tracing::warn!(%error, "could not refresh topic metadata");
                return;
            }
        }
    }

    /// One `READ` script round trip.
    async fn read_once(
        &self,
        topic: &Topic,
        after: u64,
        limit: usize,
    ) -> Result<History, StoreError> {
        // `after` is whatever a client sent. No event follows a position at
        // or past `MAX_SEQ`, so such a read asks for the bounds only (and
        // the position is past the head); the script gets a number it can
        // hold exactly, and does no arithmetic on it.
        let (from, limit) = match after.checked_add(1) {
            Some(from) if from <= MAX_SEQ => (from, limit),
            _ => (MAX_SEQ, 0),
        };
        let mut commands = self.primary.commands().await?;
        let reply: Vec<Value> = self
            .read
            .key(self.keys.meta(topic))
            .key(self.keys.events(topic))
            .arg(from)
            .arg(limit)
            .arg(self.max_age_ms())
            .arg(self.retention.max_events.max(1))
            .invoke_async(&mut commands)
            .await
            .map_err(store_error)?;
        if reply.is_empty() {
            return Ok(History {
                oldest: 1,
                ..History::default()
            });
        }
        let field = |i: usize| {
            reply
                .get(i)
                .and_then(as_u64)
                .ok_or_else(|| malformed("read"))
        };
        let epoch = Epoch(field(0)?);
        let head = field(1)?;
        let oldest = field(2)?;
        // Bounds a publish script could have left, so the engine's
        // arithmetic on them (`oldest - 1`, `head + 1`) stays in range.
        if head > MAX_SEQ || oldest == 0 || oldest > head + 1 {
            return Err(malformed("read"));
        }
        let mut events = Vec::with_capacity(reply.len().saturating_sub(3) / 3);
        let mut next = from.max(oldest);
        for entry in reply[3..].chunks(3) {
            let [seq, name, data] = entry else {
                return Err(malformed("read"));
            };
            let seq = as_u64(seq)
                .filter(|seq| (next..=head).contains(seq))
                .ok_or_else(|| malformed("read"))?;
            next = seq + 1;
            let name = as_text(name).unwrap_or_default();
            let name = (!name.is_empty())
                .then(|| EventName::parse(&name).ok())
                .flatten();
            let data = as_text(data).unwrap_or_default();
            events.push(Arc::new(Event::new(
                topic.clone(),
                seq,
                epoch,
                name.as_ref(),
                &data,
            )));
        }
        Ok(History {
            epoch: Some(epoch),
            oldest,
            head,
            events,
        })
    }

    /// The `PUBLISH` script's request for one topic's events. `events` are
    /// indices into `all`, `keys` the request's distinct idempotency keys
    /// (every topic's script checks them all), and `guarded` the topics of a
    /// request of several (every topic's script checks all their keys
    /// before it writes). No argument is built as a string of its own
    /// first.
    fn publish_request(
        &self,
        topic: &Topic,
        all: &[(NewEvent, Option<Once>)],
        events: &[usize],
        keys: &IndexMap<KeyDigest, Fingerprint>,
        window: Duration,
        guarded: &[(&Topic, Vec<usize>)],
    ) -> ScriptRequest {
        let nkeys = 2 + keys.len() + 2 * guarded.len();
        let data: usize = events.iter().map(|&i| all[i].0.data.len() + 16).sum();
        let mut names = redis::Cmd::with_capacity(nkeys, 96 * nkeys);
        names
            .arg(self.keys.meta(topic))
            .arg(self.keys.events(topic));
        for key in keys.keys() {
            names.arg(self.keys.once(key, topic));
        }
        for (other, _) in guarded {
            names
                .arg(self.keys.meta(other))
                .arg(self.keys.events(other));
        }
        let mut cmd = redis::Cmd::with_capacity(
            13 + keys.len() + guarded.len() + 3 * events.len(),
            256 + 80 * keys.len() + data,
        );
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
        cmd.arg(self.keys.channel(topic))
            .arg(self.retention.max_events.max(1))
            .arg(self.max_age_ms())
            .arg(self.meta_ttl_ms());
        match self.floor(topic) {
            Some((epoch, seq)) => cmd.arg(epoch.0).arg(seq),
            None => cmd.arg("").arg(0),
        };
        cmd.arg(window_ms)
            .arg(u8::from(self.wait_replicas > 0))
            .arg(self.keys.live_command())
            .arg(self.keys.live_head(topic))
            .arg(keys.len());
        for fingerprint in keys.values() {
            cmd.arg(fingerprint.hex());
        }
        cmd.arg(guarded.len());
        for (_, list) in guarded {
            cmd.arg(list.len());
        }
        for &i in events {
            let (event, once) = &all[i];
            let k = once
                .and_then(|once| keys.get_index_of(&once.key))
                .map_or(0, |k| k + 1);
            cmd.arg(k)
                .arg(event.name.as_ref().map_or("", EventName::as_str))
                .arg(event.data.as_str());
        }
        ScriptRequest {
            keys: names,
            args: cmd,
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn append_once(
        &self,
        events: Vec<(NewEvent, Option<Once>)>,
        window: Duration,
    ) -> Result<Vec<Appended>, StoreError> {
        // Group by topic, keeping each topic's order, and remember where
        // each event goes back in the answer.
        let mut topics: Vec<(&Topic, Vec<usize>)> = Vec::new();
        // The request's distinct keys, each with its fingerprint (callers
        // never pass one key with two).
        let mut keys: IndexMap<KeyDigest, Fingerprint> = IndexMap::new();
        for (i, (event, once)) in events.iter().enumerate() {
            match topics.iter_mut().find(|(t, _)| *t == &event.topic) {
                Some((_, list)) => list.push(i),
                None => topics.push((&event.topic, vec![i])),
            }
            if let Some(once) = once {
                keys.entry(once.key).or_insert(once.fingerprint);
            }
        }
        let replies: Vec<Value> = match topics.as_slice() {
            [] => Vec::new(),
            [(topic, list)] => {
                let request = self.publish_request(topic, &events, list, &keys, window, &[]);
                let bytes = list.iter().map(|&i| events[i].0.data.len()).sum();
                let confirm = (self.wait_replicas > 0).then(|| self.confirmable(topic));
                let partition = self.keys.partition(topic);
                let reply = self
                    .outbox
                    .publish(request, partition, bytes, confirm, self.timeout)
                    .await?;
                vec![reply]
            }
            // Several topics: one atomic pipeline, so the batch is stored
            // whole or not at all.
            many => {
                let partition = self.keys.partition(many[0].0);
                if many
                    .iter()
                    .any(|(t, _)| self.keys.partition(t) != partition)
                {
                    return Err(StoreError::SpansPartitions);
                }
                let mut commands = self.primary.commands().await?;
                let mut pipe = redis::pipe();
                pipe.cmd("MULTI");
                for (topic, list) in many {
                    // EVAL, not EVALSHA: inside MULTI a missing script
                    // would fail alone and let the rest of the batch in.
                    let request = self.publish_request(topic, &events, list, &keys, window, many);
                    pipe.add_command(publish_call(
                        &self.publish,
                        Some(PUBLISH),
                        std::iter::once(&request),
                    ));
                }
                pipe.cmd("EXEC");
                // In the same write as the transaction: on the connection
                // that made the writes it waits for.
                let wait = self.wait();
                wait.add_to(&mut pipe);
                let mut replies: Vec<Value> =
                    pipe.query_async(&mut commands).await.map_err(store_error)?;
                if wait.replicas > 0 {
                    wait.check(replies.pop().as_ref())?;
                }
                let Some(Value::Array(results)) = replies.pop() else {
                    return Err(malformed("publish"));
                };
                // Each topic's call answers for its one request.
                let results = results
                    .into_iter()
                    .map(|result| match result {
                        Value::Array(mut one) if one.len() == 1 => Ok(one.remove(0)),
                        Value::ServerError(error) => Err(store_error(error.into())),
                        _ => Err(malformed("publish")),
                    })
                    .collect::<Result<Vec<Value>, StoreError>>()?;
                if let Some(Value::ServerError(error)) =
                    results.iter().find(|r| matches!(r, Value::ServerError(_)))
                {
                    return Err(store_error(error.clone().into()));
                }
                if wait.replicas > 0 {
                    let confirms: Vec<Confirmable> = many
                        .iter()
                        .map(|(topic, _)| self.confirmable(topic))
                        .collect();
                    let topics = confirms
                        .iter()
                        .zip(&results)
                        .filter_map(|(topic, reply)| Some((topic, publish_head(reply)?)));
                    wait.send_confirmed(&mut commands, topics).await;
                }
                results
            }
        };
        if replies.len() != topics.len() {
            return Err(malformed("publish"));
        }

        let mut answers: Vec<Option<Appended>> = (0..events.len()).map(|_| None).collect();
        for (reply, (topic, list)) in replies.iter().zip(&topics) {
            let Value::Array(parts) = reply else {
                return Err(malformed("publish"));
            };
            if parts.first().and_then(as_text).as_deref() == Some("reused") {
                // Every topic's script saw the same records: nothing of the
                // request was stored. Name the first event with that key.
                let (key, _) = parts
                    .get(1)
                    .and_then(as_u64)
                    .and_then(|k| keys.get_index(usize::try_from(k).ok()?.checked_sub(1)?))
                    .ok_or_else(|| malformed("publish"))?;
                let item = events
                    .iter()
                    .position(|(_, once)| once.is_some_and(|o| o.key == *key))
                    .ok_or_else(|| malformed("publish"))?;
                return Err(StoreError::KeyReused { item });
            }
            let outcomes = parts.get(4..).filter(|o| o.len() == list.len());
            match parts.get(2).and_then(as_u64) {
                Some(1) => {
                    tracing::warn!(%topic, "the topic's data in Redis belongs to another replication history (a restart or a failover): it starts a new epoch");
                    self.hub.metrics().redis().renewed(Renewal::Replication);
                }
                Some(2) => self.hub.metrics().redis().renewed(Renewal::WentBack),
                _ => {}
            }
            let (Some(epoch), Some(first), Some(outcomes)) = (
                parts.first().and_then(as_u64),
                parts.get(1).and_then(as_u64),
                outcomes,
            ) else {
                return Err(malformed("publish"));
            };
            let epoch = Epoch(epoch);
            let stored = outcomes.iter().filter(|o| is_empty_text(o)).count();
            // The script numbers within 1..=MAX_SEQ; checked here so the
            // numbering below cannot overflow whatever came back.
            let in_range = first >= 1
                && u64::try_from(stored)
                    .ok()
                    .and_then(|n| first.checked_add(n.saturating_sub(1)))
                    .is_some_and(|last| last <= MAX_SEQ);
            if stored > 0 && !in_range {
                return Err(malformed("publish"));
            }
            let mut seq = first;
            for (outcome, &i) in outcomes.iter().zip(list) {
                let (event, _) = &events[i];
                answers[i] = Some(if is_empty_text(outcome) {
                    // Waiting for replicas, only what went live counts as
                    // seen (reads see no further), and it is seen there.
                    if self.wait_replicas == 0 {
                        self.saw(topic, epoch, seq, None);
                    }
                    let stored = Event::new(
                        event.topic.clone(),
                        seq,
                        epoch,
                        event.name.as_ref(),
                        &event.data,
                    );
                    seq += 1;
                    Appended::Stored(Arc::new(stored))
                } else {
                    let outcome = as_text(outcome).ok_or_else(|| malformed("publish"))?;
                    Appended::Replayed(parse_receipt(topic, &outcome)?)
                });
            }
        }
        answers
            .into_iter()
            .map(|a| a.ok_or_else(|| malformed("publish")))
            .collect()
    }

    async fn read(&self, topic: &Topic, after: u64, limit: usize) -> Result<History, StoreError> {
        // Taken before the read is sent, so the store had got that far when
        // it answers: a lower head in the same epoch is a history that went
        // back, never a race with live messages still on their way.
        let floor = self.floor(topic);
        let history = self.read_once(topic, after, limit).await?;
        match (floor, history.epoch) {
            (Some((seen_epoch, seen)), Some(epoch))
                if seen_epoch == epoch && history.head < seen =>
            {
                self.history_went_back(topic, epoch).await;
                self.read_once(topic, after, limit).await
            }
            _ => {
                if let Some(epoch) = history.epoch {
                    self.saw(topic, epoch, history.head, None);
                }
                Ok(history)
            }
        }
    }

    async fn watch(&self, topic: &Topic) -> Result<(), StoreError> {
        // Right after start-up, or during a reconnect, wait a moment for the
        // live feed rather than fail at once.
        let mut up = self.live_up.subscribe();
        let _ = tokio::time::timeout(self.timeout, up.wait_for(|up| *up)).await;
        let mut link = self.live.lock().await;
        if link.topics.contains(topic) && link.sink.is_some() {
            return Ok(());
        }
        let channel = self.keys.channel(topic);
        // Remember it either way: a reconnect subscribes every known topic.
        // On a cluster, another topic of the partition may have subscribed
        // the channel already.
        let first = link.add(topic, channel.clone());
        if !first && link.sink.is_some() {
            return Ok(());
        }
        let sink = link
            .sink
            .as_mut()
            .ok_or_else(|| unavailable("the live feed from Redis is down"))?;
        match tokio::time::timeout(self.timeout, sink.subscribe(std::slice::from_ref(&channel)))
            .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(unavailable(error)),
            Err(_) => Err(unavailable("timed out subscribing")),
        }
    }

    async fn put_ticket(&self, key: &str, record: &str, ttl: Duration) -> Result<(), StoreError> {
        let mut commands = self.primary.commands().await?;
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        // The connection manager bounds every answer by --redis-timeout.
        redis::cmd("SET")
            .arg(self.keys.ticket(key))
            .arg(record)
            .arg("PX")
            .arg(ms)
            .query_async::<()>(&mut commands)
            .await
            .map_err(unavailable)
    }

    async fn take_ticket(&self, key: &str) -> Result<Option<String>, StoreError> {
        let mut commands = self.primary.commands().await?;
        // GETDEL is atomic: of two nodes redeeming one ticket, one gets it.
        redis::cmd("GETDEL")
            .arg(self.keys.ticket(key))
            .query_async::<Option<String>>(&mut commands)
            .await
            .map_err(unavailable)
    }

    async fn check(&self) -> Result<(), StoreError> {
        if !*self.live_up.borrow() {
            return Err(unavailable("the live feed from Redis is down"));
        }
        // Logged here too, so a stall readiness reports is always in the log.
        self.canary.report();
        if let Some((age, path)) = self.canary.overdue() {
            return Err(StoreError::Stalled(format!(
                "a canary sent {:.1} s ago through Redis pub/sub (shard {}) has not come back (allowed: {:?})",
                age.as_secs_f64(),
                self.shard_of(&path),
                self.canary.settings.timeout
            )));
        }
        let mut commands = self.primary.commands().await?;
        redis::cmd("PING")
            .query_async::<()>(&mut commands)
            .await
            .map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_publish_script_refuses_numbers_past_max_seq() {
        assert!(PUBLISH.contains(&format!("> {MAX_SEQ} then")));
        assert_eq!(MAX_SEQ as f64 as u64, MAX_SEQ, "exact as a Lua number");
    }
}
