//! The sidecar of a paged pool: what a variant derives from K (Quest page bounds, the 4-bit K
//! with its scale and min, Double Sparsity labels and channels), owned by twilight, sized for
//! the pool's pages, and kept current by the append launch. [`crate::PagedKvCache`] owns one
//! beside its own K/V; an engine that owns K/V allocates one per layer for its pool.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use twilight_jit::{DerivedKinds, VariantSpec};

use crate::element::KvElement;
use crate::error::{Error, Result};
use crate::host::CacheShape;
use crate::pool::{check_shape, SidecarView, SidecarViewMut};

/// What a variant derives from K, kept beside a pool of `shape` (one layer) and updated by the
/// same launch that appends K/V.
#[derive(Debug)]
pub struct Sidecar<T: KvElement> {
    /// Quest: `[num_pages, num_kv_heads, 2, head_dim]`, the element-wise max (row 0) and min
    /// (row 1) over each page's valid tokens, a page's two rows adjacent so that scoring reads
    /// them as one run.
    pub page_bounds: Option<CudaSlice<T>>,
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
    shape: CacheShape,
}

/// The former name of [`Sidecar`].
pub type Derived<T> = Sidecar<T>;

impl<T: KvElement> Sidecar<T> {
    /// The sidecar a variant reads, zeroed, for a pool of `shape`. `double_sparse(r)` variants
    /// also need their channels: see [`Sidecar::for_double_sparse`]. Dense variants keep
    /// nothing: their sidecar is empty.
    ///
    /// # Errors
    /// A shape the kernels cannot address, a `double_sparse` variant, a failed allocation.
    pub fn for_variant(
        stream: &Arc<CudaStream>,
        shape: CacheShape,
        spec: &VariantSpec,
    ) -> Result<Self> {
        Self::with_kinds(stream, shape, spec.derived_kinds())
    }

    /// The sidecar of a `double_sparse(r)` variant, whose labels hold each key's values at the
    /// calibrated `channels` of its KV head (one ascending list of `r` ids per KV head, e.g.
    /// from [`crate::calibration::ChannelConfig::kv_head_channels`]), fixed for its life.
    ///
    /// # Errors
    /// As [`Sidecar::for_variant`]; a variant that is not `double_sparse`; channel lists that
    /// are not one list of `r` ascending, distinct ids below head_dim per KV head.
    pub fn for_double_sparse(
        stream: &Arc<CudaStream>,
        shape: CacheShape,
        spec: &VariantSpec,
        channels: &[Vec<usize>],
    ) -> Result<Self> {
        let kinds = spec.derived_kinds();
        if kinds.labels == 0 {
            return Err(Error::Parameter(format!(
                "variant {spec} does not select with double_sparse: use for_variant"
            )));
        }
        crate::reference::double_sparse::check_channels(
            channels,
            shape.num_kv_heads,
            shape.head_dim,
            kinds.labels,
        )?;
        Self::alloc(stream, shape, kinds, channels)
    }

    /// A sidecar with the given structures (labels need channels: see
    /// [`Sidecar::for_double_sparse`]).
    ///
    /// # Errors
    /// As [`Sidecar::for_variant`], or `kinds.labels > 0`.
    pub fn with_kinds(
        stream: &Arc<CudaStream>,
        shape: CacheShape,
        kinds: DerivedKinds,
    ) -> Result<Self> {
        if kinds.labels > 0 {
            return Err(Error::Parameter(format!(
                "a sidecar with double_sparse({}) labels needs its calibrated channels: create it with for_double_sparse",
                kinds.labels
            )));
        }
        Self::alloc(stream, shape, kinds, &[])
    }

    fn alloc(
        stream: &Arc<CudaStream>,
        shape: CacheShape,
        kinds: DerivedKinds,
        channels: &[Vec<usize>],
    ) -> Result<Self> {
        check_shape(&shape)?;
        let rows = shape.num_pages * shape.num_kv_heads * shape.page_size;
        let bounds = shape.num_pages * shape.num_kv_heads * 2 * shape.head_dim;
        let zeros = |what: &str, n: usize| -> Result<CudaSlice<T>> {
            stream
                .alloc_zeros::<T>(n)
                .map_err(|e| Error::driver(format!("allocating {what}"), e))
        };
        Ok(Sidecar {
            page_bounds: kinds
                .quest
                .then(|| zeros("Quest page bounds", bounds))
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
            shape,
        })
    }

    /// The pool shape (of one layer) this sidecar was allocated for.
    pub fn shape(&self) -> CacheShape {
        self.shape
    }

    /// The structures this sidecar keeps.
    pub fn kinds(&self) -> DerivedKinds {
        DerivedKinds {
            quest: self.page_bounds.is_some(),
            quant4: self.k_q4.is_some(),
            labels: self.label_channels.first().map_or(0, Vec::len),
        }
    }

    /// The sidecar as a step reads it.
    pub fn view(&self) -> SidecarView<'_, T> {
        SidecarView {
            page_bounds: self.page_bounds.as_ref().map(CudaSlice::as_view),
            k_q4: self.k_q4.as_ref().map(CudaSlice::as_view),
            k_q4_scale_min: self.k_q4_scale_min.as_ref().map(CudaSlice::as_view),
            k_label: self.k_label.as_ref().map(CudaSlice::as_view),
            ds_channels: self.ds_channels.as_ref().map(CudaSlice::as_view),
            kinds: self.kinds(),
        }
    }

    /// The sidecar as an append writes it.
    pub fn view_mut(&mut self) -> SidecarViewMut<'_, T> {
        let kinds = self.kinds();
        SidecarViewMut {
            page_bounds: self.page_bounds.as_mut().map(CudaSlice::as_view_mut),
            k_q4: self.k_q4.as_mut().map(CudaSlice::as_view_mut),
            k_q4_scale_min: self.k_q4_scale_min.as_mut().map(CudaSlice::as_view_mut),
            k_label: self.k_label.as_mut().map(CudaSlice::as_view_mut),
            ds_channels: self.ds_channels.as_ref().map(CudaSlice::as_view),
            kinds,
        }
    }
}
