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
//! This file is the store itself: publishing and reading. Beside it in
//! `redis/`: `primary.rs` (which server: one, Sentinel's primary, or a
//! cluster), `feed.rs` (the live link, its canaries, the catch-up),
//! `floor.rs` (what this node saw of each topic, and renewals when history
//! went back), `housekeeping.rs`, `keys.rs` (names, and a cluster's
//! partitions), `live.rs` (what the live feed carries), `canary.rs`,
//! `outbox.rs` (grouped publishes, and `WAIT`), `reply.rs` (Redis's answers
//! read as crier's), and the scripts, `*.lua`.

use indexmap::IndexMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::{Script, Value};

use super::{
    Appended, Fingerprint, History, KeyDigest, MAX_SEQ, NewEvent, Once, Retention, Store,
    StoreError,
};
use crate::event::{Epoch, Event, EventName, Topic};
use crate::hub::Hub;
use crate::metrics::Renewal;

mod canary;
mod feed;
mod floor;
mod housekeeping;
mod keys;
mod live;
mod outbox;
mod primary;
mod reply;

use canary::Canary;
pub use canary::CanarySettings;
use feed::LiveLink;
use floor::Floor;
use keys::{Keys, partition_tags};
use outbox::{Confirmable, Queued, ScriptRequest, Wait, publish_call, publish_head};
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
    /// Single-topic publish calls on their way to Redis (see [`send_outbox`]).
    outbox: tokio::sync::mpsc::UnboundedSender<Queued>,
    /// The outbox's other end, until `run_until` starts its sender.
    outbox_queue: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Queued>>>,
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
        let (outbox, outbox_queue) = tokio::sync::mpsc::unbounded_channel();
        // Shown (as down) from the start, not from the first connection.
        hub.metrics().redis().set_connected(false);
        Ok(RedisStore {
            primary,
            wait_replicas,
            keys: Keys {
                prefix: prefix.to_owned(),
                partitions,
            },
            retention,
            timeout,
            publish: Arc::new(Script::new(PUBLISH)),
            read: Script::new(READ),
            reepoch: Script::new(REEPOCH),
            confirm: Arc::new(Script::new(CONFIRM)),
            shards: std::sync::Mutex::new(Vec::new()),
            outbox,
            outbox_queue: std::sync::Mutex::new(Some(outbox_queue)),
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
                let (answer, reply) = tokio::sync::oneshot::channel();
                let partition = self.keys.partition(topic);
                self.outbox
                    .send(Queued {
                        request,
                        partition,
                        bytes,
                        answer,
                        confirm: (self.wait_replicas > 0).then(|| self.confirmable(topic)),
                    })
                    .map_err(|_| unavailable("the Redis store has stopped"))?;
                // Bounded like a command of its own: a publish waiting
                // behind groups in flight is answered within the timeout
                // too (and is not sent at all if it has not been yet).
                match tokio::time::timeout(self.timeout, reply).await {
                    Ok(Ok(reply)) => vec![reply?],
                    Ok(Err(_)) => return Err(unavailable("the Redis store has stopped")),
                    Err(_) => return Err(unavailable("Redis did not answer in time")),
                }
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
