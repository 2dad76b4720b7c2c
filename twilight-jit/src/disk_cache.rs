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
//! <dir>/v<CACHE_FORMAT>/.evict.lock               held (flock) while evicting
//! ```
//!
//! The seed has the same layout (a copy of a filled cache directory works as a seed).
//!
//! # Publishing an entry
//!
//! The binary is written to a temporary file in the same directory (`.tmp-<pid>-<n>`), fsynced
//! and renamed to `<keyhex>.bin`; then the metadata is written and renamed the same way, last.
//! The metadata is the commit marker: a process killed mid-write leaves either nothing, a stray
//! `.tmp-*` file (removed by the first write of a later process once it is an hour old, or by
//! [`DiskCache::clear_report`] at any age), or a `.bin` without metadata, which is a miss.
//! Renames are atomic, so readers never see half a file, and several threads or processes
//! writing one key at once each publish a complete entry; the last rename wins. Should two
//! writers publish different bytes for one key, a reader may pair one's metadata with the
//! other's binary: the checksum catches it and it is a miss.
//!
//! # Safety on shared machines
//!
//! Cached binaries are code this process will run, so only what this user controls is trusted:
//!
//! - **Directories.** The cache directory, its `v<CACHE_FORMAT>` folder and each variant folder
//!   must be directories owned by this user (the seed's: by this user or root) that neither
//!   group nor others can write to. A directory that fails is not used at all: the cache runs
//!   memory-only with one warning naming the path and why ([`DiskStatus::Refused`]); a variant
//!   folder that fails is skipped with one warning. Decisions are made on the link, not its
//!   target (`symlink_metadata`): the configured directory may be a link owned by this user
//!   (its target is then checked too); below it, twilight never creates links and uses none.
//! - **No changes by reading.** Opening the cache, lookups and [`DiskCache::list`] create
//!   nothing and change no mode; the only change a lookup makes is refreshing the modification
//!   time of a binary it hit (its last use, for eviction). Twilight changes the mode of no
//!   directory: those it creates are created owner-only (`0o700`), files `0o600`.
//! - **Entries** are opened with `O_NOFOLLOW | O_NONBLOCK` (a link is refused, a FIFO cannot
//!   hang the lookup) and checked on the opened file: a regular file owned by this user (seed:
//!   or root), of the recorded length, read up to that length and no further. Anything else is
//!   a corrupt entry: one warning, a miss, and the next write replaces it (a directory in the
//!   way is removed or renamed aside when this user owns it).
//!
//! # Size cap
//!
//! After each write, when the entries take more than the cap (`TWILIGHT_CACHE_MAX_BYTES`,
//! default 2 GiB) the least recently used go, metadata before binary so that no reader sees
//! half an entry, until the rest fit. A binary's modification time is its last use: set when
//! written and refreshed on each disk hit. One process evicts at a time (a `flock` on
//! `.evict.lock`); readers never lock.
//!
//! # Failure policy
//!
//! The disk tier never fails a lookup; the worst it does is make the caller compile again.
//!
//! - **Reading**: a corrupt entry (see above), or one whose metadata is of another key, format
//!   or variant, or whose binary has another length or checksum, warns once (`tracing::warn!`,
//!   "... recompiling") and is a miss. A missing entry, or a binary without metadata, is a
//!   quiet miss.
//! - **Loading**: when the driver refuses a binary that passed those checks, the caller calls
//!   [`DiskCache::invalidate`], which warns and removes the writable entry; a seed entry is then
//!   skipped for the rest of the process.
//! - **Writing**: [`DiskCache::put`] says whether the entry was stored ([`StoreError`] when
//!   not), so that a tool like `precompile` can fail naming what it could not keep; the
//!   library's callers warn and carry on. A cache directory that cannot be created or written
//!   warns once and turns writing off for the life of the `DiskCache` (each later `put` returns
//!   the reason at once); reading goes on where the directory exists. Something in the way of
//!   one variant or entry (a file where its folder belongs, a directory where an entry belongs)
//!   is removed when this user owns it; otherwise that variant's writes fail, with one warning,
//!   and the others go on.
//! - **Names**: a variant must be a canonical name (`[a-z0-9_]+`, as `VariantSpec::name` spells
//!   it); anything else warns and is a miss, so no name can reach outside the cache directory.

mod clear;
mod entry;
mod evict;
mod report;
mod scan;
mod sys;
mod trust;

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

