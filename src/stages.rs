//! One launch per pipeline stage: each function fills its kernel's parameter struct from the
//! step and builds its grid, in one place. The decoder calls them in `stages_of(spec)` order.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream};
use twilight_jit::params::{
    AttendParams, CompactParams, ConstPtr, DsScoreParams, DsSelectParams, EstimateParams,
    QuestScoreParams, QuestSelectParams, ThresholdCompactParams, ThresholdParams,
};
use twilight_jit::{LoadedProgram, Stage, Tiling, VariantSpec};

use crate::buffer::{DeviceMut, DeviceRef};
use crate::element::KvElement;
use crate::error::{Error, Result};
use crate::launch::{Grid, Launcher};
use crate::page_table::PageTableView;
use crate::plan::{streaming_blocks_per_row, StepPlan};
use crate::pool::KvPool;
use crate::workspace::Workspace;

/// Pages each warp of the Quest scoring kernel scores at least: one stage of its ring at
/// head_dim 128 (twilight/quest.cuh).
const QUEST_PAGES_PER_WARP: usize = 4;
/// Candidates each warp of the estimate multiplies at a time (twilight/prune.cuh).
const ESTIMATE_GROUP: usize = 32;

/// Blocks of each streaming kernel the device holds at once: their grids are one wave
/// (`streaming_blocks_per_row`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct StreamingSlots {
    pub quest_score: usize,
    pub estimate: usize,
}

impl StreamingSlots {
    /// Per SM, where the driver cannot say.
    const FALLBACK_BLOCKS_PER_SM: usize = 4;

    /// As the driver reports them for the program's kernels (0 for a stage it has not).
    pub fn of(stream: &Arc<CudaStream>, program: &LoadedProgram, num_sms: usize) -> Self {
        let slots = |stage: Stage, threads: u32| match program.function(stage) {
            Some(f) => {
                let per_sm = crate::launch::resident_blocks_per_sm(stream, f, threads, 0);
                num_sms
                    * if per_sm > 0 {
                        per_sm
                    } else {
                        Self::FALLBACK_BLOCKS_PER_SM
                    }
            }
            None => 0,
        };
        StreamingSlots {
            quest_score: slots(Stage::QuestScore, program.tiling.select_threads),
            estimate: slots(Stage::Estimate, program.tiling.estimate_threads),
        }
    }
}

/// Everything of a step the stages read, checked by the decoder before the first launch.
pub(crate) struct Step<'a, T> {
    pub spec: &'a VariantSpec,
    pub tiling: Tiling,
    pub plan: StepPlan,
    pub stream: &'a Arc<CudaStream>,
    pub q: &'a DeviceRef<'a, T>,
    pub pool: &'a KvPool<'a, T>,
    pub table: &'a PageTableView<'a>,
    pub batch: usize,
    pub num_kv_heads: usize,
    pub streaming: StreamingSlots,
    pub sm_scale: f32,
    /// B0, at most the longest request's token rows.
    pub budget_tokens: usize,
    pub p: f32,
    /// Launch each stage with overlap (programmatic dependent launch).
    pub overlap: bool,
    /// Number the attention's blocks chunk-major (see `chunk_major_attention`).
    pub attend_chunk_major: bool,
}

/// Whether a step's attention numbers its blocks chunk-major (attend.cuh, `tw_attend_block`):
/// kept lists of steps of at most one row per SM. There every list's first chunk is then
/// dispatched ahead of other lists' empty chunks (H200, one grid against the last: the
/// attention stage up to 2.0 us faster at 32 and 64 rows, unchanged at 8). With more rows the
/// first chunks fill the resident slots, and a list's second chunk waits for a later wave
/// instead of running beside its first (Double Sparsity at 256 to 2048 rows: 0.4-3.5 us
/// slower; bench/PERF-NOTES.md, v22). Dense lists fill every chunk and keep the grid's order.
pub(crate) fn chunk_major_attention(spec: &VariantSpec, rows: usize, num_sms: usize) -> bool {
    !spec.is_dense() && rows <= num_sms
}

