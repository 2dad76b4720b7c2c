//! The Select-then-Prune decode step on the GPU: a base selector (`quest`, `double_sparse(r)`
//! or `full`), the top-p pruner over a 4-bit estimate of K (or `none`), and exact attention over
//! what is kept.
//!
//! Launches per step: the selector's score and select (none for `full`), estimate and threshold
//! (top_p only),
//! compaction into kept lists, and attention (a split list is merged by its last block). Every
//! grid is sized from host-side bounds (the longest request, B0), idle blocks exit early, and
//! nothing is read back, so a step can be captured in a CUDA graph and replayed.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use twilight_jit::{LoadedProgram, Pruning, Selector, Stage, VariantSpec};

use crate::decoder::{check_step_inputs, ensure_len, load_program};
use crate::element::KvElement;
use crate::error::{Error, Result};
use crate::kv_cache::{PagedKvCache, RequestId};
use crate::page_table::PageTable;

/// The parameters of a sparse step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SparseParams {
    /// B0: the selector's token budget per (request, KV head).
    pub budget: usize,
    /// Top-p threshold in (0, 1]: the share of the candidates' estimated mass to keep.
    pub p: f32,
    /// Softmax scale; `None` means `1 / sqrt(head_dim)`.
    pub sm_scale: Option<f32>,
}

impl SparseParams {
    /// # Errors
    /// [`Error::Parameter`] for B0 = 0, p outside (0, 1], or a non-finite or non-positive
    /// sm_scale.
    pub fn validate(&self) -> Result<()> {
        if self.budget == 0 {
            return Err(Error::Parameter(
                "the token budget B0 must be at least 1".into(),
            ));
        }
        if !(self.p > 0.0 && self.p <= 1.0) {
            return Err(Error::Parameter(format!(
                "p must be in (0, 1], got {}",
                self.p
            )));
        }
        if let Some(s) = self.sm_scale {
            if !s.is_finite() || s <= 0.0 {
                return Err(Error::Parameter(format!(
                    "sm_scale must be finite and positive, got {s}"
                )));
            }
        }
        Ok(())
    }
}

/// Grid bounds of a step, all from host-side knowledge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparsePlan {
    /// Pages of the longest request.
    pub max_pages: usize,
    /// Token rows of per-token buffers: max_pages * page_size.
    pub max_tokens: usize,
    /// ceil(B0 / page_size): pages the Quest selector keeps (the last page included).
    pub budget_pages: usize,
    /// Row length of the selector's output: `budget_pages` page positions (quest), `max_cands`
    /// token positions (double_sparse), 0 for `full`.
    pub selected_stride: usize,
    /// Upper bound of candidates (and so of kept tokens) per (request, KV head).
    pub max_cands: usize,
    /// The smallest chunk of a kept list one attention block takes (one tile), and the blocks
    /// per (request, KV head) a list is spread over.
    pub chunk_tokens: usize,
    pub num_chunks: usize,
}

impl SparsePlan {
    /// The bounds for `rows` (request, KV head) pairs of at most `max_len` tokens, with
    /// attention tiles of `tile` tokens on `num_sms` multiprocessors.
    pub fn new(
        spec: &VariantSpec,
        budget: usize,
        tile: usize,
        num_sms: usize,
        rows: usize,
        max_len: usize,
    ) -> SparsePlan {
        let page_size = spec.page_size as usize;
        let max_pages = max_len.div_ceil(page_size).max(1);
        let budget_pages = budget.div_ceil(page_size).max(1);
        let max_tokens = max_pages * page_size;
        let (max_cands, selected_stride) = match spec.selector {
            Selector::Quest => (budget_pages.min(max_pages) * page_size, budget_pages),
            Selector::DoubleSparse { .. } => {
                let cands = budget.min(max_len).max(1);
                (cands, cands)
            }
            Selector::Full => (max_tokens, 0),
        };
        let wanted = (num_sms * TARGET_BLOCKS_PER_SM)
            .div_ceil(rows.max(1))
            .max(1);
        let tile = tile.max(1);
        // Kept lists are of unknown length here: the kernel spreads each over num_chunks blocks
        // in chunks of at least one tile, so a short list takes one or two blocks and the rest
        // of its blocks exit at once.
        let num_chunks = wanted.min(max_cands.div_ceil(tile)).max(1);
        let chunk_tokens = tile;
        SparsePlan {
            max_pages,
            max_tokens,
            budget_pages,
            selected_stride,
            max_cands,
            chunk_tokens,
            num_chunks,
        }
    }
}

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

