//! The few operating-system facts the disk cache needs that `std` does not offer: the
//! effective uid, the open flags that keep a lookup from following links or blocking, and the
//! free space of a file system. The C library is already linked by `std` on every Unix, so
//! declaring the two functions used here adds no dependency.

use std::path::Path;

extern "C" {
    fn geteuid() -> u32;
}

/// The uid whose files the cache trusts and whose files it creates.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid takes no argument, cannot fail and touches no memory of ours.
    unsafe { geteuid() }
}

/// `O_NOFOLLOW | O_NONBLOCK` for this target: opening a symbolic link fails instead of
/// following it, and opening a FIFO returns at once instead of waiting for a writer. `None`
/// where the values are not known here; callers then check with `symlink_metadata` first.
pub(crate) fn no_follow_no_block() -> Option<i32> {
    #[cfg(all(
        target_os = "linux",
        any(
            target_arch = "x86",
            target_arch = "x86_64",
            target_arch = "riscv64",
            target_arch = "s390x",
            target_arch = "loongarch64"
        )
    ))]
    return Some(0o400000 | 0o4000);
    #[cfg(all(
        target_os = "linux",
        any(
            target_arch = "arm",
            target_arch = "aarch64",
            target_arch = "powerpc",
            target_arch = "powerpc64"
        )
    ))]
    return Some(0o100000 | 0o4000);
    #[cfg(any(
        target_os = "macos",
        target_os = "ios",
        target_os = "freebsd",
        target_os = "openbsd",
        target_os = "netbsd",
        target_os = "dragonfly"
    ))]
    return Some(0x100 | 0x4);
    #[allow(unreachable_code)]
    None
}

/// What `statvfs` says about the file system holding a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FsStats {
    /// Bytes available to an unprivileged user.
    pub free_bytes: u64,
    /// Mounted read-only.
    pub read_only: bool,
}

/// [`FsStats`] of the file system holding `path`, where it can be read: Linux on 64-bit
/// targets, whose `struct statvfs` layout is the same for glibc and musl.
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
pub(crate) fn fs_stats(path: &Path) -> Option<FsStats> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    extern "C" {
        fn statvfs(path: *const std::ffi::c_char, buf: *mut u64) -> i32;
    }
    /// `ST_RDONLY` in `f_flag`.
    const READ_ONLY: u64 = 1;
    // `struct statvfs` is eleven 64-bit fields then six ints (112 bytes); a larger, aligned
    // buffer leaves room. Fields: 1 f_frsize, 4 f_bavail, 9 f_flag.
    let mut buf = [0u64; 32];
    let c_path = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: c_path is a NUL-terminated string that outlives the call; buf is writable,
    // 8-byte aligned and larger than `struct statvfs`.
    let rc = unsafe { statvfs(c_path.as_ptr(), buf.as_mut_ptr()) };
    (rc == 0).then(|| FsStats {
        free_bytes: buf[1].saturating_mul(buf[4]),
        read_only: buf[9] & READ_ONLY != 0,
    })
}

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
pub(crate) fn fs_stats(_path: &Path) -> Option<FsStats> {
    None
}