pub use clear::{ClearError, ClearFailure, ClearReport};
pub use report::{check_cache, CacheLocation, CacheReport, SeedLocation, SeedReport, SeedStatus};
pub use trust::Refusal;

use crate::env::{DiskOff, JitEnv};
use crate::key::{CacheKey, CACHE_FORMAT};
use entry::{entry_paths, read_entry, tmp_name, write_entry, Hit, TMP_PREFIX};
use trust::{check_ancestors, check_dir, owner_can_write, DirState, Links, Owners};

/// Longest accepted variant name; well under the usual 255-byte file name limit.
const MAX_VARIANT_LEN: usize = 200;

/// A temporary file older than this belongs to a writer that died.
const STALE_TMP_AGE: Duration = Duration::from_secs(60 * 60);

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
    /// Unix seconds of its last write or disk hit (what eviction goes by).
    pub last_used: u64,
    /// Path of the `.bin` file.
    pub path: PathBuf,
}

/// What the writable cache directory is good for.
#[derive(Clone, Debug)]
pub enum DiskStatus {
    /// Read and written.
    Ready,
    /// Does not exist yet; the first write creates it owner-only.
    NotCreated,
    /// No directory: the disk cache is off (the seed, if any, is still read).
    Off(DiskOff),
    /// Not used at all, neither read nor written: it cannot be trusted.
    Refused(Refusal),
    /// Not written (read where it exists): why.
    NotWritable(String),
}

impl DiskStatus {
    /// Whether a write is expected to work.
    pub fn is_writable(&self) -> bool {
        matches!(self, DiskStatus::Ready | DiskStatus::NotCreated)
    }

    /// Whether something is wrong (as opposed to working, or turned off on purpose).
    pub fn is_problem(&self) -> bool {
        matches!(self, DiskStatus::Refused(_) | DiskStatus::NotWritable(_))
    }
}

impl fmt::Display for DiskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskStatus::Ready => f.write_str("ready"),
            DiskStatus::NotCreated => {
                f.write_str("not created yet; the first write creates it owner-only")
            }
            DiskStatus::Off(off) => write!(f, "{off}"),
            DiskStatus::Refused(refusal) => write!(f, "refused: {refusal}"),
            DiskStatus::NotWritable(why) => write!(f, "not writable: {why}"),
        }
    }
}

/// Why [`DiskCache::put`] did not store an entry.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the disk cache is {0}")]
    Off(DiskOff),
    #[error("the kernel cache directory is refused: {0}")]
    Refused(Refusal),
    #[error("the kernel cache directory is not writable: {0}")]
    NotWritable(String),
    #[error("`{0}` is not a canonical variant name")]
    BadVariant(String),
    #[error("the variant's cache folder is refused: {0}")]
    VariantRefused(Refusal),
    #[error("{} is in the way and cannot be removed: {why}", path.display())]
    Blocked { path: PathBuf, why: String },
    #[error("cannot write {}: {error}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        error: Arc<io::Error>,
    },
}

impl StoreError {
    /// The error of a put while the cache is in `status`; `None` when writing is possible.
    fn of_status(status: &DiskStatus) -> Option<StoreError> {
        match status {
            DiskStatus::Ready | DiskStatus::NotCreated => None,
            DiskStatus::Off(off) => Some(StoreError::Off(*off)),
            DiskStatus::Refused(refusal) => Some(StoreError::Refused(refusal.clone())),
            DiskStatus::NotWritable(why) => Some(StoreError::NotWritable(why.clone())),
        }
    }
}

/// Everything [`DiskCache::open_with`] needs.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    /// The writable cache directory, or why there is none.
    pub dir: Result<PathBuf, DiskOff>,
    /// A read-only cache consulted first and never written.
    pub seed: Option<PathBuf>,
    /// The size cap of the writable directory's entries.
    pub max_bytes: u64,
}

impl DiskConfig {
    /// The configuration the environment asks for.
    pub fn from_env(env: &JitEnv) -> DiskConfig {
        DiskConfig {
            dir: env
                .cache_dir
                .clone()
                .ok_or(env.disk_off.unwrap_or(DiskOff::NotConfigured)),
            seed: env.seed_cache_dir.clone(),
            max_bytes: env.cache_max_bytes,
        }
    }
}

