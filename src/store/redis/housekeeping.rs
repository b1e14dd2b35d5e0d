//! Housekeeping: unsubscribing topics no one watches here, and keeping the
//! metadata of watched topics from expiring.

use indexmap::IndexMap;

use super::RedisStore;
use crate::event::Topic;
use crate::store::sweep;

/// Topics per UNSUBSCRIBE and per pipeline of PEXPIRE in housekeeping.
pub(super) const HOUSEKEEPING_CHUNK: usize = 1000;

impl RedisStore {
    /// Unsubscribes from topics nobody on this node watches any more, and
    /// keeps the `meta` of watched topics alive. It works a slice at a time
    /// (the link's lock is what `watch` takes; the floors' is taken by every
    /// publish and live message), so it holds no lock for long whatever the
    /// number of topics.
    pub(super) async fn housekeeping(&self) {
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
}
