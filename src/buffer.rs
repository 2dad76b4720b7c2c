//! Device buffers a step or an append borrows, whoever allocated them: a window of a cudarc
//! view (ordered across streams by cudarc's guards at launch), or a raw device address with a
//! length for engines on another cudarc line (ordered by the caller's stream alone).
//!
//! A window knows its address from the moment it is made, so alignment and lengths are checked
//! when a view of a pool, a page table or an output is built, never in the middle of a step.

use std::marker::PhantomData;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr};

use crate::error::{Error, Result};

/// The alignment of buffers read or written 16 bytes at a time (K, V, q, o, new rows).
pub const VECTOR_ALIGN: u64 = 16;

enum Source<'a, T> {
    View(CudaView<'a, T>),
    Raw(PhantomData<&'a [T]>),
}

enum SourceMut<'a, T> {
    View(CudaViewMut<'a, T>),
    Raw(PhantomData<&'a mut [T]>),
}

/// A device buffer a kernel reads: `len` elements of `T` from `address`.
pub struct DeviceRef<'a, T> {
    source: Source<'a, T>,
    /// Elements between the start of the view and the start of this window.
    start: usize,
    len: usize,
    address: u64,
}

/// A device buffer a kernel writes: `len` elements of `T` from `address`.
pub struct DeviceMut<'a, T> {
    source: SourceMut<'a, T>,
    start: usize,
    len: usize,
    address: u64,
}

/// The address of a view, read once when a window is made. The guard this returns records a
/// read on the view's own stream, which orders nothing new: no work is queued in between.
fn view_address<T>(view: &impl DevicePtr<T>) -> u64 {
    let (address, _guard) = view.device_ptr(view.stream());
    address
}

/// The window `start..start + len` of a buffer of `total` elements at `base`, checked.
fn window<T>(what: &str, base: u64, total: usize, start: usize, len: usize) -> Result<u64> {
    let end = start.checked_add(len);
    if end.is_none_or(|end| end > total) {
        return Err(Error::shape(
            format!("{what}: elements {start}..{start}+{len} of the buffer"),
            format!("at least {}", start.saturating_add(len)),
            format!("{total} elements"),
        ));
    }
    Ok(base + (start * std::mem::size_of::<T>()) as u64)
}

/// Checks that a buffer starts on a multiple of `align` bytes.
///
/// # Errors
/// [`Error::Parameter`] naming the buffer and its address.
pub fn check_alignment(what: &str, address: u64, align: u64) -> Result<()> {
    if !address.is_multiple_of(align) {
        return Err(Error::Parameter(format!(
            "{what} starts at {address:#x}, which is not a multiple of {align} bytes (the kernels load it {align} bytes at a time)"
        )));
    }
    Ok(())
}

impl<'a, T> DeviceRef<'a, T> {
    /// A buffer the caller allocated outside cudarc 0.19 (another cudarc line, a C++ engine).
    ///
    /// # Safety
    /// `address` is 0 with `len == 0`, or the start of `len` elements of `T` in device memory
    /// of the context of the stream the buffer is used on, which stay allocated, and are not
    /// written by anything but the kernels this buffer is passed to, for `'a` and until every
    /// launch that reads them has completed. Work on other streams that writes the memory is
    /// ordered before those launches by the caller (twilight records no events for it).
    pub unsafe fn from_raw(address: u64, len: usize) -> DeviceRef<'a, T> {
        DeviceRef {
            source: Source::Raw(PhantomData),
            start: 0,
            len,
            address,
        }
    }

    /// Elements in the window.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address of the window's first element.
    pub fn address(&self) -> u64 {
        self.address
    }

    /// The elements `start..start + len` of this window.
    ///
    /// # Errors
    /// [`Error::Shape`] when the range does not lie inside the window.
    pub fn window(self, start: usize, len: usize) -> Result<DeviceRef<'a, T>> {
        let address = window::<T>("window", self.address, self.len, start, len)?;
        Ok(DeviceRef {
            source: self.source,
            start: self.start + start,
            len,
            address,
        })
    }

    /// A second handle on the same window, for as long as this one is borrowed.
    pub fn reborrow(&self) -> DeviceRef<'_, T> {
        DeviceRef {
            source: match &self.source {
                Source::View(view) => Source::View(view.slice(..)),
                Source::Raw(_) => Source::Raw(PhantomData),
            },
            start: self.start,
            len: self.len,
            address: self.address,
        }
    }

    /// The cudarc view and the window's start in it, or `None` for a raw buffer.
    pub(crate) fn view(&self) -> Option<(&CudaView<'a, T>, usize)> {
        match &self.source {
            Source::View(view) => Some((view, self.start)),
            Source::Raw(_) => None,
        }
    }

    /// Checks the window's alignment.
    ///
    /// # Errors
    /// As [`check_alignment`].
    pub(crate) fn check_aligned(&self, what: &str, align: u64) -> Result<()> {
        check_alignment(what, self.address, align)
    }
}

impl<'a, T> DeviceMut<'a, T> {
    /// A buffer the caller allocated outside cudarc 0.19, for writing.
    ///
    /// # Safety
    /// As [`DeviceRef::from_raw`], and nothing else reads or writes the memory while the
    /// launches that write it may run.
    pub unsafe fn from_raw(address: u64, len: usize) -> DeviceMut<'a, T> {
        DeviceMut {
            source: SourceMut::Raw(PhantomData),
            start: 0,
            len,
            address,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn address(&self) -> u64 {
        self.address
    }

    /// The elements `start..start + len` of this window.
    ///
    /// # Errors
    /// [`Error::Shape`] when the range does not lie inside the window.
    pub fn window(self, start: usize, len: usize) -> Result<DeviceMut<'a, T>> {
        let address = window::<T>("window", self.address, self.len, start, len)?;
        Ok(DeviceMut {
            source: self.source,
            start: self.start + start,
            len,
            address,
        })
    }

