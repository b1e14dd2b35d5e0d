//! Where events live. A store assigns each topic's dense sequence numbers,
//! retains history by count and age, reads it back after a position, and
//! hands every event it learns of to the node's [`Hub`](crate::hub::Hub) in
//! sequence order per topic (its live tail).
//!
//! The embedded [`MemoryStore`] is the default; [`DurableStore`] keeps it on
//! disk as well (`--data-dir`); [`RedisStore`] lets several nodes serve one
//! feed. All pass the same behavioural tests through HTTP.
//!
//! The `Store` trait: `append` (number and keep a batch, all or none), `read`
//! (retained events after a position, with the topic's epoch, oldest and
//! head; it answers every `u64` position a client can send, and no store
//! numbers past `MAX_SEQ`, 2^53 − 1), `put_ticket`/`take_ticket` (a ticket's
//! record, handed out once, atomically: `GETDEL` on Redis), `watch` (make
//! sure a topic's new events reach this node's hub from now on) and `check`
//! (readiness: reachable, and the live feed flows; the embedded store is
//! always ready). A store hands every event it learns of to the node's `Hub`,
//! in sequence order per topic. `append_once` is `append` for events that may
//! carry an idempotency key (`Once`: the key's digest and the event's
//! fingerprint); its doc comment is the contract a store implements. In one
//! atomic step with the append: a key holding a live record of another
//! fingerprint refuses the whole call (`KeyReused { item }`, 422) before
//! anything is stored; a key holding a live record of the same fingerprint is
//! answered `Appended::Replayed(Receipt)` (topic, seq, epoch of the first)
//! and not stored; the rest is stored as by `append` (`Stored`), and each
//! keyed stored event leaves a record of fingerprint and receipt under its
//! key for the window, seen by later events of the same call. Two concurrent
//! calls with one key store once. The default method serves keyless calls and
//! refuses keyed ones, so a store without records never stores a duplicate
//! silently.

mod durable;
mod journal;
mod measured;
mod memory;
pub mod once;
mod redis;
pub(crate) mod sweep;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::event::{Epoch, Event, EventName, Topic};

pub use durable::{DurableSettings, DurableStore, Fsync, Repaired, repair};
pub use measured::Measured;
pub use memory::{Budget, MemoryStore};
pub use once::{Fingerprint, IdempotencyKey, InvalidIdempotencyKey, KeyDigest, Once};
pub use redis::{CanarySettings, RedisSettings, RedisStore, RedisTarget};

/// The highest sequence number a store hands out: 2^53 - 1, the largest
/// integer Redis's Lua numbers (doubles) hold exactly. The embedded store
/// keeps to it too, so a position means the same on either, and any larger
/// one is ahead of every topic. (At a million events a second, one topic
/// takes 285 years to get there.)
pub const MAX_SEQ: u64 = (1 << 53) - 1;

/// An event a publisher sent, already validated, not yet numbered.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub topic: Topic,
    pub name: Option<EventName>,
    pub data: String,
}

/// How much history each topic keeps.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub max_events: usize,
    pub max_age: Duration,
}

/// What a store holds of one topic after a position.
#[derive(Debug, Default)]
pub struct History {
    /// The current epoch; `None` when the topic has no history at all.
    pub epoch: Option<Epoch>,
    /// Sequence number of the oldest retained event (`head + 1` when none is).
    pub oldest: u64,
    /// Sequence number of the newest event ever appended in this epoch.
    pub head: u64,
    /// Retained events after the requested position, oldest first.
    pub events: Vec<Arc<Event>>,
}

/// Why a store could not do what it was asked.
///
/// The difference that matters to callers is whether asking again can
/// help: an outage passes (`Unavailable`), a refusal does not (`Rejected`),
/// so a stream retries the one with backoff and never retries the other.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("the event store is unavailable: {0}")]
    Unavailable(String),
    /// The store answered, and refused the request itself or answered
    /// something crier cannot use (say, a topic's keys in Redis were
    /// overwritten by hand): the same request would be refused again.
    #[error("the event store refused the request: {0}")]
    Rejected(String),
    /// The store holds all it may (`--max-retained-bytes`, `--max-topics`):
    /// nothing of the request was stored.
    #[error("the store is full: {0}")]
    Full(String),
    /// The store answers commands, but its live feed to this node has
    /// stalled (a canary did not come back in time): readiness fails.
    #[error("the live feed from the store has stalled: {0}")]
    Stalled(String),
    /// A setting the store cannot work with; reported at start-up.
    #[error("invalid store configuration: {0}")]
    Config(String),
    /// The idempotency key of event `item` of the request was used, within
    /// the window, for another event (topic, name or data differ): nothing
    /// of the request was stored.
    #[error("the idempotency key of item {item} was already used for another event")]
    KeyReused { item: usize },
    /// A batch's topics live on different partitions of a Redis Cluster,
    /// where one atomic step cannot reach them all: nothing was stored.
    #[error(
        "the batch's topics are on different partitions of the Redis Cluster, so it cannot be \
         stored atomically; nothing was stored: publish to these topics in separate requests"
    )]
    SpansPartitions,
}

