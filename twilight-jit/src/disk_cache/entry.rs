//! One entry on disk: opening its files without following links or blocking, reading them up
//! to their recorded length, verifying them, and publishing a new one.

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::sys;
use super::trust::{file_problem, kind_name, Owners};
use super::EntryMeta;
use crate::key::{CacheKey, CACHE_FORMAT};

/// Prefix of every temporary file; nothing else in the cache starts with it.
pub(crate) const TMP_PREFIX: &str = ".tmp-";

/// A metadata file is a few hundred bytes; anything far larger is not one of ours.
const MAX_META_LEN: u64 = 64 * 1024;

/// Makes temporary names unique within this process (the pid makes them unique across).
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The metadata file of an entry. Written last: its presence commits the entry.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct MetaFile {
    pub format: u32,
    pub key: String,
    pub sha256: String,
    pub len: u64,
    #[serde(flatten)]
    pub meta: EntryMeta,
    pub created: u64,
}

/// Why an entry that exists cannot be used.
#[derive(Debug)]
pub(crate) enum EntryProblem {
    Io(&'static str, io::Error),
    Invalid(String),
}

impl std::fmt::Display for EntryProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EntryProblem::Io(what, err) => write!(f, "cannot read {what}: {err}"),
            EntryProblem::Invalid(why) => f.write_str(why),
        }
    }
}

/// The two files of an entry.
pub(crate) fn entry_paths(dir: &Path, key: &CacheKey) -> (PathBuf, PathBuf) {
    let hex = key.hex();
    (
        dir.join(format!("{hex}.bin")),
        dir.join(format!("{hex}.json")),
    )
}

/// A fresh temporary name, unique across threads and processes.
pub(crate) fn tmp_name(what: &str) -> String {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{TMP_PREFIX}{}-{n}-{what}", std::process::id())
}

pub(crate) fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn sha256_hex(bytes: &[u8]) -> String {
    // A sha256 is 32 bytes, the size of a key, whose hex spelling is the one wanted.
    CacheKey::from_bytes(Sha256::digest(bytes).into()).hex()
}

/// Opens `path` for reading without following a link and without blocking on a FIFO, and
/// checks on the opened file that it is a regular file of `owners` no longer than `max_len`.
/// `Ok(None)` when there is nothing at `path`.
pub(crate) fn open_checked(
    path: &Path,
    what: &'static str,
    owners: Owners,
    max_len: u64,
) -> Result<Option<(File, Metadata)>, EntryProblem> {
    let file = match open_no_follow(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(describe_open_failure(path, what, e)),
    };
    let meta = file.metadata().map_err(|e| EntryProblem::Io(what, e))?;
    match file_problem(&meta, owners, max_len) {
        Some(why) => Err(EntryProblem::Invalid(format!("{what}: {why}"))),
        None => Ok(Some((file, meta))),
    }
}

fn open_no_follow(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    match sys::no_follow_no_block() {
        Some(flags) => {
            options.custom_flags(flags);
        }
        None => {
            // Without the flags, look first: only a regular file is opened. A swap between the
            // look and the open is caught by the fstat check after it.
            let meta = fs::symlink_metadata(path)?;
            if !meta.is_file() {
                return Err(io::Error::other(format!(
                    "it is {}",
                    kind_name(meta.file_type())
                )));
            }
        }
    }
    options.open(path)
}

/// An open that failed: a link refused by `O_NOFOLLOW` says so rather than "too many levels".
fn describe_open_failure(path: &Path, what: &'static str, error: io::Error) -> EntryProblem {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            EntryProblem::Invalid(format!("{what}: it is a symbolic link"))
        }
        _ => EntryProblem::Io(what, error),
    }
}

/// Reads at most `len + 1` bytes: enough to tell a file longer than `len`, never more.
fn read_bounded(file: &File, len: u64, what: &'static str) -> Result<Vec<u8>, EntryProblem> {
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0).min(1 << 30));
    file.take(len.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| EntryProblem::Io(what, e))?;
    Ok(bytes)
}

/// Parses and checks the metadata of `key` in `variant`'s folder.
fn read_meta_checked(
    path: &Path,
    key: &CacheKey,
    variant: &str,
    owners: Owners,
) -> Result<Option<MetaFile>, EntryProblem> {
    let Some((file, _)) = open_checked(path, "metadata", owners, MAX_META_LEN)? else {
        return Ok(None);
    };
    let bytes = read_bounded(&file, MAX_META_LEN, "metadata")?;
    let meta: MetaFile = serde_json::from_slice(&bytes)
        .map_err(|e| EntryProblem::Invalid(format!("metadata does not parse: {e}")))?;
    if meta.format != CACHE_FORMAT {
        return Err(EntryProblem::Invalid(format!(
            "metadata of format {}, expected {CACHE_FORMAT}",
            meta.format
        )));
    }
    if meta.key != key.hex() {
        return Err(EntryProblem::Invalid(format!(
            "metadata names key {}",
            meta.key
        )));
    }
    if meta.meta.variant != variant {
        return Err(EntryProblem::Invalid(format!(
            "metadata names variant {}",
            meta.meta.variant
        )));
    }
    Ok(Some(meta))
}

