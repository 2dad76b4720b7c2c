//! The disk tier of the kernel cache: a directory of compiled kernel binaries, shared by every
//! process of the user, plus an optional read-only *seed* cache shipped with an application.
//!
//! # Layout
//!
//! ```text
//! <dir>/v<CACHE_FORMAT>/<variant>/<keyhex>.bin    the CUBIN or PTX, as NVRTC produced it
//! <dir>/v<CACHE_FORMAT>/<variant>/<keyhex>.json   metadata: format, key, sha256 and length of
//!                                                  the binary, variant, target, kind, NVRTC
//!                                                  version, options, creation time
//! ```
//!
//! The seed has the same layout (a copy of a filled cache directory works as a seed).
//!
//! # Publishing an entry
//!
//! The binary is written to a temporary file in the same directory (`.tmp-<pid>-<n>`), fsynced
//! and renamed to `<keyhex>.bin`; then the metadata is written and renamed the same way, last.
//! The metadata is the commit marker: a process killed mid-write leaves either nothing, a stray
//! `.tmp-*` file (removed by [`DiskCache::open`] or [`DiskCache::clear`] once it is an hour old),
//! or a `.bin` without metadata, which is a miss. Renames are atomic, so readers never see half
//! a file, and several threads or processes writing one key at once each publish a complete
//! entry; the last rename wins. Should two writers publish different bytes for one key, a reader
//! may pair one's metadata with the other's binary: the checksum catches it and it is a miss.
//!
//! # Failure policy
//!
//! The disk tier never fails the caller; the worst it does is make the caller compile again.
//!
//! - **Reading**: an unreadable, unparsable or mismatching entry (metadata of another key or
//!   format, binary of another length or checksum, metadata without binary) warns
//!   (`tracing::warn!`, "... recompiling") and is a miss. A missing entry, or a binary without
//!   metadata, is a quiet miss.
//! - **Loading**: when the driver refuses a binary that passed those checks, the caller calls
//!   [`DiskCache::invalidate`], which warns and removes the writable entry; a seed entry is then
//!   skipped for the rest of the process.
//! - **Writing**: [`DiskCache::put`] returns nothing. A directory that cannot be created or
//!   written when the cache is opened, or the first write that fails later, warns once and turns
//!   writing off for the life of the `DiskCache`: the caller keeps its in-memory kernel and the
//!   process carries on memory-only, with one warning rather than one per kernel. A directory
//!   that could not be created is not read either; one that exists but is read-only still is.
//! - **Names**: a variant must be a canonical name (`[a-z0-9_]+`, as `VariantSpec::name` spells
//!   it); anything else warns and is a miss, so no name can reach outside the cache directory.
//!
//! # Permissions
//!
//! Cached binaries are code this process will run, so the cache directory is owner-only: it is
//! created with mode `0o700`, and an existing one with group or other permission bits is
//! tightened to `0o700` when this user owns it (a warning when that fails).

use std::collections::HashSet;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::key::{CacheKey, CACHE_FORMAT};

/// Longest accepted variant name; well under the usual 255-byte file name limit.
const MAX_VARIANT_LEN: usize = 200;

/// A temporary file older than this belongs to a writer that died.
const STALE_TMP_AGE: Duration = Duration::from_secs(60 * 60);

/// Prefix of every temporary file; nothing else in the cache starts with it.
const TMP_PREFIX: &str = ".tmp-";

/// Makes temporary names unique within this process (the pid makes them unique across).
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// What kind of binary an entry holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BinaryKind {
    /// A CUBIN for one `sm_XY`.
    Cubin,
    /// PTX, for a target NVRTC cannot build a CUBIN for; the driver JIT-compiles it.
    Ptx,
}

/// What the caller knows about a binary it stores, written into the entry's metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryMeta {
    /// Canonical variant name; also the entry's folder.
    pub variant: String,
    /// `sm_XY` or `compute_XY`.
    pub target: String,
    pub kind: BinaryKind,
    pub nvrtc_version: (i32, i32),
    /// NVRTC options, in order.
    pub options: Vec<String>,
}

