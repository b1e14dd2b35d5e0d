//! The embedded store: each topic's recent history in process memory.
//!
//! Appending and handing the event to the hub happen under the topic's lock,
//! so the hub sees each topic's events in sequence order and a reader never
//! sees an event the hub has not been given. History is gone when the process
//! exits; topics then start a new epoch, which is how returning subscribers
//! learn that their position no longer exists.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::{History, MAX_SEQ, NewEvent, Retention, Store, StoreError};
use crate::event::{Epoch, Event, Topic};
use crate::hub::Hub;

pub struct MemoryStore {
    topics: Mutex<HashMap<Topic, Arc<Mutex<Log>>>>,
    hub: Hub,
    retention: Retention,
    /// Tickets by digest: record and expiry. Expired ones are swept.
    tickets: Mutex<HashMap<String, (String, Instant)>>,
}

/// One topic's history in one epoch.
struct Log {
    epoch: Epoch,
    head: u64,
    events: VecDeque<(Instant, Arc<Event>)>,
    /// Set when the sweeper removed this log from the map; an appender that
    /// raced with it starts over with a fresh log.
    removed: bool,
}

impl Log {
    fn new() -> Log {
        Log {
            epoch: Epoch::random(),
            head: 0,
            events: VecDeque::new(),
            removed: false,
        }
    }

    fn oldest(&self) -> u64 {
        self.events
            .front()
            .map_or(self.head.saturating_add(1), |(_, e)| e.seq)
    }

    fn trim(&mut self, retention: &Retention, now: Instant) {
        while self.events.len() > retention.max_events {
            self.events.pop_front();
        }
        while self
            .events
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > retention.max_age)
        {
            self.events.pop_front();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemoryStore {
    pub fn new(hub: Hub, retention: Retention) -> MemoryStore {
        MemoryStore {
            topics: Mutex::new(HashMap::new()),
            hub,
            retention,
            tickets: Mutex::new(HashMap::new()),
        }
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
                _ = tick.tick() => self.sweep(),
            }
        }
    }

    fn sweep(&self) {
        let now = Instant::now();
        lock(&self.tickets).retain(|_, (_, expires)| *expires > now);
        let mut topics = lock(&self.topics);
        topics.retain(|topic, log| {
            let mut log = lock(log);
            log.trim(&self.retention, now);
            let keep = !log.events.is_empty() || self.hub.is_watched(topic);
            log.removed = !keep;
            keep
        });
    }

    fn log(&self, topic: &Topic) -> Arc<Mutex<Log>> {
        lock(&self.topics)
            .entry(topic.clone())
            .or_insert_with(|| Arc::new(Mutex::new(Log::new())))
            .clone()
    }

    fn append_one(&self, new: NewEvent) -> Result<Arc<Event>, StoreError> {
        loop {
            let log = self.log(&new.topic);
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
            let event = Arc::new(Event::new(
                new.topic,
                seq,
                log.epoch,
                new.name.as_ref(),
                &new.data,
            ));
            log.head = seq;
            log.events.push_back((now, event.clone()));
            log.trim(&self.retention, now);
            self.hub.deliver(&event);
            return Ok(event);
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn append(&self, events: Vec<NewEvent>) -> Result<Vec<Arc<Event>>, StoreError> {
        events.into_iter().map(|e| self.append_one(e)).collect()
    }

    async fn read(&self, topic: &Topic, after: u64, limit: usize) -> Result<History, StoreError> {
        let Some(log) = lock(&self.topics).get(topic).cloned() else {
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
        let taken = lock(&self.tickets).remove(key);
        Ok(taken
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(record, _)| record))
    }
}
