//! The decode step and the append as candle operations.

use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{DType, Device, Error, Layout, Result, Tensor};
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use twilight::{
    CacheShape, Decoder, Dtype, HostPageTable, KvElement, KvLayout, KvPool, KvPoolMut,
    PageTableView, Sidecar, StepOutputs, StepParams, VariantSpec, Workspace,
};

use crate::tensors::{
    check_contiguous, check_devices, check_rank_dtype, check_shape, contiguous_range, cuda_device,
    cuda_slice, storage_address, with_storage_mut, wrap,
};

/// A twilight error as a candle error, with what was being done.
pub(crate) fn tw(what: &'static str) -> impl FnOnce(twilight::Error) -> Error {
    move |e| Error::wrap(e).context(what)
}

/// The candle dtype of a twilight dtype.
pub fn candle_dtype(dtype: Dtype) -> DType {
    match dtype {
        Dtype::F16 => DType::F16,
        Dtype::Bf16 => DType::BF16,
    }
}

/// The element types of K, V, q and o that both candle and twilight know.
pub trait Element: KvElement + CudaDType + DeviceRepr + ValidAsZeroBits {
    fn sidecar(s: &LayerSidecar) -> Option<&Sidecar<Self>>;
    fn sidecar_mut(s: &mut LayerSidecar) -> Option<&mut Sidecar<Self>>;
    fn wrap_sidecar(s: Sidecar<Self>) -> LayerSidecar;
}

impl Element for half::f16 {
    fn sidecar(s: &LayerSidecar) -> Option<&Sidecar<Self>> {
        match s {
            LayerSidecar::F16(s) => Some(s),
            LayerSidecar::Bf16(_) => None,
        }
    }
    fn sidecar_mut(s: &mut LayerSidecar) -> Option<&mut Sidecar<Self>> {
        match s {
            LayerSidecar::F16(s) => Some(s),
            LayerSidecar::Bf16(_) => None,
        }
    }
    fn wrap_sidecar(s: Sidecar<Self>) -> LayerSidecar {
        LayerSidecar::F16(s)
    }
}

impl Element for half::bf16 {
    fn sidecar(s: &LayerSidecar) -> Option<&Sidecar<Self>> {
        match s {
            LayerSidecar::Bf16(s) => Some(s),
            LayerSidecar::F16(_) => None,
        }
    }
    fn sidecar_mut(s: &mut LayerSidecar) -> Option<&mut Sidecar<Self>> {
        match s {
            LayerSidecar::Bf16(s) => Some(s),
            LayerSidecar::F16(_) => None,
        }
    }
    fn wrap_sidecar(s: Sidecar<Self>) -> LayerSidecar {
        LayerSidecar::Bf16(s)
    }
}

/// What a sparse variant derives from one layer's K (Quest page bounds, the 4-bit K), owned by
/// twilight beside the engine's pool tensors and kept current by [`TwilightAttention::append`]
/// or [`TwilightAttention::update_sidecar`]. One per layer; dense layers need none.
#[derive(Debug)]
pub enum LayerSidecar {
    F16(Sidecar<half::f16>),
    Bf16(Sidecar<half::bf16>),
}

impl LayerSidecar {
    pub fn shape(&self) -> CacheShape {
        match self {
            LayerSidecar::F16(s) => s.shape(),
            LayerSidecar::Bf16(s) => s.shape(),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            LayerSidecar::F16(_) => DType::F16,
            LayerSidecar::Bf16(_) => DType::BF16,
        }
    }
}

impl From<Sidecar<half::f16>> for LayerSidecar {
    fn from(s: Sidecar<half::f16>) -> Self {
        LayerSidecar::F16(s)
    }
}

impl From<Sidecar<half::bf16>> for LayerSidecar {
    fn from(s: Sidecar<half::bf16>) -> Self {
        LayerSidecar::Bf16(s)
    }
}

