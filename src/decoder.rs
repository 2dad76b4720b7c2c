//! Dense paged decode on the GPU: the `full`/`none` variant, the baseline every sparse variant
//! is measured against.
//!
//! A step is one launch, sized from host-side bounds only, so it can be captured in a CUDA
//! graph; a request split over blocks is merged by its last block in the same launch.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use twilight_jit::{Jit, LoadedProgram, Pruning, Selector, Stage, VariantSpec};

use crate::element::KvElement;
use crate::error::{Error, Result};
use crate::kv_cache::{PagedKvCache, RequestId};
use crate::page_table::PageTable;
use crate::variant::Variant;

/// How a step splits each request's tokens over blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitPlan {
    /// Tokens per block; a multiple of the kernel's tile.
    pub chunk_tokens: usize,
    /// Blocks per (request, KV head).
    pub num_chunks: usize,
}

impl SplitPlan {
    /// The split for `rows` (request, KV head) pairs of at most `max_len` tokens, with tiles of
    /// `tile` tokens on `num_sms` multiprocessors: enough blocks to fill the GPU, chunks never
    /// below [`MIN_CHUNK_TOKENS`].
    pub fn new(tile: usize, num_sms: usize, rows: usize, max_len: usize) -> SplitPlan {
        let wanted_chunks = (num_sms * TARGET_BLOCKS_PER_SM)
            .div_ceil(rows.max(1))
            .max(1);
        let chunk = max_len
            .div_ceil(wanted_chunks)
            .max(MIN_CHUNK_TOKENS)
            .next_multiple_of(tile.max(1));
        SplitPlan {
            chunk_tokens: chunk,
            num_chunks: max_len.div_ceil(chunk).max(1),
        }
    }
}

/// The outputs of a step: `o [batch, num_qo_heads, head_dim]` and `lse [batch, num_qo_heads]`.
#[derive(Debug)]
pub struct DecodeOutput<T: KvElement> {
    pub o: CudaSlice<T>,
    pub lse: CudaSlice<f32>,
}

/// Scratch space of split-KV attention, reused across steps: the partial (o, lse) of every
/// chunk, and per (request, KV head) a count of finished chunks that the merging block resets
/// to zero (so it is zero between steps, as a fresh allocation is).
#[derive(Debug, Default)]
pub struct Workspace {
    partial_o: Option<CudaSlice<f32>>,
    partial_lse: Option<CudaSlice<f32>>,
    done: Option<CudaSlice<i32>>,
}

impl Workspace {
    /// Grows the buffers for `heads` query heads split into `chunks`, over `rows`
    /// (request, KV head) pairs; allocates nothing when they are large enough.
    pub(crate) fn ensure(
        &mut self,
        stream: &Arc<CudaStream>,
        heads: usize,
        chunks: usize,
        head_dim: usize,
        rows: usize,
    ) -> Result<()> {
        let partials = if chunks > 1 { heads * chunks } else { 1 };
        ensure_len(
            stream,
            &mut self.partial_o,
            partials * head_dim,
            "partial o",
        )?;
        ensure_len(stream, &mut self.partial_lse, partials, "partial lse")?;
        ensure_len(stream, &mut self.done, rows, "split counters")
    }

    /// The buffers, after [`Workspace::ensure`].
    pub(crate) fn buffers(
        &mut self,
    ) -> (
        &mut CudaSlice<f32>,
        &mut CudaSlice<f32>,
        &mut CudaSlice<i32>,
    ) {
        match (&mut self.partial_o, &mut self.partial_lse, &mut self.done) {
            (Some(o), Some(lse), Some(done)) => (o, lse, done),
            _ => unreachable!("Workspace::ensure runs before every launch"),
        }
    }
}

/// Blocks the split-KV plan aims for per multiprocessor: enough resident warps to keep the
/// loads of every SM in flight.
const TARGET_BLOCKS_PER_SM: usize = 8;
/// Below this many tokens per block merging the split costs more than the parallelism saves.
const MIN_CHUNK_TOKENS: usize = 256;

/// Dense decode for one variant on one stream.
pub struct DenseDecoder {
    spec: VariantSpec,
    stream: Arc<CudaStream>,
    program: Arc<LoadedProgram>,
    num_sms: usize,
}

impl std::fmt::Debug for DenseDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DenseDecoder")
            .field("spec", &self.spec.name())
            .finish()
    }
}

impl DenseDecoder {
    /// Loads (from memory, disk or NVRTC) the kernels of a dense variant.
    ///
    /// # Errors
    /// An invalid spec, a variant that is not `full`/`none`, a JIT or driver error.
    pub fn new(stream: Arc<CudaStream>, spec: VariantSpec) -> Result<Self> {
        spec.validate()?;
        if spec.selector != Selector::Full || spec.pruning != Pruning::None {
            return Err(Error::Unsupported {
                variant: spec.name(),
                reason: "DenseDecoder runs `selector = full, pruning = none` variants".into(),
            });
        }
        let (program, num_sms) = load_program(&stream, &spec)?;
        Ok(DenseDecoder {
            spec,
            stream,
            program,
            num_sms,
        })
    }

