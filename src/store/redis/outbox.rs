//! The outbox: single-topic publish requests that queued meanwhile go as
//! one call of the publish script per partition, in one round trip, with
//! `WAIT` for replicas after them (then `CONFIRM`, which sends live what the
//! replicas confirmed).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use indexmap::IndexMap;
use redis::{Script, Value};

use super::primary::{Commands, Primary};
use super::reply::{as_u64, malformed, store_error, unavailable};
use crate::store::StoreError;

/// Groups of publish requests in flight to Redis at once (see [`send_outbox`]).
const OUTBOX_IN_FLIGHT: usize = 2;

/// Times a failed `CONFIRM` is tried again, backing off from 50 ms to 2 s
/// (about 10 s in all).
const CONFIRM_RETRIES: usize = 8;

/// Most publish requests in one group, and the event bytes past which a
/// group takes no more.
const OUTBOX_GROUP: usize = 128;
const OUTBOX_GROUP_BYTES: usize = 1 << 20;

/// One topic's request to the publish script: its keys and its arguments,
/// each written once into a buffer of its own and copied into the call that
/// carries it (see `PUBLISH` in redis.rs).
pub(super) struct ScriptRequest {
    pub(super) keys: redis::Cmd,
    pub(super) args: redis::Cmd,
}

/// The publish script's call for `requests`: by its hash, or by its text
/// inside a transaction (where a missing script would fail alone).
pub(super) fn publish_call<'a>(
    script: &Script,
    by_text: Option<&str>,
    requests: impl Iterator<Item = &'a ScriptRequest> + Clone,
) -> redis::Cmd {
    // Each request's counts of keys and arguments, which the call's ARGV
    // starts with.
    let counts: Vec<(usize, usize)> = requests
        .clone()
        .map(|r| (r.keys.args_iter().count(), r.args.args_iter().count()))
        .collect();
    let bytes: usize = requests
        .clone()
        .flat_map(|r| r.keys.args_iter().chain(r.args.args_iter()))
        .map(|arg| match arg {
            redis::Arg::Simple(arg) => arg.len(),
            _ => 0,
        })
        .sum();
    let keys: usize = counts.iter().map(|(k, _)| k).sum();
    let args: usize = counts.iter().map(|(_, a)| a).sum();
    let mut cmd = redis::Cmd::with_capacity(4 + keys + 2 * counts.len() + args, 64 + bytes);
    match by_text {
        Some(text) => cmd.arg("EVAL").arg(text),
        None => cmd.arg("EVALSHA").arg(script.get_hash()),
    };
    cmd.arg(keys);
    for request in requests.clone() {
        copy_args(&mut cmd, &request.keys);
    }
    cmd.arg(counts.len());
    for (keys, args) in &counts {
        cmd.arg(keys).arg(args);
    }
    for request in requests {
        copy_args(&mut cmd, &request.args);
    }
    cmd
}

/// Appends `from`'s arguments to `cmd`.
fn copy_args(cmd: &mut redis::Cmd, from: &redis::Cmd) {
    for arg in from.args_iter() {
        if let redis::Arg::Simple(arg) = arg {
            cmd.arg(arg);
        }
    }
}

/// One topic's publish request waiting in the outbox, and where its reply
/// goes.
pub(super) struct Queued {
    pub(super) request: ScriptRequest,
    /// Its topic's partition: a pipeline to a cluster keeps to one slot.
    pub(super) partition: usize,
    /// Its events' data, in bytes.
    pub(super) bytes: usize,
    pub(super) answer: tokio::sync::oneshot::Sender<Result<Value, StoreError>>,
    /// Its topic, for `CONFIRM` (when publishes wait for replicas).
    pub(super) confirm: Option<Confirmable>,
}

/// What `CONFIRM` needs of one topic: its keys, its channel and the head of
/// its live messages.
#[derive(Clone)]
pub(super) struct Confirmable {
    pub(super) meta: String,
    pub(super) events: String,
    pub(super) channel: String,
    pub(super) live_head: String,
}

