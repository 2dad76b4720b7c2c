//! The Select-then-Prune step: a base selector (`quest`, `double_sparse(r)` or `full`), the
//! top-p pruner over a 4-bit estimate of K (or `none`), and exact attention over what is kept.
//! A thin name over the one [`Decoder`] pipeline, holding B0, p and sm_scale.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use twilight_jit::{LoadedProgram, Stage, VariantSpec};

use crate::decoder::{Decoder, LaunchOverlap, StepParams};
use crate::element::KvElement;
use crate::error::{Error, Result};
use crate::kv_cache::{PagedKvCache, RequestId};
use crate::page_table::PageTable;
use crate::plan::SparsePlan;
use crate::stages::StepOutputs;
use crate::workspace::SparseWorkspace;

/// The parameters of a sparse step: B0, p and sm_scale (see [`StepParams`]).
pub type SparseParams = StepParams;

/// What a step returns: `o [batch, num_qo_heads, head_dim]`, `lse [batch, num_qo_heads]`, the
/// kept count per (request, KV head) (the adaptive budget) and the kept token slots
/// `[batch, num_kv_heads, max_cands]` (the first `kept_counts` of each row are valid).
#[derive(Debug)]
pub struct SparseOutput<T: KvElement> {
    pub o: CudaSlice<T>,
    pub lse: CudaSlice<f32>,
    pub kept_counts: CudaSlice<i32>,
    pub kept: CudaSlice<i32>,
    /// The row length of `kept`.
    pub max_cands: usize,
}

/// The sparse step of one variant on one stream.
#[derive(Debug)]
pub struct SparseDecoder {
    decoder: Decoder,
    params: SparseParams,
}

impl SparseDecoder {
    /// Loads the kernels of a sparse variant (any selector with `top_p` or `none` pruning, but
    /// not both `full` and `none`: that is dense decode, [`crate::DenseDecoder`], which keeps
    /// no lists).
    ///
    /// # Errors
    /// Bad parameters, an unsupported variant, JIT or driver errors.
    pub fn new(stream: Arc<CudaStream>, spec: VariantSpec, params: SparseParams) -> Result<Self> {
        spec.validate()?;
        params.validate()?;
        if spec.is_dense() {
            return Err(Error::Unsupported {
                variant: spec.name(),
                reason: "`full` with `none` is dense decode: use DenseDecoder".into(),
            });
        }
        Ok(SparseDecoder {
            decoder: Decoder::new(stream, spec)?,
            params,
        })
    }

    /// The pipeline underneath.
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// See [`Decoder::set_launch_overlap`].
    pub fn set_launch_overlap(&mut self, overlap: LaunchOverlap) {
        self.decoder.set_launch_overlap(overlap);
    }

    /// See [`Decoder::set_attention_kernel`].
    pub fn set_attention_kernel(&mut self, kernel: crate::AttentionKernel) {
        self.decoder.set_attention_kernel(kernel);
    }

    /// See [`Decoder::set_selection_kernel`].
    pub fn set_selection_kernel(&mut self, kernel: crate::SelectionKernel) {
        self.decoder.set_selection_kernel(kernel);
    }

    /// See [`Decoder::set_selection_cluster_limit`].
    ///
    /// # Errors
    /// See [`Decoder::set_selection_cluster_limit`].
    pub fn set_selection_cluster_limit(&mut self, limit: u32) -> crate::Result<()> {
        self.decoder.set_selection_cluster_limit(limit)
    }

    /// See [`Decoder::set_spread_rows`].
    pub fn set_spread_rows(&mut self, on: bool) {
        self.decoder.set_spread_rows(on);
    }

    /// See [`Decoder::set_sparse_chunk_tiles`].
    pub fn set_sparse_chunk_tiles(&mut self, tiles: usize) {
        self.decoder.set_sparse_chunk_tiles(tiles);
    }

    /// See [`Decoder::set_fused_prune`].
    pub fn set_fused_prune(&mut self, on: bool) {
        self.decoder.set_fused_prune(on);
    }

    /// See [`Decoder::set_prune_launch`].
    pub fn set_prune_launch(&mut self, how: crate::decoder::PruneLaunch) {
        self.decoder.set_prune_launch(how);
    }

    /// See [`Decoder::set_prune_blocks`].
    pub fn set_prune_blocks(&mut self, blocks: crate::PruneBlocks) {
        self.decoder.set_prune_blocks(blocks);
    }

    pub fn spec(&self) -> &VariantSpec {
        self.decoder.spec()
    }

    pub fn params(&self) -> &SparseParams {
        &self.params
    }

    pub fn program(&self) -> &Arc<LoadedProgram> {
        self.decoder.program()
    }