/// Scratch buffers of a step, reused across steps.
#[derive(Debug, Default)]
pub struct SparseWorkspace {
    scores: Option<CudaSlice<f32>>,
    selected: Option<CudaSlice<i32>>,
    selected_count: Option<CudaSlice<i32>>,
    logits: Option<CudaSlice<f32>>,
    stats: Option<CudaSlice<f32>>,
    split: crate::decoder::Workspace,
}

impl SparseWorkspace {
    /// The selector's choice in the last step, copied to the host: positions, ascending, in
    /// rows of [`SparsePlan::selected_stride`] (page positions for `quest`, token positions for
    /// `double_sparse`), and their count per (request, KV head). `None` for `full`. For tests
    /// and diagnostics; it synchronizes.
    ///
    /// # Errors
    /// A failed copy.
    pub fn selection(&self, stream: &Arc<CudaStream>) -> Result<Option<(Vec<i32>, Vec<i32>)>> {
        match (&self.selected, &self.selected_count) {
            (Some(sel), Some(count)) => Ok(Some((
                stream
                    .clone_dtoh(sel)
                    .map_err(|e| Error::driver("downloading selected pages", e))?,
                stream
                    .clone_dtoh(count)
                    .map_err(|e| Error::driver("downloading selected counts", e))?,
            ))),
            _ => Ok(None),
        }
    }
}

/// Blocks per SM the attention split aims for (as in dense decode).
const TARGET_BLOCKS_PER_SM: usize = 8;
/// Pages each warp of the Quest scoring kernel walks.
const PAGES_PER_WARP: u32 = 16;

/// The sparse decode step of one variant on one stream.
pub struct SparseDecoder {
    spec: VariantSpec,
    params: SparseParams,
    stream: Arc<CudaStream>,
    program: Arc<LoadedProgram>,
    num_sms: usize,
}

impl std::fmt::Debug for SparseDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseDecoder")
            .field("spec", &self.spec.name())
            .field("params", &self.params)
            .finish()
    }
}

impl SparseDecoder {
    /// Loads the kernels of a sparse variant (any selector with `top_p` or `none` pruning, but
    /// not both `full` and `none`: that is [`crate::DenseDecoder`]).
    ///
    /// # Errors
    /// Bad parameters, an unsupported variant, JIT or driver errors.
    pub fn new(stream: Arc<CudaStream>, spec: VariantSpec, params: SparseParams) -> Result<Self> {
        spec.validate()?;
        params.validate()?;
        if spec.selector == Selector::Full && spec.pruning == Pruning::None {
            return Err(Error::Unsupported {
                variant: spec.name(),
                reason: "`full` with `none` is dense decode: use DenseDecoder".into(),
            });
        }
        let (program, num_sms) = load_program(&stream, &spec)?;
        Ok(SparseDecoder {
            spec,
            params,
            stream,
            program,
            num_sms,
        })
    }

    pub fn spec(&self) -> &VariantSpec {
        &self.spec
    }
    pub fn params(&self) -> &SparseParams {
        &self.params
    }
    pub fn program(&self) -> &Arc<LoadedProgram> {
        &self.program
    }

    /// Changes B0, p or sm_scale; the kernels do not depend on them.
    ///
    /// # Errors
    /// As [`SparseParams::validate`].
    pub fn set_params(&mut self, params: SparseParams) -> Result<()> {
        params.validate()?;
        self.params = params;
        Ok(())
    }