/// Where a step's results go: buffers twilight allocated or an engine's own (any
/// [`DeviceMut`]: cudarc slices and views, or raw device pointers).
pub struct StepOutputs<'a, T> {
    /// `[batch, num_qo_heads, head_dim]`, on a 16-byte boundary.
    pub o: DeviceMut<'a, T>,
    /// `[batch, num_qo_heads]`, natural log.
    pub lse: DeviceMut<'a, f32>,
    /// Sparse variants: the kept count per (request, KV head) and the kept token slots in
    /// rows of the plan's `max_cands`.
    pub kept: Option<(DeviceMut<'a, i32>, DeviceMut<'a, i32>)>,
}

impl<'a, T> StepOutputs<'a, T> {
    /// The outputs of a dense step.
    pub fn new(o: impl Into<DeviceMut<'a, T>>, lse: impl Into<DeviceMut<'a, f32>>) -> Self {
        StepOutputs {
            o: o.into(),
            lse: lse.into(),
            kept: None,
        }
    }

    /// With the kept lists of a sparse step: `kept_counts [batch * num_kv_heads]` and
    /// `kept [batch * num_kv_heads * plan.max_cands]`.
    pub fn with_kept(
        self,
        kept_counts: impl Into<DeviceMut<'a, i32>>,
        kept: impl Into<DeviceMut<'a, i32>>,
    ) -> Self {
        StepOutputs {
            kept: Some((kept_counts.into(), kept.into())),
            ..self
        }
    }
}

/// A stage's kernel in the loaded program.
pub(crate) fn function<'p>(
    functions: &'p twilight_jit::LoadedProgram,
    spec: &VariantSpec,
    stage: Stage,
) -> Result<&'p CudaFunction> {
    functions.function(stage).ok_or_else(|| Error::Unsupported {
        variant: spec.name(),
        reason: format!("the program has no {stage:?} stage"),
    })
}

/// The selector's choice as the candidate stages read it: positions, counts and, for Quest,
/// page ids (null where the selector has none, and where the step launched no selection
/// because every request fits the budget: the kernels then take every token).
struct Selection {
    selected: ConstPtr<i32>,
    selected_count: ConstPtr<i32>,
    selected_pages: ConstPtr<i32>,
}

fn selection<'a, T>(
    s: &Step<'_, T>,
    l: &mut Launcher<'a>,
    selected: &'a Option<CudaSlice<i32>>,
    selected_count: &'a Option<CudaSlice<i32>>,
    selected_pages: &'a Option<CudaSlice<i32>>,
) -> Selection {
    if s.plan.selects_everything {
        return Selection {
            selected: ConstPtr::NULL,
            selected_count: ConstPtr::NULL,
            selected_pages: ConstPtr::NULL,
        };
    }
    let (selected, selected_count) = match (selected, selected_count) {
        (Some(a), Some(b)) => (l.read(a), l.read(b)),
        _ => (ConstPtr::NULL, ConstPtr::NULL),
    };
    let selected_pages = match selected_pages {
        Some(ids) => l.read(ids),
        None => ConstPtr::NULL,
    };
    Selection {
        selected,
        selected_count,
        selected_pages,
    }
}

/// A candidate stage's parameter struct: the fields every such stage shares (where a row's
/// candidates come from and how many there can be), then the stage's own.
macro_rules! candidate_params {
    ($ty:ident, $s:expr, $l:expr, $sel:expr, { $($field:ident $(: $value:expr)?),* $(,)? }) => {
        $ty {
            kv_indptr: $l.read_ref(&$s.table.kv_indptr),
            kv_indices: $l.read_ref(&$s.table.kv_indices),
            kv_last_page_len: $l.read_ref(&$s.table.kv_last_page_len),
            selected: $sel.selected,
            selected_count: $sel.selected_count,
            selected_pages: $sel.selected_pages,
            num_kv_heads: $s.num_kv_heads as i32,
            selected_stride: $s.plan.selected_stride as i32,
            max_cands: $s.plan.max_cands as i32,
            $($field $(: $value)?),*
        }
    };
}