/// Sends the publish calls of single topics to Redis: what queued while
/// the groups before were in flight goes as one pipeline, one write and one
/// round trip, so concurrent publishes (to any topics) share Redis round
/// trips, system calls and wake-ups instead of paying one each. Each call
/// is still its own script, atomic for its topic alone, as when sent one by
/// one. Ends once the store is dropped and every group is answered.
pub(super) async fn send_outbox(
    mut queue: tokio::sync::mpsc::UnboundedReceiver<Queued>,
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
                let mut parts: IndexMap<usize, Vec<Queued>> = IndexMap::new();
                for outgoing in group {
                    parts.entry(outgoing.partition).or_default().push(outgoing);
                }
                match primary.commands().await {
                    Ok(commands) => {
                        for (_, part) in parts {
                            in_flight.push(send_group(
                                commands.clone(),
                                part,
                                script.clone(),
                                wait.clone(),
                            ));
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

/// Sends one group's requests as one call of the publish script (then
/// `WAIT`), in one round trip, and hands each request its own answer.
pub(super) async fn send_group(
    mut commands: Commands,
    group: Vec<Queued>,
    script: Arc<Script>,
    wait: Wait,
) {
    let mut requests = Vec::with_capacity(group.len());
    let mut answers = Vec::with_capacity(group.len());
    let mut confirms = Vec::with_capacity(group.len());
    for outgoing in group {
        requests.push(outgoing.request);
        answers.push(outgoing.answer);
        confirms.push(outgoing.confirm);
    }
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    pipe.add_command(publish_call(&script, None, requests.iter()));
    wait.add_to(&mut pipe);
    let (mut reply, mut confirmed) = match send_call(&mut commands, &pipe, &wait).await {
        Ok(sent) => sent,
        Err(error) => {
            for answer in answers {
                let _ = answer.send(Err(store_error(error.clone())));
            }
            return;
        }
    };
    // Redis forgot the script (a restart, SCRIPT FLUSH): it ran nothing, so
    // it is loaded and the call sent again.
    if matches!(&reply, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
    {
        let resent = match script.load_async(&mut commands).await {
            Ok(_) => send_call(&mut commands, &pipe, &wait).await,
            Err(error) => Err(error),
        };
        (reply, confirmed) = match resent {
            Ok(sent) => sent,
            Err(error) => (Err(error), Ok(())),
        };
    }
    let replies: Vec<Result<Value, StoreError>> = match reply {
        Ok(Value::Array(each)) if each.len() == answers.len() => each
            .into_iter()
            .map(|reply| match reply {
                Value::ServerError(error) => Err(store_error(error.into())),
                reply => Ok(reply),
            })
            .collect(),
        Ok(_) => answers.iter().map(|_| Err(malformed("publish"))).collect(),
        Err(error) => answers
            .iter()
            .map(|_| Err(store_error(error.clone())))
            .collect(),
    };
    if wait.replicas > 0 && confirmed.is_ok() {
        let topics = confirms.iter().zip(&replies).filter_map(|(topic, reply)| {
            Some((topic.as_ref()?, publish_head(reply.as_ref().ok()?)?))
        });
        wait.send_confirmed(&mut commands, topics).await;
    }
    for (answer, reply) in answers.into_iter().zip(replies) {
        let reply = match (&confirmed, reply) {
            // Stored, maybe, but not confirmed: not reported as stored.
            (Err(unconfirmed), Ok(_)) => Err(unconfirmed.clone()),
            (_, reply) => reply,
        };
        let _ = answer.send(reply);
    }
}

/// Sends a publish call (and its `WAIT`): the call's reply, and whether the
/// replicas confirmed it.
async fn send_call(
    commands: &mut Commands,
    pipe: &redis::Pipeline,
    wait: &Wait,
) -> Result<(Result<Value, redis::RedisError>, Result<(), StoreError>), redis::RedisError> {
    let mut replies = query_group(commands, pipe).await?;
    let confirmed = if wait.replicas > 0 {
        let reply = replies.pop().and_then(Result::ok);
        wait.check(reply.as_ref())
    } else {
        Ok(())
    };
    let reply = replies.pop().ok_or_else(|| {
        redis::RedisError::from((redis::ErrorKind::UnexpectedReturnType, "no reply"))
    })?;
    Ok((reply, confirmed))
}

/// `--redis-wait-replicas`: a `WAIT` after a pipeline's writes, on the
/// connection that made them, and `CONFIRM` after it.
#[derive(Clone)]
pub(super) struct Wait {
    pub(super) replicas: u32,
    pub(super) timeout: Duration,
    /// The `CONFIRM` script, and the command it sends live messages with.
    pub(super) confirm: Arc<Script>,
    pub(super) live_command: &'static str,
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

    /// Sends live what `WAIT` confirmed of `topics`, each with the head its
    /// publish script answered (all of one partition). The publishes are
    /// answered as stored either way, which they are; a failed `CONFIRM` is
    /// tried again in the background for a while (it is idempotent: `pub`
    /// only moves forward), and after that the events go live with the
    /// topic's next confirmed publish.
    pub(super) async fn send_confirmed<'a>(
        &self,
        commands: &mut Commands,
        topics: impl Iterator<Item = (&'a Confirmable, u64)>,
    ) {
        let topics: Vec<(&Confirmable, u64)> = topics.filter(|(_, head)| *head > 0).collect();
        if topics.is_empty() {
            return;
        }
        let Err(error) = self.confirm_once(commands, &topics).await else {
            return;
        };
        tracing::warn!(%error, "could not send confirmed events live; trying again");
        let topics: Vec<(Confirmable, u64)> = topics
            .into_iter()
            .map(|(t, head)| (t.clone(), head))
            .collect();
        let (wait, mut commands) = (self.clone(), commands.clone());
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(50);
            for _ in 0..CONFIRM_RETRIES {
                tokio::time::sleep(delay).await;
                let borrowed: Vec<(&Confirmable, u64)> =
                    topics.iter().map(|(t, head)| (t, *head)).collect();
                if wait.confirm_once(&mut commands, &borrowed).await.is_ok() {
                    return;
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            tracing::warn!(
                "gave up sending confirmed events live; they go with the topic's next publish"
            );
        });
    }

    /// One `CONFIRM` call for `topics`.
    async fn confirm_once(
        &self,
        commands: &mut Commands,
        topics: &[(&Confirmable, u64)],
    ) -> Result<(), redis::RedisError> {
        let mut invocation = self.confirm.prepare_invoke();
        invocation.arg(self.live_command);
        for (topic, head) in topics {
            invocation
                .key(&topic.meta)
                .key(&topic.events)
                .arg(&topic.channel)
                .arg(&topic.live_head)
                .arg(*head);
        }
        invocation.invoke_async::<()>(commands).await
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

/// The topic's head in a publish script's answer (none for a refusal).
pub(super) fn publish_head(reply: &Value) -> Option<u64> {
    match reply {
        Value::Array(parts) if parts.len() >= 4 => as_u64(&parts[3]),
        _ => None,
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
