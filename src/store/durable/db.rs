//! The open fjall database: its keyspaces, a group's writes as a list of
//! [`Change`]s written in one batch (synced or not), and what a failed
//! write means to a publisher. Never numbers or decides anything.

use std::path::Path;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use crate::store::StoreError;

/// When the durable store answers a publish (`--fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fsync {
    /// After the event is synced to disk: nothing acknowledged is ever lost.
    Always,
    /// After the OS holds the event; synced every `--fsync-interval`.
    Interval,
}

/// The open database and its keyspaces.
pub(super) struct Db {
    pub(super) db: Database,
    pub(super) events: Keyspace,
    pub(super) topics: Keyspace,
    pub(super) once: Keyspace,
    pub(super) state: Keyspace,
}

impl Db {
    pub(super) fn open(path: &Path) -> Result<Db, fjall::Error> {
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
pub(super) enum Space {
    Events,
    Topics,
    Once,
}

/// One write of a group, kept apart from any batch: a group is written
/// again to a reopened database, and undone after a failure.
#[derive(Debug, Clone)]
pub(super) enum Change {
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
    pub(super) fn write(&self, changes: &[Change], fsync: Fsync) -> Result<(), fjall::Error> {
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

/// What a storage error means to a publisher: a full disk is `Full` (507),
/// anything else `Unavailable` (503). Either way nothing was stored.
///
/// fjall poisons the database when a write of its own fails (a flush of a
/// memtable in the background, say) and then refuses every write with
/// `Poisoned`, the cause lost: that counts as a full disk when the
/// filesystem of `dir` has less room left than a flush may need.
pub(super) fn storage_error(error: &fjall::Error, dir: &Path) -> StoreError {
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
