//! The writer thread: the one place events are numbered and written. It
//! takes every request waiting (up to 1,024), numbers their events after
//! each topic's head (its own record of what was written, then the heads
//! numbered earlier in the group; a new topic's log and epoch come from
//! `MemoryStore::tip`), checks keys and budgets per request (all or none),
//! writes the whole group as one fjall batch and, with `--fsync always`,
//! one `fdatasync` (group commit; with `always` it waits up to 0.3 ms for
//! as many requests as its last group had). Only then does it send the
//! group to the committer, one task on the runtime, which hands each event
//! to `MemoryStore::commit` (visible, delivered to the hub, in sequence
//! order) and answers each request, group after group.
//!
//! A failed write answers every request of the group with `Full` (ENOSPC,
//! or fjall's `Poisoned` with less free room than a flush needs) or
//! `Unavailable`, undoes the group's idempotency records, and reopens the
//! database (fjall refuses writes after a failed one), writing first what
//! undoes the group in case part of it reached the journal; a write refused
//! as `Poisoned` is retried once on the reopened database. So nothing is
//! half-stored and publishing resumes when the disk does. Each second (and
//! after each group for the topics it touched) it deletes from disk what
//! memory trimmed and removes topics memory forgot, only once the
//! committer has caught up. Never serves a read.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use fjall::PersistMode;
use tokio::sync::oneshot;

use super::db::{Change, Db, Fsync, Space, storage_error};
use super::layout::{KeyRecord, event_key, event_value, record_value, topic_value, wall_ms};
use crate::event::{Epoch, Event, Topic};
use crate::store::{
    Appended, KeyDigest, MAX_SEQ, MemoryStore, NewEvent, Once, Receipt, StoreError,
};

/// Requests a writer takes into one batch at most.
const GROUP: usize = 1024;

/// Longest a writer with `--fsync always` waits for the rest of a group
/// (as many requests as the last group had) before writing what it has.
const LINGER: Duration = Duration::from_micros(300);

/// How often the writer trims disk to memory's retention and forgets idle
/// topics.
const TICK: Duration = Duration::from_secs(1);

/// Longest the writer waits for the committer before forgetting a topic to
/// make room; past it the publish is refused as over budget.
const CATCH_UP: Duration = Duration::from_millis(100);

/// Where a request's answer goes.
pub(super) type Reply = oneshot::Sender<Result<Vec<Appended>, StoreError>>;

/// An append waiting for the writer: its events, the key window, the reply.
type Request = (Vec<(NewEvent, Option<Once>)>, Duration, Reply);

