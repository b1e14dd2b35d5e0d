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
//! `DurableStore`, the embedded store kept on disk too (`--data-dir`). It
//! wraps a `MemoryStore` (built `for_durable`: its sweeper trims but does not
//! forget topics) as the copy every read, live tail and fan-out is served
//! from, so those cost what they cost in memory. Appends go through one
//! writer thread: it takes every request waiting (up to 1,024), numbers their
//! events after each topic's head (its own record of what was written, then
//! the heads numbered earlier in the group; a new topic's log and epoch come
//! from `MemoryStore::tip`), checks keys and budgets per request (all or
//! none), writes the whole group as one fjall batch and, with `--fsync
//! always`, one `fdatasync` (group commit; with `always` it waits up to 0.3
//! ms for as many requests as its last group had). Only then does it send the
//! group to one task on the runtime, which hands each event to
//! `MemoryStore::commit` (visible, delivered to the hub, in sequence order)
//! and answers each request, group after group. The tick forgets idle topics
//! only when that task has caught up. A group's writes are kept as a list of
//! `Change`s apart from any batch. A failed write answers every request of
//! the group with `Full` (ENOSPC, or fjall's `Poisoned` with less free room
//! than a flush needs) or `Unavailable`, undoes the group's idempotency
//! records, and reopens the database (fjall refuses writes after a failed
//! one), writing first what undoes the group in case part of it reached the
//! journal; a write refused as `Poisoned` (fjall's own flush failed) is
//! retried once on the reopened database. So nothing is half-stored and
//! publishing resumes when the disk does. Keys: `events` `topic \0 seq(BE)` →
//! stored-at, name, data; `topics` `topic` → epoch, head; `once` key digest →
//! fingerprint, expiry, receipt (in the same batch as its event); `state`
//! boot id and clean-stop mark. At start it checks `DIR/FORMAT` and the
//! journals (`journal.rs`) before writing anything, takes `DIR/LOCK` (flock),
//! finishes an interrupted repair (`DIR/RENEW`), and loads each topic by a
//! prefix seek (only the run of numbers ending at its head), so resuming
//! never scans; with `--fsync interval`, an unclean stop followed by a new
//! boot id renews every topic's epoch. Each second (and after each group for
//! the topics it touched) the writer deletes from disk what memory trimmed
//! and removes topics memory forgot (`forget_if_idle`). `close()` (after the
//! server returns) syncs, marks a clean stop and unlocks. Why fjall rather
//! than redb, measured on this workload (one small event per write, 16
//! concurrent publishers, each write durable, 2 cores): fjall's journal
//! batches many writes into one sync and reached ~20,000 events/s; redb,
//! whose commit rewrites its B-tree pages and syncs twice, ~5,200/s. Both are
//! pure Rust and well kept; fjall's LSM also turns retention into cheap
//! tombstones and range seeks, where a B-tree file grows and must be
//! compacted by hand (Mercure's Bolt complaint).

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

use super::journal;
use super::{
    Appended, Budget, Fingerprint, History, KeyDigest, MAX_SEQ, MemoryStore, NewEvent, Once,
    Receipt, Retention, Store, StoreError,
};
use crate::event::{Epoch, Event, EventName, Topic};
use crate::hub::Hub;

/// When the durable store answers a publish (`--fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fsync {
    /// After the event is synced to disk: nothing acknowledged is ever lost.
    Always,
    /// After the OS holds the event; synced every `--fsync-interval`.
    Interval,
}

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
        let small = || KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE);
        Ok(Db {
            events: db.keyspace("events", small)?,
            topics: db.keyspace("topics", small)?,
            once: db.keyspace("once", small)?,
            state: db.keyspace("state", small)?,
            db,
        })
    }
}

/// A keyspace of [`Db`], by name.
#[derive(Debug, Clone, Copy)]
enum Space {
    Events,
    Topics,
    Once,
}