    /// Appends tokens and updates the metadata the variant reads (see
    /// [`crate::DenseDecoder::append`]).
    ///
    /// # Errors
    /// Shape, dtype or layout mismatches, a cache without the variant's metadata, a full
    /// cache, driver errors.
    pub fn append<T: KvElement>(
        &self,
        cache: &mut PagedKvCache<T>,
        appends: &[(RequestId, usize)],
        k_new: &CudaSlice<T>,
        v_new: &CudaSlice<T>,
    ) -> Result<()> {
        crate::append::append(&self.stream, &self.program, cache, appends, k_new, v_new)
    }

    /// The bounds of a step over `batch` requests of at most `max_len` tokens.
    pub fn plan(&self, batch: usize, num_kv_heads: usize, max_len: usize) -> SparsePlan {
        SparsePlan::new(
            &self.spec,
            self.params.budget,
            self.program.tiling.decode_tile_tokens(self.spec.head_dim) as usize,
            self.num_sms,
            batch * num_kv_heads,
            max_len,
        )
    }

    /// Allocates outputs for a step over `table`.
    ///
    /// # Errors
    /// A failed allocation.
    pub fn alloc_output<T: KvElement>(
        &self,
        table: &PageTable,
        num_kv_heads: usize,
    ) -> Result<SparseOutput<T>> {
        let plan = self.plan(table.batch(), num_kv_heads, table.max_len());
        let heads = table.batch() * num_kv_heads * self.spec.group_size as usize;
        let rows = table.batch() * num_kv_heads;
        let alloc = |what: &str, e| Error::driver(format!("allocating {what}"), e);
        Ok(SparseOutput {
            o: self
                .stream
                .alloc_zeros::<T>(heads * self.spec.head_dim as usize)
                .map_err(|e| alloc("o", e))?,
            lse: self
                .stream
                .alloc_zeros::<f32>(heads)
                .map_err(|e| alloc("lse", e))?,
            kept_counts: self
                .stream
                .alloc_zeros::<i32>(rows)
                .map_err(|e| alloc("kept counts", e))?,
            kept: self
                .stream
                .alloc_zeros::<i32>(rows * plan.max_cands)
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
        let spec = &self.spec;
        let (batch, num_kv_heads, num_qo_heads, sm_scale) =
            check_step_inputs(spec, q, cache, table, self.params.sm_scale)?;
        cache.check_derived_for(spec)?;
        let plan = self.plan(batch, num_kv_heads, table.max_len());
        let rows = batch * num_kv_heads;
        let head_dim = spec.head_dim as usize;
        if out.o.len() != q.len() || out.lse.len() != batch * num_qo_heads {
            return Err(Error::shape(
                "o and lse",
                format!("{} and {}", q.len(), batch * num_qo_heads),
                format!("{} and {}", out.o.len(), out.lse.len()),
            ));
        }
        if out.kept_counts.len() != rows
            || out.max_cands != plan.max_cands
            || out.kept.len() != rows * plan.max_cands
        {
            return Err(Error::shape(
                "kept lists (allocate outputs with SparseDecoder::alloc_output for this table)",
                format!("{rows} rows of {}", plan.max_cands),
                format!("{} rows of {}", out.kept_counts.len(), out.max_cands),
            ));
        }
        let quest = spec.selector == Selector::Quest;
        let double_sparse = matches!(spec.selector, Selector::DoubleSparse { .. });
        let top_p = spec.pruning == Pruning::TopP;
        let s = &self.stream;
        if quest || double_sparse {
            let score_rows = if quest {
                plan.max_pages
            } else {
                plan.max_tokens
            };
            ensure_len(
                s,
                &mut workspace.scores,
                rows * score_rows,
                "selector scores",
            )?;
            ensure_len(
                s,
                &mut workspace.selected,
                rows * plan.selected_stride,
                "selected positions",
            )?;
            ensure_len(s, &mut workspace.selected_count, rows, "selected counts")?;
        }
        if top_p {
            ensure_len(
                s,
                &mut workspace.logits,
                batch * num_qo_heads * plan.max_cands,
                "logits",
            )?;
            ensure_len(
                s,
                &mut workspace.stats,
                batch * num_qo_heads * 2,
                "top-p thresholds",
            )?;
        }
        workspace
            .split
            .ensure(s, batch * num_qo_heads, plan.num_chunks, head_dim, rows)?;

        let tiling = self.program.tiling;
        let null: u64 = 0;
        let (kvh_i, max_pages_i, budget_pages_i, max_cands_i) = (
            num_kv_heads as i32,
            plan.max_pages as i32,
            plan.budget_pages as i32,
            plan.max_cands as i32,
        );
        let (max_tokens_i, stride_i) = (plan.max_tokens as i32, plan.selected_stride as i32);
        // B0 beyond the longest request selects everything either way.
        let budget_tokens_i = self.params.budget.min(plan.max_tokens) as i32;
        let (chunk_i, chunks_i) = (plan.chunk_tokens as i32, plan.num_chunks as i32);
        let (b, kvh, qo) = (batch as u32, num_kv_heads as u32, num_qo_heads as u32);
        let ws = workspace;

        if quest {
            let derived = cache.derived();
            let (Some(page_max), Some(page_min)) = (&derived.page_max, &derived.page_min) else {
                unreachable!("checked above: the cache keeps Quest metadata");
            };
            let scores = ws.scores.as_mut().expect("ensured above");
            before(Some(Stage::QuestScore))?;
            let mut l = s.launch_builder(self.function(Stage::QuestScore)?);
            l.arg(q)
                .arg(page_max)
                .arg(page_min)
                .arg(&table.kv_indptr)
                .arg(&table.kv_indices)
                .arg(&mut *scores)
                .arg(&kvh_i)
                .arg(&max_pages_i);
            // Each warp scores PAGES_PER_WARP pages, so q is loaded once per warp for many pages.
            let warps = tiling.select_threads / 32;
            let grid_x = (plan.max_pages as u32)
                .div_ceil(warps * PAGES_PER_WARP)
                .max(1);
            // SAFETY: matches `_quest_score` of quest.cu.tera; scores hold rows * max_pages
            // entries and every request has at most max_pages pages (max_pages is derived from
            // the table's longest request).
            unsafe { l.launch(cfg((grid_x, kvh, b), tiling.select_threads)) }
                .map_err(|e| Error::driver("launching quest_score", e))?;

            before(Some(Stage::QuestSelect))?;
            let selected = ws.selected.as_mut().expect("ensured above");
            let selected_count = ws.selected_count.as_mut().expect("ensured above");
            let mut l = s.launch_builder(self.function(Stage::QuestSelect)?);
            l.arg(&*scores)
                .arg(&table.kv_indptr)
                .arg(&mut *selected)
                .arg(&mut *selected_count)
                .arg(&kvh_i)
                .arg(&max_pages_i)
                .arg(&budget_pages_i);
            // SAFETY: matches `_quest_select`; selected holds rows * budget_pages entries and
            // the kernel writes at most budget_pages per row.
            unsafe { l.launch(cfg((kvh, b, 1), tiling.select_threads)) }
                .map_err(|e| Error::driver("launching quest_select", e))?;
        }

        if double_sparse {
            let derived = cache.derived();
            let (Some(labels), Some(channels)) = (&derived.k_label, &derived.ds_channels) else {
                unreachable!("checked above: the cache keeps Double Sparsity labels");
            };
            let scores = ws.scores.as_mut().expect("ensured above");
            before(Some(Stage::DsScore))?;
            let mut l = s.launch_builder(self.function(Stage::DsScore)?);
            l.arg(q)
                .arg(labels)
                .arg(channels)
                .arg(&table.kv_indptr)
                .arg(&table.kv_indices)
                .arg(&table.kv_last_page_len)
                .arg(&mut *scores)
                .arg(&kvh_i)
                .arg(&max_tokens_i)
                .arg(&budget_tokens_i);
            let grid_x = (plan.max_tokens as u32)
                .div_ceil(tiling.ds_score_tokens)
                .max(1);
            // SAFETY: matches `_ds_score` of ds.cu.tera; scores hold rows * max_tokens entries
            // and no request has more tokens; labels and channels were sized for this cache's
            // r, which check_derived_for matched to the variant's.
            unsafe { l.launch(cfg((grid_x, kvh, b), tiling.select_threads)) }
                .map_err(|e| Error::driver("launching ds_score", e))?;

            before(Some(Stage::DsSelect))?;
            let selected = ws.selected.as_mut().expect("ensured above");
            let selected_count = ws.selected_count.as_mut().expect("ensured above");
            let mut l = s.launch_builder(self.function(Stage::DsSelect)?);
            l.arg(&*scores)
                .arg(&table.kv_indptr)
                .arg(&table.kv_last_page_len)
                .arg(&mut *selected)
                .arg(&mut *selected_count)
                .arg(&kvh_i)
                .arg(&max_tokens_i)
                .arg(&budget_tokens_i)
                .arg(&stride_i);
            // SAFETY: matches `_ds_select`; selected holds rows * selected_stride entries and a
            // row gets at most min(B0, its length) <= selected_stride positions.
            unsafe { l.launch(cfg((kvh, b, 1), tiling.ds_select_threads)) }
                .map_err(|e| Error::driver("launching ds_select", e))?;
        }

        if top_p {
            let derived = cache.derived();
            let (Some(codes), Some(scales)) = (&derived.k_q4, &derived.k_q4_scale_min) else {
                unreachable!("checked above: the cache keeps the 4-bit K");
            };
            before(Some(Stage::Estimate))?;
            let logits = ws.logits.as_mut().expect("ensured above");
            let mut l = s.launch_builder(self.function(Stage::Estimate)?);
            l.arg(q).arg(codes).arg(scales);
            push_candidates(
                &mut l,
                table,
                ws.selected.as_ref(),
                ws.selected_count.as_ref(),
                &null,
            );
            l.arg(&mut *logits)
                .arg(&kvh_i)
                .arg(&stride_i)
                .arg(&max_cands_i)
                .arg(&sm_scale);
            let grid_x = (plan.max_cands as u32)
                .div_ceil(tiling.estimate_threads * tiling.estimate_per_thread);
            // SAFETY: matches `_estimate` of prune.cu.tera; logits hold
            // batch * num_qo_heads * max_cands entries and no row has more candidates.
            unsafe { l.launch(cfg((grid_x, kvh, b), tiling.estimate_threads)) }
                .map_err(|e| Error::driver("launching estimate", e))?;

            before(Some(Stage::Threshold))?;
            let stats = ws.stats.as_mut().expect("ensured above");
            let mut l = s.launch_builder(self.function(Stage::Threshold)?);
            l.arg(&*logits);
            push_candidates(
                &mut l,
                table,
                ws.selected.as_ref(),
                ws.selected_count.as_ref(),
                &null,
            );
            l.arg(&mut *stats)
                .arg(&kvh_i)
                .arg(&stride_i)
                .arg(&max_cands_i)
                .arg(&self.params.p);
            // SAFETY: matches `_threshold`; stats hold 2 floats per (request, qo head).
            unsafe { l.launch(cfg((qo, b, 1), tiling.threshold_threads)) }
                .map_err(|e| Error::driver("launching threshold", e))?;
        }

        before(Some(Stage::Compact))?;
        let mut l = s.launch_builder(self.function(Stage::Compact)?);
        match (&ws.logits, &ws.stats) {
            (Some(logits), Some(stats)) if top_p => l.arg(logits).arg(stats),
            _ => l.arg(&null).arg(&null),
        };
        push_candidates(
            &mut l,
            table,
            ws.selected.as_ref(),
            ws.selected_count.as_ref(),
            &null,
        );
        l.arg(&mut out.kept)
            .arg(&mut out.kept_counts)
            .arg(&kvh_i)
            .arg(&stride_i)
            .arg(&max_cands_i);
        // SAFETY: matches `_compact`; kept holds rows * max_cands entries (checked above).
        unsafe { l.launch(cfg((kvh, b, 1), tiling.compact_threads)) }
            .map_err(|e| Error::driver("launching compact", e))?;

        before(Some(Stage::Attend))?;
        let (partial_o, partial_lse, done) = ws.split.buffers();
        let mut l = s.launch_builder(self.function(Stage::Attend)?);
        l.arg(q)
            .arg(&cache.k)
            .arg(&cache.v)
            .arg(&out.kept)
            .arg(&out.kept_counts)
            .arg(&mut out.o)
            .arg(&mut out.lse)
            .arg(partial_o)
            .arg(partial_lse)
            .arg(done)
            .arg(&kvh_i)
            .arg(&max_cands_i)
            .arg(&chunk_i)
            .arg(&chunks_i)
            .arg(&sm_scale);
        // SAFETY: matches the sparse `_attend` of attend.cu.tera; kept lists hold slots inside
        // the cache's pool (written by compact from the validated page table), partials hold
        // batch * num_qo_heads * num_chunks rows when split, and the counters one per row.
        unsafe { l.launch(cfg((plan.num_chunks as u32, kvh, b), tiling.decode_threads)) }
            .map_err(|e| Error::driver("launching attend", e))?;

        before(None)
    }

    fn function(&self, stage: Stage) -> Result<&CudaFunction> {
        self.program
            .function(stage)
            .ok_or_else(|| Error::Unsupported {
                variant: self.spec.name(),
                reason: format!("the program has no {stage:?} stage"),
            })
    }
}

fn cfg(grid: (u32, u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The candidate arguments shared by estimate, threshold and compact: the page table and the
/// selector's positions (null for `full`).
fn push_candidates<'a>(
    l: &mut cudarc::driver::LaunchArgs<'a>,
    table: &'a PageTable,
    selected: Option<&'a CudaSlice<i32>>,
    selected_count: Option<&'a CudaSlice<i32>>,
    null: &'a u64,
) {
    l.arg(&table.kv_indptr)
        .arg(&table.kv_indices)
        .arg(&table.kv_last_page_len);
    match (selected, selected_count) {
        (Some(sel), Some(count)) => l.arg(sel).arg(count),
        _ => l.arg(null).arg(null),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use twilight_jit::{Dtype, KvLayout};

    /// Every candidate list fits its row, every kept token is covered by a chunk, and chunks
    /// are whole tiles, over many shapes.
    #[test]
    fn plans_bound_every_list() {
        for selector in [
            Selector::Quest,
            Selector::Full,
            Selector::DoubleSparse { channels: 32 },
        ] {
            for page_size in [1u32, 16, 64] {
                let spec = VariantSpec {
                    selector,
                    pruning: Pruning::TopP,
                    ..VariantSpec::dense(page_size, 128, Dtype::F16, 4, KvLayout::Hnd)
                };
                for max_len in [1, 15, 16, 17, 1000, 32768, 131072] {
                    for budget in [1, 64, 8192, 1 << 20] {
                        for rows in [1, 64, 4096] {
                            let plan = SparsePlan::new(&spec, budget, 32, 132, rows, max_len);
                            let ps = page_size as usize;
                            let pages = max_len.div_ceil(ps);
                            // The longest request's candidates: its selected pages, full.
                            let cands = match selector {
                                Selector::Quest => pages.min(budget.div_ceil(ps)) * ps,
                                Selector::DoubleSparse { .. } => budget.min(max_len),
                                Selector::Full => pages * ps,
                            };
                            let at =
                                format!("{spec} len {max_len} B0 {budget} rows {rows}: {plan:?}");
                            assert!(plan.max_cands >= cands.min(max_len), "{at}");
                            assert!(plan.max_pages >= pages && plan.budget_pages >= 1, "{at}");
                            assert!(plan.max_tokens >= max_len, "{at}");
                            // The selector's rows hold its whole choice.
                            match selector {
                                Selector::Quest => assert!(
                                    plan.selected_stride >= budget.div_ceil(ps).min(pages),
                                    "{at}"
                                ),
                                Selector::DoubleSparse { .. } => {
                                    assert!(plan.selected_stride >= budget.min(max_len), "{at}")
                                }
                                Selector::Full => {}
                            }
                            assert_eq!(plan.chunk_tokens % 32, 0, "{at}");
                            assert!(plan.num_chunks >= 1, "{at}");
                            // No more blocks than tiles of the longest possible list.
                            assert!(
                                plan.num_chunks <= plan.max_cands.div_ceil(32).max(1),
                                "{at}"
                            );
                        }
                    }
                }
            }
        }
    }
}