/// A FlashInfer page table as i32 tensors: `kv_indptr [batch + 1]`, `kv_indices [nnz_pages]`,
/// `kv_last_page_len [batch]`, with the batch and the longest request, for a pool of
/// `num_pages` pages of `page_size` tokens. The kernels index the pool with its contents, so a
/// table is either built from a validated [`HostPageTable`] or vouched for by the caller.
#[derive(Clone, Debug)]
pub struct PageTable {
    kv_indptr: Tensor,
    kv_indices: Tensor,
    kv_last_page_len: Tensor,
    batch: usize,
    max_len: usize,
    num_pages: usize,
    page_size: usize,
}

impl PageTable {
    /// Uploads a host table (validated against a pool of `num_pages` pages) to `device`.
    ///
    /// # Errors
    /// A table with page ids outside the pool, a failed upload.
    pub fn from_host(table: &HostPageTable, num_pages: usize, device: &Device) -> Result<Self> {
        table
            .validate(num_pages)
            .map_err(|e| Error::wrap(e).context("page table"))?;
        let max_len = table.max_len();
        let nnz = table.kv_indices().len();
        Ok(PageTable {
            kv_indptr: Tensor::from_slice(table.kv_indptr(), table.batch() + 1, device)?,
            kv_indices: Tensor::from_slice(table.kv_indices(), nnz, device)?,
            kv_last_page_len: Tensor::from_slice(table.kv_last_page_len(), table.batch(), device)?,
            batch: table.batch(),
            max_len,
            num_pages,
            page_size: table.page_size(),
        })
    }

    /// A table the engine keeps on the device already. Lengths and dtypes are checked here.
    ///
    /// # Safety
    /// `kv_indptr` starts at 0 and never decreases, its last entry is the length of
    /// `kv_indices`, every entry of `kv_indices` is a page id below `num_pages`, every
    /// `kv_last_page_len` lies in `1..=page_size`, no request holds more than `max_len` tokens,
    /// and nothing writes the tensors while a step that reads them may run.
    ///
    /// # Errors
    /// Tensors that are not rank-1 i32, lengths that disagree with `batch`.
    pub unsafe fn from_tensors(
        kv_indptr: Tensor,
        kv_indices: Tensor,
        kv_last_page_len: Tensor,
        max_len: usize,
        num_pages: usize,
        page_size: usize,
    ) -> Result<Self> {
        check_rank_dtype(&kv_indptr, "kv_indptr", 1, DType::I32)?;
        check_rank_dtype(&kv_indices, "kv_indices", 1, DType::I32)?;
        check_rank_dtype(&kv_last_page_len, "kv_last_page_len", 1, DType::I32)?;
        let batch = kv_last_page_len.dims()[0];
        check_shape(&kv_indptr, "kv_indptr [batch + 1]", &[batch + 1])?;
        Ok(PageTable {
            kv_indptr,
            kv_indices,
            kv_last_page_len,
            batch,
            max_len,
            num_pages,
            page_size,
        })
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn tensors(&self) -> [&Tensor; 3] {
        [&self.kv_indptr, &self.kv_indices, &self.kv_last_page_len]
    }
}

/// What one step returns: `o [batch, qo_heads, head_dim]` (the variant's dtype) and `lse
/// [batch, qo_heads]` (f32, natural log); sparse variants also the kept count per (request, KV
/// head), `[batch, kv_heads]` i32 (the adaptive budget), and the kept token slots, `[batch,
/// kv_heads, max_cands]` i32 (the first `count` of each row are valid).
#[derive(Debug)]
pub struct AttentionOutput {
    pub o: Tensor,
    pub lse: Tensor,
    pub kept_counts: Option<Tensor>,
    pub kept: Option<Tensor>,
}

/// The sizes a step works on, derived from its tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepShape {
    pub pool: CacheShape,
    pub batch: usize,
    pub num_qo_heads: usize,
}

