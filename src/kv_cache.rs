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

/// Which derived structures a cache keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DerivedKinds {
    pub quest: bool,
    pub quant4: bool,
    /// Label channels per token (Double Sparsity's r); 0 keeps no labels.
    pub labels: usize,
}

impl DerivedKinds {
    /// What a variant's kernels read.
    pub fn for_spec(spec: &twilight_jit::VariantSpec) -> DerivedKinds {
        DerivedKinds {
            quest: spec.selector == twilight_jit::Selector::Quest,
            quant4: spec.pruning == twilight_jit::Pruning::TopP,
            labels: match spec.selector {
                twilight_jit::Selector::DoubleSparse { channels } => channels as usize,
                _ => 0,
            },
        }
    }
}

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
    pub(crate) derived: Derived<T>,
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
        Self::with_derived(stream, shape, DerivedKinds::for_spec(spec))
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
        let kinds = DerivedKinds::for_spec(spec);
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

    /// Checks that this cache keeps every structure `spec`'s kernels read.
    ///
    /// # Errors
    /// [`Error::Parameter`] naming what is missing.
    pub fn check_derived_for(&self, spec: &twilight_jit::VariantSpec) -> Result<()> {
        let needed = DerivedKinds::for_spec(spec);
        let kept = self.derived_kinds();
        if (needed.quest && !kept.quest)
            || (needed.quant4 && !kept.quant4)
            || (needed.labels > 0 && kept.labels != needed.labels)
        {
            return Err(Error::Parameter(format!(
                "variant {spec} reads {needed:?} metadata but the cache keeps {kept:?}; create it with PagedKvCache::for_variant (for_double_sparse) and fill it through append"
            )));
        }
        Ok(())
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
        let mut seen = std::collections::HashSet::new();
        if let Some(&(id, _)) = appends.iter().find(|(id, _)| !seen.insert(*id)) {
            return Err(Error::Parameter(format!(
                "request {} appears twice in one append; give its tokens as one entry",
                id.0
            )));
        }
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