/// The disk tier. `Send + Sync`: share one per process.
#[derive(Debug)]
pub struct DiskCache {
    /// The writable cache directory as configured.
    dir: Option<PathBuf>,
    /// `<dir>/v<CACHE_FORMAT>` unless the directory was refused or cannot be reached.
    root: Option<PathBuf>,
    /// The seed directory as configured.
    seed: Option<PathBuf>,
    /// `<seed>/v<CACHE_FORMAT>` unless the seed was refused.
    seed_root: Option<PathBuf>,
    seed_refusal: Option<Refusal>,
    uid: u32,
    max_bytes: u64,
    /// Degrades at most once, from ready (or not created) to not writable, with the warning.
    status: Mutex<DiskStatus>,
    /// Whether the stale temporary files were swept (once, by the first write).
    swept: AtomicBool,
    /// Paths already warned about; each is warned about once.
    warned: Mutex<HashSet<PathBuf>>,
    /// Keys the driver refused to load; their seed entries are skipped.
    refused: Mutex<HashSet<CacheKey>>,
}

/// Locks a mutex whose data stays consistent even if a holder panicked.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl DiskCache {
    /// Opens the cache with the size cap of the environment. `dir` is the writable cache
    /// (`None` turns the disk cache off); `seed` is a read-only cache consulted first and never
    /// written. See [`DiskCache::open_with`].
    pub fn open(dir: Option<PathBuf>, seed: Option<PathBuf>) -> DiskCache {
        DiskCache::open_with(DiskConfig {
            dir: dir.ok_or(DiskOff::NotConfigured),
            seed,
            max_bytes: JitEnv::get().cache_max_bytes,
        })
    }

    /// Opens the cache the environment asks for ([`DiskConfig::from_env`]).
    pub fn from_env(env: &JitEnv) -> DiskCache {
        DiskCache::open_with(DiskConfig::from_env(env))
    }

    /// Opens the cache. Never fails and changes nothing on disk: a directory that cannot be
    /// trusted or written leaves the cache memory-only (plus the seed) with one warning; a
    /// missing one is created by the first write.
    pub fn open_with(config: DiskConfig) -> DiskCache {
        let uid = sys::effective_uid();
        let (seed_root, seed_refusal) = match &config.seed {
            Some(seed) => inspect_seed(seed, uid),
            None => (None, None),
        };
        let (dir, root, status) = match config.dir {
            Ok(dir) => {
                let (root, status) = inspect_dir(&dir, uid);
                (Some(dir), root, status)
            }
            Err(off) => (None, None, DiskStatus::Off(off)),
        };
        let cache = DiskCache {
            dir,
            root,
            seed: config.seed,
            seed_root,
            seed_refusal,
            uid,
            max_bytes: config.max_bytes,
            status: Mutex::new(status),
            swept: AtomicBool::new(false),
            warned: Mutex::new(HashSet::new()),
            refused: Mutex::new(HashSet::new()),
        };
        cache.warn_at_open();
        cache
    }

    fn warn_at_open(&self) {
        let status = self.status();
        if let (Some(dir), true) = (&self.dir, status.is_problem()) {
            tracing::warn!(
                dir = %dir.display(),
                "kernel cache directory {status}; compiled kernels are kept in memory only"
            );
        }
        if let (Some(seed), Some(refusal)) = (&self.seed, &self.seed_refusal) {
            tracing::warn!(
                dir = %seed.display(),
                "seed kernel cache refused: {refusal}; it is not read"
            );
        }
    }

    /// What the writable directory is good for, now.
    pub fn status(&self) -> DiskStatus {
        lock(&self.status).clone()
    }

    /// Whether [`DiskCache::put`] is expected to write to disk.
    pub fn is_writable(&self) -> bool {
        self.status().is_writable()
    }

    /// The writable cache directory as configured (see [`DiskCache::status`] for whether it
    /// is in use).
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The read-only seed directory as configured.
    pub fn seed_dir(&self) -> Option<&Path> {
        self.seed.as_deref()
    }

    /// The size cap of the writable directory's entries, in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The directories with what each is good for (what `twilight cache path` shows).
    pub fn location(&self) -> CacheLocation {
        CacheLocation {
            dir: self.dir.clone(),
            status: self.status(),
            seed: self.seed.as_ref().map(|dir| SeedLocation {
                dir: dir.clone(),
                status: self.seed_status(),
            }),
        }
    }

    fn seed_status(&self) -> SeedStatus {
        match (&self.seed_refusal, &self.seed_root) {
            (Some(refusal), _) => SeedStatus::Refused(refusal.clone()),
            (None, Some(root)) if root.is_dir() => SeedStatus::Ready,
            _ => SeedStatus::Missing,
        }
    }

    /// The cached binary of `key`, from the seed first, then the writable directory; verified
    /// against its metadata (format, key, variant, length, sha256). Anything wrong warns (once
    /// per entry) and is a miss, so the caller recompiles. A hit in the writable directory
    /// refreshes the binary's modification time (its last use).
    pub fn get(&self, key: &CacheKey, variant: &str) -> Option<Vec<u8>> {
        if !valid_variant(variant) {
            warn_bad_variant(variant);
            return None;
        }
        if !self.refused_contains(key) {
            if let Some(seed_root) = &self.seed_root {
                let owners = Owners::UsOrRoot(self.uid);
                if let Some(hit) = self.lookup(seed_root, variant, key, owners) {
                    return Some(hit.binary);
                }
            }
        }
        let root = self.root.as_deref()?;
        let hit = self.lookup(root, variant, key, Owners::Us(self.uid))?;
        mark_used(&hit, variant, key);
        Some(hit.binary)
    }

    fn lookup(&self, root: &Path, variant: &str, key: &CacheKey, owners: Owners) -> Option<Hit> {
        let dir = root.join(variant);
        match check_dir(&dir, owners, Links::Refuse) {
            Ok(DirState::Present) => {}
            Ok(DirState::Absent) => return None,
            Err(refusal) => {
                self.warn_once(&dir, || {
                    tracing::warn!(
                        variant,
                        "kernel cache folder refused: {refusal}; recompiling"
                    );
                });
                return None;
            }
        }
        match read_entry(&dir, key, variant, owners) {
            Ok(Some(hit)) => {
                tracing::debug!(variant, key = %key, dir = %dir.display(), "disk cache hit");
                Some(hit)
            }
            Ok(None) => None,
            Err(problem) => {
                let (_, meta_path) = entry_paths(&dir, key);
                self.warn_once(&meta_path, || {
                    tracing::warn!(
                        variant,
                        key = %key,
                        dir = %dir.display(),
                        "cached kernel is unusable ({problem}); recompiling"
                    );
                });
                None
            }
        }
    }

    /// Stores `binary` as the entry of `key`, then evicts least recently used entries while
    /// the cache is over its cap (never this one).
    ///
    /// # Errors
    /// Why the entry was not stored. A failure of the directory itself also warns (once for
    /// the life of the cache) and turns writing off; the caller keeps the kernel it has.
    pub fn put(&self, key: &CacheKey, meta: &EntryMeta, binary: &[u8]) -> Result<(), StoreError> {
        if !valid_variant(&meta.variant) {
            warn_bad_variant(&meta.variant);
            return Err(StoreError::BadVariant(meta.variant.clone()));
        }
        let root = self.writable_root()?;
        let dir = self.variant_dir_for_write(root, &meta.variant)?;
        let (bin_path, meta_path) = entry_paths(&dir, key);
        self.clear_the_way(&bin_path)?;
        self.clear_the_way(&meta_path)?;
        let mut written = write_entry(&dir, key, meta, binary);
        if matches!(&written, Err((_, e)) if e.kind() == io::ErrorKind::NotFound) {
            // Another process's clear may have removed the variant folder under us.
            let dir = self.variant_dir_for_write(root, &meta.variant)?;
            written = write_entry(&dir, key, meta, binary);
        }
        if let Err((path, error)) = written {
            return Err(self.stop_writing(path, error));
        }
        tracing::debug!(variant = %meta.variant, key = %key, "kernel written to disk cache");
        // A fresh entry may be damaged again later; that deserves a warning again.
        lock(&self.warned).remove(&meta_path);
        self.enforce_cap(root, &bin_path);
        Ok(())
    }

    /// The version folder, creating the directories on the first write.
    fn writable_root(&self) -> Result<&Path, StoreError> {
        let mut status = lock(&self.status);
        if matches!(*status, DiskStatus::NotCreated) {
            if let Err(failed) = self.create_root() {
                if let Some(dir) = &self.dir {
                    tracing::warn!(
                        dir = %dir.display(),
                        "kernel cache directory {failed}; compiled kernels are kept in memory only"
                    );
                }
                *status = failed;
            } else {
                *status = DiskStatus::Ready;
            }
        }
        if let Some(error) = StoreError::of_status(&status) {
            return Err(error);
        }
        drop(status);
        let root = self
            .root
            .as_deref()
            .ok_or_else(|| StoreError::NotWritable("no cache directory".to_string()))?;
        if !self.swept.swap(true, Ordering::Relaxed) {
            remove_stale_tmp(root, self.uid);
        }
        Ok(root)
    }

    /// Creates the cache directory and its version folder, owner-only, one level at a time so
    /// that a link planted meanwhile is found rather than followed.
    fn create_root(&self) -> Result<(), DiskStatus> {
        let (Some(dir), Some(root)) = (&self.dir, &self.root) else {
            return Err(DiskStatus::NotWritable("no cache directory".to_string()));
        };
        let not_writable = |path: &Path, e: io::Error| {
            DiskStatus::NotWritable(format!("cannot create {}: {e}", path.display()))
        };
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| not_writable(parent, e))?;
        }
        create_private_dir(dir).map_err(|e| not_writable(dir, e))?;
        check_dir(dir, Owners::Us(self.uid), Links::FollowOwn).map_err(DiskStatus::Refused)?;
        create_private_dir(root).map_err(|e| not_writable(root, e))?;
        match inspect_dir(dir, self.uid) {
            (_, DiskStatus::Ready) => Ok(()),
            (_, status) => Err(status),
        }
    }

    /// The variant's folder, ready for writing: created when missing, replaced when something
    /// of this user's that is not a folder is in its place.
    fn variant_dir_for_write(&self, root: &Path, variant: &str) -> Result<PathBuf, StoreError> {
        let dir = root.join(variant);
        match check_dir(&dir, Owners::Us(self.uid), Links::Refuse) {
            Ok(DirState::Present) => return Ok(dir),
            Ok(DirState::Absent) => {}
            Err(Refusal::NotADirectory { .. } | Refusal::Link { .. }) if self.owns(&dir) => {
                self.remove_in_the_way(&dir, fs::remove_file(&dir))?;
            }
            // Not even the version folder can be read: the whole cache is in trouble.
            Err(Refusal::Inaccessible { error, .. }) => {
                return Err(self.stop_writing(dir, io::Error::new(error.kind(), error.to_string())))
            }
            Err(refusal) => return Err(self.refuse_variant(&dir, refusal)),
        }
        match create_private_dir(&dir) {
            Ok(()) => Ok(dir),
            // Another writer created it first; check what it is.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                match check_dir(&dir, Owners::Us(self.uid), Links::Refuse) {
                    Ok(_) => Ok(dir),
                    Err(refusal) => Err(self.refuse_variant(&dir, refusal)),
                }
            }
            Err(e) => Err(self.stop_writing(dir, e)),
        }
    }

    /// Makes room for an entry file: a directory of this user's where the file belongs is
    /// removed (or renamed aside). Files, links and FIFOs need nothing: the rename replaces
    /// them.
    fn clear_the_way(&self, path: &Path) -> Result<(), StoreError> {
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => {}
            _ => return Ok(()),
        }
        if !self.owns(path) {
            let why = "a directory of another user".to_string();
            return Err(self.blocked(path, why));
        }
        let removed = fs::remove_dir_all(path).or_else(|_| {
            let aside = path.with_file_name(tmp_name("aside"));
            fs::rename(path, aside)
        });
        self.remove_in_the_way(path, removed)
    }

    /// Logs the removal of something that was in the way, or fails the put with why not.
    fn remove_in_the_way(&self, path: &Path, removed: io::Result<()>) -> Result<(), StoreError> {
        match removed {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed what was in the way of a kernel cache entry");
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.blocked(path, e.to_string())),
        }
    }

    fn blocked(&self, path: &Path, why: String) -> StoreError {
        self.warn_once(path, || {
            tracing::warn!(path = %path.display(), "{why}; this kernel is kept in memory only");
        });
        StoreError::Blocked {
            path: path.to_path_buf(),
            why,
        }
    }

    fn refuse_variant(&self, dir: &Path, refusal: Refusal) -> StoreError {
        self.warn_once(dir, || {
            tracing::warn!(
                "kernel cache folder refused: {refusal}; its kernels are kept in memory only"
            );
        });
        StoreError::VariantRefused(refusal)
    }

    /// Turns writing off after a failed write, warning the first time.
    fn stop_writing(&self, path: PathBuf, error: io::Error) -> StoreError {
        let mut status = lock(&self.status);
        if status.is_writable() {
            tracing::warn!(
                path = %path.display(),
                error = %error,
                "cannot write to the kernel cache; compiled kernels are kept in memory only from now on"
            );
            *status = DiskStatus::NotWritable(format!(
                "writing stopped after an earlier failure: cannot write {}: {error}",
                path.display()
            ));
        }
        StoreError::Write {
            path,
            error: Arc::new(error),
        }
    }

    /// Evicts while over the cap; a failure only warns (once): the entry is stored either way.
    fn enforce_cap(&self, root: &Path, keep: &Path) {
        match evict::evict(root, self.uid, self.max_bytes, keep) {
            Ok(evicted) if evicted.entries > 0 => tracing::info!(
                entries = evicted.entries,
                bytes = evicted.bytes,
                max_bytes = self.max_bytes,
                "kernel cache over its size cap; least recently used entries evicted"
            ),
            Ok(_) => {}
            Err(e) => self.warn_once(&root.join(evict::LOCK_NAME), || {
                tracing::warn!(dir = %root.display(), error = %e,
                    "cannot evict from the kernel cache; it may grow past its size cap");
            }),
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
        lock(&self.refused).insert(*key);
        let Some(root) = &self.root else {
            return;
        };
        let dir = root.join(variant);
        // Removing through a link would remove someone else's files.
        if matches!(
            check_dir(&dir, Owners::Us(self.uid), Links::Refuse),
            Ok(DirState::Present)
        ) {
            let (bin, json) = entry_paths(&dir, key);
            // Metadata first: once it is gone the entry is a miss, whatever happens next.
            let _ = fs::remove_file(json);
            let _ = fs::remove_file(bin);
        }
    }

    /// Every entry of the writable directory that looks valid (metadata parses and agrees with
    /// its file name, binary present with the recorded length, both regular files of this
    /// user; the checksum is not read), sorted by variant then key. Empty when there is no
    /// trusted directory. Reads only.
    pub fn list(&self) -> Vec<EntryInfo> {
        let Some(root) = &self.root else {
            return Vec::new();
        };
        let mut out: Vec<EntryInfo> = scan::all_entries(root, Owners::Us(self.uid))
            .into_iter()
            .map(|(variant, key, listed)| EntryInfo {
                variant,
                key,
                size: listed.meta.len,
                kind: listed.meta.meta.kind,
                target: listed.meta.meta.target,
                nvrtc_version: listed.meta.meta.nvrtc_version,
                created: listed.meta.created,
                last_used: entry::unix_seconds(listed.last_used),
                path: listed.bin_path,
            })
            .collect();
        out.sort_by(|a, b| (&a.variant, a.key).cmp(&(&b.variant, b.key)));
        out
    }

    /// Removes what it can of the writable directory (never the seed): entries, binaries
    /// without metadata, temporary files of any age, things of this user's in the way of
    /// entries, and variant folders left empty. Follows no link. What it cannot remove (files
    /// of other users, files it does not know, I/O errors) is reported with its path.
    pub fn clear_report(&self) -> ClearReport {
        let mut report = ClearReport::default();
        let (Some(dir), Some(root)) = (&self.dir, &self.root) else {
            if let DiskStatus::Refused(refusal) = self.status() {
                report.failures.push(ClearFailure {
                    path: refusal.path().to_path_buf(),
                    reason: format!("left in place: {refusal}"),
                });
            }
            return report;
        };
        // Checked again: a clear removes files, which must not happen through a swapped link.
        let trusted = check_dir(dir, Owners::Us(self.uid), Links::FollowOwn)
            .and_then(|_| check_dir(root, Owners::Us(self.uid), Links::Refuse));
        match trusted {
            Ok(DirState::Present) => clear::clear_root(root, self.uid, &mut report),
            Ok(DirState::Absent) => {}
            Err(refusal) => report.failures.push(ClearFailure {
                path: refusal.path().to_path_buf(),
                reason: format!("left in place: {refusal}"),
            }),
        }
        report
    }

    /// [`DiskCache::clear_report`] as a result: how many entries were removed.
    ///
    /// # Errors
    /// A [`ClearError`] naming every path that was left, with the count of what was removed.
    /// `Ok(0)` when the disk cache is off or the directory does not exist.
    pub fn clear(&self) -> Result<usize, ClearError> {
        self.clear_report().into_result()
    }

    fn refused_contains(&self, key: &CacheKey) -> bool {
        lock(&self.refused).contains(key)
    }

    /// Runs `warn` the first time `path` is reported.
    fn warn_once(&self, path: &Path, warn: impl FnOnce()) {
        if lock(&self.warned).insert(path.to_path_buf()) {
            warn();
        }
    }

    /// Whether this user owns `path` itself (not what a link points to).
    fn owns(&self, path: &Path) -> bool {
        fs::symlink_metadata(path).is_ok_and(|m| m.uid() == self.uid)
    }
}

