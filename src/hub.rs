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
}

#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    topics: RwLock<HashMap<Topic, broadcast::Sender<Live>>>,
    backlog: usize,
}

impl Hub {
    /// `backlog` is how many events a subscriber may fall behind before it is
    /// disconnected.
    pub fn new(backlog: usize) -> Hub {
        Hub {
            inner: Arc::new(Inner {
                topics: RwLock::new(HashMap::new()),
                backlog: backlog.max(1),
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
            let _ = tx.send(Live::Event(event.clone()));
        }
    }

    /// Tells every subscriber of every topic to check the store, because
    /// live delivery may have missed events.
    pub fn resync_all(&self) {
        let topics = self.inner.topics.read().unwrap_or_else(|e| e.into_inner());
        for tx in topics.values() {
            let _ = tx.send(Live::Resync);
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

/// One subscriber's view of one topic's live events: a stream that yields
/// each event, or an error once the subscriber has lagged past the backlog.
pub struct LiveFeed {
    /// Declared first so the receiver is dropped before `Membership` checks
    /// whether it was the last one.
    events: BroadcastStream<Live>,
    _membership: Membership,
}

impl Stream for LiveFeed {
    type Item = Result<Live, BroadcastStreamRecvError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.events).poll_next(cx)
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