pub(super) enum Job {
    Append {
        events: Vec<(NewEvent, Option<Once>)>,
        window: Duration,
        reply: Reply,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// Where one topic's records on disk start and end.
#[derive(Clone, Copy)]
pub(super) struct OnDisk {
    /// No event below this number is on disk.
    pub(super) low: u64,
    /// The last number written, in `epoch`: the writer numbers after it
    /// (memory may not have committed it yet).
    pub(super) head: u64,
    pub(super) epoch: Epoch,
}

/// The one thread that writes: numbers, stores, syncs, then publishes.
pub(super) struct Writer {
    /// Written groups, to be made visible and answered (in order).
    commits: tokio::sync::mpsc::UnboundedSender<(Vec<Planned>, Instant)>,
    /// Groups sent to `commits`, and those it has made visible.
    sent: u64,
    committed: Arc<Committed>,
    /// `None` after a failed write, until the database is reopened.
    db: Option<Db>,
    path: PathBuf,
    mem: Arc<MemoryStore>,
    fsync: Fsync,
    fsync_interval: Duration,
    max_keys: usize,
    records: HashMap<KeyDigest, KeyRecord>,
    expiry: VecDeque<(u64, KeyDigest)>,
    disk: HashMap<Topic, OnDisk>,
    /// Written since the last sync (`interval`).
    unsynced: bool,
    /// What undoes a group whose write failed, written first thing after
    /// the database is reopened.
    undo: Vec<Change>,
    /// The last write failed because fjall had poisoned the database.
    poisoned: bool,
}

/// What the directory held at open, handed to the writer.
pub(super) struct Loaded {
    pub(super) db: Db,
    /// The database's directory, to reopen it after a failed write.
    pub(super) path: PathBuf,
    pub(super) records: HashMap<KeyDigest, KeyRecord>,
    /// KeyRecord keys by expiry, soonest first.
    pub(super) expiry: VecDeque<(u64, KeyDigest)>,
    pub(super) disk: HashMap<Topic, OnDisk>,
}

/// Starts the committer (a task on the runtime) and the writer thread;
/// returns where to send them jobs.
pub(super) fn start(
    loaded: Loaded,
    mem: Arc<MemoryStore>,
    fsync: Fsync,
    fsync_interval: Duration,
    max_keys: usize,
) -> Result<mpsc::Sender<Job>, StoreError> {
    let committed = Arc::new(Committed::default());
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|e| StoreError::Config(format!("the durable store needs a runtime: {e}")))?;
    let (commits, written) = tokio::sync::mpsc::unbounded_channel();
    runtime.spawn(commit(written, mem.clone(), committed.clone()));
    let (jobs, queue) = mpsc::channel();
    let mut writer = Writer {
        commits,
        committed,
        sent: 0,
        db: Some(loaded.db),
        path: loaded.path,
        mem,
        fsync,
        fsync_interval,
        max_keys,
        records: loaded.records,
        expiry: loaded.expiry,
        disk: loaded.disk,
        unsynced: false,
        undo: Vec::new(),
        poisoned: false,
    };
    std::thread::Builder::new()
        .name("crier-writer".into())
        .spawn(move || writer.run(queue))
        .map_err(|e| StoreError::Config(format!("cannot start the writer thread: {e}")))?;
    Ok(jobs)
}

/// The committer: makes written groups visible and answers them, in order.
/// It runs on the runtime because waking thousands of subscribers from
/// there queues them locally, where the writer thread would go through the
/// runtime's global queue for each.
async fn commit(
    mut written: tokio::sync::mpsc::UnboundedReceiver<(Vec<Planned>, Instant)>,
    visible: Arc<MemoryStore>,
    committed: Arc<Committed>,
) {
    while let Some((planned, at)) = written.recv().await {
        for plan in planned {
            let mut out: Vec<Appended> = Vec::with_capacity(plan.answers.len());
            for answer in plan.answers {
                let appended = match answer {
                    Fate::Stored(event) => {
                        visible.commit(event.clone(), at);
                        Appended::Stored(event)
                    }
                    Fate::Replayed(receipt) => Appended::Replayed(receipt),
                    Fate::SameAs(j) => Appended::Replayed(out[j].receipt()),
                };
                out.push(appended);
            }
            let _ = plan.reply.send(Ok(out));
        }
        committed.advance();
    }
}

/// How many groups the committer has made visible: the writer compares it
/// with the groups it sent, and waits on it (no polling) before forgetting
/// a topic.
#[derive(Default)]
struct Committed {
    groups: Mutex<u64>,
    advanced: Condvar,
}

impl Committed {
    fn advance(&self) {
        *self.groups.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.advanced.notify_all();
    }