fn ensured<'a, E>(slot: &'a mut Option<CudaSlice<E>>, what: &str) -> Result<&'a mut CudaSlice<E>> {
    slot.as_mut()
        .ok_or_else(|| Error::Parameter(format!("workspace has no {what}")))
}

fn ensured_ref<'a, E>(slot: &'a Option<CudaSlice<E>>, what: &str) -> Result<&'a CudaSlice<E>> {
    slot.as_ref()
        .ok_or_else(|| Error::Parameter(format!("workspace has no {what}")))
}

fn missing(spec: &VariantSpec, what: &str) -> Error {
    Error::Parameter(format!("variant {spec} needs the pool's {what}"))
}

/// The one-wave grid of a streaming stage (of `slots` resident blocks) over rows of `units`,
/// blocks of `threads` whose warps take at least `units_per_warp` each.
fn streaming_grid<T>(
    s: &Step<'_, T>,
    slots: usize,
    units: usize,
    units_per_warp: usize,
    threads: u32,
) -> Grid {
    let warps = (threads / 32) as usize;
    let rows = s.batch * s.num_kv_heads;
    let parts = streaming_blocks_per_row(slots, rows, units, warps * units_per_warp);
    Grid::parts(parts, s.num_kv_heads, s.batch, threads)
}

pub(crate) fn quest_score<T: KvElement>(
    s: &Step<'_, T>,
    f: &CudaFunction,
    ws: &mut Workspace,
) -> Result<()> {
    let side = &s.pool.sidecar;
    let Some(page_bounds) = &side.page_bounds else {
        return Err(missing(s.spec, "Quest page bounds"));
    };
    let mut l = Launcher::new(s.stream, s.overlap);
    let params = QuestScoreParams {
        q: l.read_ref_elem(s.q),
        page_bounds: l.read_elem(page_bounds),
        kv_indptr: l.read_ref(&s.table.kv_indptr),
        kv_indices: l.read_ref(&s.table.kv_indices),
        scores: l.write(ensured(&mut ws.scores, "selector scores")?),
        num_kv_heads: s.num_kv_heads as i32,
        max_pages: s.plan.max_pages as i32,
    };
    let grid = streaming_grid(
        s,
        s.streaming.quest_score,
        s.plan.max_pages,
        QUEST_PAGES_PER_WARP,
        s.tiling.select_threads,
    );
    // SAFETY: `f` is `_quest_score`; scores hold rows * max_pages entries (the workspace was
    // sized from the plan) and no request has more than max_pages pages.
    unsafe { l.launch(f, grid, params, "quest_score") }
}

/// Quest's selection on `f`, either of its kernels ([`Stage::QuestSelect`] in passes or
/// [`Stage::QuestSelectInRegisters`]) on its block of `threads`, in clusters of
/// `cluster` blocks per row (1 for the passes).
pub(crate) fn quest_select<T: KvElement>(
    s: &Step<'_, T>,
    f: &CudaFunction,
    threads: u32,
    cluster: u32,
    padding: Option<u32>,
    ws: &mut Workspace,
) -> Result<()> {
    let mut l = Launcher::new(s.stream, s.overlap);
    let params = QuestSelectParams {
        scores: l.read(ensured_ref(&ws.scores, "selector scores")?),
        kv_indptr: l.read_ref(&s.table.kv_indptr),
        kv_indices: l.read_ref(&s.table.kv_indices),
        selected: l.write(ensured(&mut ws.selected, "selected positions")?),
        selected_count: l.write(ensured(&mut ws.selected_count, "selected counts")?),
        selected_pages: l.write(ensured(&mut ws.selected_pages, "selected page ids")?),
        num_kv_heads: s.num_kv_heads as i32,
        max_pages: s.plan.max_pages as i32,
        budget_pages: s.plan.budget_pages as i32,
    };
    let grid = Grid::parts(cluster as usize, s.num_kv_heads, s.batch, threads)
        .with_cluster(cluster)
        .with_padding(padding);
    // SAFETY: `f` is `_quest_select` or `_quest_select_in_registers` on its block size, in
    // clusters of `cluster` blocks per row (the kernel reads the size); selected and
    // selected_pages hold rows * budget_pages entries each (the workspace was
    // sized from the plan), the kernel writes at most budget_pages per row, and the table's
    // page list covers every request's pages.
    unsafe { l.launch(f, grid, params, "quest_select") }
}