/// `v<CACHE_FORMAT>`.
fn format_dir_name() -> String {
    format!("v{CACHE_FORMAT}")
}

/// What the configured directory is good for, without changing anything: its version folder
/// (`None` when the directory must not or cannot be read) and its status.
fn inspect_dir(dir: &Path, uid: u32) -> (Option<PathBuf>, DiskStatus) {
    let root = dir.join(format_dir_name());
    let owners = Owners::Us(uid);
    let unusable = |refusal: Refusal| match refusal {
        Refusal::Inaccessible { .. } => (None, DiskStatus::NotWritable(refusal.to_string())),
        refusal => (None, DiskStatus::Refused(refusal)),
    };
    if let Err(refusal) = check_ancestors(dir) {
        return unusable(refusal);
    }
    match check_dir(dir, owners, Links::FollowOwn) {
        Err(refusal) => return unusable(refusal),
        Ok(DirState::Absent) => return (Some(root), DiskStatus::NotCreated),
        Ok(DirState::Present) => {}
    }
    let (checked, state) = match check_dir(&root, owners, Links::Refuse) {
        Err(refusal) => return unusable(refusal),
        Ok(DirState::Absent) => (dir, DiskStatus::NotCreated),
        Ok(DirState::Present) => (root.as_path(), DiskStatus::Ready),
    };
    let status = match fs::metadata(checked) {
        Ok(meta) if owner_can_write(&meta, uid) => state,
        Ok(meta) => DiskStatus::NotWritable(format!(
            "{} has mode {:04o}: its owner cannot write to it",
            checked.display(),
            meta.mode() & 0o7777
        )),
        Err(e) => DiskStatus::NotWritable(format!("cannot inspect {}: {e}", checked.display())),
    };
    (Some(root), status)
}