/// One write of a group, kept apart from any batch: a group is written
/// again to a reopened database, and undone after a failure.
#[derive(Debug, Clone)]
enum Change {
    Put(Space, Vec<u8>, Vec<u8>),
    Delete(Space, Vec<u8>),
}

impl Db {
    fn space(&self, space: Space) -> &Keyspace {
        match space {
            Space::Events => &self.events,
            Space::Topics => &self.topics,
            Space::Once => &self.once,
        }
    }

    /// Writes `changes` in one batch, synced with `always`.
    fn write(&self, changes: &[Change], fsync: Fsync) -> Result<(), fjall::Error> {
        let mut batch = self.db.batch();
        for change in changes {
            match change {
                Change::Put(space, key, value) => {
                    batch.insert(self.space(*space), key.as_slice(), value.as_slice())
                }
                Change::Delete(space, key) => batch.remove(self.space(*space), key.as_slice()),
            }
        }
        batch.commit()?;
        match fsync {
            Fsync::Always => self.db.persist(PersistMode::SyncData),
            Fsync::Interval => Ok(()),
        }
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
///
/// fjall poisons the database when a write of its own fails (a flush of a
/// memtable in the background, say) and then refuses every write with
/// `Poisoned`, the cause lost: that counts as a full disk when the
/// filesystem of `dir` has less room left than a flush may need.
fn storage_error(error: &fjall::Error, dir: &Path) -> StoreError {
    let text = format!("{error:?}");
    let full = text.contains("StorageFull")
        || text.contains("QuotaExceeded")
        || text.contains("No space left")
        || (matches!(error, fjall::Error::Poisoned)
            && free_bytes(dir).is_some_and(|free| free < FLUSH_ROOM));
    match full {
        true => StoreError::Full("the disk of the data directory is full".into()),
        false => StoreError::Unavailable(format!("the data directory cannot be written: {error}")),
    }
}

/// Room a flush may need: the memtables of the four keyspaces, full.
const FLUSH_ROOM: u64 = 4 * MEMTABLE;

/// The size at which a keyspace's memtable is flushed to a table.
const MEMTABLE: u64 = 4 * 1024 * 1024;

/// Bytes an unprivileged writer may still use on the filesystem of `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the struct it is given, from a C string.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    let done = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
    (done == 0).then(|| (stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
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
    let file = std::fs::OpenOptions::new()
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
    Ok(file)
}

/// Writes our pid into the `LOCK` file we hold: only once the directory
/// is known to be ours and sound, so a refusal leaves it as it was.
fn claim_lock(lock: &mut File) {
    let _ = lock.set_len(0);
    let _ = writeln!(lock, "{}", std::process::id());
}

/// What `DIR` is, found without writing anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// Empty (or only a `LOCK`): a new data directory.
    New,
    /// `DIR/FORMAT` names this build's layout.
    Ours,
}

/// Reads `DIR/FORMAT`: a foreign directory or layout refuses start naming
/// the file, before anything is written into it.
fn check_format(dir: &Path) -> Result<Found, StoreError> {
    let path = dir.join("FORMAT");
    match std::fs::read_to_string(&path) {
        Ok(found) if found.trim() == FORMAT => Ok(Found::Ours),
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
            Ok(Found::New)
        }
        Err(e) => Err(config_error(format!("cannot read {}: {e}", path.display()))),
    }
}

/// Makes `DIR` a data directory of this layout.
fn write_format(dir: &Path) -> Result<(), StoreError> {
    let path = dir.join("FORMAT");
    let mut file = File::create(&path)
        .map_err(|e| config_error(format!("cannot write {}: {e}", path.display())))?;
    writeln!(file, "{FORMAT}")
        .and_then(|()| file.sync_all())
        .map_err(|e| config_error(format!("cannot write {}: {e}", path.display())))
}

/// Refuses a journal damaged before its end (fjall would cut it there,
/// silently losing acknowledged events), naming it; reads only.
fn check_journals(dir: &Path) -> Result<(), StoreError> {
    let db = dir.join("events");
    let damage = journal::first_damage(&db)
        .map_err(|e| config_error(format!("cannot read the journals in {}: {e}", db.display())))?;
    match damage {
        None => Ok(()),
        Some(damage) => Err(config_error(format!(
            "the journal file {} is damaged at byte {}, and not as a torn tail (the \
             incomplete last write of a kill): starting would lose the acknowledged events \
             after it and hand their ids out again; nothing was changed. `crier repair \
             --data-dir {}` keeps every intact event and starts every topic in a new epoch \
             (clients get reset)",
            damage.file.display(),
            damage.at,
            dir.display()
        ))),
    }
}

/// `DIR/RENEW`: written by `crier repair` before it changes a journal, and
/// removed once every topic has its new epoch; while it is there, the next
/// open (or repair) renews every epoch first.
fn renew_mark(dir: &Path) -> PathBuf {
    dir.join("RENEW")
}

/// Gives every topic of `db` a new epoch, keeping its events and head:
/// ids handed out before can then name nothing new, and clients resuming
/// from them get `reset`. Memory serves one run of numbers ending at the
/// head, so the events before a hole (a repaired journal may leave one)
/// are numbered up to close it, in order; in a new epoch every id is new
/// anyway. Returns how many topics there are.
fn renew_every_epoch(db: &Db) -> Result<usize, fjall::Error> {
    let mut batch = db.db.batch();
    let mut topics = 0;
    for item in db.topics.iter() {
        let (key, value) = item.into_inner()?;
        let Some((old, head)) = parse_topic_value(&value) else {
            continue;
        };
        let Some(topic) = std::str::from_utf8(&key)
            .ok()
            .and_then(|name| Topic::parse(name, usize::MAX).ok())
        else {
            continue;
        };
        let mut events = Vec::new();
        for item in db.events.prefix(event_prefix(&topic)) {
            let (key, value) = item.into_inner()?;
            let seq = key
                .get(key.len().saturating_sub(8)..)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes);
            match seq {
                Some(seq) if seq <= head => events.push((seq, value)),
                _ => batch.remove(&db.events, key),
            }
        }
        // The n-th newest event takes the number head - n: each key is
        // written or removed at most once.
        let first = head + 1 - events.len() as u64;
        let targets = first..=head;
        for (i, (seq, value)) in events.iter().enumerate() {
            let target = first + i as u64;
            if *seq != target {
                batch.insert(&db.events, event_key(&topic, target), value.clone());
                if !targets.contains(seq) {
                    batch.remove(&db.events, event_key(&topic, *seq));
                }
            }
        }
        let mut epoch = Epoch::random();
        while epoch == old {
            epoch = Epoch::random();
        }
        batch.insert(&db.topics, key, topic_value(epoch, head));
        topics += 1;
    }
    batch.commit()?;
    db.db.persist(PersistMode::SyncAll)?;
    Ok(topics)
}

