//! What arrives on the live feed (a pub/sub message, or a cluster's push),
//! and the subscribing end it arrives through.

use redis::Value;
use redis::aio::PubSubSink;

use crate::event::{Epoch, Event, EventName, Topic};
use crate::store::MAX_SEQ;

/// A message from the live feed, whichever way it came.
pub(super) struct LiveMessage {
    pub(super) channel: String,
    pub(super) payload: Vec<u8>,
}

/// What a cluster's live connection pushed, if it is a message or a
/// (re)subscription.
pub(super) enum Pushed {
    Message(LiveMessage),
    /// A sharded channel was subscribed (again, after a failover or a
    /// resharding moved its slot).
    Subscribed(String),
    Other,
}

pub(super) fn pushed(info: redis::PushInfo) -> Pushed {
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    match info.kind {
        redis::PushKind::SMessage | redis::PushKind::Message => {
            match (info.data.first().and_then(text), info.data.get(1)) {
                (Some(channel), Some(Value::BulkString(payload))) => Pushed::Message(LiveMessage {
                    channel,
                    payload: payload.clone(),
                }),
                _ => Pushed::Other,
            }
        }
        redis::PushKind::SSubscribe => match info.data.first().and_then(text) {
            Some(channel) => Pushed::Subscribed(channel),
            None => Pushed::Other,
        },
        _ => Pushed::Other,
    }
}

/// The subscribing end of the live feed.
pub(super) enum LiveSink {
    PubSub(PubSubSink),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl LiveSink {
    pub(super) async fn subscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        match self {
            LiveSink::PubSub(sink) => sink.subscribe(channels).await,
            LiveSink::Cluster(connection) => {
                // One by one: each channel is in its own slot.
                for channel in channels {
                    connection.ssubscribe(channel).await?;
                }
                Ok(())
            }
        }
    }

    pub(super) async fn unsubscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        match self {
            LiveSink::PubSub(sink) => sink.unsubscribe(channels).await,
            LiveSink::Cluster(connection) => {
                for channel in channels {
                    connection.sunsubscribe(channel).await?;
                }
                Ok(())
            }
        }
    }
}

/// Parses `SEQ EPOCH\nNAME\nDATA` from the live channel.
pub(super) fn parse_live(topic: Topic, payload: &[u8]) -> Option<Event> {
    let text = std::str::from_utf8(payload).ok()?;
    let (position, rest) = text.split_once('\n')?;
    let (name, data) = rest.split_once('\n')?;
    let (seq, epoch) = position.split_once(' ')?;
    let name = if name.is_empty() {
        None
    } else {
        Some(EventName::parse(name).ok()?)
    };
    // Only numbers the publish script could have sent: anything else on
    // the channel is not crier's.
    let seq = seq.parse().ok().filter(|seq| (1..=MAX_SEQ).contains(seq))?;
    Some(Event::new(
        topic,
        seq,
        Epoch(epoch.parse().ok()?),
        name.as_ref(),
        data,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_messages_parse() {
        let topic = Topic::parse("t", 8).unwrap();
        let event = parse_live(topic.clone(), b"7 1234\nupdate\nline 1\nline 2").unwrap();
        assert_eq!((event.seq, event.epoch), (7, Epoch(1234)));
        assert_eq!(
            &event.frame()[..],
            b"id: 7.ya\nevent: update\ndata: line 1\ndata: line 2\n\n"
        );
        let unnamed = parse_live(topic.clone(), b"1 1\n\n").unwrap();
        assert_eq!(&unnamed.frame()[..], b"id: 1.1\ndata: \n\n");
        assert!(parse_live(topic.clone(), b"garbage").is_none());
        // Numbers no publish script sends are not crier's messages.
        assert!(parse_live(topic.clone(), b"0 1\n\nx").is_none());
        assert!(parse_live(topic, b"9007199254740992 1\n\nx").is_none());
    }
}
