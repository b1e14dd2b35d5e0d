//! The outbox: single-topic publish calls grouped into pipelines, one
//! round trip for what queued meanwhile, and `WAIT` for replicas after them.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use indexmap::IndexMap;
use redis::{Script, Value};

use super::primary::{Commands, Primary};
use super::reply::{as_u64, store_error, unavailable};
use crate::store::StoreError;

/// Groups of publish calls in flight to Redis at once (see [`send_outbox`]).
const OUTBOX_IN_FLIGHT: usize = 2;

/// Most publish calls in one group, and the event bytes past which a group
/// takes no more.
const OUTBOX_GROUP: usize = 128;
const OUTBOX_GROUP_BYTES: usize = 1 << 20;

/// One topic's publish call waiting in the outbox, and where its reply goes.
pub(super) struct Outgoing {
    pub(super) cmd: redis::Cmd,
    /// Its topic's partition: a pipeline to a cluster keeps to one slot.
    pub(super) partition: usize,
    /// Its events' data, in bytes.
    pub(super) bytes: usize,
    pub(super) answer: tokio::sync::oneshot::Sender<Result<Value, StoreError>>,
}

/// Sends the publish calls of single topics to Redis: what queued while
/// the groups before were in flight goes as one pipeline, one write and one
/// round trip, so concurrent publishes (to any topics) share Redis round
/// trips, system calls and wake-ups instead of paying one each. Each call
/// is still its own script, atomic for its topic alone, as when sent one by
/// one. Ends once the store is dropped and every group is answered.
pub(super) async fn send_outbox(
    mut queue: tokio::sync::mpsc::UnboundedReceiver<Outgoing>,
    primary: Arc<Primary>,
    script: Arc<Script>,
    wait: Wait,
) {
    let mut in_flight = futures_util::stream::FuturesUnordered::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            first = queue.recv(), if open && in_flight.len() < OUTBOX_IN_FLIGHT.max(1) => {
                let Some(first) = first else {
                    open = false;
                    continue;
                };
                // A call whose publisher stopped waiting (it was answered
                // that Redis did not answer in time) is not sent.
                let mut bytes = 0;
                let mut group = Vec::new();
                let mut next = Some(first);
                while let Some(outgoing) = next.take() {
                    if !outgoing.answer.is_closed() {
                        bytes += outgoing.bytes;
                        group.push(outgoing);
                    }
                    if group.len() < OUTBOX_GROUP && bytes < OUTBOX_GROUP_BYTES {
                        next = queue.try_recv().ok();
                    }
                }
                if group.is_empty() {
                    continue;
                }
                // One pipeline per partition (all of them outside a
                // cluster are partition 0).
                let mut parts: IndexMap<usize, Vec<Outgoing>> = IndexMap::new();
                for outgoing in group {
                    parts.entry(outgoing.partition).or_default().push(outgoing);
                }
                match primary.commands().await {
                    Ok(commands) => {
                        for (_, part) in parts {
                            in_flight.push(send_group(commands.clone(), part, script.clone(), wait));
                        }
                    }
                    Err(error) => {
                        for outgoing in parts.into_values().flatten() {
                            let _ = outgoing.answer.send(Err(error.clone()));
                        }
                    }
                }
            }
        }
    }
}

/// Sends one group of publish calls as a pipeline and hands each its reply.
pub(super) async fn send_group(
    mut commands: Commands,
    group: Vec<Outgoing>,
    script: Arc<Script>,
    wait: Wait,
) {
    let mut answers = Vec::with_capacity(group.len());
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for outgoing in group {
        pipe.add_command(outgoing.cmd);
        answers.push(outgoing.answer);
    }
    let calls = pipe.len();
    wait.add_to(&mut pipe);
    let mut replies = match query_group(&mut commands, &pipe).await {
        Ok(replies) => replies,
        Err(error) => {
            for answer in answers {
                let _ = answer.send(Err(store_error(error.clone())));
            }
            return;
        }
    };
    // Redis forgot the script (a restart, SCRIPT FLUSH): load it and send
    // again the calls refused for that, and only those (another node may
    // have loaded it meanwhile, and the calls after ran).
    let mut confirmed = if wait.replicas > 0 {
        let reply = replies.pop().and_then(Result::ok);
        wait.check(reply.as_ref())
    } else {
        Ok(())
    };
    let forgotten: Vec<usize> = (0..replies.len())
        .filter(|&i| matches!(&replies[i], Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)))
        .collect();
    if !forgotten.is_empty() {
        let cmds: Vec<&redis::Cmd> = pipe.cmd_iter().collect();
        let mut again = redis::pipe();
        again.ignore_errors();
        for &i in &forgotten {
            again.add_command(cmds[i].clone());
        }
        wait.add_to(&mut again);
        let resent = match script.load_async(&mut commands).await {
            Ok(_) => query_group(&mut commands, &again).await,
            Err(error) => Err(error),
        };
        match resent {
            Ok(mut resent) => {
                if wait.replicas > 0 {
                    let reply = resent.pop().and_then(Result::ok);
                    confirmed = confirmed.and(wait.check(reply.as_ref()));
                }
                for (i, reply) in forgotten.into_iter().zip(resent) {
                    replies[i] = reply;
                }
            }
            Err(error) => {
                for i in forgotten {
                    replies[i] = Err(error.clone());
                }
            }
        }
    }
    debug_assert!(replies.len() == calls);
    for (answer, reply) in answers.into_iter().zip(replies) {
        let reply = match (&confirmed, reply) {
            // Stored, maybe, but not confirmed: not reported as stored.
            (Err(unconfirmed), Ok(_)) => Err::<Value, _>(unconfirmed.clone()),
            (_, reply) => reply.map_err(store_error),
        };
        let _ = answer.send(reply);
    }
}

/// `--redis-wait-replicas`: a `WAIT` after a pipeline's writes, on the
/// connection that made them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Wait {
    pub(super) replicas: u32,
    pub(super) timeout: Duration,
}

impl Wait {
    /// Adds the `WAIT` (nothing when no replica is waited for).
    pub(super) fn add_to(&self, pipe: &mut redis::Pipeline) {
        if self.replicas > 0 {
            let ms = u64::try_from(self.timeout.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            pipe.cmd("WAIT").arg(self.replicas).arg(ms);
        }
    }

    /// Whether the `WAIT`'s answer confirms enough replicas.
    pub(super) fn check(&self, reply: Option<&Value>) -> Result<(), StoreError> {
        match reply.and_then(as_u64) {
            Some(n) if n >= u64::from(self.replicas) => Ok(()),
            Some(n) => Err(StoreError::Unavailable(format!(
                "only {n} of the {} Redis replicas required (--redis-wait-replicas) confirmed \
                 the write in time; it may or may not be kept: retry with the same \
                 idempotency key",
                self.replicas
            ))),
            None => Err(unavailable("Redis did not confirm the write's replication")),
        }
    }
}

/// A pipeline's replies, one per command, each a value or the error Redis
/// answered it with.
pub(super) async fn query_group(
    commands: &mut Commands,
    pipe: &redis::Pipeline,
) -> Result<Vec<Result<Value, redis::RedisError>>, redis::RedisError> {
    let replies: Vec<Value> = pipe.query_async(commands).await?;
    if replies.len() != pipe.len() {
        return Err(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "a pipeline answered a different number of replies",
        )));
    }
    Ok(replies
        .into_iter()
        .map(|reply| match reply {
            Value::ServerError(error) => Err(error.into()),
            reply => Ok(reply),
        })
        .collect())
}
