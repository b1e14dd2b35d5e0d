//! The durable embedded store (`--data-dir`): the memory store's history,
//! kept on disk as well, so a restart keeps every topic's numbering, epoch
//! and retained events.
//!
//! Reads, the live tail and fan-out are the [`MemoryStore`]'s, untouched:
//! recent events are served from memory. Appends go through one writer
//! thread, which numbers the events of every request waiting for it, writes
//! them in one fjall batch with one sync (group commit), and only then
//! makes them visible and answers: with `--fsync always` no event is seen
//! or acknowledged before it is on disk.
//!
//! On disk (fjall, under `DIR/events`):
//! - `events`: `topic \0 seq` (big-endian) → stored-at, name, data; resuming
//!   and loading seek by key, never scan;
//! - `topics`: `topic` → epoch and head;
//! - `once`: idempotency key digest → fingerprint, expiry and receipt,
//!   written in the same batch as the event it records;
//! - `state`: the boot id of the running machine and a clean-stop mark.
//!
//! Retention trims disk with memory: what memory drops by count or age is
//! deleted from disk by the writer, and a topic memory forgets is removed.
//!
//! The parts: `layout` (keys and values, pure), `db` (the fjall database
//! and its batches), `dir` (the directory, its lock and `crier repair`),
//! `writer` (the thread that numbers, writes and syncs, and the committer
//! that makes written groups visible); this file opens the directory and
//! loads it into memory, and serves the `Store` trait.
//!
//! At start it checks `DIR/FORMAT` and the journals before writing
//! anything, takes `DIR/LOCK` (flock), finishes an interrupted repair
//! (`DIR/RENEW`), and loads each topic by a prefix seek (only the run of
//! numbers ending at its head), so resuming never scans; with `--fsync
//! interval`, an unclean stop followed by a new boot id renews every
//! topic's epoch. `close()` (after the server returns) syncs, marks a clean
//! stop and unlocks.
//!
//! Why fjall rather than redb, measured on this workload (one small event
//! per write, 16 concurrent publishers, each write durable, 2 cores):
//! fjall's journal batches many writes into one sync and reached ~20,000
//! events/s; redb, whose commit rewrites its B-tree pages and syncs twice,
//! ~5,200/s. Both are pure Rust and well kept; fjall's LSM also turns
//! retention into cheap tombstones and range seeks, where a B-tree file
//! grows and must be compacted by hand (Mercure's Bolt complaint).

mod db;
mod dir;
mod layout;
mod writer;

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use fjall::PersistMode;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{
    Appended, Budget, History, KeyDigest, MemoryStore, NewEvent, Once, Retention, Store, StoreError,
};
use crate::event::{Epoch, Event, Topic};
use crate::hub::Hub;
use db::Db;
use dir::{
    Found, boot_id, check_format, check_journals, claim_lock, config_error, journals, mark,
    renew_every_epoch, renew_mark, take_lock, write_format,
};
use layout::{
    event_key, event_prefix, instant_of, parse_event, parse_record, parse_topic_value, seq_of_key,
    topic_value, wall_ms,
};
use writer::{Job, Loaded, OnDisk};

pub use db::Fsync;
pub use dir::{Repaired, repair};

/// Where and how the durable store keeps its data.
#[derive(Debug, Clone)]
pub struct DurableSettings {
    pub dir: PathBuf,
    pub fsync: Fsync,
    pub fsync_interval: Duration,
}

/// The embedded store kept on disk too: memory serves, the writer thread
/// stores.
pub struct DurableStore {
    mem: Arc<MemoryStore>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    /// Held (flock) while the store is open; released by `close`.
    lock: Mutex<Option<File>>,
}

