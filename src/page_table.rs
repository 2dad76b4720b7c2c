//! Page tables on the device (`kv_indptr`, `kv_indices`, `kv_last_page_len`) with the
//! host-side bounds that size every grid of a step: [`PageTable`] owns a table uploaded from a
//! validated [`HostPageTable`]; [`PageTableView`] borrows one an engine already keeps on the
//! device. A step reads either through a [`PageTableView`] and never reads device memory back.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use crate::buffer::DeviceRef;
use crate::error::{Error, Result};
use crate::host::{CacheShape, HostPageTable};

/// A validated page table on the device, with the host-side bounds that size launch grids
/// (so no step ever reads a device count back).
#[derive(Debug)]
pub struct PageTable {
    pub(crate) kv_indptr: CudaSlice<i32>,
    pub(crate) kv_indices: CudaSlice<i32>,
    pub(crate) kv_last_page_len: CudaSlice<i32>,
    batch: usize,
    max_len: usize,
    page_size: usize,
    num_pages: usize,
}

impl PageTable {
    /// Uploads a host table (already validated against `num_pages`).
    ///
    /// # Errors
    /// A driver error on allocation or copy, or the table's own validation error.
    pub fn upload(
        stream: &Arc<CudaStream>,
        table: &HostPageTable,
        num_pages: usize,
    ) -> Result<PageTable> {
        table.validate(num_pages)?;
        let copy = |what: &str, data: &[i32]| {
            stream
                .clone_htod(data)
                .map_err(|e| Error::driver(format!("uploading {what}"), e))
        };
        Ok(PageTable {
            kv_indptr: copy("kv_indptr", table.kv_indptr())?,
            kv_indices: copy("kv_indices", table.kv_indices())?,
            kv_last_page_len: copy("kv_last_page_len", table.kv_last_page_len())?,
            batch: table.batch(),
            max_len: table.max_len(),
            page_size: table.page_size(),
            num_pages,
        })
    }

    pub fn batch(&self) -> usize {
        self.batch
    }
    /// The longest request: the bound that sizes split-KV grids.
    pub fn max_len(&self) -> usize {
        self.max_len
    }
    pub fn page_size(&self) -> usize {
        self.page_size
    }
    /// The page count of the cache this table was validated against.
    pub fn num_pages(&self) -> usize {
        self.num_pages
    }

    /// The device buffers `(kv_indptr, kv_indices, kv_last_page_len)`, read only: for code
    /// that hands them on as an engine's own table ([`PageTableView::from_device`], e.g.
    /// through raw pointers). Their contents were validated on upload.
    pub fn buffers(&self) -> (&CudaSlice<i32>, &CudaSlice<i32>, &CudaSlice<i32>) {
        (&self.kv_indptr, &self.kv_indices, &self.kv_last_page_len)
    }
}

/// A page table on the device as a step reads it: borrowed buffers and the bounds that size
/// the step's grids.
#[derive(Debug)]
pub struct PageTableView<'a> {
    pub(crate) kv_indptr: DeviceRef<'a, i32>,
    pub(crate) kv_indices: DeviceRef<'a, i32>,
    pub(crate) kv_last_page_len: DeviceRef<'a, i32>,
    batch: usize,
    max_len: usize,
    page_size: usize,
    num_pages: usize,
}

/// Checks what can be known of an engine's page table without reading it: `kv_indptr` holds
/// `batch + 1` entries, `kv_last_page_len` `batch`, `kv_indices` at least one page per
/// request; the batch and the longest request are positive and within the kernels' 32-bit
/// token index; the pool shape is one the kernels address.
///
/// # Errors
/// [`Error::PageTable`] naming the first problem, or the shape's own error.
pub fn check_table_lengths(
    indptr_len: usize,
    indices_len: usize,
    last_page_len_len: usize,
    batch: usize,
    max_len: usize,
    shape: &CacheShape,
) -> Result<()> {
    crate::pool::check_shape(shape)?;
    let bad = |msg: String| Err(Error::PageTable(msg));
    if batch == 0 {
        return bad("a step needs at least one request (batch = 0)".into());
    }
    if indptr_len != batch + 1 {
        return bad(format!(
            "kv_indptr has {indptr_len} entries for a batch of {batch}; expected {}",
            batch + 1
        ));
    }
    if last_page_len_len != batch {
        return bad(format!(
            "kv_last_page_len has {last_page_len_len} entries for a batch of {batch}"
        ));
    }
    if indices_len < batch {
        return bad(format!(
            "kv_indices has {indices_len} entries, fewer than one page per request of {batch}"
        ));
    }
    if max_len == 0 || max_len > i32::MAX as usize / 2 {
        return bad(format!(
            "the longest request ({max_len} tokens) must be between 1 and the kernels' 32-bit token index"
        ));
    }
    if max_len.div_ceil(shape.page_size) > shape.num_pages {
        return bad(format!(
            "the longest request ({max_len} tokens) needs more pages than the pool's {}",
            shape.num_pages
        ));
    }
    Ok(())
}