pub(crate) fn ds_score<T: KvElement>(
    s: &Step<'_, T>,
    f: &CudaFunction,
    ws: &mut Workspace,
) -> Result<()> {
    let side = &s.pool.sidecar;
    let (Some(labels), Some(channels)) = (&side.k_label, &side.ds_channels) else {
        return Err(missing(s.spec, "Double Sparsity labels"));
    };
    let mut l = Launcher::new(s.stream, s.overlap);
    let params = DsScoreParams {
        q: l.read_ref_elem(s.q),
        k_label: l.read_elem(labels),
        ds_channels: l.read(channels),
        kv_indptr: l.read_ref(&s.table.kv_indptr),
        kv_indices: l.read_ref(&s.table.kv_indices),
        kv_last_page_len: l.read_ref(&s.table.kv_last_page_len),
        scores: l.write(ensured(&mut ws.scores, "selector scores")?),
        num_kv_heads: s.num_kv_heads as i32,
        max_tokens: s.plan.max_tokens as i32,
        budget: s.budget_tokens as i32,
    };
    let parts = s
        .plan
        .max_tokens
        .div_ceil(s.tiling.ds_score_tokens as usize);
    let grid = Grid::parts(parts, s.num_kv_heads, s.batch, s.tiling.select_threads);
    // SAFETY: `f` is `_ds_score`; scores hold rows * max_tokens entries and no request has
    // more tokens; labels and channels were sized for the pool's r, which the decoder matched
    // to the variant's.
    unsafe { l.launch(f, grid, params, "ds_score") }
}

/// Double Sparsity's selection on `f`, either of its kernels ([`Stage::DsSelect`] or
/// [`Stage::DsSelectInRegisters`]) on its block of `threads`, in clusters of
/// `cluster` blocks per row (1 for the passes).
pub(crate) fn ds_select<T: KvElement>(
    s: &Step<'_, T>,
    f: &CudaFunction,
    threads: u32,
    cluster: u32,
    padding: Option<u32>,
    ws: &mut Workspace,
) -> Result<()> {
    let mut l = Launcher::new(s.stream, s.overlap);
    let params = DsSelectParams {
        scores: l.read(ensured_ref(&ws.scores, "selector scores")?),
        kv_indptr: l.read_ref(&s.table.kv_indptr),
        kv_last_page_len: l.read_ref(&s.table.kv_last_page_len),
        selected: l.write(ensured(&mut ws.selected, "selected positions")?),
        selected_count: l.write(ensured(&mut ws.selected_count, "selected counts")?),
        num_kv_heads: s.num_kv_heads as i32,
        max_tokens: s.plan.max_tokens as i32,
        budget: s.budget_tokens as i32,
        stride: s.plan.selected_stride as i32,
    };
    let grid = Grid::parts(cluster as usize, s.num_kv_heads, s.batch, threads)
        .with_cluster(cluster)
        .with_padding(padding);
    // SAFETY: `f` is `_ds_select` or `_ds_select_in_registers` on its block size, in clusters
    // of `cluster` blocks per row (the kernel reads the size); selected holds
    // rows * selected_stride entries and a row gets at most min(B0, its length) <=
    // selected_stride positions.
    unsafe { l.launch(f, grid, params, "ds_select") }
}