/// A verified entry, with the binary still open (for the caller to mark it used).
pub(crate) struct Hit {
    pub binary: Vec<u8>,
    pub file: File,
}

/// Reads and verifies one entry of `dir` (a trusted folder). `Ok(None)`: no committed entry.
pub(crate) fn read_entry(
    dir: &Path,
    key: &CacheKey,
    variant: &str,
    owners: Owners,
) -> Result<Option<Hit>, EntryProblem> {
    let (bin_path, meta_path) = entry_paths(dir, key);
    let Some(meta) = read_meta_checked(&meta_path, key, variant, owners)? else {
        if fs::symlink_metadata(&bin_path).is_ok() {
            // Either a writer died between the two renames or one is between them now.
            tracing::debug!(variant, key = %key, "binary without metadata; a miss");
        }
        return Ok(None);
    };
    let opened = open_checked(&bin_path, "binary", owners, meta.len)?;
    let Some((file, file_meta)) = opened else {
        if fs::symlink_metadata(&meta_path).is_err() {
            // Removed under us by an eviction or a clear, metadata first: a plain miss.
            return Ok(None);
        }
        return Err(EntryProblem::Invalid("metadata without binary".to_string()));
    };
    if file_meta.len() != meta.len {
        return Err(EntryProblem::Invalid(format!(
            "binary length {} differs from the recorded {} bytes",
            file_meta.len(),
            meta.len
        )));
    }
    let binary = read_bounded(&file, meta.len, "binary")?;
    if binary.len() as u64 != meta.len {
        return Err(EntryProblem::Invalid(format!(
            "binary length differs from the recorded {} bytes",
            meta.len
        )));
    }
    if sha256_hex(&binary) != meta.sha256 {
        return Err(EntryProblem::Invalid(
            "binary checksum mismatch".to_string(),
        ));
    }
    Ok(Some(Hit { binary, file }))
}

/// An entry as `list` and eviction see it: committed, of the right shape, checksum unread.
pub(crate) struct Listed {
    pub meta: MetaFile,
    pub bin_path: PathBuf,
    pub meta_path: PathBuf,
    /// Bytes of both files.
    pub disk_bytes: u64,
    /// When the binary was last written or used.
    pub last_used: SystemTime,
}

/// The entry of `key` in `dir` when it looks valid, without reading the binary.
pub(crate) fn inspect_entry(
    dir: &Path,
    key: &CacheKey,
    variant: &str,
    owners: Owners,
) -> Option<Listed> {
    let (bin_path, meta_path) = entry_paths(dir, key);
    let meta = read_meta_checked(&meta_path, key, variant, owners).ok()??;
    let meta_len = fs::symlink_metadata(&meta_path).ok()?.len();
    let bin = fs::symlink_metadata(&bin_path).ok()?;
    if file_problem(&bin, owners, meta.len).is_some() || bin.len() != meta.len {
        return None;
    }
    Some(Listed {
        disk_bytes: bin.len() + meta_len,
        last_used: bin.modified().unwrap_or(UNIX_EPOCH),
        meta,
        bin_path,
        meta_path,
    })
}

/// Writes `bytes` to a fresh temporary file in `dir`, fsyncs it and renames it to `dest`.
fn write_atomic(dir: &Path, dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(tmp_name("w"));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        // File times are coarse (a clock tick); an exact one keeps eviction's order of use.
        file.set_modified(SystemTime::now())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, dest)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Publishes one entry in `dir` (which exists): binary first, metadata (the commit marker)
/// last. On failure, the path that could not be written.
pub(crate) fn write_entry(
    dir: &Path,
    key: &CacheKey,
    meta: &EntryMeta,
    binary: &[u8],
) -> Result<(), (PathBuf, io::Error)> {
    let (bin_path, meta_path) = entry_paths(dir, key);
    let meta_file = MetaFile {
        format: CACHE_FORMAT,
        key: key.hex(),
        sha256: sha256_hex(binary),
        len: binary.len() as u64,
        meta: meta.clone(),
        created: unix_seconds(SystemTime::now()),
    };
    let json = serde_json::to_vec_pretty(&meta_file)
        .map_err(|e| (meta_path.clone(), io::Error::other(e)))?;
    write_atomic(dir, &bin_path, binary).map_err(|e| (bin_path, e))?;
    write_atomic(dir, &meta_path, &json).map_err(|e| (meta_path, e))
}

/// `Ok` when removed or already gone (another process got there first).
pub(crate) fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
