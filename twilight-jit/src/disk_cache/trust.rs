//! Whether a directory or file of the cache may be trusted: who owns it, who can write to it,
//! and whether it is what it claims to be. Decisions are made on `symlink_metadata` (the link,
//! not what it points to) and on `fstat` of opened files, never on a path followed twice.

use std::fs::{self, FileType, Metadata};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Group and other write bits: anyone but the owner could plant or swap entries.
const WRITABLE_BY_OTHERS: u32 = 0o022;
/// Anyone's write bit, and the sticky bit that stops anyone but a child's owner from renaming
/// or removing it (as on /tmp).
const WRITABLE_BY_ALL: u32 = 0o002;
const STICKY: u32 = 0o1000;

/// Who may own what the cache reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Owners {
    /// The writable cache: this user only.
    Us(u32),
    /// The seed, which an installer (root) may have put in place: this user or root.
    UsOrRoot(u32),
}

impl Owners {
    pub(crate) fn allows(self, uid: u32) -> bool {
        match self {
            Owners::Us(us) => uid == us,
            Owners::UsOrRoot(us) => uid == us || uid == 0,
        }
    }

    pub(crate) fn uid(self) -> u32 {
        match self {
            Owners::Us(us) | Owners::UsOrRoot(us) => us,
        }
    }
}

/// Whether a symbolic link may stand where a directory is expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Links {
    /// The directory named by the environment: a link of an allowed owner is followed (its
    /// target is then checked like any directory); a link of anyone else is refused.
    FollowOwn,
    /// Folders twilight creates itself: a link there was not made by twilight.
    Refuse,
}

/// Why a cache directory (or a variant's folder) is not used.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{} is owned by uid {owner}, not by uid {ours}", path.display())]
    OwnedByOther {
        path: PathBuf,
        owner: u32,
        ours: u32,
    },
    #[error("{} has mode {mode:04o}: group or others can write to it", path.display())]
    WritableByOthers { path: PathBuf, mode: u32 },
    #[error("{} is a symbolic link owned by uid {owner}, not by uid {ours}", path.display())]
    ForeignLink {
        path: PathBuf,
        owner: u32,
        ours: u32,
    },
    #[error("{} is a symbolic link, which twilight never creates there", path.display())]
    Link { path: PathBuf },
    #[error("{} is {kind}, not a directory", path.display())]
    NotADirectory { path: PathBuf, kind: &'static str },
    #[error("cannot inspect {}: {error}", path.display())]
    Inaccessible {
        path: PathBuf,
        #[source]
        error: Arc<io::Error>,
    },
}

impl Refusal {
    /// The path the refusal is about.
    pub fn path(&self) -> &Path {
        match self {
            Refusal::OwnedByOther { path, .. }
            | Refusal::WritableByOthers { path, .. }
            | Refusal::ForeignLink { path, .. }
            | Refusal::Link { path }
            | Refusal::NotADirectory { path, .. }
            | Refusal::Inaccessible { path, .. } => path,
        }
    }

    fn inaccessible(path: &Path, error: io::Error) -> Refusal {
        Refusal::Inaccessible {
            path: path.to_path_buf(),
            error: Arc::new(error),
        }
    }
}

/// A directory that passed [`check_dir`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DirState {
    Present,
    Absent,
}

/// `a regular file`, `a FIFO`, ...: for messages.
pub(crate) fn kind_name(file_type: FileType) -> &'static str {
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_file() {
        "a regular file"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_block_device() || file_type.is_char_device() {
        "a device"
    } else {
        "an unknown kind of file"
    }
}

/// Checks that `path` is a directory owned by `owners` that nobody else can write to, or
/// that it does not exist. Reads metadata only; changes nothing.
pub(crate) fn check_dir(path: &Path, owners: Owners, links: Links) -> Result<DirState, Refusal> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(DirState::Absent),
        Err(e) => return Err(Refusal::inaccessible(path, e)),
    };
    if !meta.file_type().is_symlink() {
        return check_dir_meta(path, &meta, owners).map(|()| DirState::Present);
    }
    if links == Links::Refuse {
        return Err(Refusal::Link {
            path: path.to_path_buf(),
        });
    }
    if !owners.allows(meta.uid()) {
        return Err(Refusal::ForeignLink {
            path: path.to_path_buf(),
            owner: meta.uid(),
            ours: owners.uid(),
        });
    }
    match fs::metadata(path) {
        Ok(target) => check_dir_meta(path, &target, owners).map(|()| DirState::Present),
        // A dangling link of our own: creating the directory would create its target.
        Err(e) => Err(Refusal::inaccessible(path, e)),
    }
}

/// Checks the directories above `path` that exist: none may be writable by everyone without
/// the sticky bit, where any user could rename the cache away and put a directory of their
/// own in its place between two checks. Ownership of the ancestors is not checked: a cache
/// under a directory of another user (a mounted volume in a container, say) is common and
/// stays usable.
pub(crate) fn check_ancestors(path: &Path) -> Result<(), Refusal> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Refusal::inaccessible(path, e))?
            .join(path)
    };
    for ancestor in absolute.ancestors().skip(1) {
        let meta = match fs::metadata(ancestor) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Refusal::inaccessible(ancestor, e)),
        };
        let mode = meta.mode() & 0o7777;
        if meta.is_dir() && mode & WRITABLE_BY_ALL != 0 && mode & STICKY == 0 {
            return Err(Refusal::WritableByOthers {
                path: ancestor.to_path_buf(),
                mode,
            });
        }
    }
    Ok(())
}

/// The directory checks on metadata already read.
pub(crate) fn check_dir_meta(path: &Path, meta: &Metadata, owners: Owners) -> Result<(), Refusal> {
    if !meta.is_dir() {
        return Err(Refusal::NotADirectory {
            path: path.to_path_buf(),
            kind: kind_name(meta.file_type()),
        });
    }
    if !owners.allows(meta.uid()) {
        return Err(Refusal::OwnedByOther {
            path: path.to_path_buf(),
            owner: meta.uid(),
            ours: owners.uid(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & WRITABLE_BY_OTHERS != 0 {
        return Err(Refusal::WritableByOthers {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Why an opened entry file is not trusted, or `None` when it is: a regular file owned by
/// `owners`, no longer than `max_len`.
pub(crate) fn file_problem(meta: &Metadata, owners: Owners, max_len: u64) -> Option<String> {
    if !meta.is_file() {
        return Some(format!(
            "it is {}, not a regular file",
            kind_name(meta.file_type())
        ));
    }
    if !owners.allows(meta.uid()) {
        return Some(format!(
            "it is owned by uid {}, not by uid {}",
            meta.uid(),
            owners.uid()
        ));
    }
    (meta.len() > max_len).then(|| format!("it is {} bytes, more than {max_len}", meta.len()))
}

/// Whether this user can write to a directory it owns, judging from its mode alone (root
/// writes regardless). A read-only file system is found by the first write.
pub(crate) fn owner_can_write(meta: &Metadata, uid: u32) -> bool {
    uid == 0 || meta.mode() & 0o300 == 0o300
}
