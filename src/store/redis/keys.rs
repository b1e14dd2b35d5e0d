//! Key and channel names, and on a Redis Cluster the partitions whose hash
//! tags keep a topic's keys, records and live channel in one slot.

use std::sync::Arc;

use crate::event::Topic;
use crate::store::KeyDigest;

/// Partitions of the topics on a Redis Cluster: a topic's keys, its
/// idempotency records and its live channel all carry its partition's hash
/// tag, so one script reaches them all in one slot, and a node holds one
/// sharded subscription per partition it needs rather than one per topic.
pub(super) const PARTITIONS: usize = 128;

/// Redis Cluster's hash slots.
pub(super) const SLOTS: u16 = 16384;

/// The slot Redis Cluster puts `key` in (the CRC16 of its hash tag).
pub(super) fn slot_of(key: &str) -> u16 {
    let tagged = key
        .find('{')
        .and_then(|open| {
            let close = key[open + 1..].find('}')?;
            (close > 0).then(|| &key[open + 1..open + 1 + close])
        })
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(tagged.as_bytes()) % SLOTS
}

/// One hash tag per partition, partition `i`'s in the `i`-th of
/// [`PARTITIONS`] equal ranges of slots, so the partitions spread over the
/// cluster's nodes as evenly as its slots do (tags `{0}`...`{127}` hash
/// to clumps). Searched, not stored: every node finds the same tags.
pub(super) fn partition_tags() -> Vec<String> {
    let per = usize::from(SLOTS) / PARTITIONS;
    (0..PARTITIONS)
        .map(|i| {
            (0u32..)
                .map(|n| format!("p{i}.{n}"))
                .find(|tag| usize::from(slot_of(tag)) / per == i)
                .unwrap_or_default()
        })
        .collect()
}

/// Key and channel names.
#[derive(Clone)]
pub(super) struct Keys {
    pub(super) prefix: String,
    /// On a Redis Cluster, each partition's hash tag.
    pub(super) partitions: Option<Arc<[String]>>,
}

impl Keys {
    /// The partition of `topic` (0 outside a cluster).
    pub(super) fn partition(&self, topic: &Topic) -> usize {
        match &self.partitions {
            None => 0,
            Some(_) => {
                let hash = xxhash_rust::xxh3::xxh3_64(topic.as_str().as_bytes());
                usize::try_from(hash % PARTITIONS as u64).unwrap_or(0)
            }
        }
    }

    /// What every key of `topic` starts with.
    pub(super) fn base(&self, topic: &Topic) -> String {
        match &self.partitions {
            None => format!("{}{{{topic}}}", self.prefix),
            Some(tags) => format!(
                "{}{{{}}}{{{topic}}}",
                self.prefix,
                tags[self.partition(topic)]
            ),
        }
    }

    pub(super) fn meta(&self, topic: &Topic) -> String {
        format!("{}:meta", self.base(topic))
    }

    pub(super) fn events(&self, topic: &Topic) -> String {
        format!("{}:events", self.base(topic))
    }

    /// An idempotency record, for an event of `topic`. Outside a cluster
    /// not in the topic's hash slot: a key names one event whatever its
    /// topic, so using it for another topic must be seen. On a cluster it
    /// must share the slot of the script that reads it: there, a key names
    /// one event per partition.
    pub(super) fn once(&self, key: &KeyDigest, topic: &Topic) -> String {
        match &self.partitions {
            None => format!("{}once:{}", self.prefix, key.hex()),
            Some(tags) => format!(
                "{}{{{}}}:once:{}",
                self.prefix,
                tags[self.partition(topic)],
                key.hex()
            ),
        }
    }

    pub(super) fn ticket(&self, digest: &str) -> String {
        format!("{}ticket:{digest}", self.prefix)
    }