/// The shape of one layer's pool from its K tensor: `[num_pages, num_kv_heads, page_size,
/// head_dim]` for HND variants, `[num_pages, page_size, num_kv_heads, head_dim]` for NHD; V
/// must have the same shape and both the variant's dtype.
///
/// # Errors
/// Candle shape, rank and dtype errors naming the tensor.
pub fn pool_shape(spec: &VariantSpec, k_pool: &Tensor, v_pool: &Tensor) -> Result<CacheShape> {
    let dtype = candle_dtype(spec.dtype);
    check_rank_dtype(k_pool, "K pool", 4, dtype)?;
    check_rank_dtype(v_pool, "V pool", 4, dtype)?;
    let d = k_pool.dims();
    let (num_pages, num_kv_heads, page_size) = match spec.kv_layout {
        KvLayout::Hnd => (d[0], d[1], d[2]),
        KvLayout::Nhd => (d[0], d[2], d[1]),
    };
    let shape = CacheShape {
        num_pages,
        num_kv_heads,
        page_size: spec.page_size as usize,
        head_dim: spec.head_dim as usize,
        layout: spec.kv_layout,
    };
    let expected = match spec.kv_layout {
        KvLayout::Hnd => [num_pages, num_kv_heads, shape.page_size, shape.head_dim],
        KvLayout::Nhd => [num_pages, shape.page_size, num_kv_heads, shape.head_dim],
    };
    let what = match spec.kv_layout {
        KvLayout::Hnd => "K pool [num_pages, num_kv_heads, page_size, head_dim] of the variant",
        KvLayout::Nhd => "K pool [num_pages, page_size, num_kv_heads, head_dim] of the variant",
    };
    check_shape(k_pool, what, &expected)?;
    check_shape(v_pool, "V pool (the shape of the K pool)", &expected)?;
    check_contiguous(&[k_pool, v_pool], "twilight KV pool")?;
    if page_size == 0 || num_pages == 0 || num_kv_heads == 0 {
        return Err(Error::Msg(format!(
            "the pool has a zero dimension: {shape:?}"
        )));
    }
    Ok(shape)
}

/// Every check of a step's tensors that needs no device: ranks, shapes, dtypes, and the
/// table's agreement with the pool.
///
/// # Errors
/// Candle shape, rank and dtype errors.
pub fn check_step(
    spec: &VariantSpec,
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    table: &PageTable,
) -> Result<StepShape> {
    let pool = pool_shape(spec, k_pool, v_pool)?;
    if table.num_pages != pool.num_pages || table.page_size != pool.page_size {
        return Err(Error::Msg(format!(
            "the page table was made for {} pages of {} tokens, the pool has {} of {}",
            table.num_pages, table.page_size, pool.num_pages, pool.page_size
        )));
    }
    check_rank_dtype(
        q,
        "q [batch, qo_heads, head_dim]",
        3,
        candle_dtype(spec.dtype),
    )?;
    let num_qo_heads = pool.num_kv_heads * spec.group_size as usize;
    check_shape(
        q,
        "q [batch (of the page table), qo_heads (KV heads x group size), head_dim]",
        &[table.batch, num_qo_heads, pool.head_dim],
    )?;
    check_contiguous(&[q], "twilight attention (q)")?;
    check_contiguous(&table.tensors(), "twilight page table")?;
    Ok(StepShape {
        pool,
        batch: table.batch,
        num_qo_heads,
    })
}

/// Every check of an append's tensors that needs no device: `k_new` and `v_new` are `[slots,
/// num_kv_heads, head_dim]` of the variant's dtype.
///
/// # Errors
/// Candle shape, rank and dtype errors.
pub fn check_append(
    spec: &VariantSpec,
    k_pool: &Tensor,
    v_pool: &Tensor,
    slots: usize,
    k_new: &Tensor,
    v_new: &Tensor,
) -> Result<CacheShape> {
    let pool = pool_shape(spec, k_pool, v_pool)?;
    let dtype = candle_dtype(spec.dtype);
    check_rank_dtype(k_new, "k_new [tokens, kv_heads, head_dim]", 3, dtype)?;
    check_rank_dtype(v_new, "v_new [tokens, kv_heads, head_dim]", 3, dtype)?;
    let rows = [slots, pool.num_kv_heads, pool.head_dim];
    check_shape(k_new, "k_new [one row per slot, kv_heads, head_dim]", &rows)?;
    check_shape(v_new, "v_new [one row per slot, kv_heads, head_dim]", &rows)?;
    check_contiguous(&[k_new, v_new], "twilight append (new rows)")?;
    Ok(pool)
}