    fn count(&self) -> u64 {
        *self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits at most `within` until `sent` groups are committed; whether
    /// they are.
    fn wait_for(&self, sent: u64, within: Duration) -> bool {
        let groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        let (groups, _) = self
            .advanced
            .wait_timeout_while(groups, within, |groups| *groups != sent)
            .unwrap_or_else(|e| e.into_inner());
        *groups == sent
    }
}

/// One request's events, numbered, with where each went.
pub(super) enum Fate {
    Stored(Arc<Event>),
    Replayed(Receipt),
    SameAs(usize),
}

pub(super) struct Planned {
    reply: Reply,
    answers: Vec<Fate>,
}

impl Writer {
    pub(super) fn run(&mut self, queue: mpsc::Receiver<Job>) {
        let mut last_tick = Instant::now();
        let mut last_sync = Instant::now();
        let mut last_group = 1;
        loop {
            let wait = match self.fsync {
                Fsync::Interval if self.unsynced => self.fsync_interval,
                _ => TICK,
            }
            .min(TICK);
            let first = match queue.recv_timeout(wait) {
                Ok(job) => Some(job),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.stop();
                    return;
                }
            };
            let mut group = Vec::new();
            let mut close = None;
            let mut next = first;
            let mut started = None;
            while let Some(job) = next {
                match job {
                    Job::Append {
                        events,
                        window,
                        reply,
                    } => group.push((events, window, reply)),
                    Job::Close { reply } => {
                        close = Some(reply);
                        break;
                    }
                }
                if group.len() >= GROUP {
                    break;
                }
                next = queue.try_recv().ok();
                // With `always`, publishers answered together come back
                // together: wait a moment for as many as came last time,
                // so they share the next sync instead of the one after.
                if next.is_none() && self.fsync == Fsync::Always && group.len() < last_group {
                    let linger =
                        started.map_or(LINGER, |at: Instant| LINGER.saturating_sub(at.elapsed()));
                    next = queue.recv_timeout(linger).ok();
                }
                started.get_or_insert_with(Instant::now);
            }
            last_group = group.len().max(1);
            if !group.is_empty() {
                self.write_group(group);
            }
            if let Some(reply) = close {
                self.stop();
                let _ = reply.send(());
                return;
            }
            if self.fsync == Fsync::Interval
                && self.unsynced
                && last_sync.elapsed() >= self.fsync_interval
            {
                self.sync(PersistMode::SyncData);
                last_sync = Instant::now();
            }
            if last_tick.elapsed() >= TICK {
                self.tick();
                last_tick = Instant::now();
            }
        }
    }

    /// The database, reopened after a failed write (fjall refuses writes
    /// after one): first undoing what the failed group may have left in
    /// the journal, so that nothing of a refused request is ever stored.
    fn db(&mut self) -> Result<&Db, StoreError> {
        if self.db.is_none() {
            let db = Db::open(&self.path).map_err(|e| storage_error(&e, &self.path))?;
            if !self.undo.is_empty() {
                db.write(&self.undo, Fsync::Always)
                    .map_err(|e| storage_error(&e, &self.path))?;
                self.undo.clear();
            }
            self.db = Some(db);
        }
        self.db
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("the event database is not open".into()))
    }

    /// Writes one group's `changes`. A database fjall has poisoned (after
    /// a failure of its own flush, say) refuses every write with no cause
    /// given: it is reopened and the group written once more, so that the
    /// answer says what is wrong now (a full disk is 507, not 503).
    fn write(&mut self, changes: &[Change]) -> Result<(), StoreError> {
        let mut again = true;
        loop {
            let fsync = self.fsync;
            let result = self.db()?.write(changes, fsync);
            match result {
                Ok(()) => return Ok(()),
                Err(error) => {
                    self.undo_later(changes);
                    let error = self.failed(&error);
                    if !std::mem::take(&mut again) || !self.poisoned {
                        return Err(error);
                    }
                }
            }
        }
    }

    /// What undoes `changes` if they reach the journal after all: their
    /// events and records deleted, their topics' heads put back.
    fn undo_later(&mut self, changes: &[Change]) {
        for change in changes {
            let undo = match change {
                Change::Put(Space::Topics, key, _) => {
                    let on_disk = std::str::from_utf8(key)
                        .ok()
                        .and_then(|name| Topic::parse(name, usize::MAX).ok())
                        .and_then(|topic| self.disk.get(&topic).copied());
                    match on_disk {
                        Some(d) => Change::Put(
                            Space::Topics,
                            key.clone(),
                            topic_value(d.epoch, d.head).to_vec(),
                        ),
                        None => Change::Delete(Space::Topics, key.clone()),
                    }
                }
                Change::Put(space, key, _) => Change::Delete(*space, key.clone()),
                Change::Delete(..) => continue,
            };
            self.undo.push(undo);
        }
    }