impl<'a> PageTableView<'a> {
    /// A table over an engine's device buffers for steps over a pool of `shape` (any layer:
    /// every layer of a model shares one table), with the batch size and the longest request's
    /// token count, which size the step's grids (nothing is read back from the device).
    ///
    /// # Errors
    /// As [`check_table_lengths`].
    ///
    /// # Safety
    /// The kernels trust the table's contents, which are not read here: `kv_indptr` starts at 0
    /// and never decreases, ending at the number of valid `kv_indices`; every request has at
    /// least one page; every page id lies in `0..shape.num_pages`; every `kv_last_page_len`
    /// lies in `1..=shape.page_size`; no request holds more than `max_len` tokens. The buffers
    /// are not written while a step that reads them may run. ([`PageTable::upload`] checks
    /// all of this on the host for tables that are not on the device yet.)
    pub unsafe fn from_device(
        kv_indptr: impl Into<DeviceRef<'a, i32>>,
        kv_indices: impl Into<DeviceRef<'a, i32>>,
        kv_last_page_len: impl Into<DeviceRef<'a, i32>>,
        batch: usize,
        max_len: usize,
        shape: &CacheShape,
    ) -> Result<PageTableView<'a>> {
        let (kv_indptr, kv_indices, kv_last_page_len) =
            (kv_indptr.into(), kv_indices.into(), kv_last_page_len.into());
        check_table_lengths(
            kv_indptr.len(),
            kv_indices.len(),
            kv_last_page_len.len(),
            batch,
            max_len,
            shape,
        )?;
        for (what, buffer) in [
            ("kv_indptr", &kv_indptr),
            ("kv_indices", &kv_indices),
            ("kv_last_page_len", &kv_last_page_len),
        ] {
            buffer.check_aligned(what, 4)?;
        }
        Ok(PageTableView {
            kv_indptr,
            kv_indices,
            kv_last_page_len,
            batch,
            max_len,
            page_size: shape.page_size,
            num_pages: shape.num_pages,
        })
    }

    pub fn batch(&self) -> usize {
        self.batch
    }
    /// The longest request: the bound that sizes split-KV grids.
    pub fn max_len(&self) -> usize {
        self.max_len
    }
    pub fn page_size(&self) -> usize {
        self.page_size
    }
    /// The page count of the pool this table indexes.
    pub fn num_pages(&self) -> usize {
        self.num_pages
    }
}

impl PageTable {
    /// The table as a step reads it.
    pub fn view(&self) -> PageTableView<'_> {
        PageTableView {
            kv_indptr: (&self.kv_indptr).into(),
            kv_indices: (&self.kv_indices).into(),
            kv_last_page_len: (&self.kv_last_page_len).into(),
            batch: self.batch,
            max_len: self.max_len,
            page_size: self.page_size,
            num_pages: self.num_pages,
        }
    }
}

impl<'a> From<&'a PageTable> for PageTableView<'a> {
    fn from(table: &'a PageTable) -> PageTableView<'a> {
        table.view()
    }
}

impl<'a> From<&'a PageTableView<'_>> for PageTableView<'a> {
    fn from(table: &'a PageTableView<'_>) -> PageTableView<'a> {
        PageTableView {
            kv_indptr: table.kv_indptr.reborrow(),
            kv_indices: table.kv_indices.reborrow(),
            kv_last_page_len: table.kv_last_page_len.reborrow(),
            batch: table.batch,
            max_len: table.max_len,
            page_size: table.page_size,
            num_pages: table.num_pages,
        }
    }
}
