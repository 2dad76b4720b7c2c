//! A paged KV pool that twilight owns: K, V and the variant's sidecar on the device, with a
//! host-side page allocator per request. It hands out the borrowed views ([`KvPool`],
//! [`KvPoolMut`]) that every step and append runs over.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
pub use twilight_jit::DerivedKinds;

use crate::element::KvElement;
use crate::error::{Error, Result};
use crate::host::{CacheShape, HostPageTable};
use crate::page_table::PageTable;
use crate::pool::{KvPool, KvPoolMut};
pub use crate::sidecar::Derived;
use crate::sidecar::Sidecar;

mod pages;

use pages::PageAllocator;
pub use pages::RequestId;

/// K and V pools on the device (FlashInfer-compatible paged layout), and which pages each
/// request owns. Tokens are written through a decoder's `append`, which also maintains every
/// structure derived from K that its variant reads.
pub struct PagedKvCache<T: KvElement> {
    shape: CacheShape,
    k: CudaSlice<T>,
    v: CudaSlice<T>,
    derived: Sidecar<T>,
    pages: PageAllocator,
}

impl<T: KvElement> std::fmt::Debug for PagedKvCache<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedKvCache")
            .field("shape", &self.shape)
            .field("dtype", &T::DTYPE)
            .field("free_pages", &self.pages.free_pages())
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
        Self::with_derived(stream, shape, DerivedKinds::default())
    }

    /// A cache for a variant: K, V and every structure the variant derives from K.
    /// `double_sparse(r)` variants also need their channels: see
    /// [`PagedKvCache::for_double_sparse`].
    ///
    /// # Errors
    /// As [`PagedKvCache::new`], or a `double_sparse` variant.
    pub fn for_variant(
        stream: &Arc<CudaStream>,
        shape: CacheShape,
        spec: &twilight_jit::VariantSpec,
    ) -> Result<Self> {
        Self::with_derived(stream, shape, spec.derived_kinds())
    }

    /// A cache for a `double_sparse(r)` variant, whose labels hold each key's values at the
    /// calibrated `channels` of its KV head (one ascending list of `r` ids per KV head, e.g.
    /// from [`crate::calibration::ChannelConfig::kv_head_channels`]). The channels are fixed
    /// for the cache's life: every label is written by `append` with them.
    ///
    /// # Errors
    /// As [`PagedKvCache::new`]; a variant that is not `double_sparse`; channel lists that are
    /// not one list of `r` ascending, distinct ids below head_dim per KV head.
    pub fn for_double_sparse(
        stream: &Arc<CudaStream>,
        shape: CacheShape,
        spec: &twilight_jit::VariantSpec,
        channels: &[Vec<usize>],
    ) -> Result<Self> {
        let derived = Sidecar::for_double_sparse(stream, shape, spec, channels)?;
        Self::build(stream, derived)
    }

    /// A cache with the given derived structures (labels need channels: see
    /// [`PagedKvCache::for_double_sparse`]).
    ///
    /// # Errors
    /// As [`PagedKvCache::new`], or `kinds.labels > 0`.
    pub fn with_derived(
        stream: &Arc<CudaStream>,
        shape: CacheShape,
        kinds: DerivedKinds,
    ) -> Result<Self> {
        let derived = Sidecar::with_kinds(stream, shape, kinds)?;
        Self::build(stream, derived)
    }

    /// K and V beside a sidecar allocated for the same shape (which checked it).
    fn build(stream: &Arc<CudaStream>, derived: Sidecar<T>) -> Result<Self> {
        let shape = derived.shape();
        let pages = PageAllocator::new(shape.num_pages, shape.page_size)?;
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
            derived,
            k: alloc("K")?,
            v: alloc("V")?,
            pages,
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

    /// Checks that this cache keeps every structure `spec`'s kernels read.
    ///
    /// # Errors
    /// [`Error::Parameter`] naming what is missing.
    pub fn check_derived_for(&self, spec: &twilight_jit::VariantSpec) -> Result<()> {
        self.pool().check_sidecar_for(spec)
    }

    /// The pool as a step reads it.
    pub fn pool(&self) -> KvPool<'_, T> {
        KvPool::owned(self.shape, &self.k, &self.v, self.derived.view())
    }

    /// The pool as an append writes it (the caller reserves the slots first).
    pub(crate) fn pool_mut(&mut self) -> KvPoolMut<'_, T> {
        KvPoolMut::owned(
            self.shape,
            &mut self.k,
            &mut self.v,
            self.derived.view_mut(),
        )
    }

    /// The structures derived from K that this cache keeps.
    pub fn derived(&self) -> &Derived<T> {
        &self.derived
    }

    pub fn derived_kinds(&self) -> DerivedKinds {
        self.derived.kinds()
    }

    /// K and V for writing in place (an engine's own kernels, benchmark fills). Nothing
    /// derived from K is updated: variants that keep derived structures need `append`.
    pub fn k_v_mut(&mut self) -> (&mut CudaSlice<T>, &mut CudaSlice<T>) {
        (&mut self.k, &mut self.v)
    }

    pub fn free_pages(&self) -> usize {
        self.pages.free_pages()
    }

    /// Starts an empty request.
    pub fn add_request(&mut self) -> RequestId {
        self.pages.add_request()
    }

    /// Ends a request and returns its pages to the pool (its first page is the next handed
    /// out).
    ///
    /// # Errors
    /// [`Error::UnknownRequest`].
    pub fn remove_request(&mut self, id: RequestId) -> Result<()> {
        self.pages.remove_request(id)
    }

    /// Tokens held by a request.
    ///
    /// # Errors
    /// [`Error::UnknownRequest`].
    pub fn len(&self, id: RequestId) -> Result<usize> {
        self.pages.len(id)
    }

    /// The pages a request owns, in token order.
    ///
    /// # Errors
    /// [`Error::UnknownRequest`].
    pub fn pages_of(&self, id: RequestId) -> Result<&[i32]> {
        self.pages.pages(id)
    }

    /// Reserves the slots (`page * page_size + offset`) of `count` new tokens for each listed
    /// request, allocating pages as needed. All or nothing: on any error (the pool runs out, a
    /// request is unknown or listed twice, a count overflows) nothing is reserved.
    ///
    /// # Errors
    /// [`Error::UnknownRequest`], [`Error::OutOfPages`], [`Error::Parameter`].
    pub fn reserve(&mut self, appends: &[(RequestId, usize)]) -> Result<Vec<i32>> {
        self.pages.reserve(appends)
    }

    /// The host page table of the listed requests, in order.
    ///
    /// # Errors
    /// [`Error::UnknownRequest`], or an empty request (a table row needs a token).
    pub fn host_page_table(&self, ids: &[RequestId]) -> Result<HostPageTable> {
        self.pages.host_page_table(ids)
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
    /// A length other than `shape.elements()`, a cache with derived structures (which this
    /// would leave stale: fill such a cache through a decoder's `append`), or a failed copy.
    pub fn upload(&mut self, stream: &Arc<CudaStream>, k: &[T], v: &[T]) -> Result<()> {
        if self.derived_kinds() != DerivedKinds::default() {
            return Err(Error::Parameter(
                "upload would leave the cache's Quest, 4-bit or label metadata stale; use append"
                    .into(),
            ));
        }
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