/// The seed's version folder, or why the seed is refused. A missing seed is no refusal (its
/// lookups miss), nor one that cannot be inspected (each lookup then says why).
fn inspect_seed(seed: &Path, uid: u32) -> (Option<PathBuf>, Option<Refusal>) {
    let owners = Owners::UsOrRoot(uid);
    let root = seed.join(format_dir_name());
    let checked = check_ancestors(seed)
        .and_then(|()| check_dir(seed, owners, Links::FollowOwn))
        .and_then(|state| match state {
            DirState::Present => check_dir(&root, owners, Links::Refuse),
            DirState::Absent => Ok(DirState::Absent),
        });
    match checked {
        Ok(_) => (Some(root), None),
        Err(refusal) => (None, Some(refusal)),
    }
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

/// One directory, owner-only; its parent must exist.
fn create_private_dir(path: &Path) -> io::Result<()> {
    match DirBuilder::new().mode(0o700).create(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// Refreshes the last use of a hit; failing that only makes it an earlier eviction candidate.
fn mark_used(hit: &Hit, variant: &str, key: &CacheKey) {
    if let Err(e) = hit.file.set_modified(SystemTime::now()) {
        tracing::debug!(variant, key = %key, error = %e, "cannot mark a cached kernel as used");
    }
}

/// Whether a temporary file was left by a writer that died (an hour without a write).
fn is_stale(meta: &fs::Metadata) -> bool {
    meta.modified()
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age > STALE_TMP_AGE)
}

/// Removes stale temporary files of this user in trusted variant folders, ignoring errors.
fn remove_stale_tmp(root: &Path, uid: u32) {
    for dir in scan::variant_dirs(root, Owners::Us(uid)) {
        if dir.trusted.is_err() {
            continue;
        }
        let Ok(children) = fs::read_dir(&dir.path) else {
            continue;
        };
        for child in children.flatten() {
            let is_tmp = child
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(TMP_PREFIX));
            // DirEntry::metadata does not follow links.
            let stale = child
                .metadata()
                .is_ok_and(|m| m.uid() == uid && !m.is_dir() && is_stale(&m));
            if is_tmp && stale {
                let _ = fs::remove_file(child.path());
            }
        }
    }
}
