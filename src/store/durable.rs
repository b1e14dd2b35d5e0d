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

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{
    Appended, Budget, Fingerprint, History, KeyDigest, MAX_SEQ, MemoryStore, NewEvent, Once,
    Receipt, Retention, Store, StoreError,
};
use crate::config::Fsync;
use crate::event::{Epoch, Event, EventName, Topic};
use crate::hub::Hub;

/// What `DIR/FORMAT` holds: the layout this build reads and writes.
pub const FORMAT: &str = "crier-data 1";

/// Requests a writer takes into one batch at most.
const GROUP: usize = 1024;

/// Longest a writer with `--fsync always` waits for the rest of a group
/// (as many requests as the last group had) before writing what it has.
const LINGER: Duration = Duration::from_micros(300);

/// How often the writer trims disk to memory's retention and forgets idle
/// topics.
const TICK: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct DurableSettings {
    pub dir: PathBuf,
    pub fsync: Fsync,
    pub fsync_interval: Duration,
}

pub struct DurableStore {
    mem: Arc<MemoryStore>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    /// Held (flock) while the store is open; released by `close`.
    lock: Mutex<Option<File>>,
}

/// Where a request's answer goes.
type Reply = oneshot::Sender<Result<Vec<Appended>, StoreError>>;

/// An append waiting for the writer: its events, the key window, the reply.
type Request = (Vec<(NewEvent, Option<Once>)>, Duration, Reply);

enum Job {
    Append {
        events: Vec<(NewEvent, Option<Once>)>,
        window: Duration,
        reply: Reply,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// The open database and its keyspaces.
struct Db {
    db: Database,
    events: Keyspace,
    topics: Keyspace,
    once: Keyspace,
    state: Keyspace,
}

impl Db {
    fn open(path: &Path) -> Result<Db, fjall::Error> {
        let db = Database::builder(path)
            // The smallest journal fjall allows: it bounds the directory
            // together with the memtables (see docs/OPERATIONS.md).
            .max_journaling_size(64 * 1024 * 1024)
            .worker_threads(1)
            .cache_size(8 * 1024 * 1024)
            .open()?;
        let small = || KeyspaceCreateOptions::default().max_memtable_size(4 * 1024 * 1024);
        Ok(Db {
            events: db.keyspace("events", small)?,
            topics: db.keyspace("topics", small)?,
            once: db.keyspace("once", small)?,
            state: db.keyspace("state", small)?,
            db,
        })
    }
}

/// An idempotency record, as the writer keeps it.
#[derive(Clone)]
struct Record {
    fingerprint: Fingerprint,
    receipt: Receipt,
    /// Wall-clock milliseconds: records outlive the process.
    expires_ms: u64,
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The instant a wall-clock time of the past corresponds to.
fn instant_of(at_ms: u64, now: Instant, now_ms: u64) -> Instant {
    now.checked_sub(Duration::from_millis(now_ms.saturating_sub(at_ms)))
        .unwrap_or(now)
}

fn event_key(topic: &Topic, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(topic.as_str().len() + 9);
    key.extend_from_slice(topic.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn event_prefix(topic: &Topic) -> Vec<u8> {
    let mut key = topic.as_str().as_bytes().to_vec();
    key.push(0);
    key
}

fn event_value(at_ms: u64, name: Option<&EventName>, data: &str) -> Vec<u8> {
    let mut value = Vec::with_capacity(data.len() + 16);
    value.extend_from_slice(&at_ms.to_be_bytes());
    match name {
        Some(name) => {
            value.push(1);
            value.extend_from_slice(&(name.as_str().len() as u32).to_be_bytes());
            value.extend_from_slice(name.as_str().as_bytes());
        }
        None => value.push(0),
    }
    value.extend_from_slice(data.as_bytes());
    value
}

/// Stored-at, name and data of an event record; `None` when malformed.
fn parse_event(value: &[u8]) -> Option<(u64, Option<EventName>, String)> {
    let at = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
    let (name, rest) = match value.get(8)? {
        0 => (None, value.get(9..)?),
        1 => {
            let len = u32::from_be_bytes(value.get(9..13)?.try_into().ok()?) as usize;
            let name = std::str::from_utf8(value.get(13..13 + len)?).ok()?;
            (Some(EventName::parse(name).ok()?), value.get(13 + len..)?)
        }
        _ => return None,
    };
    Some((at, name, String::from_utf8(rest.to_vec()).ok()?))
}

fn topic_value(epoch: Epoch, head: u64) -> [u8; 16] {
    let mut value = [0; 16];
    value[..8].copy_from_slice(&epoch.0.to_be_bytes());
    value[8..].copy_from_slice(&head.to_be_bytes());
    value
}

fn parse_topic_value(value: &[u8]) -> Option<(Epoch, u64)> {
    let epoch = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
    let head = u64::from_be_bytes(value.get(8..16)?.try_into().ok()?);
    Some((Epoch(epoch), head))
}

fn record_value(record: &Record) -> Vec<u8> {
    let mut value = Vec::with_capacity(96);
    value.extend_from_slice(&record.fingerprint.0);
    value.extend_from_slice(&record.expires_ms.to_be_bytes());
    value.extend_from_slice(&record.receipt.epoch.0.to_be_bytes());
    value.extend_from_slice(&record.receipt.seq.to_be_bytes());
    value.extend_from_slice(record.receipt.topic.as_str().as_bytes());
    value
}

fn parse_record(value: &[u8]) -> Option<Record> {
    let fingerprint = Fingerprint(value.get(..32)?.try_into().ok()?);
    let expires_ms = u64::from_be_bytes(value.get(32..40)?.try_into().ok()?);
    let epoch = u64::from_be_bytes(value.get(40..48)?.try_into().ok()?);
    let seq = u64::from_be_bytes(value.get(48..56)?.try_into().ok()?);
    let topic = Topic::parse(std::str::from_utf8(value.get(56..)?).ok()?, usize::MAX).ok()?;
    Some(Record {
        fingerprint,
        receipt: Receipt {
            topic,
            seq,
            epoch: Epoch(epoch),
        },
        expires_ms,
    })
}

/// What a storage error means to a publisher: a full disk is `Full` (507),
/// anything else `Unavailable` (503). Either way nothing was stored.
fn storage_error(error: &fjall::Error) -> StoreError {
    let text = format!("{error:?}");
    if text.contains("StorageFull") || text.contains("No space left") {
        StoreError::Full("the disk of the data directory is full".into())
    } else {
        StoreError::Unavailable(format!("the data directory cannot be written: {error}"))
    }
}

/// The id of the running boot of the machine (Linux), or "" if unknown.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn config_error(what: String) -> StoreError {
    StoreError::Config(what)
}

/// Takes the directory's `LOCK` file, or says who holds it.
fn take_lock(dir: &Path) -> Result<File, StoreError> {
    use std::os::fd::AsRawFd;
    let path = dir.join("LOCK");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| config_error(format!("cannot open {}: {e}", path.display())))?;
    // SAFETY: flock on a descriptor this function owns.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if locked != 0 {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        return Err(config_error(format!(
            "{} is locked: another crier (pid {}) uses this data directory",
            path.display(),
            holder.trim()
        )));
    }
    let _ = file.set_len(0);
    let _ = writeln!(file, "{}", std::process::id());
    Ok(file)
}