pub(crate) fn estimate<T: KvElement>(
    s: &Step<'_, T>,
    f: &CudaFunction,
    ws: &mut Workspace,
) -> Result<()> {
    let side = &s.pool.sidecar;
    let (Some(codes), Some(scales)) = (&side.k_q4, &side.k_q4_scale_min) else {
        return Err(missing(s.spec, "4-bit K"));
    };
    let mut l = Launcher::new(s.stream, s.overlap);
    let sel = selection(
        s,
        &mut l,
        &ws.selected,
        &ws.selected_count,
        &ws.selected_pages,
    );
    let params = candidate_params!(EstimateParams, s, l, sel, {
        q: l.read_ref_elem(s.q),
        k_q4: l.read(codes),
        k_q4_scale_min: l.read(scales),
        logits: l.write(ensured(&mut ws.logits, "logits")?),
        sm_scale: s.sm_scale,
    });
    let grid = streaming_grid(
        s,
        s.streaming.estimate,
        s.plan.max_cands,
        ESTIMATE_GROUP,
        s.tiling.estimate_threads,
    );
    // SAFETY: `f` is `_estimate`; logits hold batch * num_qo_heads * max_cands entries and no
    // row has more candidates.
    unsafe { l.launch(f, grid, params, "estimate") }
}

/// The threshold on `f`, either of its kernels ([`Stage::Threshold`] or
/// [`Stage::ThresholdInSmallBlocks`]) on its block of `threads`.
pub(crate) fn threshold<T: KvElement>(
    s: &Step<'_, T>,
    f: &CudaFunction,
    threads: u32,
    ws: &mut Workspace,
) -> Result<()> {
    let mut l = Launcher::new(s.stream, s.overlap);
    let sel = selection(
        s,
        &mut l,
        &ws.selected,
        &ws.selected_count,
        &ws.selected_pages,
    );
    let params = candidate_params!(ThresholdParams, s, l, sel, {
        logits: l.read(ensured_ref(&ws.logits, "logits")?),
        stats: l.write(ensured(&mut ws.stats, "top-p thresholds")?),
        p: s.p,
    });
    let num_qo_heads = s.num_kv_heads * s.spec.group_size as usize;
    let grid = Grid::rows(num_qo_heads, s.batch, threads);
    // SAFETY: `f` is `_threshold` or `_threshold_small` on its block size; stats hold 2 floats
    // per (request, query head).
    unsafe { l.launch(f, grid, params, "threshold") }
}

/// Threshold and compaction in one launch: a cluster of the group's query heads per row.
pub(crate) fn threshold_compact<T: KvElement>(
    s: &Step<'_, T>,
    f: &CudaFunction,
    ws: &mut Workspace,
    kept_counts: &mut DeviceMut<'_, i32>,
    kept: &mut DeviceMut<'_, i32>,
) -> Result<()> {
    let mut l = Launcher::new(s.stream, s.overlap);
    let sel = selection(
        s,
        &mut l,
        &ws.selected,
        &ws.selected_count,
        &ws.selected_pages,
    );
    let params = candidate_params!(ThresholdCompactParams, s, l, sel, {
        logits: l.read(ensured_ref(&ws.logits, "logits")?),
        stats: l.write(ensured(&mut ws.stats, "top-p thresholds")?),
        kept: l.write_mut(kept),
        kept_count: l.write_mut(kept_counts),
        p: s.p,
    });
    // One CTA per query head of the group, the group one cluster (its size is compiled into
    // the kernel).
    let group = s.spec.group_size as usize;
    let grid = Grid::parts(group, s.num_kv_heads, s.batch, s.tiling.threshold_threads);
    // SAFETY: `f` is `_threshold_compact`; stats hold 2 floats per (request, query head), kept
    // holds rows * max_cands entries (the decoder checked the outputs against the plan), and
    // the grid's x is the cluster size the kernel was compiled with.
    unsafe { l.launch(f, grid, params, "threshold_compact") }
}