/// Creates or removes a file and syncs it and its directory, so that the
/// step it marks survives a crash.
fn mark(path: &Path, present: bool) -> std::io::Result<()> {
    match present {
        true => File::create(path)?.sync_all()?,
        false => match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        },
    }
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Writes `bytes` to a new file `path`, its trailing zeros (a journal's
/// preallocated room) as a hole: the same content, not 64 MiB of disk.
fn save(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let used = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let mut file = File::create_new(path)?;
    file.write_all(&bytes[..used])?;
    file.set_len(bytes.len() as u64)?;
    file.sync_all()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// What `crier repair` did to a data directory.
#[derive(Debug, Default)]
pub struct Repaired {
    /// Each damaged journal, and the bytes of it that were no intact batch
    /// (dropped).
    pub journals: Vec<(PathBuf, usize)>,
    /// Where the damaged journals were copied as they were.
    pub saved: Option<PathBuf>,
    /// Topics given a new epoch.
    pub topics: usize,
}

/// `crier repair`: cuts what is not an intact batch out of every damaged
/// journal (keeping every intact event, after the damage too), then gives
/// every topic a new epoch, since any of them may have lost acknowledged
/// events. Safe to run again, also after a crash halfway: `Ok(None)` when
/// there is nothing to do, and nothing was changed.
pub fn repair(dir: &Path) -> Result<Option<Repaired>, StoreError> {
    if check_format(dir)? == Found::New {
        return Err(config_error(format!(
            "{} holds no data directory (no FORMAT): nothing to repair; nothing was changed",
            dir.display()
        )));
    }
    let mut lock = take_lock(dir)?;
    let db_path = dir.join("events");
    let io = |what: &Path, e: std::io::Error| config_error(format!("{}: {e}", what.display()));
    let mut damaged = Vec::new();
    let files = journal::files(&db_path).map_err(|e| io(&db_path, e))?;
    let newest = files.len();
    for (i, file) in files.into_iter().enumerate() {
        let bytes = std::fs::read(&file).map_err(|e| io(&file, e))?;
        let batches = journal::intact(&bytes);
        if journal::damage(&bytes, &batches, i + 1 == newest).is_some() {
            damaged.push((file, bytes, batches));
        }
    }
    let renew = renew_mark(dir);
    if damaged.is_empty() && !renew.exists() {
        return Ok(None);
    }
    claim_lock(&mut lock);
    mark(&renew, true).map_err(|e| io(&renew, e))?;
    let mut repaired = Repaired::default();
    if !damaged.is_empty() {
        let saved = dir.join(format!("damaged-{}", wall_ms() / 1000));
        std::fs::create_dir_all(&saved).map_err(|e| io(&saved, e))?;
        for (file, bytes, batches) in damaged {
            let name = file.file_name().unwrap_or_default();
            let copy = saved.join(name);
            save(&copy, &bytes).map_err(|e| io(&copy, e))?;
            let mut kept = Vec::with_capacity(bytes.len());
            for batch in &batches {
                kept.extend_from_slice(&bytes[batch.clone()]);
            }
            // Written beside the copy, then moved into place: fjall never
            // sees a half-written journal.
            let next = saved.join(format!("{}.repaired", name.to_string_lossy()));
            std::fs::write(&next, &kept)
                .and_then(|()| File::open(&next)?.sync_all())
                .and_then(|()| sync_dir(&saved))
                .and_then(|()| std::fs::rename(&next, &file))
                .and_then(|()| sync_dir(&db_path))
                .map_err(|e| io(&file, e))?;
            let dropped = batches.last().map_or(0, |b| b.end) - kept.len();
            tracing::warn!(
                journal = %file.display(),
                dropped_bytes = dropped,
                "cut the damaged parts out of a journal"
            );
            repaired.journals.push((file, dropped));
        }
        repaired.saved = Some(saved);
    }
    let db = Db::open(&db_path).map_err(|e| {
        config_error(format!(
            "cannot open the event database {}: {e}",
            db_path.display()
        ))
    })?;
    repaired.topics = renew_every_epoch(&db).map_err(|e| {
        config_error(format!(
            "cannot write the event database {}: {e}",
            db_path.display()
        ))
    })?;
    drop(db);
    mark(&renew, false).map_err(|e| io(&renew, e))?;
    Ok(Some(repaired))
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
            undo: Vec::new(),
            poisoned: false,
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
    /// What undoes a group whose write failed, written first thing after
    /// the database is reopened.
    undo: Vec<Change>,
    /// The last write failed because fjall had poisoned the database.
    poisoned: bool,
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
                        changes.push(Change::Put(
                            Space::Events,
                            event_key(&event.topic, event.seq),
                            event_value(now_ms, new.name.as_ref(), &new.data),
                        ));
                        if let Some(once) = once
                            && !window.is_zero()
                        {
                            let record = Record {
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