/// Checks `DIR/FORMAT`, writing it into a new, empty directory; a foreign
/// directory or layout refuses start naming the file.
fn check_format(dir: &Path) -> Result<(), StoreError> {
    let path = dir.join("FORMAT");
    match std::fs::read_to_string(&path) {
        Ok(found) if found.trim() == FORMAT => Ok(()),
        Ok(found) => Err(config_error(format!(
            "{} says {:?}, not {FORMAT:?}: this data directory is not one this crier can read; \
             nothing was changed",
            path.display(),
            found.trim().chars().take(64).collect::<String>()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let foreign = std::fs::read_dir(dir)
                .map_err(|e| config_error(format!("cannot read {}: {e}", dir.display())))?
                .filter_map(Result::ok)
                .any(|entry| entry.file_name() != "LOCK");
            if foreign {
                return Err(config_error(format!(
                    "{} is missing and {} is not empty: not a crier data directory; \
                     nothing was changed",
                    path.display(),
                    dir.display()
                )));
            }
            let mut file = File::create(&path)
                .map_err(|e| config_error(format!("cannot write {}: {e}", path.display())))?;
            writeln!(file, "{FORMAT}")
                .and_then(|()| file.sync_all())
                .map_err(|e| config_error(format!("cannot write {}: {e}", path.display())))?;
            Ok(())
        }
        Err(e) => Err(config_error(format!("cannot read {}: {e}", path.display()))),
    }
}

/// The journal files of the database at `path`, for a message.
fn journals(path: &Path) -> String {
    let mut files: Vec<String> = std::fs::read_dir(path)
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|p| p.extension().is_some_and(|e| e == "jnl"))
                .map(|p| p.display().to_string())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    match files.is_empty() {
        true => path.display().to_string(),
        false => format!("a journal file ({})", files.join(", ")),
    }
}

/// Where one topic's records on disk start and end.
#[derive(Clone, Copy)]
struct OnDisk {
    /// No event below this number is on disk.
    low: u64,
    /// The last number written, in `epoch`: the writer numbers after it
    /// (memory may not have committed it yet).
    head: u64,
    epoch: Epoch,
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
        let lock = take_lock(dir)?;
        check_format(dir)?;
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
                let seq = key
                    .get(key.len().saturating_sub(8)..)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(|| corrupt("event key"))?;
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

        // Written groups are made visible and answered by a task on the
        // runtime, in order: waking thousands of subscribers from there
        // queues them locally, where the writer thread would go through
        // the runtime's global queue for each.
        let (commits, mut written) =
            tokio::sync::mpsc::unbounded_channel::<(Vec<Planned>, Instant)>();
        let committed = Arc::new(AtomicU64::new(0));
        let (visible, done) = (mem.clone(), committed.clone());
        tokio::runtime::Handle::try_current()
            .map_err(|e| config_error(format!("the durable store needs a runtime: {e}")))?
            .spawn(async move {
                while let Some((planned, at)) = written.recv().await {
                    for plan in planned {
                        let mut out: Vec<Appended> = Vec::with_capacity(plan.answers.len());
                        for answer in plan.answers {
                            let appended = match answer {
                                Answer::Stored(event) => {
                                    visible.commit(event.clone(), at);
                                    Appended::Stored(event)
                                }
                                Answer::Replayed(receipt) => Appended::Replayed(receipt),
                                Answer::SameAs(j) => Appended::Replayed(out[j].receipt()),
                            };
                            out.push(appended);
                        }
                        let _ = plan.reply.send(Ok(out));
                    }
                    done.fetch_add(1, Ordering::Release);
                }
            });
        let (jobs, queue) = mpsc::channel();
        let mut writer = Writer {
            commits,
            committed,
            sent: 0,
            db: Some(db),
            path,
            mem: mem.clone(),
            fsync: settings.fsync,
            fsync_interval: settings.fsync_interval,
            max_keys: budget.max_keys,
            records,
            expiry: expiry.into(),
            disk,
            unsynced: false,
        };
        std::thread::Builder::new()
            .name("crier-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(|e| config_error(format!("cannot start the writer thread: {e}")))?;
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

/// The one thread that writes: numbers, stores, syncs, then publishes.
struct Writer {
    /// Written groups, to be made visible and answered (in order).
    commits: tokio::sync::mpsc::UnboundedSender<(Vec<Planned>, Instant)>,
    /// Groups sent to `commits`, and those it has made visible.
    sent: u64,
    committed: Arc<AtomicU64>,
    /// `None` after a failed write, until the database is reopened.
    db: Option<Db>,
    path: PathBuf,
    mem: Arc<MemoryStore>,
    fsync: Fsync,
    fsync_interval: Duration,
    max_keys: usize,
    records: HashMap<KeyDigest, Record>,
    expiry: VecDeque<(u64, KeyDigest)>,
    disk: HashMap<Topic, OnDisk>,
    /// Written since the last sync (`interval`).
    unsynced: bool,
}

/// One request's events, numbered, with where each went.
enum Answer {
    Stored(Arc<Event>),
    Replayed(Receipt),
    SameAs(usize),
}

struct Planned {
    reply: Reply,
    answers: Vec<Answer>,
}

impl Writer {
    fn run(&mut self, queue: mpsc::Receiver<Job>) {
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
    /// after one).
    fn db(&mut self) -> Result<&Db, StoreError> {
        if self.db.is_none() {
            match Db::open(&self.path) {
                Ok(db) => self.db = Some(db),
                Err(e) => return Err(storage_error(&e)),
            }
        }
        self.db
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("the event database is not open".into()))
    }

    fn failed(&mut self, error: &fjall::Error) -> StoreError {
        tracing::warn!(%error, "writing the data directory failed; reopening it");
        self.db = None;
        storage_error(error)
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
        let db = match self.db() {
            Ok(db) => db,
            Err(error) => {
                for (_, _, reply) in group {
                    let _ = reply.send(Err(clone_error(&error)));
                }
                return;
            }
        };
        let mut batch = db.db.batch();
        let (events_ks, topics_ks, once_ks) =
            (db.events.clone(), db.topics.clone(), db.once.clone());
        self.prune_records(now_ms, &mut batch, &once_ks);
        // Heads numbered in this group, and the records it made (to undo
        // if the write fails).
        let mut tips: HashMap<Topic, (Epoch, u64)> = HashMap::new();
        let mut undo: Vec<(KeyDigest, Option<Record>)> = Vec::new();
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
                        let Answer::Stored(event) = answer else {
                            continue;
                        };
                        batch.insert(
                            &events_ks,
                            event_key(&event.topic, event.seq),
                            event_value(now_ms, new.name.as_ref(), &new.data),
                        );
                        if let Some(once) = once
                            && !window.is_zero()
                        {
                            let record = Record {
                                fingerprint: once.fingerprint,
                                receipt: Receipt::from(&**event),
                                expires_ms,
                            };
                            batch.insert(&once_ks, once.key.0, record_value(&record));
                            undo.push((once.key, self.records.insert(once.key, record)));
                            self.expiry.push_back((expires_ms, once.key));
                        }
                    }
                    planned.push(Planned { reply, answers });
                }
            }
        }
        for (topic, (epoch, head)) in &tips {
            batch.insert(
                &topics_ks,
                topic.as_str().as_bytes(),
                topic_value(*epoch, *head),
            );
        }
        let writing = Instant::now();
        let requests = planned.len();
        let written = batch.commit().and_then(|()| match self.fsync {
            Fsync::Always => self
                .db
                .as_ref()
                .map_or(Ok(()), |db| db.db.persist(PersistMode::SyncData)),
            Fsync::Interval => Ok(()),
        });
        tracing::trace!(
            requests,
            took_us = writing.elapsed().as_micros() as u64,
            "wrote a group"
        );
        if let Err(error) = written {
            let error = self.failed(&error);
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
    ) -> Result<(Vec<Answer>, HashMap<Topic, (Epoch, u64)>, usize), StoreError> {
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
                answers.push(Some(Answer::Replayed(record.receipt.clone())));
            } else if let Some(j) = events[..i]
                .iter()
                .position(|(_, o)| o.is_some_and(|o| o.key == once.key))
            {
                answers.push(Some(Answer::SameAs(j)));
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
            answers[i] = Some(Answer::Stored(Arc::new(event)));
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
        let deadline = Instant::now() + Duration::from_millis(100);
        while self.committed.load(Ordering::Acquire) != self.sent {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        let spare = |topic: &Topic| local.contains_key(topic) || tips.contains_key(topic);
        let Some(topic) = self.mem.evict_topic(spare) else {
            return false;
        };
        self.trim(std::slice::from_ref(&topic));
        self.disk.remove(&topic);
        true
    }

    /// Forgets expired records, deleting them from disk with `batch`.
    fn prune_records(&mut self, now_ms: u64, batch: &mut fjall::OwnedWriteBatch, once: &Keyspace) {
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
                batch.remove(once, key.0);
            }
        }
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
        let settled = self.committed.load(Ordering::Acquire) == self.sent;
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
        let now_ms = wall_ms();
        if let Ok(db) = self.db() {
            let once = db.once.clone();
            let mut batch = db.db.batch();
            self.prune_records(now_ms, &mut batch, &once);
            if let Err(error) = batch.commit() {
                self.failed(&error);
            }
        }
    }
}