/// One variant's decode step and append over candle tensors, on one candle CUDA device.
///
/// Twilight launches on the device's own stream, the one candle queues every op of that device
/// on, so inputs written by earlier candle ops are ready and the outputs can be used by the
/// next candle op without synchronizing (a candle device made by `Device::new_cuda` uses the
/// per-thread default stream: run the op on the thread that runs the model's other ops, as
/// with any candle op). Tensors of any other device are refused.
pub struct TwilightAttention {
    device: Device,
    cuda: CudaDevice,
    decoder: Decoder,
    params: StepParams,
    workspace: Workspace,
}

impl std::fmt::Debug for TwilightAttention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwilightAttention")
            .field("device", &self.device)
            .field("variant", &self.decoder.spec().name())
            .field("params", &self.params)
            .finish()
    }
}

impl TwilightAttention {
    /// Loads a variant's kernels (memory cache, disk cache or NVRTC) for `device`. Dense
    /// variants (`full`/`none`) take `StepParams::dense(sm_scale)`; sparse ones B0 and p.
    ///
    /// # Errors
    /// A device that is not CUDA, bad parameters, a JIT or driver error.
    pub fn new(device: &Device, spec: VariantSpec, params: StepParams) -> Result<Self> {
        let cuda = cuda_device(device, "the attention's device")?.clone();
        params.validate().map_err(tw("step parameters"))?;
        let decoder = Decoder::new(cuda.cuda_stream(), spec).map_err(tw("loading the variant"))?;
        tracing::debug!(variant = %spec, ?params, "twilight attention on a candle device");
        Ok(TwilightAttention {
            device: device.clone(),
            cuda,
            decoder,
            params,
            workspace: Workspace::default(),
        })
    }

    /// Dense decode attention (`full`/`none`).
    ///
    /// # Errors
    /// As [`TwilightAttention::new`], and a variant that is not dense.
    pub fn dense(device: &Device, spec: VariantSpec, sm_scale: Option<f32>) -> Result<Self> {
        if !spec.is_dense() {
            return Err(Error::Msg(format!(
                "variant {spec} is not dense decode (selector = full, pruning = none)"
            )));
        }
        Self::new(device, spec, StepParams::dense(sm_scale))
    }

    pub fn spec(&self) -> &VariantSpec {
        self.decoder.spec()
    }