    /// A second handle on the same window, for as long as this one is borrowed mutably.
    pub fn reborrow(&mut self) -> DeviceMut<'_, T> {
        DeviceMut {
            source: match &mut self.source {
                SourceMut::View(view) => SourceMut::View(view.slice_mut(..)),
                SourceMut::Raw(_) => SourceMut::Raw(PhantomData),
            },
            start: self.start,
            len: self.len,
            address: self.address,
        }
    }

    pub(crate) fn view_mut(&mut self) -> Option<(&mut CudaViewMut<'a, T>, usize)> {
        match &mut self.source {
            SourceMut::View(view) => Some((view, self.start)),
            SourceMut::Raw(_) => None,
        }
    }

    pub(crate) fn view(&self) -> Option<(&CudaViewMut<'a, T>, usize)> {
        match &self.source {
            SourceMut::View(view) => Some((view, self.start)),
            SourceMut::Raw(_) => None,
        }
    }

    pub(crate) fn check_aligned(&self, what: &str, align: u64) -> Result<()> {
        check_alignment(what, self.address, align)
    }
}

impl<'a, T> From<CudaView<'a, T>> for DeviceRef<'a, T> {
    fn from(view: CudaView<'a, T>) -> DeviceRef<'a, T> {
        DeviceRef {
            start: 0,
            len: view.len(),
            address: view_address(&view),
            source: Source::View(view),
        }
    }
}

impl<'a, T> From<&'a CudaView<'_, T>> for DeviceRef<'a, T> {
    fn from(view: &'a CudaView<'_, T>) -> DeviceRef<'a, T> {
        view.slice(..).into()
    }
}

impl<'a, T> From<&'a CudaSlice<T>> for DeviceRef<'a, T> {
    fn from(slice: &'a CudaSlice<T>) -> DeviceRef<'a, T> {
        slice.as_view().into()
    }
}

impl<'a, T> From<&'a DeviceRef<'_, T>> for DeviceRef<'a, T> {
    fn from(buffer: &'a DeviceRef<'_, T>) -> DeviceRef<'a, T> {
        buffer.reborrow()
    }
}

impl<'a, T> From<CudaViewMut<'a, T>> for DeviceMut<'a, T> {
    fn from(view: CudaViewMut<'a, T>) -> DeviceMut<'a, T> {
        DeviceMut {
            start: 0,
            len: view.len(),
            address: view_address(&view),
            source: SourceMut::View(view),
        }
    }
}

impl<'a, T> From<&'a mut CudaViewMut<'_, T>> for DeviceMut<'a, T> {
    fn from(view: &'a mut CudaViewMut<'_, T>) -> DeviceMut<'a, T> {
        view.slice_mut(..).into()
    }
}

impl<'a, T> From<&'a mut CudaSlice<T>> for DeviceMut<'a, T> {
    fn from(slice: &'a mut CudaSlice<T>) -> DeviceMut<'a, T> {
        slice.as_view_mut().into()
    }
}

impl<'a, T> From<&'a mut DeviceMut<'_, T>> for DeviceMut<'a, T> {
    fn from(buffer: &'a mut DeviceMut<'_, T>) -> DeviceMut<'a, T> {
        buffer.reborrow()
    }
}

impl<T> std::fmt::Debug for DeviceRef<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        debug(
            f,
            "DeviceRef",
            self.view().is_some(),
            self.address,
            self.len,
        )
    }
}

impl<T> std::fmt::Debug for DeviceMut<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        debug(
            f,
            "DeviceMut",
            self.view().is_some(),
            self.address,
            self.len,
        )
    }
}

fn debug(
    f: &mut std::fmt::Formatter<'_>,
    name: &str,
    view: bool,
    address: u64,
    len: usize,
) -> std::fmt::Result {
    f.debug_struct(name)
        .field("source", &if view { "cudarc view" } else { "raw" })
        .field("address", &format_args!("{address:#x}"))
        .field("len", &len)
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_checked_and_keep_their_address() {
        // SAFETY: never launched; only the bookkeeping is exercised.
        let raw = unsafe { DeviceRef::<half::f16>::from_raw(0x1000, 100) };
        let w = raw.window(8, 50).unwrap();
        assert_eq!((w.address(), w.len()), (0x1000 + 16, 50));
        assert!(w.check_aligned("w", VECTOR_ALIGN).is_ok());
        let w = w.window(1, 10).unwrap();
        assert!(w
            .check_aligned("w", VECTOR_ALIGN)
            .unwrap_err()
            .to_string()
            .contains("not a multiple of 16"));
        // SAFETY: as above.
        let raw = unsafe { DeviceMut::<i32>::from_raw(0x2000, 10) };
        let err = raw.window(5, 6).unwrap_err().to_string();
        assert!(err.contains("10 elements"), "{err}");
        // SAFETY: as above.
        let raw = unsafe { DeviceRef::<i32>::from_raw(0x2000, 10) };
        assert!(raw.window(usize::MAX, 2).is_err());
    }
}