impl DurableStore {
    /// Opens (or creates) the data directory and loads what it holds into
    /// memory. Refuses, naming the file, a directory another crier holds,
    /// a foreign or unknown layout, and a database fjall cannot read.
    pub fn open(
        settings: DurableSettings,
        hub: Hub,
        retention: Retention,
        budget: Budget,
    ) -> Result<DurableStore, StoreError> {
        let dir = &settings.dir;
        std::fs::create_dir_all(dir)
            .map_err(|e| config_error(format!("cannot create {}: {e}", dir.display())))?;
        // Nothing is written into the directory before it is known to be
        // a sound crier directory (or an empty one).
        let found = check_format(dir)?;
        let mut lock = take_lock(dir)?;
        if found == Found::Ours {
            check_journals(dir)?;
        }
        claim_lock(&mut lock);
        if found == Found::New {
            write_format(dir)?;
        }
        let path = dir.join("events");
        let db = Db::open(&path).map_err(|e| {
            let which = match &e {
                // Name the journal files: one of them failed its checksums.
                fjall::Error::JournalRecovery(_) => journals(&path),
                _ => path.display().to_string(),
            };
            config_error(format!(
                "cannot open the event database: {which}: {e}; it was left as it is"
            ))
        })?;
        let corrupt = |what: &str| {
            config_error(format!(
                "the event database {} holds a malformed {what}; it was left as it is",
                path.display()
            ))
        };
        let read_error = |e: fjall::Error| {
            config_error(format!(
                "cannot read the event database {}: {e}; it was left as it is",
                path.display()
            ))
        };
        let renewing = renew_mark(dir);
        if renewing.exists() {
            // A repair stopped before every topic had its new epoch.
            let topics = renew_every_epoch(&db).map_err(read_error)?;
            mark(&renewing, false)
                .map_err(|e| config_error(format!("cannot remove {}: {e}", renewing.display())))?;
            tracing::warn!(
                topics,
                "finished an interrupted repair: every topic has a new epoch"
            );
        }
        let mem = Arc::new(MemoryStore::for_durable(hub, retention, budget));

        // Could acknowledged events be missing? Only after an unclean stop
        // that the OS did not outlive, with `interval`.
        let clean = db.state.get("clean").map_err(read_error)?.is_some();
        let last_boot = db.state.get("boot").map_err(read_error)?;
        let boot = boot_id();
        let renew = settings.fsync == Fsync::Interval
            && !clean
            && last_boot.is_some_and(|b| *b != *boot.as_bytes());
        if renew {
            tracing::warn!(
                "the last run stopped uncleanly and the machine restarted since, with \
                 --fsync interval: every topic starts a new epoch (clients get reset)"
            );
        }

        let now = Instant::now();
        let now_ms = wall_ms();
        let mut disk = HashMap::new();
        let mut fix = db.db.batch();
        for item in db.topics.iter() {
            let (key, value) = item.into_inner().map_err(read_error)?;
            let name = std::str::from_utf8(&key).map_err(|_| corrupt("topic name"))?;
            let topic = Topic::parse(name, usize::MAX).map_err(|_| corrupt("topic name"))?;
            let (epoch, head) = parse_topic_value(&value).ok_or_else(|| corrupt("topic record"))?;
            let mut events = Vec::new();
            let mut low = head + 1;
            for item in db.events.prefix(event_prefix(&topic)) {
                let (key, value) = item.into_inner().map_err(read_error)?;
                let seq = seq_of_key(&key).ok_or_else(|| corrupt("event key"))?;
                low = low.min(seq);
                if renew || seq > head {
                    fix.remove(&db.events, key);
                    continue;
                }
                let (at_ms, name, data) = parse_event(&value).ok_or_else(|| corrupt("event"))?;
                let event = Event::new(topic.clone(), seq, epoch, name.as_ref(), &data)
                    .retained_under(mem.retained_bytes());
                events.push((instant_of(at_ms, now, now_ms), Arc::new(event)));
            }
            // Memory serves one run of numbers ending at the head: events
            // before a hole in it (a repaired journal may leave one) go.
            let run = events
                .iter()
                .rev()
                .zip((0..=head).rev())
                .take_while(|((_, event), seq)| event.seq == *seq)
                .count();
            let holed = events.len() - run;
            for (_, event) in events.drain(..holed) {
                fix.remove(&db.events, event_key(&topic, event.seq));
            }
            let (epoch, head) = if renew {
                let epoch = Epoch::random();
                fix.insert(&db.topics, key.clone(), topic_value(epoch, 0));
                low = 1;
                (epoch, 0)
            } else {
                (epoch, head)
            };
            mem.restore(&topic, epoch, head, events)?;
            disk.insert(topic, OnDisk { low, head, epoch });
        }
        let mut records = HashMap::new();
        let mut expiry = Vec::new();
        for item in db.once.iter() {
            let (key, value) = item.into_inner().map_err(read_error)?;
            let record = parse_record(&value).ok_or_else(|| corrupt("idempotency record"))?;
            let digest = KeyDigest(key[..].try_into().map_err(|_| corrupt("idempotency key"))?);
            if record.expires_ms <= now_ms || renew {
                fix.remove(&db.once, key);
                continue;
            }
            expiry.push((record.expires_ms, digest));
            records.insert(digest, record);
        }
        expiry.sort_by_key(|(expires, _)| *expires);
        fix.remove(&db.state, "clean");
        fix.insert(&db.state, "boot", boot.as_bytes());
        fix.commit()
            .and_then(|()| db.db.persist(PersistMode::SyncAll))
            .map_err(|e| config_error(format!("cannot write {}: {e}", path.display())))?;
        tracing::info!(
            dir = %dir.display(),
            topics = disk.len(),
            idempotency_keys = records.len(),
            clean,
            "opened the data directory"
        );

        let jobs = writer::start(
            Loaded {
                db,
                path,
                records,
                expiry: expiry.into(),
                disk,
            },
            mem.clone(),
            settings.fsync,
            settings.fsync_interval,
            budget.max_keys,
        )?;
        Ok(DurableStore {
            mem,
            jobs: Mutex::new(Some(jobs)),
            lock: Mutex::new(Some(lock)),
        })
    }

    /// Runs the in-memory copy's sweeper until `stop`.
    pub async fn sweep_until(self: Arc<Self>, stop: CancellationToken) {
        self.mem.clone().sweep_until(stop).await
    }

    fn send(&self, job: Job) -> Result<(), StoreError> {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let closed = || StoreError::Unavailable("the durable store is closed".into());
        jobs.as_ref()
            .ok_or_else(closed)?
            .send(job)
            .map_err(|_| closed())
    }
}

#[async_trait]
impl Store for DurableStore {
    async fn append_once(
        &self,
        events: Vec<(NewEvent, Option<Once>)>,
        window: Duration,
    ) -> Result<Vec<Appended>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Append {
            events,
            window,
            reply,
        })?;
        answer.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the durable store's writer stopped".into(),
            ))
        })
    }

    async fn read(&self, topic: &Topic, after: u64, limit: usize) -> Result<History, StoreError> {
        self.mem.read(topic, after, limit).await
    }

    async fn put_ticket(&self, key: &str, record: &str, ttl: Duration) -> Result<(), StoreError> {
        self.mem.put_ticket(key, record, ttl).await
    }

    async fn take_ticket(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.mem.take_ticket(key).await
    }

    async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self.send(Job::Close { reply }).is_ok() {
            let _ = done.await;
        }
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.lock.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}