fn clone_error(error: &StoreError) -> StoreError {
    match error {
        StoreError::Full(s) => StoreError::Full(s.clone()),
        other => StoreError::Unavailable(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_records_read_back_as_written() {
        let name = EventName::parse("update").unwrap();
        for (name, data) in [
            (None, ""),
            (Some(&name), "line one\nline two"),
            (None, "ünïcødé"),
        ] {
            let value = event_value(1_700_000_000_123, name, data);
            let (at, read_name, read_data) = parse_event(&value).unwrap();
            assert_eq!(at, 1_700_000_000_123);
            assert_eq!(
                read_name.as_ref().map(EventName::as_str),
                name.map(EventName::as_str)
            );
            assert_eq!(read_data, data);
        }
        assert!(parse_event(b"short").is_none());
        assert!(parse_event(&[0, 0, 0, 0, 0, 0, 0, 0, 7]).is_none());
    }

    #[test]
    fn event_keys_sort_by_topic_then_number_and_a_prefix_holds_one_topic() {
        let (a, ab) = (
            Topic::parse("a", 128).unwrap(),
            Topic::parse("ab", 128).unwrap(),
        );
        assert!(event_key(&a, 9) < event_key(&a, 10));
        assert!(event_key(&a, u64::MAX) < event_key(&ab, 1));
        assert!(event_key(&a, 3).starts_with(&event_prefix(&a)));
        assert!(!event_key(&ab, 3).starts_with(&event_prefix(&a)));
    }

    #[test]
    fn topic_and_idempotency_records_read_back_as_written() {
        assert_eq!(
            parse_topic_value(&topic_value(Epoch(42), 7)),
            Some((Epoch(42), 7))
        );
        let record = Record {
            fingerprint: Fingerprint([3; 32]),
            receipt: Receipt {
                topic: Topic::parse("orders", 128).unwrap(),
                seq: 17,
                epoch: Epoch(99),
            },
            expires_ms: 123_456,
        };
        let read = parse_record(&record_value(&record)).unwrap();
        assert_eq!(read.fingerprint, record.fingerprint);
        assert_eq!(read.receipt, record.receipt);
        assert_eq!(read.expires_ms, 123_456);
        assert!(parse_record(&[0; 20]).is_none());
    }
}
