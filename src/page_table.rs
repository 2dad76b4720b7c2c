//! A validated page table on the device (`kv_indptr`, `kv_indices`, `kv_last_page_len`), with
//! the host-side bounds that size every grid of a step.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use crate::error::{Error, Result};
use crate::host::HostPageTable;

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
}
