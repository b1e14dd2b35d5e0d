//! The node's live feed: one pub/sub link and its subscriptions, the
//! canaries that tell it flows, and the catch-up after every reconnect.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use indexmap::IndexSet;
use redis::Value;
use tokio_util::sync::CancellationToken;

use super::RedisStore;
use super::floor::Seen;
use super::keys;
use super::live::{LiveMessage, LiveSink, Pushed, parse_live, pushed};
use super::outbox::send_outbox;
use super::reply::{as_u64, unavailable};
use crate::event::{Epoch, Topic};
use crate::store::{History, Store, StoreError};

/// This node's pub/sub connection and the channels it is subscribed to.
#[derive(Default)]
pub(super) struct LiveLink {
    pub(super) sink: Option<LiveSink>,
    pub(super) topics: IndexSet<Topic>,
    /// Each channel subscribed for `topics`, with how many of them use it
    /// (one each outside a cluster; a partition's topics share one there).
    pub(super) channels: std::collections::HashMap<String, usize>,
    /// On a cluster, the partitions' channels confirmed once: a second
    /// confirmation is a resubscription, after which the partition's
    /// topics are caught up.
    pub(super) confirmed: std::collections::HashSet<String>,
}

impl LiveLink {
    /// Adds `topic`, on `channel`; true if no topic used that channel yet.
    pub(super) fn add(&mut self, topic: &Topic, channel: String) -> bool {
        if !self.topics.insert(topic.clone()) {
            return false;
        }
        let users = self.channels.entry(channel).or_default();
        *users += 1;
        *users == 1
    }

    /// Removes `topic`, on `channel`.
    pub(super) fn remove(&mut self, topic: &Topic, channel: &str) {
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

/// Events read per round trip when a node catches up after a reconnect.
pub(super) const CATCH_UP_PAGE: usize = 256;

impl RedisStore {
    /// Runs until `stop`: keeps the pub/sub connection up, delivers what it
    /// carries to the hub, and after every (re)connection resubscribes and
    /// asks subscribers to check for anything missed meanwhile.
    pub async fn run_until(self: Arc<Self>, stop: CancellationToken) {
        // The outbox's sender runs until the store is dropped, not until
        // `stop`: publishes still answered during a drain go through it.
        let queue = self
            .outbox_queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(queue) = queue {
            tokio::spawn(send_outbox(
                queue,
                self.primary.clone(),
                self.publish.clone(),
                self.wait(),
            ));
        }
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
    pub(super) async fn send_canaries_until(self: Arc<Self>, stop: CancellationToken) {
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
    pub(super) fn shard_of(&self, path: &str) -> String {
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
    pub(super) async fn learn_shards(
        &self,
        connection: &mut redis::cluster_async::ClusterConnection,
    ) {
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
    pub(super) async fn send_shared_canaries(&self) {
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
    pub(super) async fn connect_live(
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
    pub(super) async fn resubscribed(&self, channel: String) {
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
    pub(super) fn canary_back(&self, path: &str, n: u64) {
        if let Some(took) = self.canary.back(path, n) {
            self.hub
                .metrics()
                .redis_canary_back(&self.shard_of(path), took);
        }
    }

    /// Hands a live message to the hub. Returns the topic and epoch when
    /// the message shows that the topic's history went back in time.
    pub(super) fn on_message(&self, message: &LiveMessage) -> Option<(Topic, Epoch)> {
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

    /// After the live feed (re)connected: for every watched topic, reads
    /// what was published since the last live event this node delivered and
    /// delivers it, so the subscribers that were in step get it as live
    /// events. One read per topic (and page), however many subscribers
    /// watch it; subscribers that owe the store work of their own are told
    /// the store is back. A topic this node has no live position for, whose
    /// history changed, or that cannot be read now, gets a resync: its
    /// subscribers check the store themselves.
    pub(super) async fn catch_up(&self) {
        let topics: Vec<Topic> = self.live.lock().await.topics.iter().cloned().collect();
        self.catch_up_topics(&topics).await;
        self.hub.store_back();
    }

    /// Catches up each of `topics` this node's subscribers watch, or has
    /// them check the store themselves where that cannot be done.
    pub(super) async fn catch_up_topics(&self, topics: &[Topic]) {
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
    pub(super) async fn catch_up_read(&self, topic: &Topic, after: u64) -> Option<History> {
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
    pub(super) async fn catch_up_topic(&self, topic: &Topic) -> bool {
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
}
