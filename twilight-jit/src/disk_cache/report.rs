//! What `twilight cache path` and `twilight doctor` show: the cache directories with what each
//! is good for, and a check of the writable one (owner, mode, space, entries) that lists every
//! problem. Nothing here changes the disk.

use std::fmt;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::scan::all_entries;
use super::sys;
use super::trust::{owner_can_write, Owners, Refusal};
use super::{DiskCache, DiskStatus};
use crate::env::JitEnv;

/// Less free space than this on the cache's file system is a problem.
const LOW_FREE_BYTES: u64 = 64 << 20;

/// The cache directories and what each is good for.
#[derive(Clone, Debug)]
pub struct CacheLocation {
    /// The writable directory as configured; `None` when the disk cache is off.
    pub dir: Option<PathBuf>,
    pub status: DiskStatus,
    pub seed: Option<SeedLocation>,
}

/// The read-only seed directory and what it is good for.
#[derive(Clone, Debug)]
pub struct SeedLocation {
    pub dir: PathBuf,
    pub status: SeedStatus,
}

/// What the seed directory is good for.
#[derive(Clone, Debug)]
pub enum SeedStatus {
    /// Read before the writable directory.
    Ready,
    /// Its version folder does not exist: every lookup misses.
    Missing,
    /// Not read: it cannot be trusted.
    Refused(Refusal),
}

impl fmt::Display for SeedStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SeedStatus::Ready => f.write_str("read-only, ready"),
            SeedStatus::Missing => f.write_str("read-only, holds no cache of this format"),
            SeedStatus::Refused(refusal) => write!(f, "refused: {refusal}"),
        }
    }
}

/// `/path (status)`, or the reason there is no directory.
impl fmt::Display for CacheLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.dir {
            Some(dir) => write!(f, "{} ({})", dir.display(), self.status),
            None => write!(f, "{}", self.status),
        }
    }
}

/// `/path (status)`.
impl fmt::Display for SeedLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.dir.display(), self.status)
    }
}

/// A check of the disk cache, for `twilight doctor`.
#[derive(Clone, Debug)]
pub struct CacheReport {
    /// The writable directory as configured; `None` when the disk cache is off.
    pub dir: Option<PathBuf>,
    pub status: DiskStatus,
    pub exists: bool,
    /// The configured path is a symbolic link (of this user; its target was checked).
    pub is_symlink: bool,
    /// Owner of the directory (of the link's target for a link).
    pub owner_uid: Option<u32>,
    /// The uid this process runs as.
    pub our_uid: u32,
    /// Permission bits, `0o7777` at most.
    pub mode: Option<u32>,
    /// Whether a write is expected to work, judged from status, mode and mount flags without
    /// writing anything (the first real write can still fail, on a full disk say).
    pub writable: bool,
    /// Bytes available on the file system holding the directory (or its nearest existing
    /// parent); `None` where it cannot be read without a new dependency (it is read through
    /// `statvfs` on 64-bit Linux only).
    pub free_bytes: Option<u64>,
    /// The file system is mounted read-only (known where `free_bytes` is).
    pub read_only_fs: bool,
    /// Entries that look valid, and the bytes of their files.
    pub entries: usize,
    pub total_bytes: u64,
    /// The size cap.
    pub max_bytes: u64,
    pub seed: Option<SeedReport>,
    /// Everything wrong, one sentence each; empty when healthy.
    pub problems: Vec<String>,
}

/// The seed part of a [`CacheReport`].
#[derive(Clone, Debug)]
pub struct SeedReport {
    pub dir: PathBuf,
    pub status: SeedStatus,
    /// Its version folder exists and can be listed.
    pub readable: bool,
    pub entries: usize,
    pub total_bytes: u64,
}

