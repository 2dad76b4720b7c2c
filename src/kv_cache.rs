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
use crate::pool::{check_shape, KvPool, KvPoolMut, SidecarView, SidecarViewMut};

mod pages;

use pages::PageAllocator;
pub use pages::RequestId;

/// What a variant derives from K, kept beside it and updated by the same append launch.
#[derive(Debug)]
pub struct Derived<T: KvElement> {
    /// Quest: `[num_pages, num_kv_heads, head_dim]` element-wise max and min over each page's
    /// valid tokens.
    pub page_max: Option<CudaSlice<T>>,
    pub page_min: Option<CudaSlice<T>>,
    /// Top-p: 4-bit K, one row of `head_dim / 2` bytes per (token, head) in the K layout.
    pub k_q4: Option<CudaSlice<u8>>,
    /// Top-p: `(scale, min)` per (token, head) in the K layout.
    pub k_q4_scale_min: Option<CudaSlice<half::f16>>,
    /// Double Sparsity: the label of every (token, head), its key's values at the head's `r`
    /// calibrated channels, in the K layout with `r` values per row.
    pub k_label: Option<CudaSlice<T>>,
    /// Double Sparsity: `[num_kv_heads, r]` channel ids, each row ascending.
    pub ds_channels: Option<CudaSlice<i32>>,
    /// The same channels on the host, one list per KV head (empty without labels).
    pub label_channels: Vec<Vec<usize>>,
}

/// K and V pools on the device (FlashInfer-compatible paged layout), and which pages each
/// request owns. Tokens are written through a decoder's `append`, which also maintains every
/// structure derived from K that its variant reads.
pub struct PagedKvCache<T: KvElement> {
    shape: CacheShape,
    k: CudaSlice<T>,
    v: CudaSlice<T>,
    derived: Derived<T>,
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
        let kinds = spec.derived_kinds();
        if kinds.labels == 0 {
            return Err(Error::Parameter(format!(
                "variant {spec} does not select with double_sparse: use PagedKvCache::for_variant"
            )));
        }
        crate::reference::double_sparse::check_channels(
            channels,
            shape.num_kv_heads,
            shape.head_dim,
            kinds.labels,
        )?;
        Self::build(stream, shape, kinds, channels)
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
        if kinds.labels > 0 {
            return Err(Error::Parameter(format!(
                "a cache with double_sparse({}) labels needs its calibrated channels: create it with PagedKvCache::for_double_sparse",
                kinds.labels
            )));
        }
        Self::build(stream, shape, kinds, &[])
    }

    fn build(
        stream: &Arc<CudaStream>,
        shape: CacheShape,
        kinds: DerivedKinds,
        channels: &[Vec<usize>],
    ) -> Result<Self> {
        check_shape(&shape)?;
        let pages = PageAllocator::new(shape.num_pages, shape.page_size)?;
        let alloc = |what| {
            stream.alloc_zeros::<T>(shape.elements()).map_err(|e| {
                Error::driver(
                    format!("allocating {what} ({} elements)", shape.elements()),
                    e,
                )
            })
        };
        // check_shape bounded num_pages * num_kv_heads * page_size * head_dim, and every size
        // below is at most that (labels: r < head_dim; scales: 2 <= head_dim).
        let rows = shape.num_pages * shape.num_kv_heads * shape.page_size;
        let meta = shape.num_pages * shape.num_kv_heads * shape.head_dim;
        let zeros = |what: &str, n: usize| -> Result<CudaSlice<T>> {
            stream
                .alloc_zeros::<T>(n)
                .map_err(|e| Error::driver(format!("allocating {what}"), e))
        };
        let derived = Derived {
            page_max: kinds
                .quest
                .then(|| zeros("Quest page max", meta))
                .transpose()?,
            page_min: kinds
                .quest
                .then(|| zeros("Quest page min", meta))
                .transpose()?,
            k_q4: kinds
                .quant4
                .then(|| stream.alloc_zeros::<u8>(rows * shape.head_dim / 2))
                .transpose()
                .map_err(|e| Error::driver("allocating 4-bit K", e))?,
            k_q4_scale_min: kinds
                .quant4
                .then(|| stream.alloc_zeros::<half::f16>(rows * 2))
                .transpose()
                .map_err(|e| Error::driver("allocating 4-bit K scales", e))?,
            k_label: (kinds.labels > 0)
                .then(|| zeros("Double Sparsity labels", rows * kinds.labels))
                .transpose()?,
            ds_channels: (kinds.labels > 0)
                .then(|| {
                    let ids: Vec<i32> = channels.iter().flatten().map(|&c| c as i32).collect();
                    stream.clone_htod(&ids)
                })
                .transpose()
                .map_err(|e| Error::driver("uploading Double Sparsity channels", e))?,
            label_channels: channels.to_vec(),
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
        let d = &self.derived;
        KvPool {
            shape: self.shape,
            k: self.k.as_view(),
            v: self.v.as_view(),
            sidecar: SidecarView {
                page_max: d.page_max.as_ref().map(CudaSlice::as_view),
                page_min: d.page_min.as_ref().map(CudaSlice::as_view),
                k_q4: d.k_q4.as_ref().map(CudaSlice::as_view),
                k_q4_scale_min: d.k_q4_scale_min.as_ref().map(CudaSlice::as_view),
                k_label: d.k_label.as_ref().map(CudaSlice::as_view),
                ds_channels: d.ds_channels.as_ref().map(CudaSlice::as_view),
                kinds: self.derived_kinds(),
            },
        }
    }

    /// The pool as an append writes it (the caller reserves the slots first).
    pub(crate) fn pool_mut(&mut self) -> KvPoolMut<'_, T> {
        let kinds = self.derived_kinds();
        let d = &mut self.derived;
        KvPoolMut {
            shape: self.shape,
            k: self.k.as_view_mut(),
            v: self.v.as_view_mut(),
            sidecar: SidecarViewMut {
                page_max: d.page_max.as_mut().map(CudaSlice::as_view_mut),
                page_min: d.page_min.as_mut().map(CudaSlice::as_view_mut),
                k_q4: d.k_q4.as_mut().map(CudaSlice::as_view_mut),
                k_q4_scale_min: d.k_q4_scale_min.as_mut().map(CudaSlice::as_view_mut),
                k_label: d.k_label.as_mut().map(CudaSlice::as_view_mut),
                ds_channels: d.ds_channels.as_ref().map(CudaSlice::as_view),
                kinds,
            },
        }
    }

    /// The structures derived from K that this cache keeps.
    pub fn derived(&self) -> &Derived<T> {
        &self.derived
    }

    pub fn derived_kinds(&self) -> DerivedKinds {
        DerivedKinds {
            quest: self.derived.page_max.is_some(),
            quant4: self.derived.k_q4.is_some(),
            labels: self.derived.label_channels.first().map_or(0, Vec::len),
        }
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