    pub fn params(&self) -> &StepParams {
        &self.params
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The twilight decoder underneath (launch choices, plans, workspace sizes).
    pub fn decoder_mut(&mut self) -> &mut Decoder {
        &mut self.decoder
    }

    /// Allocates the sidecar this variant keeps for one layer's pool (shaped like `k_pool`),
    /// zeroed: fill it through [`TwilightAttention::append`] or
    /// [`TwilightAttention::update_sidecar`]. Double Sparsity variants need their channels:
    /// build a [`Sidecar::for_double_sparse`] on [`TwilightAttention::stream`] instead.
    ///
    /// # Errors
    /// Shape or dtype errors, a Double Sparsity variant, a failed allocation.
    pub fn new_sidecar(&self, k_pool: &Tensor) -> Result<LayerSidecar> {
        let spec = *self.spec();
        let shape = pool_shape(&spec, k_pool, k_pool)?;
        let stream = self.decoder.stream();
        match spec.dtype {
            Dtype::F16 => Sidecar::<half::f16>::for_variant(stream, shape, &spec).map(Into::into),
            Dtype::Bf16 => Sidecar::<half::bf16>::for_variant(stream, shape, &spec).map(Into::into),
        }
        .map_err(tw("allocating the sidecar"))
    }

    /// The stream twilight launches on: the candle device's.
    pub fn stream(&self) -> &std::sync::Arc<cudarc::driver::CudaStream> {
        self.decoder.stream()
    }

    /// One decode step over a layer: `q [batch, qo_heads, head_dim]`, the layer's K and V pool
    /// tensors (see [`pool_shape`]; contiguous, possibly a view of a `[layers, ...]` tensor),
    /// its sidecar for sparse variants, and the page table. The outputs are new tensors on the
    /// same device, written on its stream.
    ///
    /// # Errors
    /// Shape, dtype and device errors; a sparse variant without its sidecar; twilight errors.
    pub fn forward(
        &mut self,
        q: &Tensor,
        k_pool: &Tensor,
        v_pool: &Tensor,
        sidecar: Option<&LayerSidecar>,
        table: &PageTable,
    ) -> Result<AttentionOutput> {
        let step = check_step(self.spec(), q, k_pool, v_pool, table)?;
        let [indptr, indices, last] = table.tensors();
        check_devices(
            &self.device,
            &[q, k_pool, v_pool, indptr, indices, last],
            "twilight attention",
        )?;
        self.check_sidecar(sidecar, &step.pool)?;
        match self.spec().dtype {
            Dtype::F16 => self.forward_typed::<half::f16>(q, k_pool, v_pool, sidecar, table, step),
            Dtype::Bf16 => {
                self.forward_typed::<half::bf16>(q, k_pool, v_pool, sidecar, table, step)
            }
        }
    }

    fn check_sidecar(&self, sidecar: Option<&LayerSidecar>, pool: &CacheShape) -> Result<()> {
        let spec = self.spec();
        match sidecar {
            None if !spec.is_dense() => Err(Error::Msg(format!(
                "variant {spec} reads the layer's sidecar: pass the one new_sidecar made for this pool"
            ))),
            Some(s) if s.shape() != *pool => Err(Error::Msg(format!(
                "the sidecar was made for {:?}, the pool is {pool:?}",
                s.shape()
            ))),
            Some(s) if s.dtype() != candle_dtype(spec.dtype) => Err(Error::UnexpectedDType {
                msg: "sidecar",
                expected: candle_dtype(spec.dtype),
                got: s.dtype(),
            }),
            _ => Ok(()),
        }
    }

    fn forward_typed<T: Element>(
        &mut self,
        q: &Tensor,
        k_pool: &Tensor,
        v_pool: &Tensor,
        sidecar: Option<&LayerSidecar>,
        table: &PageTable,
        step: StepShape,
    ) -> Result<AttentionOutput> {
        let op = "twilight attention";
        let (q_store, q_layout) = q.storage_and_layout();
        let (k_store, k_layout) = k_pool.storage_and_layout();
        let (v_store, v_layout) = v_pool.storage_and_layout();
        let q_view = window::<T>(&q_store, q_layout, "q", op)?;
        let k_view = window::<T>(&k_store, k_layout, "K pool", op)?;
        let v_view = window::<T>(&v_store, v_layout, "V pool", op)?;
        let [indptr, indices, last] = table.tensors();
        let (i_store, i_layout) = indptr.storage_and_layout();
        let (x_store, x_layout) = indices.storage_and_layout();
        let (l_store, l_layout) = last.storage_and_layout();
        let i_view = window::<i32>(&i_store, i_layout, "kv_indptr", op)?;
        let x_view = window::<i32>(&x_store, x_layout, "kv_indices", op)?;
        let l_view = window::<i32>(&l_store, l_layout, "kv_last_page_len", op)?;
        // SAFETY: a `PageTable` exists only through `from_host` (validated against a pool of
        // `num_pages` pages) or `from_tensors` (whose caller vouches for the same), and
        // `check_step` matched its page count and size with this pool's.
        let table_view = unsafe {
            PageTableView::from_device(
                &i_view,
                &x_view,
                &l_view,
                table.batch,
                table.max_len,
                &step.pool,
            )
        }
        .map_err(tw("page table"))?;
        let mut pool = KvPool::new(step.pool, &k_view, &v_view).map_err(tw("KV pool"))?;
        if let Some(s) = sidecar {
            let s = T::sidecar(s).ok_or_else(|| Error::Msg("sidecar of another dtype".into()))?;
            pool = pool.with_sidecar(s).map_err(tw("sidecar"))?;
        }

        let (batch, kv_heads) = (step.batch, step.pool.num_kv_heads);
        let head_dim = step.pool.head_dim;
        let mut o = self
            .cuda
            .alloc_zeros::<T>(batch * step.num_qo_heads * head_dim)?;
        let mut lse = self.cuda.alloc_zeros::<f32>(batch * step.num_qo_heads)?;
        let plan = self
            .decoder
            .plan(batch, kv_heads, table.max_len, self.params.budget);
        let mut kept = if self.spec().is_dense() {
            None
        } else {
            let rows = batch * kv_heads;
            let slots = rows
                .checked_mul(plan.max_cands)
                .ok_or_else(|| Error::Msg("the kept lists of this step overflow".into()))?;
            Some((
                self.cuda.alloc_zeros::<i32>(rows)?,
                self.cuda.alloc_zeros::<i32>(slots)?,
            ))
        };
        let mut out = StepOutputs::new(&mut o, &mut lse);
        if let Some((counts, slots)) = kept.as_mut() {
            out = out.with_kept(counts, slots);
        }
        self.decoder
            .run_into(
                &q_view,
                &pool,
                table_view,
                &self.params,
                out,
                &mut self.workspace,
                &mut |_| Ok(()),
            )
            .map_err(tw("twilight decode step"))?;
        Ok(AttentionOutput {
            o: wrap(o, &self.cuda, &[batch, step.num_qo_heads, head_dim]),
            lse: wrap(lse, &self.cuda, &[batch, step.num_qo_heads]),
            kept_counts: None,
            kept: None,
        }
        .with_kept(kept, &self.cuda, [batch, kv_heads, plan.max_cands]))
    }

    /// Writes new K/V rows into the engine's pool tensors and updates the sidecar, in one
    /// launch: row `i` of `k_new`/`v_new` (`[slots.len(), kv_heads, head_dim]`) goes to
    /// `slots[i]` (`page * page_size + offset`; one run of consecutive offsets per page, as
    /// twilight's `Decoder::append_slots`). The pool tensors are written in place under
    /// candle's write lock; `k_new` and `v_new` must not share storage with them.
    ///
    /// # Errors
    /// Shape, dtype and device errors, shared storage, a sparse variant without its sidecar,
    /// bad slots, twilight errors.
    pub fn append(
        &self,
        k_pool: &Tensor,
        v_pool: &Tensor,
        sidecar: Option<&mut LayerSidecar>,
        slots: &[i32],
        k_new: &Tensor,
        v_new: &Tensor,
    ) -> Result<()> {
        let spec = *self.spec();
        let shape = check_append(&spec, k_pool, v_pool, slots.len(), k_new, v_new)?;
        check_devices(
            &self.device,
            &[k_pool, v_pool, k_new, v_new],
            "twilight append",
        )?;
        self.check_sidecar(sidecar.as_deref(), &shape)?;
        match spec.dtype {
            Dtype::F16 => {
                self.append_typed::<half::f16>(k_pool, v_pool, sidecar, slots, k_new, v_new, shape)
            }
            Dtype::Bf16 => {
                self.append_typed::<half::bf16>(k_pool, v_pool, sidecar, slots, k_new, v_new, shape)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn append_typed<T: Element>(
        &self,
        k_pool: &Tensor,
        v_pool: &Tensor,
        sidecar: Option<&mut LayerSidecar>,
        slots: &[i32],
        k_new: &Tensor,
        v_new: &Tensor,
        shape: CacheShape,
    ) -> Result<()> {
        let op = "twilight append";
        // The pools are written under their write locks while the new rows are read under read
        // locks: a tensor sharing storage with a pool would wait on itself.
        let k_at = storage_address::<T>(k_pool, "K pool")?;
        let v_at = storage_address::<T>(v_pool, "V pool")?;
        let new_at = [
            storage_address::<T>(k_new, "k_new")?,
            storage_address::<T>(v_new, "v_new")?,
        ];
        if k_at == v_at || new_at.contains(&k_at) || new_at.contains(&v_at) {
            return Err(Error::Msg(format!(
                "{op}: the K pool, the V pool and the new rows must be separate tensors (not views of one storage)"
            )));
        }
        let sidecar = match sidecar {
            Some(s) => Some(
                T::sidecar_mut(s).ok_or_else(|| Error::Msg("sidecar of another dtype".into()))?,
            ),
            None => None,
        };
        with_storage_mut(k_pool, op, |k_store, k_layout| {
            with_storage_mut(v_pool, op, |v_store, v_layout| {
                let (k_start, k_end) = contiguous_range(k_layout, op)?;
                let (v_start, v_end) = contiguous_range(v_layout, op)?;
                let k_slice: &mut CudaSlice<T> = k_store.as_cuda_slice_mut::<T>()?;
                let v_slice: &mut CudaSlice<T> = v_store.as_cuda_slice_mut::<T>()?;
                let mut k_view = k_slice.slice_mut(k_start..k_end);
                let mut v_view = v_slice.slice_mut(v_start..v_end);
                let (kn_store, kn_layout) = k_new.storage_and_layout();
                let (vn_store, vn_layout) = v_new.storage_and_layout();
                let kn_view = window::<T>(&kn_store, kn_layout, "k_new", op)?;
                let vn_view = window::<T>(&vn_store, vn_layout, "v_new", op)?;
                let mut pool = KvPoolMut::from_layer(shape, &mut k_view, &mut v_view, 0)
                    .map_err(tw("KV pool"))?;
                if let Some(s) = sidecar {
                    pool = pool.with_sidecar(s).map_err(tw("sidecar"))?;
                }
                self.decoder
                    .append_slots(pool, slots, &kn_view, &vn_view)
                    .map_err(tw("twilight append"))
            })
        })
    }

    /// Brings the sidecar up to date with K the engine wrote itself (candle ops) at `slots`,
    /// reading the keys in place; the slot rules of [`TwilightAttention::append`] apply.
    ///
    /// # Errors
    /// Shape, dtype and device errors, a sidecar of another pool, bad slots, twilight errors.
    pub fn update_sidecar(
        &self,
        k_pool: &Tensor,
        v_pool: &Tensor,
        sidecar: &mut LayerSidecar,
        slots: &[i32],
    ) -> Result<()> {
        let spec = *self.spec();
        let shape = pool_shape(&spec, k_pool, v_pool)?;
        check_devices(&self.device, &[k_pool, v_pool], "twilight sidecar update")?;
        self.check_sidecar(Some(sidecar), &shape)?;
        match spec.dtype {
            Dtype::F16 => self.update_typed::<half::f16>(k_pool, v_pool, sidecar, slots, shape),
            Dtype::Bf16 => self.update_typed::<half::bf16>(k_pool, v_pool, sidecar, slots, shape),
        }
    }

    fn update_typed<T: Element>(
        &self,
        k_pool: &Tensor,
        v_pool: &Tensor,
        sidecar: &mut LayerSidecar,
        slots: &[i32],
        shape: CacheShape,
    ) -> Result<()> {
        let op = "twilight sidecar update";
        let (k_store, k_layout) = k_pool.storage_and_layout();
        let (v_store, v_layout) = v_pool.storage_and_layout();
        let k_view = window::<T>(&k_store, k_layout, "K pool", op)?;
        let v_view = window::<T>(&v_store, v_layout, "V pool", op)?;
        let pool = KvPool::new(shape, &k_view, &v_view).map_err(tw("KV pool"))?;
        let sidecar =
            T::sidecar_mut(sidecar).ok_or_else(|| Error::Msg("sidecar of another dtype".into()))?;
        self.decoder
            .update_sidecar(&pool, sidecar, slots)
            .map_err(tw("twilight sidecar update"))
    }
}

impl AttentionOutput {
    fn with_kept(
        mut self,
        kept: Option<(CudaSlice<i32>, CudaSlice<i32>)>,
        device: &CudaDevice,
        dims: [usize; 3],
    ) -> Self {
        if let Some((counts, slots)) = kept {
            self.kept_counts = Some(wrap(counts, device, &dims[..2]));
            self.kept = Some(wrap(slots, device, &dims));
        }
        self
    }
}

/// The window of a read-locked storage that a contiguous tensor covers.
fn window<'s, T: CudaDType>(
    storage: &'s candle_core::Storage,
    layout: &Layout,
    what: &str,
    op: &'static str,
) -> Result<cudarc::driver::CudaView<'s, T>> {
    let (start, end) = contiguous_range(layout, op)?;
    Ok(cuda_slice::<T>(storage, what)?.slice(start..end))
}