/// One entry of the writable cache, as [`DiskCache::list`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryInfo {
    pub variant: String,
    /// Its hex spelling is the file stem.
    pub key: CacheKey,
    /// Length of the binary in bytes.
    pub size: u64,
    pub kind: BinaryKind,
    pub target: String,
    pub nvrtc_version: (i32, i32),
    /// Unix seconds at which the entry was written.
    pub created: u64,
    /// Path of the `.bin` file.
    pub path: PathBuf,
}

/// The metadata file of an entry. Written last: its presence commits the entry.
#[derive(Debug, Serialize, Deserialize)]
struct MetaFile {
    format: u32,
    key: String,
    sha256: String,
    len: u64,
    #[serde(flatten)]
    meta: EntryMeta,
    created: u64,
}

/// Why an entry that exists cannot be used.
enum EntryProblem {
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

/// The disk tier. `Send + Sync`: share one per process.
#[derive(Debug)]
pub struct DiskCache {
    /// The writable cache directory as configured.
    dir: Option<PathBuf>,
    /// `<dir>/v<CACHE_FORMAT>` when the directory exists and can be read.
    root: Option<PathBuf>,
    /// The seed directory as configured.
    seed: Option<PathBuf>,
    /// `<seed>/v<CACHE_FORMAT>`.
    seed_root: Option<PathBuf>,
    /// Cleared, with the one warning, the first time writing fails.
    writable: AtomicBool,
    /// Keys the driver refused to load; their seed entries are skipped.
    refused: Mutex<HashSet<CacheKey>>,
}

impl DiskCache {
    /// Opens the cache. `dir` is the writable cache (`None` turns the disk cache off); `seed` is
    /// a read-only cache consulted first and never written.
    ///
    /// Never fails: a `dir` that cannot be created or written leaves the cache memory-only (plus
    /// the seed) with one warning. Creates `dir` with mode `0o700`, tightens an existing one
    /// that has group or other bits when this user owns it, and removes temporary files older
    /// than an hour.
    pub fn open(dir: Option<PathBuf>, seed: Option<PathBuf>) -> DiskCache {
        let seed_root = seed.as_ref().map(|s| s.join(format_dir_name()));
        let mut cache = DiskCache {
            dir: dir.clone(),
            root: None,
            seed,
            seed_root,
            writable: AtomicBool::new(false),
            refused: Mutex::new(HashSet::new()),
        };
        let Some(dir) = dir else {
            return cache;
        };
        let root = dir.join(format_dir_name());
        if let Err(err) = create_private_dir(&root) {
            tracing::warn!(
                dir = %dir.display(),
                error = %err,
                "cannot create the kernel cache directory; compiled kernels are kept in memory only"
            );
            return cache;
        }
        cache.root = Some(root.clone());
        match probe_owner(&root) {
            Ok(our_uid) => {
                tighten_permissions(&dir, our_uid);
                cache.writable.store(true, Ordering::Relaxed);
                remove_stale_tmp(&root);
            }
            Err(err) => {
                tracing::warn!(
                    dir = %dir.display(),
                    error = %err,
                    "the kernel cache directory is not writable; compiled kernels are kept in memory only"
                );
            }
        }
        cache
    }

    /// Whether [`DiskCache::put`] still writes to disk.
    pub fn is_writable(&self) -> bool {
        self.writable.load(Ordering::Relaxed)
    }

    /// The writable cache directory as configured (see [`DiskCache::is_writable`] for whether
    /// it is in use).
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The read-only seed directory as configured.
    pub fn seed_dir(&self) -> Option<&Path> {
        self.seed.as_deref()
    }

