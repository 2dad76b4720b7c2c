//! Borrowed views of a paged KV pool and of its sidecar (what a variant derives from K): what
//! every step and append runs over, whoever owns the memory. [`crate::PagedKvCache`] is one
//! owner that hands such views out.

use cudarc::driver::{CudaView, CudaViewMut};
use twilight_jit::{DerivedKinds, VariantSpec};

use crate::element::KvElement;
use crate::error::{Error, Result};
use crate::host::CacheShape;

/// The sidecar of a pool for reading: each structure its variant keeps (see [`DerivedKinds`]).
#[derive(Debug)]
pub struct SidecarView<'a, T> {
    /// Quest: `[num_pages, num_kv_heads, head_dim]` element-wise max and min over each page.
    pub page_max: Option<CudaView<'a, T>>,
    pub page_min: Option<CudaView<'a, T>>,
    /// Top-p: 4-bit K, one row of `head_dim / 2` bytes per (token, head) in the K layout.
    pub k_q4: Option<CudaView<'a, u8>>,
    /// Top-p: `(scale, min)` per (token, head) in the K layout.
    pub k_q4_scale_min: Option<CudaView<'a, half::f16>>,
    /// Double Sparsity: the label (values at the `r` calibrated channels) per (token, head).
    pub k_label: Option<CudaView<'a, T>>,
    /// Double Sparsity: `[num_kv_heads, r]` channel ids, each row ascending.
    pub ds_channels: Option<CudaView<'a, i32>>,
    pub kinds: DerivedKinds,
}

/// The sidecar of a pool for an append, which rewrites it.
#[derive(Debug)]
pub struct SidecarViewMut<'a, T> {
    pub page_max: Option<CudaViewMut<'a, T>>,
    pub page_min: Option<CudaViewMut<'a, T>>,
    pub k_q4: Option<CudaViewMut<'a, u8>>,
    pub k_q4_scale_min: Option<CudaViewMut<'a, half::f16>>,
    pub k_label: Option<CudaViewMut<'a, T>>,
    pub ds_channels: Option<CudaView<'a, i32>>,
    pub kinds: DerivedKinds,
}

/// A borrowed paged KV pool: K and V (FlashInfer layout, see [`CacheShape`]) and its sidecar.
#[derive(Debug)]
pub struct KvPool<'a, T> {
    pub(crate) shape: CacheShape,
    pub(crate) k: CudaView<'a, T>,
    pub(crate) v: CudaView<'a, T>,
    pub(crate) sidecar: SidecarView<'a, T>,
}

/// A borrowed paged KV pool that an append writes.
#[derive(Debug)]
pub struct KvPoolMut<'a, T> {
    pub(crate) shape: CacheShape,
    pub(crate) k: CudaViewMut<'a, T>,
    pub(crate) v: CudaViewMut<'a, T>,
    pub(crate) sidecar: SidecarViewMut<'a, T>,
}

impl<'a, T: KvElement> KvPool<'a, T> {
    /// A view of K and V with no sidecar: enough for dense (`full`/`none`) variants.
    ///
    /// # Errors
    /// A shape the kernels cannot address, or K or V not holding `shape.elements()`.
    pub fn new(shape: CacheShape, k: CudaView<'a, T>, v: CudaView<'a, T>) -> Result<Self> {
        check_shape(&shape)?;
        for (what, len) in [("K", k.len()), ("V", v.len())] {
            if len != shape.elements() {
                return Err(Error::shape(
                    format!("{what} pool of {shape:?}"),
                    shape.elements(),
                    len,
                ));
            }
        }
        Ok(KvPool {
            shape,
            k,
            v,
            sidecar: SidecarView {
                page_max: None,
                page_min: None,
                k_q4: None,
                k_q4_scale_min: None,
                k_label: None,
                ds_channels: None,
                kinds: DerivedKinds::default(),
            },
        })
    }

    pub fn shape(&self) -> CacheShape {
        self.shape
    }

    pub fn sidecar(&self) -> &SidecarView<'a, T> {
        &self.sidecar
    }

    /// Checks that the pool keeps every structure `spec`'s kernels read.
    ///
    /// # Errors
    /// [`Error::Parameter`] naming what is missing.
    pub fn check_sidecar_for(&self, spec: &VariantSpec) -> Result<()> {
        check_kinds(spec, self.sidecar.kinds)
    }
}

impl<T: KvElement> KvPoolMut<'_, T> {
    pub fn shape(&self) -> CacheShape {
        self.shape
    }

    /// As [`KvPool::check_sidecar_for`].
    ///
    /// # Errors
    /// As [`KvPool::check_sidecar_for`].
    pub fn check_sidecar_for(&self, spec: &VariantSpec) -> Result<()> {
        check_kinds(spec, self.sidecar.kinds)
    }
}

fn check_kinds(spec: &VariantSpec, kept: DerivedKinds) -> Result<()> {
    let needed = spec.derived_kinds();
    if (needed.quest && !kept.quest)
        || (needed.quant4 && !kept.quant4)
        || (needed.labels > 0 && kept.labels != needed.labels)
    {
        return Err(Error::Parameter(format!(
            "variant {spec} reads {needed:?} metadata but the pool keeps {kept:?}; create it with PagedKvCache::for_variant (for_double_sparse) and fill it through append"
        )));
    }
    Ok(())
}

/// The shape rules every pool obeys: no zero dimension, head_dim a multiple of 8 (16-byte
/// loads), slots addressable with 32-bit ids.
pub(crate) fn check_shape(shape: &CacheShape) -> Result<()> {
    if shape.num_pages == 0 || shape.num_kv_heads == 0 || shape.page_size == 0 {
        return Err(Error::Parameter(format!(
            "cache shape has a zero dimension: {shape:?}"
        )));
    }
    if shape.head_dim == 0 || !shape.head_dim.is_multiple_of(8) {
        return Err(Error::Parameter(format!(
            "head_dim {} is not a positive multiple of 8",
            shape.head_dim
        )));
    }
    let slots = shape.num_pages.checked_mul(shape.page_size);
    if slots.is_none_or(|s| s > i32::MAX as usize) {
        return Err(Error::Parameter(format!(
            "{} pages of {} tokens overflow 32-bit slot ids",
            shape.num_pages, shape.page_size
        )));
    }
    if shape
        .num_kv_heads
        .checked_mul(shape.head_dim)
        .and_then(|row| row.checked_mul(slots.unwrap_or(0)))
        .is_none()
    {
        return Err(Error::Parameter(format!(
            "cache shape {shape:?} has more elements than this machine can address"
        )));
    }
    Ok(())
}