    fn failed(&mut self, error: &fjall::Error) -> StoreError {
        self.poisoned = matches!(error, fjall::Error::Poisoned);
        tracing::warn!(%error, "writing the data directory failed; reopening it");
        self.db = None;
        storage_error(error, &self.path)
    }

    fn sync(&mut self, mode: PersistMode) {
        if let Some(db) = &self.db {
            match db.db.persist(mode) {
                Ok(()) => self.unsynced = false,
                Err(error) => {
                    self.failed(&error);
                }
            }
        }
    }

    fn stop(&mut self) {
        self.sync(PersistMode::SyncAll);
        if let Ok(db) = self.db() {
            let mut batch = db.db.batch();
            batch.insert(&db.state, "clean", "1");
            let written = batch
                .commit()
                .and_then(|()| db.db.persist(PersistMode::SyncAll));
            if let Err(error) = written {
                tracing::warn!(%error, "could not mark the data directory cleanly stopped");
            }
        }
        self.db = None;
    }

    /// Numbers, writes and syncs every request of `group` that can be
    /// stored, then publishes them in order and answers each.
    fn write_group(&mut self, group: Vec<Request>) {
        let now_ms = wall_ms();
        let mut changes: Vec<Change> = self
            .prune_records(now_ms)
            .into_iter()
            .map(|key| Change::Delete(Space::Once, key.0.to_vec()))
            .collect();
        // Heads numbered in this group, and the records it made (to undo
        // if the write fails).
        let mut tips: HashMap<Topic, (Epoch, u64)> = HashMap::new();
        let mut undo: Vec<(KeyDigest, Option<KeyRecord>)> = Vec::new();
        let mut planned = Vec::with_capacity(group.len());
        let mut group_bytes = 0usize;
        for (events, window, reply) in group {
            match self.plan(&events, &tips, group_bytes, now_ms) {
                Err(error) => {
                    let _ = reply.send(Err(error));
                }
                Ok((answers, local, bytes)) => {
                    group_bytes += bytes;
                    tips.extend(local);
                    let expires_ms = now_ms.saturating_add(window.as_millis() as u64);
                    for ((new, once), answer) in events.iter().zip(&answers) {
                        let Fate::Stored(event) = answer else {
                            continue;
                        };
                        changes.push(Change::Put(
                            Space::Events,
                            event_key(&event.topic, event.seq),
                            event_value(now_ms, new.name.as_ref(), &new.data),
                        ));
                        if let Some(once) = once
                            && !window.is_zero()
                        {
                            let record = KeyRecord {
                                fingerprint: once.fingerprint,
                                receipt: Receipt::from(&**event),
                                expires_ms,
                            };
                            changes.push(Change::Put(
                                Space::Once,
                                once.key.0.to_vec(),
                                record_value(&record),
                            ));
                            undo.push((once.key, self.records.insert(once.key, record)));
                            self.expiry.push_back((expires_ms, once.key));
                        }
                    }
                    planned.push(Planned { reply, answers });
                }
            }
        }
        for (topic, (epoch, head)) in &tips {
            changes.push(Change::Put(
                Space::Topics,
                topic.as_str().as_bytes().to_vec(),
                topic_value(*epoch, *head).to_vec(),
            ));
        }
        let writing = Instant::now();
        let requests = planned.len();
        let written = self.write(&changes);
        tracing::trace!(
            requests,
            took_us = writing.elapsed().as_micros() as u64,
            "wrote a group"
        );
        if let Err(error) = written {
            for (key, before) in undo.into_iter().rev() {
                match before {
                    Some(record) => self.records.insert(key, record),
                    None => self.records.remove(&key),
                };
            }
            for plan in planned {
                let _ = plan.reply.send(Err(clone_error(&error)));
            }
            return;
        }
        self.unsynced = self.fsync == Fsync::Interval;
        for (topic, (_, head)) in &tips {
            if let Some(entry) = self.disk.get_mut(topic) {
                entry.head = *head;
            }
        }
        self.sent += 1;
        if self.commits.send((planned, Instant::now())).is_err() {
            tracing::error!("the durable store's committer stopped: written events are not served");
        }
        let touched: Vec<Topic> = tips.into_keys().collect();
        self.trim(&touched);
    }

