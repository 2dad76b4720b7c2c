//! The size cap: after a write, least recently used entries go until the cache fits. A binary's
//! modification time is its last use (written at publication, refreshed on every disk hit), so
//! no access times are needed. Only evictors take the lock; readers never do.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::entry::{remove_if_present, Listed};
use super::scan::{all_entries, variant_dirs};
use super::sys;
use super::trust::{file_problem, Owners};

/// The lock file in the version folder; held while evicting, so that two processes never
/// evict at once. It is never removed (a process could hold the removed one).
pub(crate) const LOCK_NAME: &str = ".evict.lock";

/// What one eviction pass removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Evicted {
    pub entries: usize,
    pub bytes: u64,
}

fn total_bytes<'a>(entries: impl IntoIterator<Item = &'a Listed>) -> u64 {
    entries.into_iter().map(|e| e.disk_bytes).sum()
}

/// Removes least recently used entries of `root` until they take at most `max_bytes`, never
/// the entry whose binary is `keep` (just written: its caller was told it is stored). Nothing
/// when under the cap, or when another process holds the lock (it is evicting already).
///
/// # Errors
/// The lock file cannot be opened or locked, or an entry cannot be removed (the others still
/// are).
pub(crate) fn evict(root: &Path, uid: u32, max_bytes: u64, keep: &Path) -> io::Result<Evicted> {
    let owners = Owners::Us(uid);
    if upper_bound_bytes(root, owners) <= max_bytes {
        return Ok(Evicted::default());
    }
    let lock = open_lock(root, owners)?;
    match try_lock(&lock) {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Ok(Evicted::default()),
        Err(TryLockError::Error(e)) => return Err(e),
    }
    // Scanned again under the lock: another evictor may have made room since.
    let mut entries: Vec<Listed> = all_entries(root, owners)
        .into_iter()
        .map(|(_, _, e)| e)
        .collect();
    entries.sort_by_key(|e| e.last_used);
    let result = remove_oldest(entries, max_bytes, keep);
    drop(lock);
    result
}

// std's file locks (Rust 1.89, the workspace's MSRV) need no new dependency.
fn try_lock(file: &File) -> Result<(), TryLockError> {
    file.try_lock()
}

/// The bytes of every `.bin` and `.json` file of this user in trusted variant folders: at
/// least what the valid entries take, found from directory listings alone (no file is opened),
/// so that a write into a cache under its cap costs little.
fn upper_bound_bytes(root: &Path, owners: Owners) -> u64 {
    let mut total = 0;
    for dir in variant_dirs(root, owners) {
        if dir.trusted.is_err() {
            continue;
        }
        let Ok(files) = fs::read_dir(&dir.path) else {
            continue;
        };
        for file in files.flatten() {
            let name = file.file_name();
            let is_entry_file = name
                .to_str()
                .is_some_and(|n| n.ends_with(".bin") || n.ends_with(".json"));
            // DirEntry::metadata does not follow links.
            let Ok(meta) = file.metadata() else {
                continue;
            };
            if is_entry_file && meta.is_file() && owners.allows(meta.uid()) {
                total += meta.len();
            }
        }
    }
    total
}

/// Removes entries from the front of `oldest_first` until the rest fit in `max_bytes`.
fn remove_oldest(oldest_first: Vec<Listed>, max_bytes: u64, keep: &Path) -> io::Result<Evicted> {
    let mut total = total_bytes(&oldest_first);
    let mut evicted = Evicted::default();
    let mut first_error = None;
    for entry in oldest_first {
        if total <= max_bytes {
            break;
        }
        if entry.bin_path == keep {
            continue;
        }
        match remove_entry(&entry) {
            Ok(()) => {
                total -= entry.disk_bytes;
                evicted.entries += 1;
                evicted.bytes += entry.disk_bytes;
                tracing::debug!(path = %entry.bin_path.display(), bytes = entry.disk_bytes,
                    "evicted from the kernel cache");
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(evicted),
    }
}

/// Metadata first: from then on readers see a miss, never half an entry.
fn remove_entry(entry: &Listed) -> io::Result<()> {
    remove_if_present(&entry.meta_path)?;
    remove_if_present(&entry.bin_path)
}

/// Opens (creating it owner-only) the lock file, refusing anything but a regular file of ours.
fn open_lock(root: &Path, owners: Owners) -> io::Result<File> {
    let path = root.join(LOCK_NAME);
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).mode(0o600);
    if let Some(flags) = sys::no_follow_no_block() {
        options.custom_flags(flags);
    }
    let file = options.open(&path)?;
    match file_problem(&file.metadata()?, owners, u64::MAX) {
        Some(why) => Err(io::Error::other(format!("{}: {why}", path.display()))),
        None => Ok(file),
    }
}
