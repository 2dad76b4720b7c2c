//! Borrowed views of a paged KV pool and of its sidecar (what a variant derives from K): what
//! every step and append runs over, whoever owns the memory. An engine builds one per layer
//! over its own K/V buffers ([`KvPool::from_layer`]) beside a [`Sidecar`] twilight allocated;
//! [`crate::PagedKvCache`] is one owner that hands such views out.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use twilight_jit::{DerivedKinds, VariantSpec};

use crate::buffer::{check_alignment, DeviceMut, DeviceRef, VECTOR_ALIGN};
use crate::element::KvElement;
use crate::error::{Error, Result};
use crate::host::CacheShape;
use crate::sidecar::Sidecar;

/// The sidecar of a pool for reading: each structure its variant keeps (see [`DerivedKinds`]).
#[derive(Debug)]
pub struct SidecarView<'a, T> {
    /// Quest: `[num_pages, num_kv_heads, 2, head_dim]`, the element-wise max and min over each
    /// page (see [`Sidecar::page_bounds`]).
    pub page_bounds: Option<CudaView<'a, T>>,
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
    pub page_bounds: Option<CudaViewMut<'a, T>>,
    pub k_q4: Option<CudaViewMut<'a, u8>>,
    pub k_q4_scale_min: Option<CudaViewMut<'a, half::f16>>,
    pub k_label: Option<CudaViewMut<'a, T>>,
    pub ds_channels: Option<CudaView<'a, i32>>,
    pub kinds: DerivedKinds,
}

/// A borrowed paged KV pool: K and V (FlashInfer layout, see [`CacheShape`]) of one layer and
/// its sidecar. K and V may be windows of allocations that hold every layer.
#[derive(Debug)]
pub struct KvPool<'a, T> {
    pub(crate) shape: CacheShape,
    pub(crate) k: DeviceRef<'a, T>,
    pub(crate) v: DeviceRef<'a, T>,
    pub(crate) sidecar: SidecarView<'a, T>,
}

/// A borrowed paged KV pool that an append writes.
#[derive(Debug)]
pub struct KvPoolMut<'a, T> {
    pub(crate) shape: CacheShape,
    pub(crate) k: DeviceMut<'a, T>,
    pub(crate) v: DeviceMut<'a, T>,
    pub(crate) sidecar: SidecarViewMut<'a, T>,
}

fn empty_sidecar<'a, T>() -> SidecarView<'a, T> {
    SidecarView {
        page_bounds: None,
        k_q4: None,
        k_q4_scale_min: None,
        k_label: None,
        ds_channels: None,
        kinds: DerivedKinds::default(),
    }
}

fn empty_sidecar_mut<'a, T>() -> SidecarViewMut<'a, T> {
    SidecarViewMut {
        page_bounds: None,
        k_q4: None,
        k_q4_scale_min: None,
        k_label: None,
        ds_channels: None,
        kinds: DerivedKinds::default(),
    }
}

/// Checks that a buffer of `len` elements holds one layer of `shape` from element `offset`
/// (an engine keeping `[layers, pages, ...]` in one allocation passes `layer *
/// shape.elements()`), and that the layer starts on a 16-byte boundary (the kernels move K and
/// V 16 bytes at a time) given the buffer's `address` and element size.
///
/// # Errors
/// [`Error::Parameter`] for a shape the kernels cannot address or a misaligned layer,
/// [`Error::Shape`] for a buffer too short for the layer at that offset.
pub fn check_layer(
    what: &str,
    shape: &CacheShape,
    len: usize,
    offset: usize,
    address: u64,
    elem_size: usize,
) -> Result<()> {
    check_shape(shape)?;
    let layer = shape.elements();
    match offset.checked_add(layer) {
        Some(end) if end <= len => {}
        _ => {
            return Err(Error::shape(
                format!(
                    "{what} pool buffer for a layer of {layer} elements ({} pages x {} KV heads x {} tokens x {} channels) at element offset {offset}",
                    shape.num_pages, shape.num_kv_heads, shape.page_size, shape.head_dim
                ),
                format!("at least {} elements", offset.saturating_add(layer)),
                format!("{len} elements"),
            ))
        }
    }
    let start = (offset as u64)
        .checked_mul(elem_size as u64)
        .and_then(|bytes| address.checked_add(bytes))
        .ok_or_else(|| {
            Error::Parameter(format!(
                "{what} layer offset {offset} overflows the address space"
            ))
        })?;
    check_alignment(
        &format!("{what} layer at element offset {offset}"),
        start,
        VECTOR_ALIGN,
    )
}

/// Checks that a sidecar allocated for `sidecar` serves a pool of `pool`.
///
/// # Errors
/// [`Error::Shape`] naming both shapes.
pub fn check_sidecar_shape(pool: &CacheShape, sidecar: &CacheShape) -> Result<()> {
    if pool != sidecar {
        return Err(Error::shape(
            "sidecar (allocate one per layer for the pool's shape)",
            format!("{pool:?}"),
            format!("{sidecar:?}"),
        ));
    }
    Ok(())
}