impl CacheReport {
    /// No problem found.
    pub fn is_healthy(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the disk cache the environment configures, and the environment's knobs themselves.
pub fn check_cache(env: &JitEnv) -> CacheReport {
    let mut report = DiskCache::from_env(env).check();
    report
        .problems
        .extend(env.problems.iter().map(|p| format!("environment: {p}")));
    report
}

impl DiskCache {
    /// Checks the writable directory and the seed, reading only.
    pub fn check(&self) -> CacheReport {
        let status = self.status();
        let mut report = CacheReport {
            dir: self.dir.clone(),
            status: status.clone(),
            exists: false,
            is_symlink: false,
            owner_uid: None,
            our_uid: self.uid,
            mode: None,
            writable: false,
            free_bytes: None,
            read_only_fs: false,
            entries: 0,
            total_bytes: 0,
            max_bytes: self.max_bytes,
            seed: self.check_seed(),
            problems: Vec::new(),
        };
        if let Some(dir) = &self.dir {
            self.check_dir_facts(dir, &mut report);
        }
        if let Some(root) = &self.root {
            let entries = all_entries(root, Owners::Us(self.uid));
            report.entries = entries.len();
            report.total_bytes = entries.iter().map(|(_, _, e)| e.disk_bytes).sum();
        }
        report.problems = problems_of(&report);
        report
    }

    fn check_dir_facts(&self, dir: &Path, report: &mut CacheReport) {
        report.is_symlink = fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
        let existing = match fs::metadata(dir) {
            Ok(meta) => {
                report.exists = true;
                report.owner_uid = Some(meta.uid());
                report.mode = Some(meta.mode() & 0o7777);
                let ours_and_writable = meta.uid() == self.uid && owner_can_write(&meta, self.uid);
                report.writable = report.status.is_writable() && ours_and_writable;
                Some(dir.to_path_buf())
            }
            Err(_) => {
                report.writable = report.status.is_writable();
                dir.ancestors().find(|a| a.is_dir()).map(Path::to_path_buf)
            }
        };
        if let Some(stats) = existing.as_deref().and_then(sys::fs_stats) {
            report.free_bytes = Some(stats.free_bytes);
            report.read_only_fs = stats.read_only;
            report.writable &= !stats.read_only;
        }
    }

    fn check_seed(&self) -> Option<SeedReport> {
        let dir = self.seed.clone()?;
        let status = self.seed_status();
        let mut seed = SeedReport {
            dir,
            readable: false,
            entries: 0,
            total_bytes: 0,
            status,
        };
        if let (SeedStatus::Ready, Some(root)) = (&seed.status, &self.seed_root) {
            seed.readable = fs::read_dir(root).is_ok();
            let entries = all_entries(root, Owners::UsOrRoot(self.uid));
            seed.entries = entries.len();
            seed.total_bytes = entries.iter().map(|(_, _, e)| e.disk_bytes).sum();
        }
        Some(seed)
    }
}

/// Every problem a report shows, one sentence each.
fn problems_of(report: &CacheReport) -> Vec<String> {
    let mut problems = Vec::new();
    let dir = report
        .dir
        .as_ref()
        .map_or(String::new(), |d| d.display().to_string());
    if report.status.is_problem() {
        problems.push(format!("cache directory {dir}: {}", report.status));
    } else if report.status.is_writable() && !report.writable {
        problems.push(format!("cache directory {dir}: not writable"));
    }
    if report.read_only_fs && report.dir.is_some() {
        problems.push(format!(
            "cache directory {dir}: the file system is read-only"
        ));
    }
    if let Some(free) = report.free_bytes.filter(|&f| f < LOW_FREE_BYTES) {
        problems.push(format!(
            "cache directory {dir}: only {free} bytes free on its file system"
        ));
    }
    if let Some(seed) = &report.seed {
        match &seed.status {
            SeedStatus::Ready if !seed.readable => problems.push(format!(
                "seed directory {}: cannot be read",
                seed.dir.display()
            )),
            SeedStatus::Ready => {}
            status => problems.push(format!("seed directory {}: {status}", seed.dir.display())),
        }
    }
    problems
}

/// Bytes in the largest binary unit that keeps a number of at least 1: `1.5 GiB`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The report as `twilight doctor` prints it, one fact per line.
impl fmt::Display for CacheReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.dir {
            Some(dir) => writeln!(f, "cache:    {} ({})", dir.display(), self.status)?,
            None => writeln!(f, "cache:    {}", self.status)?,
        }
        if let (Some(owner), Some(mode)) = (self.owner_uid, self.mode) {
            let whose = if owner == self.our_uid { " (us)" } else { "" };
            let link = if self.is_symlink {
                ", through a link"
            } else {
                ""
            };
            writeln!(f, "  owner uid {owner}{whose}, mode {mode:04o}{link}")?;
        }
        if self.dir.is_some() {
            let free = self.free_bytes.map_or("unknown".to_string(), human_bytes);
            let writable = if self.writable { "yes" } else { "no" };
            writeln!(f, "  writable: {writable}; free space: {free}")?;
            writeln!(
                f,
                "  {} entries, {} of a {} cap",
                self.entries,
                human_bytes(self.total_bytes),
                human_bytes(self.max_bytes)
            )?;
        }
        if let Some(seed) = &self.seed {
            writeln!(
                f,
                "seed:     {} ({}; {} entries, {})",
                seed.dir.display(),
                seed.status,
                seed.entries,
                human_bytes(seed.total_bytes)
            )?;
        }
        for problem in &self.problems {
            writeln!(f, "problem:  {problem}")?;
        }
        Ok(())
    }
}