/// The compaction on `f`, either of its kernels ([`Stage::Compact`] or
/// [`Stage::CompactInSmallBlocks`]) on its block of `threads`.
pub(crate) fn compact<T: KvElement>(
    s: &Step<'_, T>,
    f: &CudaFunction,
    threads: u32,
    padding: Option<u32>,
    ws: &Workspace,
    kept_counts: &mut DeviceMut<'_, i32>,
    kept: &mut DeviceMut<'_, i32>,
) -> Result<()> {
    let mut l = Launcher::new(s.stream, s.overlap);
    let sel = selection(
        s,
        &mut l,
        &ws.selected,
        &ws.selected_count,
        &ws.selected_pages,
    );
    // Without pruning the kernel keeps every candidate and reads no logits.
    let (logits, stats) = match (&ws.logits, &ws.stats) {
        (Some(logits), Some(stats)) if s.spec.pruning == twilight_jit::Pruning::TopP => {
            (l.read(logits), l.read(stats))
        }
        _ => (ConstPtr::NULL, ConstPtr::NULL),
    };
    let params = candidate_params!(CompactParams, s, l, sel, {
        logits,
        stats,
        kept: l.write_mut(kept),
        kept_count: l.write_mut(kept_counts),
    });
    let grid = Grid::rows(s.num_kv_heads, s.batch, threads).with_padding(padding);
    // SAFETY: `f` is `_compact` or `_compact_small` on its block size; kept holds
    // rows * max_cands entries (the decoder checked the outputs against the plan).
    unsafe { l.launch(f, grid, params, "compact") }
}

/// Attention over every token of each request (dense) or over each row's kept list.
pub(crate) fn attend<T: KvElement>(
    s: &Step<'_, T>,
    f: &CudaFunction,
    threads: u32,
    shared_bytes: u32,
    ws: &mut Workspace,
    out: &mut StepOutputs<'_, T>,
) -> Result<()> {
    let Workspace {
        partial_o,
        partial_lse,
        done,
        ..
    } = ws;
    let mut l = Launcher::new(s.stream, s.overlap);
    let (kept, kept_count) = match &out.kept {
        Some((counts, slots)) => (l.read_mut(slots), l.read_mut(counts)),
        None => (ConstPtr::NULL, ConstPtr::NULL),
    };
    let params = AttendParams {
        q: l.read_ref_elem(s.q),
        k_cache: l.read_ref_elem(&s.pool.k),
        v_cache: l.read_ref_elem(&s.pool.v),
        kv_indptr: l.read_ref(&s.table.kv_indptr),
        kv_indices: l.read_ref(&s.table.kv_indices),
        kv_last_page_len: l.read_ref(&s.table.kv_last_page_len),
        kept,
        kept_count,
        o: l.write_mut_elem(&mut out.o),
        lse: l.write_mut(&mut out.lse),
        partial_o: l.write(ensured(partial_o, "partial o")?),
        partial_lse: l.write(ensured(partial_lse, "partial lse")?),
        done: l.write(ensured(done, "split counters")?),
        num_kv_heads: s.num_kv_heads as i32,
        max_kept: s.plan.max_cands as i32,
        min_chunk_tokens: s.plan.chunk_tokens as i32,
        num_chunks: s.plan.num_chunks as i32,
        chunk_major: i32::from(s.attend_chunk_major),
        sm_scale: s.sm_scale,
    };
    let grid = Grid::parts(s.plan.num_chunks, s.num_kv_heads, s.batch, threads)
        .with_shared_bytes(shared_bytes);
    // SAFETY: `f` is `_attend` or `_attend_mma` (one parameter struct) on its block size; q, o and lse hold batch * num_qo_heads rows (checked), K/V
    // hold the pool the validated table (or the kept lists compact wrote from it) indexes,
    // partials hold batch * num_qo_heads * num_chunks rows when split, counters one per row.
    unsafe { l.launch(f, grid, params, "attend") }
}

#[cfg(test)]
mod tests {
    use super::chunk_major_attention;
    use twilight_jit::{Dtype, KvLayout, Pruning, Selector, VariantSpec};

    #[test]
    fn kept_lists_of_at_most_a_row_per_sm_number_their_blocks_chunk_major() {
        let dense = VariantSpec::dense(16, 128, Dtype::F16, 4, KvLayout::Hnd);
        let sparse = VariantSpec {
            selector: Selector::Quest,
            pruning: Pruning::TopP,
            ..dense
        };
        assert!(chunk_major_attention(&sparse, 64, 132));
        assert!(chunk_major_attention(&sparse, 132, 132));
        assert!(!chunk_major_attention(&sparse, 133, 132));
        assert!(!chunk_major_attention(&dense, 8, 132));
    }
}
