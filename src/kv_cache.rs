//! The paged KV cache on the device, with a host-side page allocator per request.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use crate::element::KvElement;
use crate::error::{Error, Result};
use crate::page_table::{HostPageTable, PageTable};
use crate::reference::CacheShape;

/// A handle to one request (sequence) in a [`PagedKvCache`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub usize);

#[derive(Clone, Debug, Default)]
struct RequestPages {
    pages: Vec<i32>,
    len: usize,
}

/// K and V pools on the device (FlashInfer-compatible paged layout), and which pages each
/// request owns. Tokens are written through a decoder's `append`, which also maintains every
/// structure derived from K that its variant reads.
pub struct PagedKvCache<T: KvElement> {
    shape: CacheShape,
    pub(crate) k: CudaSlice<T>,
    pub(crate) v: CudaSlice<T>,
    free_pages: Vec<i32>,
    requests: Vec<Option<RequestPages>>,
}

impl<T: KvElement> std::fmt::Debug for PagedKvCache<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedKvCache")
            .field("shape", &self.shape)
            .field("dtype", &T::DTYPE)
            .field("free_pages", &self.free_pages.len())
            .finish()
    }
}

impl<T: KvElement> PagedKvCache<T> {
    /// Allocates K and V for `shape.num_pages` pages (zeroed).
    ///
    /// # Errors
    /// A shape with a zero dimension, a head_dim that is not a multiple of 8, a page count
    /// beyond 32-bit page ids, or a failed allocation.
    pub fn new(stream: &Arc<CudaStream>, shape: CacheShape) -> Result<Self> {
        if shape.num_pages == 0 || shape.num_kv_heads == 0 || shape.page_size == 0 {
            return Err(Error::Parameter(format!(
                "cache shape has a zero dimension: {shape:?}"
            )));
        }
        if shape.head_dim == 0 || shape.head_dim % 8 != 0 {
            return Err(Error::Parameter(format!(
                "head_dim {} is not a positive multiple of 8",
                shape.head_dim
            )));
        }
        if shape.num_pages * shape.page_size > i32::MAX as usize {
            return Err(Error::Parameter(format!(
                "{} pages of {} tokens overflow 32-bit slot ids",
                shape.num_pages, shape.page_size
            )));
        }
        let alloc = |what| {
            stream.alloc_zeros::<T>(shape.elements()).map_err(|e| {
                Error::driver(
                    format!("allocating {what} ({} elements)", shape.elements()),
                    e,
                )
            })
        };
        Ok(PagedKvCache {
            shape,
            k: alloc("K")?,
            v: alloc("V")?,
            // Popped from the end: page 0 is handed out first.
            free_pages: (0..shape.num_pages as i32).rev().collect(),
            requests: Vec::new(),
        })
    }

    pub fn shape(&self) -> CacheShape {
        self.shape
    }

    pub fn k(&self) -> &CudaSlice<T> {
        &self.k
    }

    pub fn v(&self) -> &CudaSlice<T> {
        &self.v
    }

    /// K and V for writing in place (an engine's own kernels, benchmark fills). Nothing
    /// derived from K is updated: variants that keep derived structures need `append`.
    pub fn k_v_mut(&mut self) -> (&mut CudaSlice<T>, &mut CudaSlice<T>) {
        (&mut self.k, &mut self.v)
    }

    pub fn free_pages(&self) -> usize {
        self.free_pages.len()
    }

    /// Starts an empty request.
    pub fn add_request(&mut self) -> RequestId {
        self.requests.push(Some(RequestPages::default()));
        RequestId(self.requests.len() - 1)
    }

    /// Ends a request and returns its pages to the pool.
    ///
    /// # Errors
    /// [`Error::UnknownRequest`].
    pub fn remove_request(&mut self, id: RequestId) -> Result<()> {
        let request = self
            .requests
            .get_mut(id.0)
            .and_then(Option::take)
            .ok_or(Error::UnknownRequest(id.0))?;
        self.free_pages.extend(request.pages.iter().rev());
        Ok(())
    }

