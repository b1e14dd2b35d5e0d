//! The outbox: single-topic publish requests that queued meanwhile go as
//! one call of the publish script per partition, in one round trip, sent
//! by a publisher of the group (no task of its own), with `WAIT` for
//! replicas after them (then `CONFIRM`, which sends live what the replicas
//! confirmed).

use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexMap;
use redis::{Script, Value};

use super::primary::{Commands, Primary};
use super::reply::{as_u64, malformed, store_error, unavailable};
use crate::store::StoreError;

/// Groups of publish requests in flight to Redis at once (see [`Outbox`]).
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
    answer: tokio::sync::oneshot::Sender<Turn>,
    /// Its topic, for `CONFIRM` (when publishes wait for replicas).
    pub(super) confirm: Option<Confirmable>,
}

/// What a queued publisher is handed: its answer, or a group to send (its
/// own request among them).
enum Turn {
    Answer(Result<Value, StoreError>),
    /// Boxed: rare, and the size of a request.
    Lead(Box<Lead>),
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

/// Single-topic publish calls on their way to Redis. What queued while the
/// groups before were in flight goes as one call of the publish script per
/// partition, one write and one round trip, so concurrent publishes (to
/// any topics) share Redis round trips, system calls and wake-ups instead
/// of paying one each; each request in it is still answered, and fails,
/// for itself.
///
/// No task of its own: a publisher that finds fewer than
/// [`OUTBOX_IN_FLIGHT`] groups in flight sends its group itself, and the
/// one that finishes a group hands what queued meanwhile to a publisher
/// waiting in it. A request then goes from its own task to the socket and
/// back, with no hop through a sender task.
pub(super) struct Outbox {
    queue: std::sync::Mutex<Queue>,
    primary: Arc<Primary>,
    script: Arc<Script>,
    wait: Wait,
}

#[derive(Default)]
struct Queue {
    waiting: std::collections::VecDeque<Queued>,
    in_flight: usize,
}

impl Queue {
    /// The next group: what waits, up to [`OUTBOX_GROUP`] requests or
    /// [`OUTBOX_GROUP_BYTES`], without those nobody waits for any more (it
    /// was answered that Redis did not answer in time: not sent).
    fn take_group(&mut self) -> Vec<Queued> {
        let mut bytes = 0;
        let mut group = Vec::new();
        while group.len() < OUTBOX_GROUP && bytes < OUTBOX_GROUP_BYTES {
            let Some(next) = self.waiting.pop_front() else {
                break;
            };
            if !next.answer.is_closed() {
                bytes += next.bytes;
                group.push(next);
            }
        }
        group
    }
}

impl Outbox {
    pub(super) fn new(primary: Arc<Primary>, script: Arc<Script>, wait: Wait) -> Outbox {
        Outbox {
            queue: std::sync::Mutex::new(Queue::default()),
            primary,
            script,
            wait,
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends one topic's request with whatever else queues, and answers
    /// its reply within `timeout` (a publish waiting behind groups in
    /// flight is bounded like a command of its own, and is not sent at all
    /// once it stopped waiting).
    pub(super) async fn publish(
        self: &Arc<Self>,
        request: ScriptRequest,
        partition: usize,
        bytes: usize,
        confirm: Option<Confirmable>,
        timeout: Duration,
    ) -> Result<Value, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (answer, mut reply) = tokio::sync::oneshot::channel();
        let lead = {
            let mut queue = self.queue();
            queue.waiting.push_back(Queued {
                request,
                partition,
                bytes,
                answer,
                confirm,
            });
            (queue.in_flight < OUTBOX_IN_FLIGHT.max(1)).then(|| {
                queue.in_flight += 1;
                queue.take_group()
            })
        };
        if let Some(group) = lead {
            let _ = tokio::time::timeout_at(deadline, Sending::new(self.clone(), group)).await;
        }
        loop {
            match tokio::time::timeout_at(deadline, &mut reply).await {
                Ok(Ok(Turn::Answer(reply))) => return reply,
                Ok(Ok(Turn::Lead(mut lead))) => {
                    // This publisher's request is the first of the group:
                    // its answer comes back on a channel of its own.
                    let mut group = lead.group.take().unwrap_or_default();
                    let (answer, mine) = tokio::sync::oneshot::channel();
                    reply = mine;
                    if let Some(first) = lead.first.take() {
                        group.insert(
                            0,
                            Queued {
                                request: first.request,
                                partition: first.partition,
                                bytes: first.bytes,
                                answer,
                                confirm: first.confirm,
                            },
                        );
                    }
                    let sending = Sending::new(self.clone(), group);
                    let _ = tokio::time::timeout_at(deadline, sending).await;
                }
                Ok(Err(_)) => return Err(unavailable("the Redis store has stopped")),
                Err(_) => return Err(unavailable("Redis did not answer in time")),
            }
        }
    }

    /// Sends `group`, then the groups that queue meanwhile, handing each
    /// to a publisher waiting in it.
    async fn send(self: Arc<Self>, group: Vec<Queued>) {
        self.send_parts(group).await;
        loop {
            let next = {
                let mut queue = self.queue();
                let next = queue.take_group();
                if next.is_empty() {
                    queue.in_flight -= 1;
                    return;
                }
                next
            };
            // Nobody in it waiting any more, it is not sent: the next.
            if self.hand_over(next) {
                return;
            }
        }
    }

    /// Hands `group` to its first publisher still waiting; false when none
    /// is.
    fn hand_over(self: &Arc<Self>, group: Vec<Queued>) -> bool {
        let mut group = std::collections::VecDeque::from(group);
        while let Some(first) = group.pop_front() {
            let Queued {
                request,
                partition,
                bytes,
                answer,
                confirm,
            } = first;
            let lead = Lead {
                outbox: self.clone(),
                first: Some(First {
                    request,
                    partition,
                    bytes,
                    confirm,
                }),
                group: Some(group.drain(..).collect()),
            };
            match answer.send(Turn::Lead(Box::new(lead))) {
                Ok(()) => return true,
                Err(Turn::Lead(mut lead)) => {
                    // It stopped waiting: its request is not sent.
                    group = lead.group.take().unwrap_or_default().into();
                }
                Err(Turn::Answer(_)) => return true,
            }
        }
        false
    }

    /// Sends one group: one call per partition (all of them outside a
    /// cluster are partition 0), at once.
    async fn send_parts(&self, group: Vec<Queued>) {
        let Some(partition) = group.first().map(|q| q.partition) else {
            return;
        };
        let commands = match self.primary.commands().await {
            Ok(commands) => commands,
            Err(error) => {
                for outgoing in group {
                    let _ = outgoing.answer.send(Turn::Answer(Err(error.clone())));
                }
                return;
            }
        };
        if group.iter().all(|q| q.partition == partition) {
            send_group(commands, group, &self.script, &self.wait).await;
            return;
        }
        let mut parts: IndexMap<usize, Vec<Queued>> = IndexMap::new();
        for outgoing in group {
            parts.entry(outgoing.partition).or_default().push(outgoing);
        }
        let sends = parts
            .into_values()
            .map(|part| send_group(commands.clone(), part, &self.script, &self.wait));
        futures_util::future::join_all(sends).await;
    }
}

/// A group handed to a waiting publisher to send. Should that publisher be
/// gone before it takes the group (its wait just ran out), the group is
/// sent from a task of its own: nobody else would.
struct Lead {
    outbox: Arc<Outbox>,
    first: Option<First>,
    group: Option<Vec<Queued>>,
}

/// The request of the publisher a group is handed to.
struct First {
    request: ScriptRequest,
    partition: usize,
    bytes: usize,
    confirm: Option<Confirmable>,
}

impl Drop for Lead {
    fn drop(&mut self) {
        let Some(group) = self.group.take() else {
            return;
        };
        // Its own request is not sent: it stopped waiting.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(self.outbox.clone().send(group));
        }
    }
}

/// A group being sent by a publisher. If that publisher stops waiting
/// halfway (its client went, or its time ran out), the sending goes on in a
/// task of its own, so the group's other publishers are still answered and
/// the groups queued behind it still sent.
struct Sending {
    send: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
}

impl Sending {
    fn new(outbox: Arc<Outbox>, group: Vec<Queued>) -> Sending {
        Sending {
            send: Some(Box::pin(outbox.send(group))),
        }
    }
}

impl std::future::Future for Sending {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let Some(send) = self.send.as_mut() else {
            return std::task::Poll::Ready(());
        };
        let done = send.as_mut().poll(cx);
        if done.is_ready() {
            self.send = None;
        }
        done
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        if let Some(send) = self.send.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(send);
        }
    }
}

/// Sends one group's requests as one call of the publish script (then
/// `WAIT`), in one round trip, and hands each request its own answer.
async fn send_group(mut commands: Commands, group: Vec<Queued>, script: &Script, wait: &Wait) {
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
    pipe.add_command(publish_call(script, None, requests.iter()));
    wait.add_to(&mut pipe);
    let (mut reply, mut confirmed) = match send_call(&mut commands, &pipe, wait).await {
        Ok(sent) => sent,
        Err(error) => {
            for answer in answers {
                let _ = answer.send(Turn::Answer(Err(store_error(error.clone()))));
            }
            return;
        }
    };
    // Redis forgot the script (a restart, SCRIPT FLUSH): it ran nothing, so
    // it is loaded and the call sent again.
    if matches!(&reply, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
    {
        let resent = match script.load_async(&mut commands).await {
            Ok(_) => send_call(&mut commands, &pipe, wait).await,
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
        let _ = answer.send(Turn::Answer(reply));
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