    /// What one request becomes: each event replayed or numbered after the
    /// heads so far (`tips`, then memory). All or none.
    #[allow(clippy::type_complexity)]
    fn plan(
        &mut self,
        events: &[(NewEvent, Option<Once>)],
        tips: &HashMap<Topic, (Epoch, u64)>,
        group_bytes: usize,
        now_ms: u64,
    ) -> Result<(Vec<Fate>, HashMap<Topic, (Epoch, u64)>, usize), StoreError> {
        let mut answers = Vec::with_capacity(events.len());
        let mut local: HashMap<Topic, (Epoch, u64)> = HashMap::new();
        let mut new_keys = 0;
        let mut fresh = Vec::new();
        for (i, (_, once)) in events.iter().enumerate() {
            let Some(once) = once else {
                fresh.push(i);
                answers.push(None);
                continue;
            };
            if let Some(record) = self
                .records
                .get(&once.key)
                .filter(|r| r.expires_ms > now_ms)
            {
                if record.fingerprint != once.fingerprint {
                    return Err(StoreError::KeyReused { item: i });
                }
                answers.push(Some(Fate::Replayed(record.receipt.clone())));
            } else if let Some(j) = events[..i]
                .iter()
                .position(|(_, o)| o.is_some_and(|o| o.key == once.key))
            {
                answers.push(Some(Fate::SameAs(j)));
            } else {
                new_keys += 1;
                fresh.push(i);
                answers.push(None);
            }
        }
        if self.records.len() + new_keys > self.max_keys {
            return Err(StoreError::Full(format!(
                "the hub holds {} idempotency keys, its limit (--idempotency-max-keys)",
                self.max_keys
            )));
        }
        let bytes: usize = fresh
            .iter()
            .map(|&i| crate::sse::encoded_data_len(&events[i].0.data) + 64)
            .sum();
        self.mem.room(group_bytes + bytes)?;
        for &i in &fresh {
            let new = &events[i].0;
            let known = local
                .get(&new.topic)
                .or_else(|| tips.get(&new.topic))
                .copied()
                .or_else(|| self.disk.get(&new.topic).map(|d| (d.epoch, d.head)));
            let (epoch, head) = match known {
                Some(tip) => tip,
                None => {
                    // A new topic: its log (and epoch) made in memory, and
                    // tracked so the tick forgets it once idle, even if
                    // nothing of it gets stored.
                    let (epoch, head) = match self.mem.tip(&new.topic) {
                        Err(StoreError::Full(_)) if self.make_topic_room(&local, tips) => {
                            self.mem.tip(&new.topic)?
                        }
                        tip => tip?,
                    };
                    self.disk.insert(
                        new.topic.clone(),
                        OnDisk {
                            low: head + 1,
                            head,
                            epoch,
                        },
                    );
                    (epoch, head)
                }
            };
            let seq = head + 1;
            if seq > MAX_SEQ {
                return Err(StoreError::Rejected(format!(
                    "topic {} has run out of numbers",
                    new.topic
                )));
            }
            local.insert(new.topic.clone(), (epoch, seq));
            let event = Event::new(new.topic.clone(), seq, epoch, new.name.as_ref(), &new.data)
                .retained_under(self.mem.retained_bytes());
            answers[i] = Some(Fate::Stored(Arc::new(event)));
        }
        let answers = answers
            .into_iter()
            .map(|a| a.ok_or_else(|| StoreError::Rejected("an event was not planned".into())))
            .collect::<Result<_, _>>()?;
        Ok((answers, local, bytes))
    }

