//! What a node saw of each watched topic's numbers, and what it does when
//! a topic's history went back in time: a new epoch, so no number names two
//! events.

use std::collections::VecDeque;

use indexmap::IndexMap;

use super::RedisStore;
use super::reply::unavailable;
use crate::event::{Epoch, Topic};
use crate::metrics::Renewal;

/// The furthest a node has seen a topic go in one epoch. Within an epoch a
/// topic's number never goes down, and its live messages come in order; a
/// store that answers otherwise has lost part of its history (a restored
/// snapshot, a failover to a lagging replica), and the numbers from there on
/// may be handed out again.
#[derive(Debug, Clone)]
pub(super) struct Floor {
    pub(super) epoch: Epoch,
    /// The highest number seen anywhere: publish answers, reads, live.
    pub(super) seen: u64,
    /// The highest number seen on the live channel.
    pub(super) live: u64,
    /// The highest number delivered by the catch-up after a reconnect; live
    /// messages up to it are repeats, not a history going back.
    pub(super) caught_up: u64,
    /// The last live messages, as (number, hash of the message): the same
    /// message again is a repeat (a cluster's client may hold a channel's
    /// subscription on two nodes for a moment after a failover), another
    /// message with the same number a history that went back.
    pub(super) recent: VecDeque<(u64, u64)>,
}

/// Live messages remembered per watched topic to tell repeats.
pub(super) const RECENT_LIVE: usize = 64;

/// What a number seen for a topic means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Seen {
    /// Not seen before (or a topic this node does not follow).
    New,
    /// A live message for an event the catch-up already delivered.
    Repeat,
    /// A live number not above the last live one: the history went back.
    WentBack,
}

impl RedisStore {
    /// Records a number seen for a watched topic: in a publish answer or a
    /// read, or (`live`) on the live channel.
    /// `live` is the hash of the live message, for one seen there.
    pub(super) fn saw(&self, topic: &Topic, epoch: Epoch, seq: u64, live: Option<u64>) -> Seen {
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
    pub(super) fn floor(&self, topic: &Topic) -> Option<(Epoch, u64)> {
        self.floors().get(topic).map(|f| (f.epoch, f.seen))
    }

    pub(super) fn floors(&self) -> std::sync::MutexGuard<'_, IndexMap<Topic, Floor>> {
        self.floors.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `topic`'s history in `epoch` went back in time: give it a new epoch
    /// (unless another node already did) and have its subscribers check the
    /// store, where they find the new epoch and are told with `reset`.
    pub(super) async fn history_went_back(&self, topic: &Topic, epoch: Epoch) {
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
}