    /// The cached binary of `key`, from the seed first, then the writable directory; verified
    /// against its metadata (format, key, variant, length, sha256). Any mismatch or read error
    /// warns and is a miss, so the caller recompiles.
    pub fn get(&self, key: &CacheKey, variant: &str) -> Option<Vec<u8>> {
        if !valid_variant(variant) {
            warn_bad_variant(variant);
            return None;
        }
        let skip_seed = self.refused_contains(key);
        let roots = [
            self.seed_root.as_deref().filter(|_| !skip_seed),
            self.root.as_deref(),
        ];
        for root in roots.into_iter().flatten() {
            let dir = root.join(variant);
            match read_entry(&dir, key, variant) {
                Ok(Some(binary)) => {
                    tracing::debug!(variant, key = %key, dir = %dir.display(), "disk cache hit");
                    return Some(binary);
                }
                Ok(None) => {}
                Err(problem) => {
                    tracing::warn!(
                        variant,
                        key = %key,
                        dir = %dir.display(),
                        "cached kernel is unusable ({problem}); recompiling"
                    );
                }
            }
        }
        None
    }

    /// Stores `binary` as the entry of `key`. Returns nothing: when the write fails it warns
    /// (once for the life of the cache) and the disk tier goes memory-only; the caller keeps
    /// the kernel it has.
    pub fn put(&self, key: &CacheKey, meta: &EntryMeta, binary: &[u8]) {
        if !self.is_writable() {
            return;
        }
        let Some(root) = self.root.as_deref() else {
            return;
        };
        if !valid_variant(&meta.variant) {
            warn_bad_variant(&meta.variant);
            return;
        }
        let dir = root.join(&meta.variant);
        let mut result = write_entry(&dir, key, meta, binary);
        if matches!(&result, Err(e) if e.kind() == io::ErrorKind::NotFound) {
            // Another process's `clear` may have removed the variant folder under us.
            result = write_entry(&dir, key, meta, binary);
        }
        match result {
            Ok(()) => {
                tracing::debug!(variant = %meta.variant, key = %key, "kernel written to disk cache");
            }
            Err(err) => {
                if self.writable.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        variant = %meta.variant,
                        key = %key,
                        dir = %dir.display(),
                        error = %err,
                        "cannot write to the kernel cache; compiled kernels are kept in memory only from now on"
                    );
                }
            }
        }
    }

    /// Called when the driver refuses to load a binary that passed the checks of
    /// [`DiskCache::get`]: warns, removes the writable entry (errors ignored) and skips the
    /// seed's entry of `key` for the rest of the process.
    pub fn invalidate(&self, key: &CacheKey, variant: &str) {
        if !valid_variant(variant) {
            warn_bad_variant(variant);
            return;
        }
        tracing::warn!(
            variant,
            key = %key,
            "the driver refused a cached kernel; removing the entry and recompiling"
        );
        self.refused
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(*key);
        if let Some(root) = &self.root {
            let dir = root.join(variant);
            let hex = key.hex();
            // Metadata first: once it is gone the entry is a miss, whatever happens next.
            let _ = fs::remove_file(dir.join(format!("{hex}.json")));
            let _ = fs::remove_file(dir.join(format!("{hex}.bin")));
        }
    }

    /// Every entry of the writable directory that looks valid (metadata parses and agrees with
    /// its file name, binary present with the recorded length; the checksum is not read),
    /// sorted by variant then key. Empty when there is no readable directory.
    pub fn list(&self) -> Vec<EntryInfo> {
        let Some(root) = &self.root else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (variant, variant_dir) in variant_dirs(root) {
            let Ok(files) = fs::read_dir(&variant_dir) else {
                continue;
            };
            for file in files.flatten() {
                let name = file.file_name();
                let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                    continue;
                };
                let Some(key) = CacheKey::from_hex(hex) else {
                    continue;
                };
                let Some(meta) = read_meta(&file.path()) else {
                    continue;
                };
                if meta.format != CACHE_FORMAT || meta.key != hex || meta.meta.variant != variant {
                    continue;
                }
                let bin = variant_dir.join(format!("{hex}.bin"));
                match fs::metadata(&bin) {
                    Ok(m) if m.is_file() && m.len() == meta.len => {}
                    _ => continue,
                }
                out.push(EntryInfo {
                    variant: variant.clone(),
                    key,
                    size: meta.len,
                    kind: meta.meta.kind,
                    target: meta.meta.target,
                    nvrtc_version: meta.meta.nvrtc_version,
                    created: meta.created,
                    path: bin,
                });
            }
        }
        out.sort_by(|a, b| (&a.variant, a.key).cmp(&(&b.variant, b.key)));
        out
    }

    /// Removes the entries of the writable directory (never the seed), including binaries
    /// without metadata and temporary files older than an hour, and returns how many entries
    /// (distinct keys) it removed. Empty variant folders are removed too.
    ///
    /// # Errors
    /// The first error reading the directory or removing a file, other than a file that
    /// another process removed first. `Ok(0)` when the disk cache is off.
    pub fn clear(&self) -> io::Result<usize> {
        let Some(root) = &self.root else {
            return Ok(0);
        };
        let entries = match fs::read_dir(root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry?;
            let Some(variant) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !valid_variant(&variant) || !entry.file_type()?.is_dir() {
                continue;
            }
            removed += clear_variant_dir(&entry.path())?;
        }
        Ok(removed)
    }

    fn refused_contains(&self, key: &CacheKey) -> bool {
        self.refused
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(key)
    }
}