    /// The live channel of `topic`: its own, or on a cluster its
    /// partition's.
    pub(super) fn channel(&self, topic: &Topic) -> String {
        match &self.partitions {
            None => format!("{}:live", self.base(topic)),
            Some(tags) => format!("{}{{{}}}:live", self.prefix, tags[self.partition(topic)]),
        }
    }

    /// The command that sends a live message, and what comes before the
    /// message itself: on a cluster, the topic's name on a line.
    pub(super) fn live_command(&self) -> &'static str {
        if self.partitions.is_some() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    pub(super) fn live_head(&self, topic: &Topic) -> String {
        match &self.partitions {
            None => String::new(),
            Some(_) => format!("{topic}\n"),
        }
    }

    /// The topic a channel name belongs to (outside a cluster).
    pub(super) fn topic_of(&self, channel: &str) -> Option<Topic> {
        if self.partitions.is_some() {
            return None;
        }
        let name = channel
            .strip_prefix(&self.prefix)?
            .strip_prefix('{')?
            .strip_suffix("}:live")?;
        Topic::parse(name, usize::MAX).ok()
    }

    /// The partition a channel name belongs to (on a cluster).
    pub(super) fn partition_of(&self, channel: &str) -> Option<usize> {
        let tags = self.partitions.as_ref()?;
        let tag = channel
            .strip_prefix(&self.prefix)?
            .strip_prefix('{')?
            .strip_suffix("}:live")?;
        tags.iter().position(|t| t == tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_map_back_to_topics() {
        let keys = Keys {
            prefix: "crier:".into(),
            partitions: None,
        };
        let topic = Topic::parse("news.eu", 128).unwrap();
        assert_eq!(keys.meta(&topic), "crier:{news.eu}:meta");
        assert_eq!(keys.topic_of(&keys.channel(&topic)), Some(topic));
        assert_eq!(keys.topic_of("other:{x}:live"), None);
    }

    #[test]
    fn slots_are_the_ones_redis_cluster_computes() {
        // CLUSTER KEYSLOT answers, and the CRC16 check value.
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("123456789"), 12739);
        assert_eq!(slot_of("{user1000}.following"), slot_of("user1000"));
        assert_ne!(slot_of("foo{}{bar}"), slot_of("bar"));
    }

    #[test]
    fn partition_tags_spread_evenly_over_the_slots() {
        let tags = partition_tags();
        assert_eq!(tags.len(), PARTITIONS);
        let per = usize::from(SLOTS) / PARTITIONS;
        for (i, tag) in tags.iter().enumerate() {
            assert_eq!(usize::from(slot_of(tag)) / per, i, "{tag}");
        }
        // Three primaries own a third of the slots each, so a third of the
        // partitions each (give or take the one their boundaries cut).
        for node in 0..3 {
            let range = (node * 16384 / 3)..((node + 1) * 16384 / 3);
            let owned = tags
                .iter()
                .filter(|t| range.contains(&usize::from(slot_of(t))))
                .count();
            assert!((42..=44).contains(&owned), "node {node}: {owned}");
        }
    }

    #[test]
    fn on_a_cluster_every_key_of_a_topic_and_its_channel_share_one_slot() {
        let keys = Keys {
            prefix: "crier:".into(),
            partitions: Some(partition_tags().into()),
        };
        let key = crate::store::IdempotencyKey::parse(b"k-1")
            .unwrap()
            .scoped("");
        for name in ["news", "news.eu", "a:b", "x"] {
            let topic = Topic::parse(name, 128).unwrap();
            let slot = slot_of(&keys.meta(&topic));
            assert_eq!(slot_of(&keys.events(&topic)), slot);
            assert_eq!(slot_of(&keys.once(&key, &topic)), slot);
            assert_eq!(slot_of(&keys.channel(&topic)), slot);
            assert_eq!(
                keys.partition_of(&keys.channel(&topic)),
                Some(keys.partition(&topic))
            );
            assert!(keys.meta(&topic).contains(&format!("{{{name}}}")));
        }
    }
}