    /// Past the topic budget, forgets the topic least recently published to
    /// that no one watches here (from memory, then disk), as the memory
    /// store does: never one this group numbers (`local`, `tips`), and only
    /// once memory holds everything written before, so no event on its way
    /// there meets a forgotten topic. Whether a topic was forgotten.
    fn make_topic_room(
        &mut self,
        local: &HashMap<Topic, (Epoch, u64)>,
        tips: &HashMap<Topic, (Epoch, u64)>,
    ) -> bool {
        // The committer is a task on the runtime, a group behind at most.
        if !self.committed.wait_for(self.sent, CATCH_UP) {
            return false;
        }
        let spare = |topic: &Topic| local.contains_key(topic) || tips.contains_key(topic);
        let Some(topic) = self.mem.evict_topic(spare) else {
            return false;
        };
        self.trim(std::slice::from_ref(&topic));
        self.disk.remove(&topic);
        true
    }

    /// Forgets expired records; returns their keys, to delete from disk.
    fn prune_records(&mut self, now_ms: u64) -> Vec<KeyDigest> {
        let mut gone = Vec::new();
        while let Some(&(expires, key)) = self.expiry.front() {
            if expires > now_ms {
                break;
            }
            self.expiry.pop_front();
            if self
                .records
                .get(&key)
                .is_some_and(|r| r.expires_ms == expires)
            {
                self.records.remove(&key);
                gone.push(key);
            }
        }
        gone
    }

    /// Deletes from disk what memory no longer retains of `topics`, and
    /// removes the topics memory forgot. Not synced: a deletion lost to a
    /// crash is made again after the restart.
    fn trim(&mut self, topics: &[Topic]) {
        let Ok(db) = self.db() else {
            return;
        };
        let mut batch = db.db.batch();
        let (events, topics_ks) = (db.events.clone(), db.topics.clone());
        for topic in topics {
            let Some(on_disk) = self.disk.get_mut(topic) else {
                continue;
            };
            let until = match self.mem.oldest(topic) {
                Some(oldest) => oldest,
                None => {
                    batch.remove(&topics_ks, topic.as_str().as_bytes());
                    on_disk.head + 1
                }
            };
            for seq in on_disk.low..until {
                batch.remove(&events, event_key(topic, seq));
            }
            on_disk.low = on_disk.low.max(until);
        }
        if let Err(error) = batch.commit() {
            self.failed(&error);
        }
    }

    /// Trims every topic, forgets idle ones (from memory and disk), and
    /// drops expired idempotency records.
    fn tick(&mut self) {
        // Only once memory holds everything written: a topic whose events
        // are still on their way there must not be forgotten.
        let settled = self.committed.count() == self.sent;
        let idle: Vec<Topic> = match settled {
            true => self
                .disk
                .keys()
                .filter(|topic| self.mem.forget_if_idle(topic))
                .cloned()
                .collect(),
            false => Vec::new(),
        };
        let all: Vec<Topic> = self.disk.keys().cloned().collect();
        self.trim(&all);
        if !idle.is_empty() {
            tracing::debug!(topics = idle.len(), "removed expired topics from disk");
        }
        for topic in idle {
            self.disk.remove(&topic);
        }
        let gone: Vec<Change> = self
            .prune_records(wall_ms())
            .into_iter()
            .map(|key| Change::Delete(Space::Once, key.0.to_vec()))
            .collect();
        if !gone.is_empty()
            && let Ok(db) = self.db()
            && let Err(error) = db.write(&gone, Fsync::Interval)
        {
            self.failed(&error);
        }
    }
}

fn clone_error(error: &StoreError) -> StoreError {
    match error {
        StoreError::Full(s) => StoreError::Full(s.clone()),
        StoreError::Unavailable(s) => StoreError::Unavailable(s.clone()),
        other => StoreError::Unavailable(other.to_string()),
    }
}