/// Where a publish went: the topic, number and epoch a publisher is
/// answered with, whether the event was stored now or by an earlier request
/// with the same idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub topic: Topic,
    pub seq: u64,
    pub epoch: Epoch,
}

impl From<&Event> for Receipt {
    fn from(event: &Event) -> Receipt {
        Receipt {
            topic: event.topic.clone(),
            seq: event.seq,
            epoch: event.epoch,
        }
    }
}

/// What became of one event of [`Store::append_once`].
#[derive(Debug)]
pub enum Appended {
    /// Numbered and stored by this call.
    Stored(Arc<Event>),
    /// Its key was used within the window for this very event: nothing was
    /// stored, and this is where the first request put it.
    Replayed(Receipt),
}

impl Appended {
    pub fn receipt(&self) -> Receipt {
        match self {
            Appended::Stored(event) => Receipt::from(&**event),
            Appended::Replayed(receipt) => receipt.clone(),
        }
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Numbers and stores `events`, all or none, and returns them in order.
    /// By default `append_once` without keys (each event is then stored,
    /// never a replay); a store with a cheaper path of its own overrides it.
    async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Arc<Event>>, StoreError> {
        let keyless = events.into_iter().map(|e| (e, None)).collect();
        self.append_once(keyless, Duration::ZERO)
            .await?
            .into_iter()
            .map(|a| match a {
                Appended::Stored(event) => Ok(event),
                Appended::Replayed(_) => Err(StoreError::Rejected(
                    "an event without a key was answered as a replay".into(),
                )),
            })
            .collect()
    }

    /// Reads up to `limit` retained events of `topic` with a sequence number
    /// above `after`, with the topic's bounds. `limit == 0` reads the bounds
    /// only.
    ///
    /// `after` comes from clients and may be any `u64`: a store answers
    /// every one (one beyond anything it can number has no events after it
    /// and is past the head), and never refuses a read because of it.
    async fn read(&self, topic: &Topic, after: u64, limit: usize) -> Result<History, StoreError>;

    /// Makes sure events of `topic` appended from now on reach this node's
    /// hub. A subscription calls it after joining the hub and before reading
    /// history, which closes the race between the two.
    async fn watch(&self, topic: &Topic) -> Result<(), StoreError> {
        let _ = topic;
        Ok(())
    }

    /// [`Store::append`] for events that may carry an idempotency key
    /// ([`Once`]), so that a publisher's retries store each event once.
    ///
    /// What a store must do, all in one atomic step with the append (of two
    /// concurrent calls with one key, on any node sharing the store, one
    /// stores and the other replays):
    /// - if any keyed event's key holds a record, made less than `window`
    ///   ago, with another fingerprint: store nothing, `KeyReused { item }`;
    /// - a keyed event whose key holds a live record with its fingerprint
    ///   is not stored: `Replayed` with the receipt kept in the record;
    /// - every other event is numbered and stored as `append` does (all or
    ///   none, same limits): `Stored`; for a keyed one, a record of its
    ///   fingerprint and receipt is kept under its key for `window`, so a
    ///   later event of the same call with that key replays it.
    ///
    /// Answers come in the order of `events`. Callers never pass one key
    /// twice with different fingerprints (see [`once::conflict_within`]).
    /// Records count against the store's limits: past them, `Full`.
    ///
    /// Every store implements this one; `append` is built on it, so a store
    /// cannot leave both to defaults that call each other.
    async fn append_once(
        &self,
        events: Vec<(NewEvent, Option<Once>)>,
        window: Duration,
    ) -> Result<Vec<Appended>, StoreError>;

    /// Keeps a ticket's record under `key` (the ticket's digest) for `ttl`.
    async fn put_ticket(&self, key: &str, record: &str, ttl: Duration) -> Result<(), StoreError>;

    /// Hands out the record kept under `key` and forgets it, in one atomic
    /// step: of any number of concurrent takers, on any node, at most one
    /// gets it. `None` when unknown, taken already or expired.
    async fn take_ticket(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// Whether the store can be reached now and its live feed to this node
    /// flows (for `GET /readyz`). The embedded store's live feed is a direct
    /// call that cannot stall: it is always ready.
    async fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Stops the store once the server is done with it: the durable store
    /// syncs what it holds, marks a clean stop and unlocks its directory.
    /// Later appends fail with `Unavailable`.
    async fn close(&self) {}
}