/// `v<CACHE_FORMAT>`.
fn format_dir_name() -> String {
    format!("v{CACHE_FORMAT}")
}

/// Whether `variant` is a canonical name: `[a-z0-9_]+`, not too long.
fn valid_variant(variant: &str) -> bool {
    !variant.is_empty()
        && variant.len() <= MAX_VARIANT_LEN
        && variant
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

fn warn_bad_variant(variant: &str) {
    tracing::warn!(
        variant,
        "not a canonical variant name (only [a-z0-9_] allowed); the disk cache is skipped"
    );
}

/// `create_dir_all` with mode `0o700` for every folder it creates.
fn create_private_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(path)
}

/// A fresh temporary name, unique across threads and processes.
fn tmp_name(what: &str) -> String {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{TMP_PREFIX}{}-{n}-{what}", std::process::id())
}

/// Checks that `root` can be written by creating and removing a file there, and returns the
/// uid that owns what this process creates.
fn probe_owner(root: &Path) -> io::Result<u32> {
    let probe = root.join(tmp_name("probe"));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe)?;
    let uid = file.metadata().map(|m| m.uid());
    drop(file);
    let removed = fs::remove_file(&probe);
    let uid = uid?;
    removed?;
    Ok(uid)
}

/// Sets `dir` to `0o700` when it has group or other bits and `our_uid` owns it.
fn tighten_permissions(dir: &Path, our_uid: u32) {
    let Ok(meta) = fs::metadata(dir) else {
        return;
    };
    let mode = meta.permissions().mode();
    if mode & 0o077 == 0 || meta.uid() != our_uid {
        return;
    }
    match fs::set_permissions(dir, fs::Permissions::from_mode(0o700)) {
        Ok(()) => tracing::info!(
            dir = %dir.display(),
            old_mode = format_args!("{:o}", mode & 0o7777),
            "kernel cache directory tightened to owner-only (0700)"
        ),
        Err(err) => tracing::warn!(
            dir = %dir.display(),
            mode = format_args!("{:o}", mode & 0o7777),
            error = %err,
            "kernel cache directory is readable or writable by others and could not be tightened"
        ),
    }
}

/// `(variant, path)` of every variant folder under `root`.
fn variant_dirs(root: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            valid_variant(&name).then(|| (name, e.path()))
        })
        .collect()
}

/// Whether a directory entry is a temporary file old enough to belong to a dead writer.
fn is_stale_tmp(entry: &fs::DirEntry) -> bool {
    let is_tmp = entry
        .file_name()
        .to_str()
        .is_some_and(|n| n.starts_with(TMP_PREFIX));
    is_tmp
        && entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > STALE_TMP_AGE)
}