    /// [`DenseDecoder::new`] for a variant declared with `#[twilight_kernel]`.
    ///
    /// # Errors
    /// As [`DenseDecoder::new`].
    pub fn for_variant<V: Variant>(stream: Arc<CudaStream>) -> Result<Self> {
        DenseDecoder::new(stream, V::SPEC)
    }

    pub fn spec(&self) -> &VariantSpec {
        &self.spec
    }

    pub fn program(&self) -> &Arc<LoadedProgram> {
        &self.program
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The split of a step over `batch` requests of at most `max_len` tokens.
    pub fn plan(&self, batch: usize, num_kv_heads: usize, max_len: usize) -> SplitPlan {
        SplitPlan::new(
            self.program.tiling.decode_tile_tokens(self.spec.head_dim) as usize,
            self.num_sms,
            batch * num_kv_heads,
            max_len,
        )
    }

    /// One decode step: allocates the outputs, then [`DenseDecoder::run_into`].
    ///
    /// # Errors
    /// As [`DenseDecoder::run_into`].
    pub fn run<T: KvElement>(
        &self,
        q: &CudaSlice<T>,
        cache: &PagedKvCache<T>,
        table: &PageTable,
        sm_scale: Option<f32>,
    ) -> Result<DecodeOutput<T>> {
        let heads = table.batch() * cache.shape().num_kv_heads * self.spec.group_size as usize;
        let mut out = DecodeOutput {
            o: self
                .stream
                .alloc_zeros::<T>(heads * self.spec.head_dim as usize)
                .map_err(|e| Error::driver("allocating o", e))?,
            lse: self
                .stream
                .alloc_zeros::<f32>(heads)
                .map_err(|e| Error::driver("allocating lse", e))?,
        };
        let mut workspace = Workspace::default();
        self.run_into(q, cache, table, sm_scale, &mut out, &mut workspace)?;
        Ok(out)
    }

    /// One decode step into existing outputs. With a workspace already large enough (as after
    /// one step of the same shape) it allocates nothing, so it can be captured in a graph.
    ///
    /// # Errors
    /// Shape, dtype or layout mismatches between the variant, q, the cache, the table and the
    /// outputs; a non-finite or non-positive `sm_scale`; driver errors.
    pub fn run_into<T: KvElement>(
        &self,
        q: &CudaSlice<T>,
        cache: &PagedKvCache<T>,
        table: &PageTable,
        sm_scale: Option<f32>,
        out: &mut DecodeOutput<T>,
        workspace: &mut Workspace,
    ) -> Result<()> {
        let (batch, num_kv_heads, num_qo_heads, sm_scale) =
            check_step_inputs(&self.spec, q, cache, table, sm_scale)?;
        let head_dim = self.spec.head_dim as usize;
        if out.o.len() != q.len() {
            return Err(Error::shape("o", q.len(), out.o.len()));
        }
        if out.lse.len() != batch * num_qo_heads {
            return Err(Error::shape("lse", batch * num_qo_heads, out.lse.len()));
        }

        let plan = self.plan(batch, num_kv_heads, table.max_len());
        workspace.ensure(
            &self.stream,
            batch * num_qo_heads,
            plan.num_chunks,
            head_dim,
            batch * num_kv_heads,
        )?;
        let (partial_o, partial_lse, done) = workspace.buffers();

        let tiling = self.program.tiling;
        let decode = self.function(Stage::Attend)?;
        let (num_kv_heads_i, chunk_i, chunks_i) = (
            num_kv_heads as i32,
            plan.chunk_tokens as i32,
            plan.num_chunks as i32,
        );
        let mut launch = self.stream.launch_builder(decode);
        launch
            .arg(q)
            .arg(&cache.k)
            .arg(&cache.v)
            .arg(&table.kv_indptr)
            .arg(&table.kv_indices)
            .arg(&table.kv_last_page_len)
            .arg(&mut out.o)
            .arg(&mut out.lse)
            .arg(partial_o)
            .arg(partial_lse)
            .arg(done)
            .arg(&num_kv_heads_i)
            .arg(&chunk_i)
            .arg(&chunks_i)
            .arg(&sm_scale);
        let config = LaunchConfig {
            grid_dim: (plan.num_chunks as u32, num_kv_heads as u32, batch as u32),
            block_dim: (tiling.decode_threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches the dense `_attend` entry of attend.cu.tera; every
        // buffer was checked above against the sizes the kernel indexes (q, o, lse by batch
        // and heads, partials and counters by the plan, K/V and the table by the validated
        // page table).
        unsafe { launch.launch(config) }.map_err(|e| Error::driver("launching attend", e))?;
        Ok(())
    }

    /// Appends new tokens: `k_new` and `v_new` are `[tokens, num_kv_heads, head_dim]`, the
    /// tokens of `appends[0]` first, in order. One launch for decode and prefill alike.
    ///
    /// # Errors
    /// Shape or dtype mismatches, unknown requests, a full cache, driver errors.
    pub fn append<T: KvElement>(
        &self,
        cache: &mut PagedKvCache<T>,
        appends: &[(RequestId, usize)],
        k_new: &CudaSlice<T>,
        v_new: &CudaSlice<T>,
    ) -> Result<()> {
        crate::append::append(&self.stream, &self.program, cache, appends, k_new, v_new)
    }

    fn function(&self, stage: Stage) -> Result<&cudarc::driver::CudaFunction> {
        self.program
            .function(stage)
            .ok_or_else(|| Error::Unsupported {
                variant: self.spec.name(),
                reason: format!("the program has no {stage:?} stage"),
            })
    }
}

/// A variant's program from the context's JIT, and the device's SM count (which sizes split
/// plans): what every decoder loads once at construction.
pub(crate) fn load_program(
    stream: &Arc<CudaStream>,
    spec: &VariantSpec,
) -> Result<(Arc<LoadedProgram>, usize)> {
    let program = Jit::for_context(stream.context())?.load(spec)?;
    let num_sms = stream
        .context()
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .map_err(|e| Error::driver("reading the SM count", e))? as usize;
    Ok((program, num_sms))
}

/// Grows a reusable device buffer to at least `len` elements (allocating only when it is too
/// small, so steps of a shape seen before allocate nothing).
pub(crate) fn ensure_len<E: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    slot: &mut Option<CudaSlice<E>>,
    len: usize,
    what: &str,
) -> Result<()> {
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = Some(
            stream
                .alloc_zeros::<E>(len.max(1))
                .map_err(|e| Error::driver(format!("allocating {what}"), e))?,
        );
    }
    Ok(())
}

/// The checks every decode step makes before launching: the variant, q, the cache and the table
/// agree on dtype, layout, page size, head_dim, page pool and head counts. Returns
/// `(batch, num_kv_heads, num_qo_heads, sm_scale)`.
pub(crate) fn check_step_inputs<T: KvElement>(
    spec: &VariantSpec,
    q: &CudaSlice<T>,
    cache: &PagedKvCache<T>,
    table: &PageTable,
    sm_scale: Option<f32>,
) -> Result<(usize, usize, usize, f32)> {
    let shape = cache.shape();
    let name = spec.name();
    if T::DTYPE != spec.dtype {
        return Err(Error::Dtype {
            variant: name,
            expected: spec.dtype,
            got: T::DTYPE,
        });
    }
    if shape.layout != spec.kv_layout {
        return Err(Error::Layout {
            variant: name,
            expected: spec.kv_layout,
            got: shape.layout,
        });
    }
    if shape.page_size != spec.page_size as usize {
        return Err(Error::shape(
            "cache page_size",
            spec.page_size,
            shape.page_size,
        ));
    }
    if shape.head_dim != spec.head_dim as usize {
        return Err(Error::shape(
            "cache head_dim",
            spec.head_dim,
            shape.head_dim,
        ));
    }
    if table.page_size() != shape.page_size || table.num_pages() != shape.num_pages {
        return Err(Error::PageTable(format!(
            "table was validated for {} pages of {} tokens, the cache has {} of {}",
            table.num_pages(),
            table.page_size(),
            shape.num_pages,
            shape.page_size
        )));
    }
    let head_dim = spec.head_dim as usize;
    let batch = table.batch();
    let num_kv_heads = shape.num_kv_heads;
    let num_qo_heads = num_kv_heads * spec.group_size as usize;
    if q.len() != batch * num_qo_heads * head_dim {
        return Err(Error::shape(
            format!(
                "q [batch, num_qo_heads, head_dim] (num_qo_heads = {num_kv_heads} KV heads x group_size {})",
                spec.group_size
            ),
            format!(
                "{batch} x {num_qo_heads} x {head_dim} = {}",
                batch * num_qo_heads * head_dim
            ),
            q.len(),
        ));
    }
    let sm_scale = sm_scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
    if !sm_scale.is_finite() || sm_scale <= 0.0 {
        return Err(Error::Parameter(format!(
            "sm_scale must be finite and positive, got {sm_scale}"
        )));
    }
    Ok((batch, num_kv_heads, num_qo_heads, sm_scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_plans_cover_the_longest_request_in_whole_tiles() {
        for max_len in [1, 255, 256, 257, 20_000, 32768, 131072] {
            for rows in [1, 8, 64, 2048] {
                let plan = SplitPlan::new(32, 132, rows, max_len);
                let at = format!("len {max_len} rows {rows}: {plan:?}");
                assert_eq!(plan.chunk_tokens % 32, 0, "{at}");
                assert!(plan.chunk_tokens >= MIN_CHUNK_TOKENS, "{at}");
                assert!(plan.num_chunks * plan.chunk_tokens >= max_len, "{at}");
                assert!(
                    (plan.num_chunks - 1) * plan.chunk_tokens < max_len.max(1),
                    "{at}"
                );
            }
        }
        // The headline shape fills the GPU: 64 rows of 32k tokens in 17 chunks of 1952.
        assert_eq!(
            SplitPlan::new(32, 132, 64, 32768),
            SplitPlan {
                chunk_tokens: 1952,
                num_chunks: 17
            }
        );
    }
}
