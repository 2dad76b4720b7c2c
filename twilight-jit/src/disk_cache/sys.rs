//! The few operating-system facts the disk cache needs that `std` does not offer: the
//! effective uid and the open flags that keep a lookup from following links or blocking. The C
//! library is already linked by `std` on every Unix, so declaring the function used here adds
//! no dependency.

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
