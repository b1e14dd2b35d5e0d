//! The data directory and its lock: `DIR/FORMAT` (a foreign directory or
//! layout is refused before anything is written into it), `DIR/LOCK`
//! (flock; a second crier is refused, naming the holder's pid), the
//! journals checked before fjall may cut them (`journal.rs`), and `crier
//! repair` with its `DIR/RENEW` mark. Never serves an append.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use fjall::PersistMode;

use super::db::Db;
use super::layout::{event_key, event_prefix, parse_topic_value, seq_of_key, topic_value, wall_ms};
use crate::event::{Epoch, Topic};
use crate::store::StoreError;
use crate::store::journal;

/// What `DIR/FORMAT` holds: the layout this build reads and writes.
pub(super) const FORMAT: &str = "crier-data 1";

/// The id of the running boot of the machine (Linux), or "" if unknown.
pub(super) fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// A refusal to start (or repair), naming what was found.
pub(super) fn config_error(what: String) -> StoreError {
    StoreError::Config(what)
}

/// Takes the directory's `LOCK` file, or says who holds it.
pub(super) fn take_lock(dir: &Path) -> Result<File, StoreError> {
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
pub(super) fn claim_lock(lock: &mut File) {
    let _ = lock.set_len(0);
    let _ = writeln!(lock, "{}", std::process::id());
}

/// What `DIR` is, found without writing anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Found {
    /// Empty (or only a `LOCK`): a new data directory.
    New,
    /// `DIR/FORMAT` names this build's layout.
    Ours,
}

/// Reads `DIR/FORMAT`: a foreign directory or layout refuses start naming
/// the file, before anything is written into it.
pub(super) fn check_format(dir: &Path) -> Result<Found, StoreError> {
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
pub(super) fn write_format(dir: &Path) -> Result<(), StoreError> {
    let path = dir.join("FORMAT");
    let mut file = File::create(&path)
        .map_err(|e| config_error(format!("cannot write {}: {e}", path.display())))?;
    writeln!(file, "{FORMAT}")
        .and_then(|()| file.sync_all())
        .map_err(|e| config_error(format!("cannot write {}: {e}", path.display())))
}

/// Refuses a journal damaged before its end (fjall would cut it there,
/// silently losing acknowledged events), naming it; reads only.
pub(super) fn check_journals(dir: &Path) -> Result<(), StoreError> {
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
pub(super) fn renew_mark(dir: &Path) -> PathBuf {
    dir.join("RENEW")
}

/// Gives every topic of `db` a new epoch, keeping its events and head:
/// ids handed out before can then name nothing new, and clients resuming
/// from them get `reset`. Memory serves one run of numbers ending at the
/// head, so the events before a hole (a repaired journal may leave one)
/// are numbered up to close it, in order; in a new epoch every id is new
/// anyway. Returns how many topics there are.
pub(super) fn renew_every_epoch(db: &Db) -> Result<usize, fjall::Error> {
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
            match seq_of_key(&key) {
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
pub(super) fn mark(path: &Path, present: bool) -> std::io::Result<()> {
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
pub(super) fn save(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let used = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let mut file = File::create_new(path)?;
    file.write_all(&bytes[..used])?;
    file.set_len(bytes.len() as u64)?;
    file.sync_all()
}

/// Syncs a directory, so that a file created or renamed in it stays.
pub(super) fn sync_dir(dir: &Path) -> std::io::Result<()> {
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
pub(super) fn journals(path: &Path) -> String {
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
