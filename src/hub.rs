//! Per-node fan-out: topic → live subscribers.
//!
//! The hub knows nothing of HTTP or storage. A store hands it every event it
//! learns of, in sequence order per topic, and the hub passes the same
//! `Arc<Event>` (already encoded once) to every subscriber of that topic.
//!
//! Each topic is a bounded broadcast ring shared by its subscribers: a slow
//! subscriber never holds up the others, costs no memory beyond the shared
//! ring, and once it falls further behind than the ring holds it is told it
//! lagged, and its stream ends so the client resumes from its Last-Event-ID.
//! A topic with no subscribers has no entry at all.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::broadcast;

use std::sync::atomic::{AtomicU64, Ordering};

use tokio_stream::Stream;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::event::{Event, Topic};

/// What a topic's live feed carries.
#[derive(Clone, Debug)]
pub enum Live {
    /// The next event of the topic.
    Event(Arc<Event>),
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
    topics: RwLock<HashMap<Topic, broadcast::Sender<Delivery>>>,
    backlog: usize,
    /// Numbers every delivery on this node, so that a subscription to several
    /// topics can merge their feeds in the order events were delivered.
    next_order: AtomicU64,
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
        Hub {
            inner: Arc::new(Inner {
                topics: RwLock::new(HashMap::new()),
                backlog: backlog.max(1),
                next_order: AtomicU64::new(1),
            }),
        }
    }

    /// Hands an event to every current subscriber of its topic.
    ///
    /// Callers deliver each topic's events in sequence order; subscribers
    /// still check, so a gap is filled from the store rather than skipped.
    pub fn deliver(&self, event: &Arc<Event>) {
        let topics = self.inner.topics.read().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = topics.get(&event.topic) {
            // An error only means every receiver left since the lookup.
            let _ = tx.send(self.numbered(Live::Event(event.clone())));
        }
    }

    /// Tells every subscriber of every topic that the store is back.
    pub fn store_back(&self) {
        let topics = self.inner.topics.read().unwrap_or_else(|e| e.into_inner());
        for tx in topics.values() {
            let _ = tx.send(self.numbered(Live::StoreBack));
        }
    }

    /// Tells every subscriber of `topic` to check the store.
    pub fn resync(&self, topic: &Topic) {
        let topics = self.inner.topics.read().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = topics.get(topic) {
            let _ = tx.send(self.numbered(Live::Resync));
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
            heads: vec![None; topics.len()],
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
        let rx = match topics.get(topic) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(self.inner.backlog);
                topics.insert(topic.clone(), tx);
                rx
            }
        };
        LiveFeed {
            events: BroadcastStream::new(rx),
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
        if topics.get(topic).is_some_and(|tx| tx.receiver_count() == 0) {
            topics.remove(topic);
        }
    }
}

/// One subscriber's view of one topic's live events.
pub struct LiveFeed {
    /// Declared first so the receiver is dropped before `Membership` checks
    /// whether it was the last one.
    events: BroadcastStream<Delivery>,
    _membership: Membership,
}

/// The subscriber fell further behind than the backlog holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lagged;

/// The live feeds of a subscription's topics, merged: items come out in the
/// order the hub delivered them, whichever topic they belong to.
pub struct Feeds {
    feeds: Vec<LiveFeed>,
    /// The next item of each feed, once polled.
    heads: Vec<Option<Result<Delivery, Lagged>>>,
}

impl Feeds {
    /// Waits for the next item: the index of its topic and what it carries.
    pub async fn next(&mut self) -> (usize, Result<Live, Lagged>) {
        std::future::poll_fn(|cx| match self.poll_heads(cx) {
            Some(item) => Poll::Ready(item),
            None => Poll::Pending,
        })
        .await
    }

    /// The next item if one is ready now.
    pub fn try_next(&mut self) -> Option<(usize, Result<Live, Lagged>)> {
        self.poll_heads(&mut Context::from_waker(std::task::Waker::noop()))
    }

    /// Fills every empty head that is ready, then takes the earliest one (a
    /// lag first: the stream ends anyway).
    fn poll_heads(&mut self, cx: &mut Context<'_>) -> Option<(usize, Result<Live, Lagged>)> {
        for (feed, head) in self.feeds.iter_mut().zip(self.heads.iter_mut()) {
            if head.is_none()
                && let Poll::Ready(item) = Pin::new(&mut feed.events).poll_next(cx)
            {
                *head = Some(match item {
                    Some(Ok(delivery)) => Ok(delivery),
                    // A closed feed cannot happen while we hold a receiver;
                    // treat it like a lag so the client reconnects.
                    Some(Err(BroadcastStreamRecvError::Lagged(_))) | None => Err(Lagged),
                });
            }
        }
        let i = self
            .heads
            .iter()
            .enumerate()
            .filter_map(|(i, head)| match head {
                Some(Ok(delivery)) => Some((delivery.order, i)),
                Some(Err(Lagged)) => Some((0, i)),
                None => None,
            })
            .min()?
            .1;
        let item = self.heads[i].take()?;
        Some((i, item.map(|delivery| delivery.live)))
    }
}

struct Membership {
    hub: Hub,
    topic: Topic,
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
}