impl<'a, T: KvElement> KvPool<'a, T> {
    /// A view of K and V, each exactly one layer, with no sidecar: enough for dense
    /// (`full`/`none`) variants.
    ///
    /// # Errors
    /// A shape the kernels cannot address, K or V not holding `shape.elements()`, a buffer not
    /// on a 16-byte boundary.
    pub fn new(
        shape: CacheShape,
        k: impl Into<DeviceRef<'a, T>>,
        v: impl Into<DeviceRef<'a, T>>,
    ) -> Result<Self> {
        let (k, v) = (k.into(), v.into());
        for (what, len) in [("K", k.len()), ("V", v.len())] {
            if len != shape.elements() {
                check_shape(&shape)?;
                return Err(Error::shape(
                    format!("{what} pool of {shape:?}"),
                    shape.elements(),
                    len,
                ));
            }
        }
        Self::from_layer(shape, k, v, 0)
    }

    /// One layer of an engine's pool: K and V are device buffers (a cudarc view or slice, or
    /// [`DeviceRef::from_raw`]) holding the layer's `shape.elements()` elements from element
    /// `offset` on (`layer * shape.elements()` for buffers laid out `[layers, pages, ...]`).
    /// Attach the layer's sidecar with [`KvPool::with_sidecar`] for sparse variants.
    ///
    /// # Errors
    /// As [`check_layer`], for K and for V.
    pub fn from_layer(
        shape: CacheShape,
        k: impl Into<DeviceRef<'a, T>>,
        v: impl Into<DeviceRef<'a, T>>,
        offset: usize,
    ) -> Result<Self> {
        let (k, v) = (k.into(), v.into());
        let size = std::mem::size_of::<T>();
        check_layer("K", &shape, k.len(), offset, k.address(), size)?;
        check_layer("V", &shape, v.len(), offset, v.address(), size)?;
        Ok(KvPool {
            shape,
            k: k.window(offset, shape.elements())?,
            v: v.window(offset, shape.elements())?,
            sidecar: empty_sidecar(),
        })
    }

    /// The pool with `sidecar` beside it, which must have been allocated for this shape.
    ///
    /// # Errors
    /// As [`check_sidecar_shape`].
    pub fn with_sidecar(self, sidecar: &'a Sidecar<T>) -> Result<Self> {
        check_sidecar_shape(&self.shape, &sidecar.shape())?;
        Ok(KvPool {
            sidecar: sidecar.view(),
            ..self
        })
    }

    /// A whole owned pool with its sidecar (the owner checked the shapes).
    pub(crate) fn owned(
        shape: CacheShape,
        k: &'a CudaSlice<T>,
        v: &'a CudaSlice<T>,
        sidecar: SidecarView<'a, T>,
    ) -> Self {
        KvPool {
            shape,
            k: k.into(),
            v: v.into(),
            sidecar,
        }
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

impl<'a, T: KvElement> KvPoolMut<'a, T> {
    /// One layer of an engine's pool for an append, as [`KvPool::from_layer`].
    ///
    /// # Errors
    /// As [`KvPool::from_layer`].
    pub fn from_layer(
        shape: CacheShape,
        k: impl Into<DeviceMut<'a, T>>,
        v: impl Into<DeviceMut<'a, T>>,
        offset: usize,
    ) -> Result<Self> {
        let (k, v) = (k.into(), v.into());
        let size = std::mem::size_of::<T>();
        check_layer("K", &shape, k.len(), offset, k.address(), size)?;
        check_layer("V", &shape, v.len(), offset, v.address(), size)?;
        Ok(KvPoolMut {
            shape,
            k: k.window(offset, shape.elements())?,
            v: v.window(offset, shape.elements())?,
            sidecar: empty_sidecar_mut(),
        })
    }

    /// The pool with `sidecar` beside it, as [`KvPool::with_sidecar`].
    ///
    /// # Errors
    /// As [`check_sidecar_shape`].
    pub fn with_sidecar(self, sidecar: &'a mut Sidecar<T>) -> Result<Self> {
        check_sidecar_shape(&self.shape, &sidecar.shape())?;
        Ok(KvPoolMut {
            sidecar: sidecar.view_mut(),
            ..self
        })
    }

    pub(crate) fn owned(
        shape: CacheShape,
        k: &'a mut CudaSlice<T>,
        v: &'a mut CudaSlice<T>,
        sidecar: SidecarViewMut<'a, T>,
    ) -> Self {
        KvPoolMut {
            shape,
            k: k.into(),
            v: v.into(),
            sidecar,
        }
    }

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

pub(crate) fn check_kinds(spec: &VariantSpec, kept: DerivedKinds) -> Result<()> {
    let needed = spec.derived_kinds();
    if (needed.quest && !kept.quest)
        || (needed.quant4 && !kept.quant4)
        || (needed.labels > 0 && kept.labels != needed.labels)
    {
        return Err(Error::Parameter(format!(
            "variant {spec} reads {needed:?} metadata but the pool keeps {kept:?}; allocate it with Sidecar::for_variant (for_double_sparse), or PagedKvCache::for_variant, and fill it through an append"
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