    fn request(&self, id: RequestId) -> Result<&RequestPages> {
        self.requests
            .get(id.0)
            .and_then(Option::as_ref)
            .ok_or(Error::UnknownRequest(id.0))
    }

    /// Tokens held by a request.
    ///
    /// # Errors
    /// [`Error::UnknownRequest`].
    pub fn len(&self, id: RequestId) -> Result<usize> {
        Ok(self.request(id)?.len)
    }

    /// Reserves the slots (`page * page_size + offset`) of `count` new tokens for each listed
    /// request, allocating pages as needed. All or nothing: when the pool runs out, nothing
    /// is reserved.
    ///
    /// # Errors
    /// [`Error::UnknownRequest`], [`Error::OutOfPages`].
    pub fn reserve(&mut self, appends: &[(RequestId, usize)]) -> Result<Vec<i32>> {
        let page_size = self.shape.page_size;
        let mut needed = 0;
        for &(id, count) in appends {
            let r = self.request(id)?;
            needed += (r.len + count).div_ceil(page_size) - r.len.div_ceil(page_size);
        }
        if needed > self.free_pages.len() {
            return Err(Error::OutOfPages {
                needed,
                free: self.free_pages.len(),
                total: self.shape.num_pages,
            });
        }
        let mut slots = Vec::new();
        for &(id, count) in appends {
            let mut r = self.requests[id.0].take().expect("checked above");
            for _ in 0..count {
                if r.len % page_size == 0 {
                    r.pages.push(self.free_pages.pop().expect("counted above"));
                }
                let page = *r.pages.last().expect("a page was just ensured") as usize;
                slots.push((page * page_size + r.len % page_size) as i32);
                r.len += 1;
            }
            self.requests[id.0] = Some(r);
        }
        Ok(slots)
    }

    /// The host page table of the listed requests, in order.
    ///
    /// # Errors
    /// [`Error::UnknownRequest`], or an empty request (a table row needs a token).
    pub fn host_page_table(&self, ids: &[RequestId]) -> Result<HostPageTable> {
        let rows = ids
            .iter()
            .map(|&id| self.request(id).map(|r| (r.pages.as_slice(), r.len)))
            .collect::<Result<Vec<_>>>()?;
        HostPageTable::from_requests(&rows, self.shape.page_size, self.shape.num_pages)
    }

    /// The device page table of the listed requests, in order.
    ///
    /// # Errors
    /// As [`PagedKvCache::host_page_table`], or a failed upload.
    pub fn page_table(&self, stream: &Arc<CudaStream>, ids: &[RequestId]) -> Result<PageTable> {
        PageTable::upload(stream, &self.host_page_table(ids)?, self.shape.num_pages)
    }

    /// Overwrites the whole K and V pools from the host (tests, benchmarks, engines that
    /// manage pages themselves). Page bookkeeping is not changed.
    ///
    /// # Errors
    /// A length other than `shape.elements()`, or a failed copy.
    pub fn upload(&mut self, stream: &Arc<CudaStream>, k: &[T], v: &[T]) -> Result<()> {
        for (what, data) in [("K", k), ("V", v)] {
            if data.len() != self.shape.elements() {
                return Err(Error::shape(
                    format!("{what} pool upload"),
                    self.shape.elements(),
                    data.len(),
                ));
            }
        }
        stream
            .memcpy_htod(k, &mut self.k)
            .map_err(|e| Error::driver("uploading K", e))?;
        stream
            .memcpy_htod(v, &mut self.v)
            .map_err(|e| Error::driver("uploading V", e))
    }

    /// Copies K and V back to the host (tests, `--dump`).
    ///
    /// # Errors
    /// A failed copy.
    pub fn download(&self, stream: &Arc<CudaStream>) -> Result<(Vec<T>, Vec<T>)> {
        let k = stream
            .clone_dtoh(&self.k)
            .map_err(|e| Error::driver("downloading K", e))?;
        let v = stream
            .clone_dtoh(&self.v)
            .map_err(|e| Error::driver("downloading V", e))?;
        Ok((k, v))
    }
}
