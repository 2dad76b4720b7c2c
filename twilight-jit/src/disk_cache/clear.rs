//! Emptying the writable cache: everything twilight put there that this user owns goes, and
//! whatever cannot go is named with the reason, instead of the first error ending the job.

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, DirEntry};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::entry::{remove_if_present, TMP_PREFIX};
use super::scan::variant_dirs;
use super::trust::{kind_name, Owners, Refusal};
use crate::key::CacheKey;

/// Something [`DiskCache::clear_report`](super::DiskCache::clear_report) left in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClearFailure {
    pub path: PathBuf,
    pub reason: String,
}

impl fmt::Display for ClearFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

/// What a clear did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClearReport {
    /// Entries (distinct keys) removed, complete or not.
    pub removed: usize,
    /// What could not be removed, and why.
    pub failures: Vec<ClearFailure>,
}

impl ClearReport {
    /// `Ok(removed)` when nothing was left behind.
    ///
    /// # Errors
    /// A [`ClearError`] naming every path left in place.
    pub fn into_result(self) -> Result<usize, ClearError> {
        if self.failures.is_empty() {
            Ok(self.removed)
        } else {
            Err(ClearError(self))
        }
    }

    fn fail(&mut self, path: &Path, reason: impl fmt::Display) {
        self.failures.push(ClearFailure {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        });
    }
}

/// A clear that left things behind; the report says what it removed and what it could not.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ClearError(pub ClearReport);

impl fmt::Display for ClearError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "removed {} kernel(s) but could not remove {} path(s):",
            self.0.removed,
            self.0.failures.len()
        )?;
        for failure in &self.0.failures {
            write!(f, "\n  {failure}")?;
        }
        Ok(())
    }
}

/// What a file name in a variant folder is.
enum Name {
    /// `<hex>.bin` or `<hex>.json`.
    Entry(String),
    /// `.tmp-*`: a write in progress or abandoned.
    Temporary,
    Other,
}

fn classify(name: &str) -> Name {
    if name.starts_with(TMP_PREFIX) {
        return Name::Temporary;
    }
    let stem = name
        .strip_suffix(".json")
        .or_else(|| name.strip_suffix(".bin"));
    match stem {
        Some(hex) if CacheKey::from_hex(hex).is_some() => Name::Entry(hex.to_owned()),
        _ => Name::Other,
    }
}

/// Clears the version folder `root` of this user's cache.
pub(crate) fn clear_root(root: &Path, uid: u32, report: &mut ClearReport) {
    let owners = Owners::Us(uid);
    for dir in variant_dirs(root, owners) {
        match dir.trusted {
            Ok(()) => clear_variant_dir(&dir.path, uid, report),
            Err(Refusal::NotADirectory { .. } | Refusal::Link { .. }) => {
                // Not a folder where one belongs: it only blocks writes. A link is removed, never
                // followed.
                remove_owned(&dir.path, uid, report);
            }
            Err(refusal) => report.fail(&dir.path, format!("left in place: {refusal}")),
        }
    }
    clear_root_temporaries(root, uid, report);
}

/// Temporary files directly under `root` (older versions probed writability there).
fn clear_root_temporaries(root: &Path, uid: u32, report: &mut ClearReport) {
    let Ok(children) = fs::read_dir(root) else {
        return;
    };
    for child in children.flatten() {
        let name = child.file_name();
        if name.to_str().is_some_and(|n| n.starts_with(TMP_PREFIX)) {
            remove_owned(&child.path(), uid, report);
        }
    }
}

/// Removes the entries, temporary files and (when then empty) the folder itself.
fn clear_variant_dir(dir: &Path, uid: u32, report: &mut ClearReport) {
    let children = match fs::read_dir(dir) {
        Ok(children) => children,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => return report.fail(dir, e),
    };
    let mut stems = HashSet::new();
    let mut temporaries = Vec::new();
    for child in children.flatten() {
        let name = child.file_name();
        match classify(&name.to_string_lossy()) {
            Name::Entry(hex) => {
                stems.insert(hex);
            }
            Name::Temporary => temporaries.push(child.path()),
            Name::Other => report_other(&child, report),
        }
    }
    for hex in &stems {
        // Metadata first, so that a concurrent reader sees a miss, never a binary in flux.
        let json = remove_owned(&dir.join(format!("{hex}.json")), uid, report);
        let bin = remove_owned(&dir.join(format!("{hex}.bin")), uid, report);
        if json || bin {
            report.removed += 1;
        }
    }
    for path in &temporaries {
        remove_owned(path, uid, report);
    }
    match fs::remove_dir(dir) {
        Ok(()) => {}
        // Something was left (and named above), or a writer is filling it again right now.
        Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => report.fail(dir, e),
    }
}

fn report_other(child: &DirEntry, report: &mut ClearReport) {
    let kind = child.file_type().map_or("something unreadable", kind_name);
    report.fail(
        &child.path(),
        format!("{kind} that is not a kernel cache file; left in place"),
    );
}

/// Removes `path` (a directory with its contents) when this user owns it, without following a
/// link. Whether something was removed; failures go to the report.
fn remove_owned(path: &Path, uid: u32, report: &mut ClearReport) -> bool {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return false,
        Err(e) => {
            report.fail(path, e);
            return false;
        }
    };
    if meta.uid() != uid {
        report.fail(
            path,
            format!(
                "{} owned by uid {}, not by uid {uid}; left in place",
                kind_name(meta.file_type()),
                meta.uid()
            ),
        );
        return false;
    }
    // remove_dir_all removes links inside without following them.
    let removed = if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        remove_if_present(path)
    };
    match removed {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => {
            report.fail(path, e);
            false
        }
    }
}
