//! One manager per database file, locked on the file itself.
//!
//! A manager takes the open journal entries it finds at start-up to be
//! interrupted operations and rolls them back, which is only right if nobody
//! else is driving them. So it holds an exclusive `flock` on the database
//! file for as long as it lives. The lock belongs to the inode, not to a
//! path: a symlink, a hard link or a bind mount of the file opens the same
//! database and is refused like the path itself.
//!
//! SQLite locks the same file with `fcntl` byte-range locks, and POSIX drops
//! *all* of a process's `fcntl` locks on a file when the process closes *any*
//! descriptor of it. So a descriptor opened here is never closed: releasing
//! the lock only unlocks it, and it stays in a process-wide table where the
//! next manager of the same file finds it again. The cost is one descriptor
//! per distinct database file a process ever opens; holding it also keeps the
//! inode alive, so its (device, inode) key cannot be reused by another file.
//! (`flock` and `fcntl` locks do not interact on Linux.)

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fs::{File, Metadata, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::error::{Error, ErrorCode, Result};

/// (device, inode): what a database file is, whatever the path to it.
type FileId = (u64, u64);

struct Descriptor {
    file: File,
    /// A live [`DbLock`] of this process holds the `flock`.
    held: bool,
}

/// Every database file this process has locked, by inode.
static DESCRIPTORS: Mutex<BTreeMap<FileId, Descriptor>> = Mutex::new(BTreeMap::new());

fn descriptors() -> MutexGuard<'static, BTreeMap<FileId, Descriptor>> {
    DESCRIPTORS.lock().unwrap_or_else(PoisonError::into_inner)
}

fn file_id(meta: &Metadata) -> FileId {
    (meta.dev(), meta.ino())
}

/// The exclusive lock on one database file, released on drop.
#[derive(Debug)]
pub(crate) struct DbLock {
    id: FileId,
}

impl DbLock {
    /// Locks the database file at `path`, creating it empty if missing (an
    /// empty file is an empty SQLite database). Its contents are not read
    /// or changed.
    ///
    /// # Errors
    /// `db_error` when another manager, in this process or another one,
    /// holds the file, or when it cannot be opened or locked.
    pub(crate) fn acquire(path: &Path) -> Result<Self> {
        // Held throughout, so that no other thread registers the file
        // between the look-up and the insert.
        let mut table = descriptors();
        let known = match std::fs::metadata(path) {
            Ok(meta) => Some(file_id(&meta)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(db_error(format!("cannot open {}", path.display()), e)),
        };
        let id = match known {
            // Opening (and later closing) another descriptor of a file this
            // process already uses is exactly what must not happen.
            Some(id) if table.contains_key(&id) => id,
            _ => {
                let file = open(path)?;
                let id = match file.metadata() {
                    Ok(meta) => file_id(&meta),
                    Err(e) => {
                        std::mem::forget(file);
                        return Err(db_error(format!("cannot open {}", path.display()), e));
                    }
                };
                match table.entry(id) {
                    Entry::Vacant(slot) => {
                        slot.insert(Descriptor { file, held: false });
                    }
                    // The path was switched to a file this process already
                    // holds since the look-up: keep that descriptor, and
                    // leak this one rather than close it.
                    Entry::Occupied(_) => std::mem::forget(file),
                }
                id
            }
        };
        let Some(descriptor) = table.get_mut(&id) else {
            return Err(Error::new(
                ErrorCode::DbError,
                format!("cannot lock {}: lost its descriptor", path.display()),
            ));
        };
        if descriptor.held {
            return Err(in_use(path));
        }
        match descriptor.file.try_lock() {
            Ok(()) => {
                descriptor.held = true;
                Ok(Self { id })
            }
            Err(TryLockError::WouldBlock) => Err(in_use(path)),
            Err(TryLockError::Error(e)) => {
                Err(db_error(format!("cannot lock {}", path.display()), e))
            }
        }
    }
}

impl Drop for DbLock {
    fn drop(&mut self) {
        let mut table = descriptors();
        if let Some(descriptor) = table.get_mut(&self.id) {
            if let Err(e) = descriptor.file.unlock() {
                // Only this process can still hold it then; locking the same
                // descriptor again succeeds, so this manager's successor
                // in this process is not blocked.
                tracing::warn!(error = %e, "cannot unlock the database file");
            }
            descriptor.held = false;
        }
    }
}

/// Opens `path` read-only, or creates it empty.
fn open(path: &Path) -> Result<File> {
    match File::open(path) {
        Ok(file) => Ok(file),
        Err(e) if e.kind() == io::ErrorKind::NotFound => OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            // SQLite's own default for the files it creates.
            .mode(0o644)
            .open(path)
            .map_err(|e| db_error(format!("cannot create {}", path.display()), e)),
        Err(e) => Err(db_error(format!("cannot open {}", path.display()), e)),
    }
}

fn in_use(path: &Path) -> Error {
    Error::new(
        ErrorCode::DbError,
        format!("{} is in use by another snapshot manager", path.display()),
    )
}

fn db_error(message: String, source: io::Error) -> Error {
    Error::new(ErrorCode::DbError, message).with_source(source)
}