    /// Appends tokens and updates the metadata the variant reads (see [`Decoder::append`]).
    ///
    /// # Errors
    /// As [`Decoder::append`].
    pub fn append<T: KvElement>(
        &self,
        cache: &mut PagedKvCache<T>,
        appends: &[(RequestId, usize)],
        k_new: &CudaSlice<T>,
        v_new: &CudaSlice<T>,
    ) -> Result<()> {
        self.decoder.append(cache, appends, k_new, v_new)
    }

    /// The bounds of a step over `batch` requests of at most `max_len` tokens.
    pub fn plan(&self, batch: usize, num_kv_heads: usize, max_len: usize) -> SparsePlan {
        self.decoder
            .plan(batch, num_kv_heads, max_len, self.params.budget)
    }

    /// Allocates outputs for a step over `table`.
    ///
    /// # Errors
    /// A size that overflows, or a failed allocation.
    pub fn alloc_output<T: KvElement>(
        &self,
        table: &PageTable,
        num_kv_heads: usize,
    ) -> Result<SparseOutput<T>> {
        let plan = self.plan(table.batch(), num_kv_heads, table.max_len());
        let rows = table.batch() * num_kv_heads;
        let heads = rows * self.spec().group_size as usize;
        let slots = rows
            .checked_mul(plan.max_cands)
            .ok_or_else(|| Error::Parameter("the kept lists of this step overflow".into()))?;
        let stream = self.decoder.stream();
        let alloc = |what: &str, e| Error::driver(format!("allocating {what}"), e);
        Ok(SparseOutput {
            o: stream
                .alloc_zeros::<T>(heads * self.spec().head_dim as usize)
                .map_err(|e| alloc("o", e))?,
            lse: stream
                .alloc_zeros::<f32>(heads)
                .map_err(|e| alloc("lse", e))?,
            kept_counts: stream
                .alloc_zeros::<i32>(rows)
                .map_err(|e| alloc("kept counts", e))?,
            kept: stream
                .alloc_zeros::<i32>(slots)
                .map_err(|e| alloc("kept lists", e))?,
            max_cands: plan.max_cands,
        })
    }

    /// One step: allocates outputs and scratch, then [`SparseDecoder::run_into`].
    ///
    /// # Errors
    /// As [`SparseDecoder::run_into`].
    pub fn run<T: KvElement>(
        &self,
        q: &CudaSlice<T>,
        cache: &PagedKvCache<T>,
        table: &PageTable,
    ) -> Result<SparseOutput<T>> {
        let mut out = self.alloc_output(table, cache.shape().num_kv_heads)?;
        self.run_into(q, cache, table, &mut out, &mut SparseWorkspace::default())?;
        Ok(out)
    }

    /// One step into existing outputs. With a workspace already sized (after one step of the
    /// same shape) it allocates and synchronizes nothing: it can be captured in a CUDA graph.
    ///
    /// # Errors
    /// Mismatches between the variant, q, the cache (and its metadata), the table and the
    /// outputs; driver errors.
    pub fn run_into<T: KvElement>(
        &self,
        q: &CudaSlice<T>,
        cache: &PagedKvCache<T>,
        table: &PageTable,
        out: &mut SparseOutput<T>,
        workspace: &mut SparseWorkspace,
    ) -> Result<()> {
        self.run_instrumented(q, cache, table, out, workspace, &mut |_| Ok(()))
    }

    /// [`SparseDecoder::run_into`], calling `before` with each stage just before its launch and
    /// with `None` after the last (to record CUDA events between stages, say).
    ///
    /// # Errors
    /// As [`SparseDecoder::run_into`], or what `before` returns.
    pub fn run_instrumented<T: KvElement>(
        &self,
        q: &CudaSlice<T>,
        cache: &PagedKvCache<T>,
        table: &PageTable,
        out: &mut SparseOutput<T>,
        workspace: &mut SparseWorkspace,
        before: &mut dyn FnMut(Option<Stage>) -> Result<()>,
    ) -> Result<()> {
        let plan = self.plan(table.batch(), cache.shape().num_kv_heads, table.max_len());
        if out.max_cands != plan.max_cands {
            return Err(Error::shape(
                "kept lists (allocate outputs with SparseDecoder::alloc_output for this table)",
                format!("rows of {}", plan.max_cands),
                format!("rows of {}", out.max_cands),
            ));
        }
        let outputs = StepOutputs::new(&mut out.o, &mut out.lse)
            .with_kept(&mut out.kept_counts, &mut out.kept);
        self.decoder.run_into(
            q,
            &cache.pool(),
            table,
            &self.params,
            outputs,
            workspace,
            before,
        )
    }
}