/// Removes stale temporary files under `root`, ignoring errors.
fn remove_stale_tmp(root: &Path) {
    for (_, dir) in variant_dirs(root) {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if is_stale_tmp(&entry) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// `Ok` when removed or already gone.
fn remove_if_present(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes the entries of one variant folder; see [`DiskCache::clear`].
fn clear_variant_dir(dir: &Path) -> io::Result<usize> {
    let mut stems = HashSet::new();
    let mut stale = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if let Some(hex) = name
            .strip_suffix(".json")
            .or_else(|| name.strip_suffix(".bin"))
        {
            if CacheKey::from_hex(hex).is_some() {
                stems.insert(hex.to_owned());
            }
        } else if is_stale_tmp(&entry) {
            stale.push(entry.path());
        }
    }
    let mut removed = 0;
    for hex in &stems {
        // Metadata first, so that a concurrent reader sees a miss, never a binary in flux.
        let json = remove_if_present(&dir.join(format!("{hex}.json")))?;
        let bin = remove_if_present(&dir.join(format!("{hex}.bin")))?;
        if json || bin {
            removed += 1;
        }
    }
    for path in stale {
        remove_if_present(&path)?;
    }
    // Fails (harmlessly) when something is left or another process is writing into it.
    let _ = fs::remove_dir(dir);
    Ok(removed)
}

fn sha256_hex(bytes: &[u8]) -> String {
    // A sha256 is 32 bytes, the size of a key, whose hex spelling is the one wanted.
    CacheKey::from_bytes(Sha256::digest(bytes).into()).hex()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Parses a metadata file, `None` on any failure.
fn read_meta(path: &Path) -> Option<MetaFile> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// Reads and verifies one entry. `Ok(None)`: no committed entry (no metadata file).
fn read_entry(dir: &Path, key: &CacheKey, variant: &str) -> Result<Option<Vec<u8>>, EntryProblem> {
    let hex = key.hex();
    let meta_path = dir.join(format!("{hex}.json"));
    let meta_bytes = match fs::read(&meta_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if dir.join(format!("{hex}.bin")).exists() {
                // Either a writer died between the two renames or one is between them now.
                tracing::debug!(variant, key = %key, "binary without metadata; a miss");
            }
            return Ok(None);
        }
        // Something that is not a folder where the variant's folder belongs holds no entry;
        // the write that meets it warns.
        Err(_) if !dir.is_dir() => return Ok(None),
        Err(e) => return Err(EntryProblem::Io("metadata", e)),
    };
    let meta: MetaFile = serde_json::from_slice(&meta_bytes)
        .map_err(|e| EntryProblem::Invalid(format!("metadata does not parse: {e}")))?;
    if meta.format != CACHE_FORMAT {
        return Err(EntryProblem::Invalid(format!(
            "metadata of format {}, expected {CACHE_FORMAT}",
            meta.format
        )));
    }
    if meta.key != hex {
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
    let mut binary = Vec::new();
    let file =
        File::open(dir.join(format!("{hex}.bin"))).map_err(|e| EntryProblem::Io("binary", e))?;
    // Read one byte past the recorded length at most: a longer file is wrong either way.
    file.take(meta.len.saturating_add(1))
        .read_to_end(&mut binary)
        .map_err(|e| EntryProblem::Io("binary", e))?;
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
    Ok(Some(binary))
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
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, dest)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Publishes one entry: binary first, metadata (the commit marker) last.
fn write_entry(dir: &Path, key: &CacheKey, meta: &EntryMeta, binary: &[u8]) -> io::Result<()> {
    create_private_dir(dir)?;
    let hex = key.hex();
    let meta_file = MetaFile {
        format: CACHE_FORMAT,
        key: hex.clone(),
        sha256: sha256_hex(binary),
        len: binary.len() as u64,
        meta: meta.clone(),
        created: unix_now(),
    };
    let json = serde_json::to_vec_pretty(&meta_file).map_err(io::Error::other)?;
    write_atomic(dir, &dir.join(format!("{hex}.bin")), binary)?;
    write_atomic(dir, &dir.join(format!("{hex}.json")), &json)
}
