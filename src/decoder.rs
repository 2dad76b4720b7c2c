//! The decoder: one pipeline of stages (`stages_of(spec)`) runs every variant, dense decode
//! (`full`/`none`, attention alone) being the shortest. [`DenseDecoder`] and
//! [`crate::SparseDecoder`] are thin names over it for the two common uses.
//!
//! A step is sized from host-side bounds only (the longest request, B0), idle blocks exit
//! early and nothing is read back, so a step can be captured in a CUDA graph and replayed.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use twilight_jit::{
    pipeline_of, Jit, LoadedProgram, RegisterSelection, Stage, Tiling, VariantSpec,
    MAX_SELECT_CLUSTER,
};

use crate::buffer::{DeviceRef, VECTOR_ALIGN};
use crate::element::KvElement;
use crate::error::{Error, Result};
use crate::kv_cache::{PagedKvCache, RequestId};
use crate::page_table::{PageTable, PageTableView};
use crate::plan::{AttentionGrid, SplitPlan, StepPlan};
use crate::pool::{KvPool, KvPoolMut};
use crate::sidecar::Sidecar;
use crate::spread::RowSpread;
use crate::stages::{self, chunk_major_attention, Step, StepOutputs, StreamingSlots};
use crate::variant::Variant;
use crate::workspace::{Workspace, WorkspaceSizes};

/// What a step takes besides its tensors. Dense variants read `sm_scale` only.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepParams {
    /// B0: the selector's token budget per (request, KV head).
    pub budget: usize,
    /// Top-p threshold in (0, 1]: the share of the candidates' estimated mass to keep.
    pub p: f32,
    /// Softmax scale; `None` means `1 / sqrt(head_dim)`.
    pub sm_scale: Option<f32>,
}

impl StepParams {
    /// The largest B0 a step takes: the kernels count tokens in 32-bit signed integers. A
    /// budget at or beyond a request's length selects every token, so this is "no limit" in
    /// practice.
    pub const MAX_BUDGET: usize = i32::MAX as usize;

    /// The parameters of a dense step.
    pub fn dense(sm_scale: Option<f32>) -> StepParams {
        StepParams {
            budget: StepParams::MAX_BUDGET,
            p: 1.0,
            sm_scale,
        }
    }

    /// # Errors
    /// [`Error::Parameter`] for B0 = 0 or above [`StepParams::MAX_BUDGET`], p outside (0, 1], or a
    /// non-finite or non-positive sm_scale.
    pub fn validate(&self) -> Result<()> {
        if self.budget == 0 {
            return Err(Error::Parameter(
                "the token budget B0 must be at least 1".into(),
            ));
        }
        if self.budget > StepParams::MAX_BUDGET {
            return Err(Error::Parameter(format!(
                "the token budget B0 = {} is above {}, the most the kernels count \
                 (a budget of a request's length or more already selects every token)",
                self.budget,
                StepParams::MAX_BUDGET
            )));
        }
        if !(self.p > 0.0 && self.p <= 1.0) {
            return Err(Error::Parameter(format!(
                "p must be in (0, 1], got {}",
                self.p
            )));
        }
        if let Some(s) = self.sm_scale {
            check_sm_scale(s)?;
        }
        Ok(())
    }
}

fn check_sm_scale(s: f32) -> Result<()> {
    if !s.is_finite() || s <= 0.0 {
        return Err(Error::Parameter(format!(
            "sm_scale must be finite and positive, got {s}"
        )));
    }
    Ok(())
}

/// The outputs of a dense step: `o [batch, num_qo_heads, head_dim]` and `lse [batch,
/// num_qo_heads]`.
#[derive(Debug)]
pub struct DecodeOutput<T: KvElement> {
    pub o: CudaSlice<T>,
    pub lse: CudaSlice<f32>,
}

/// How top-p's threshold and compaction are launched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PruneLaunch {
    /// Two kernels: one CTA per query head, then one per (request, KV head).
    Separate,
    /// One kernel, a thread-block cluster of the group's query heads per (request, KV head)
    /// (sm_90 and later).
    Fused,
    /// Fused when every row's cluster is resident at once (rows <= the device's active
    /// clusters for the kernel), else separate: a second round of clusters costs more than the
    /// launch the fusion saves (bench/PERF-NOTES.md, v13).
    FusedWhenResident,
}

/// Which kernel runs a step's top-k selection (Quest's pages, Double Sparsity's tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SelectionKernel {
    /// The register kernel when the step's rows fit in one wave of it (at most one per SM) and
    /// its register path holds the longest row (or the passes cannot be spread), else the radix
    /// passes (bench/PERF-NOTES.md, v20 and v21).
    #[default]
    Auto,
    /// The kernel of radix passes only: small blocks, several per SM (spread over the SMs when
    /// [`Decoder::set_spread_rows`] is on).
    RadixPasses,
    /// The register kernel (a block per SM), which still takes rows longer than its registers
    /// hold in passes.
    InRegisters,
}

/// Which blocks run top-p's threshold (one per query head) and the compaction (one per
/// (request, KV head)) when they are launched apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PruneBlocks {
    /// Small blocks where they take the longest row in one round (its weights in registers,
    /// its candidates in one scan), else large ones.
    #[default]
    Auto,
    /// Large blocks (512 threads for the threshold, 1024 for the compaction): few per SM, one
    /// round for long rows.
    Large,
    /// Small blocks (128 and 256 threads): several per SM, several rounds for long rows.
    Small,
}

/// Tiles in the smallest chunk of a kept list one attention block takes. Measured on the H200
/// (`bench sparse --chunk-tiles 2,3,4`, one call; bench/PERF-NOTES.md, v17): against 1 tile,
/// 2 took the attention stage from 13.6 to 10.9 us at the headline (98 kept tokens per row),
/// 20.6 to 17.6 with double_sparse(32) (557), 10.3 to 8.2 at batch 1, and 32.1 to 26.7 at
/// batch 32 x 8k (319; 4 tiles: 23.7), and left 128k (36 kept) unchanged.
pub const DEFAULT_SPARSE_CHUNK_TILES: usize = 2;

/// When a step's kernels may be scheduled while the stream's previous kernel finishes
/// (programmatic dependent launch, sm_90 and later; each kernel still waits for its
/// predecessor's writes before it touches memory, see `tw_after_previous_kernel` in the
/// `common.cuh` header).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LaunchOverlap {
    Off,
    /// On for every launch on sm_90 and later, graph captures included (the graph keeps the
    /// programmatic dependencies).
    Always,
    /// On for launches on sm_90 and later, off while the stream captures a graph.
    WhenLaunched,
    /// On for launches on sm_90 and later; in graph captures, on for steps of at most one
    /// (request, KV head) row per SM and off for larger ones. Launched, the overlap took the
    /// headline step from 77.6-78.1 to 70.3-70.6 us and batch 1 from 38.0 to 35.2 (v18, v19).
    /// In graphs, since row spreading (v21), one grid (bench/PERF-NOTES.md, v22) measured it
    /// faster in 27 of its 36 reports of at most 132 rows (by up to 4.5%; the other 9 lost at
    /// most 0.8%), but slower in 25 of the 44 larger ones, by up to 11.8% (512 rows of 32k
    /// tokens), and faster there by at most 1.8%.
    #[default]
    Auto,
}

/// Which kernel runs a step's attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// CUDA cores: lanes of a block share each K/V row through registers and shuffles.
    CudaCores,
    /// Tensor cores: the group's query heads as one MMA operand, K and V streamed through
    /// shared memory by asynchronous copies, the dense split balanced over the blocks the
    /// device holds at once (bench/PERF-NOTES.md, v15).
    TensorCores,
}

/// Tensor cores for every variant: dense decode at the headline shape takes 257 us on them
/// against 368 on CUDA cores, a sparse step's attention over ~98 kept tokens 13.5 us against
/// 14.0 (bench/PERF-NOTES.md, v15).
impl Default for AttentionKernel {
    fn default() -> Self {
        AttentionKernel::TensorCores
    }
}

impl AttentionKernel {
    /// The stage (program entry) of the kernel.
    pub fn stage(self) -> Stage {
        match self {
            AttentionKernel::CudaCores => Stage::Attend,
            AttentionKernel::TensorCores => Stage::AttendMma,
        }
    }
}

/// Any variant's pipeline, loaded once, on one stream.
pub struct Decoder {
    spec: VariantSpec,
    stream: Arc<CudaStream>,
    program: Arc<LoadedProgram>,
    /// The step's stages in launch order (the append is not one), with threshold and
    /// compaction apart, and fused.
    separate: Vec<Stage>,
    fused: Vec<Stage>,
    prune_launch: PruneLaunch,
    /// Clusters of the fused kernel the device holds at once (0 where it has none).
    resident_clusters: usize,
    attention: AttentionKernel,
    /// Blocks of the tensor-core attention the device holds at once, when the driver says.
    resident_attend_mma_blocks: Option<usize>,
    streaming: StreamingSlots,
    num_sms: usize,
    launch_overlap: LaunchOverlap,
    /// Whether the device schedules dependent launches early (sm_90 and later).
    programmatic_launch: bool,
    /// Waves of blocks the dense split of the tensor-core attention plans for.
    dense_waves: usize,
    /// Tiles in the smallest chunk of a kept list one attention block takes.
    sparse_chunk_tiles: usize,
    selection: SelectionKernel,
    /// The largest cluster of CTAs a register selection spreads a row over.
    selection_cluster: u32,
    /// Whether the device launches thread-block clusters (sm_90 and later).
    launches_clusters: bool,
    /// Whether kernels of a block per row spread their blocks over the SMs.
    spread_rows: bool,
    prune_blocks: PruneBlocks,
    /// Paddings that spread the blocks of the radix-pass selections and of the compaction.
    quest_select_spread: RowSpread,
    ds_select_spread: RowSpread,
    compact_spread: RowSpread,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("spec", &self.spec.name())
            .field("stages", &self.separate)
            .field("prune_launch", &self.prune_launch)
            .finish()
    }
}

impl Decoder {
    /// Loads (from memory, disk or NVRTC) the kernels of any variant.
    ///
    /// # Errors
    /// An invalid spec, a JIT or driver error.
    pub fn new(stream: Arc<CudaStream>, spec: VariantSpec) -> Result<Self> {
        spec.validate()?;
        let jit = Jit::for_context(stream.context())?;
        Decoder::with_jit(stream, spec, &jit)
    }

    /// Loads the kernels of any variant through `jit`, which must belong to the stream's
    /// context (a module is only valid in the context it was loaded into). JITs of several
    /// devices over one [`twilight_jit::KernelStore`] compile a variant once per architecture.
    ///
    /// # Errors
    /// A JIT of another context; as [`Decoder::new`].
    pub fn with_jit(stream: Arc<CudaStream>, spec: VariantSpec, jit: &Jit) -> Result<Self> {
        spec.validate()?;
        if jit.context().cu_ctx() != stream.context().cu_ctx() {
            return Err(Error::Parameter(format!(
                "the JIT belongs to the context of device {}, the stream to a context of \
                 device {}: kernels load into one context only",
                jit.context().ordinal(),
                stream.context().ordinal()
            )));
        }
        let program = jit.load(&spec)?;
        let num_sms = stream
            .context()
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| Error::driver("reading the SM count", e))? as usize;
        let major = stream
            .context()
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
            )
            .map_err(|e| Error::driver("reading the compute capability", e))?;
        let separate = pipeline_of(&spec, false);
        let fused = pipeline_of(&spec, true);
        let resident_clusters = match program.function(Stage::ThresholdCompact) {
            Some(f) => crate::launch::resident_clusters(
                &stream,
                f,
                spec.group_size,
                program.tiling.threshold_threads,
            ),
            None => 0,
        };
        let resident_attend_mma_blocks = match program.function(Stage::AttendMma) {
            Some(f) => {
                let tiling = &program.tiling;
                crate::launch::allow_dynamic_shared(&stream, f, tiling.attend_mma_shared_bytes)?;
                let per_sm = crate::launch::resident_blocks_per_sm(
                    &stream,
                    f,
                    tiling.attend_mma_threads,
                    tiling.attend_mma_shared_bytes,
                );
                (per_sm > 0).then_some(num_sms * per_sm)
            }
            None => None,
        };
        let streaming = StreamingSlots::of(&stream, &program, num_sms);
        let spread = |stage: Stage, threads: u32| match program.function(stage) {
            Some(f) => RowSpread::of(&stream, f, threads),
            None => RowSpread::default(),
        };
        let quest_select_spread = spread(Stage::QuestSelect, program.tiling.quest_select_threads);
        let ds_select_spread = spread(Stage::DsSelect, program.tiling.ds_select_threads);
        let compact_spread = spread(Stage::Compact, program.tiling.compact_threads);
        tracing::debug!(variant = %spec, stages = ?separate, resident_clusters, ?resident_attend_mma_blocks, ?streaming, origin = ?program.origin, "decoder ready");
        let mut decoder = Decoder {
            spec,
            stream,
            program,
            separate,
            fused,
            prune_launch: PruneLaunch::FusedWhenResident,
            resident_clusters,
            attention: AttentionKernel::CudaCores,
            resident_attend_mma_blocks,
            streaming,
            num_sms,
            launch_overlap: LaunchOverlap::default(),
            programmatic_launch: major >= 9,
            dense_waves: 1,
            sparse_chunk_tiles: DEFAULT_SPARSE_CHUNK_TILES,
            selection: SelectionKernel::default(),
            selection_cluster: if major >= 9 { MAX_SELECT_CLUSTER } else { 1 },
            launches_clusters: major >= 9,
            spread_rows: true,
            quest_select_spread,
            ds_select_spread,
            compact_spread,
            prune_blocks: PruneBlocks::default(),
        };
        decoder.set_attention_kernel(AttentionKernel::default());
        Ok(decoder)
    }

    /// Which blocks run the threshold and the compaction launched apart; by default
    /// [`PruneBlocks::Auto`].
    pub fn set_prune_blocks(&mut self, blocks: PruneBlocks) {
        self.prune_blocks = blocks;
    }

    pub fn prune_blocks(&self) -> PruneBlocks {
        self.prune_blocks
    }

    /// Which kernel runs the attention; by default [`AttentionKernel::default`].
    pub fn set_attention_kernel(&mut self, kernel: AttentionKernel) {
        self.attention = kernel;
        let stage = kernel.stage();
        for pipeline in [&mut self.separate, &mut self.fused] {
            if let Some(last) = pipeline.last_mut() {
                *last = stage;
            }
        }
    }

    pub fn attention_kernel(&self) -> AttentionKernel {
        self.attention
    }

    /// How top-p's threshold and compaction are launched; [`PruneLaunch::FusedWhenResident`]
    /// by default.
    pub fn set_prune_launch(&mut self, how: PruneLaunch) {
        self.prune_launch = how;
    }

    pub fn prune_launch(&self) -> PruneLaunch {
        self.prune_launch
    }

    /// The stages a step over `rows` (request, KV head) pairs launches, in order. A selection
    /// stage launches its register kernel in its place ([`Stage::QuestSelectInRegisters`],
    /// [`Stage::DsSelectInRegisters`]) as [`SelectionKernel`] says (by default for at most one
    /// row per SM whose longest row its register path holds); the hook of
    /// [`Decoder::run_into`] names the kernel launched.
    pub fn stages_for(&self, rows: usize) -> &[Stage] {
        let fuse = match self.prune_launch {
            PruneLaunch::Separate => false,
            PruneLaunch::Fused => true,
            PruneLaunch::FusedWhenResident => rows <= self.resident_clusters,
        };
        if fuse {
            &self.fused
        } else {
            &self.separate
        }
    }

    /// How many waves of blocks the dense split of the tensor-core attention fills: 1 (the
    /// default) plans one block per resident slot, each wave's longest chunk counted; more
    /// waves mean shorter chunks and more partial results to merge. `bench dense --waves`
    /// measures the trade; on the H200 one wave was the fastest at every shape tried
    /// (bench/PERF-NOTES.md, "Dense decode: paging and the split's waves"). The split also
    /// counts a tile per wave ([`SplitPlan::balanced`]), so it takes more waves than this only
    /// where they cut the longest chunk by more than that.
    pub fn set_dense_waves(&mut self, waves: usize) {
        self.dense_waves = waves.max(1);
    }

    pub fn dense_waves(&self) -> usize {
        self.dense_waves
    }

    /// The smallest share of a kept list one block of a sparse step's attention takes, in
    /// tiles of the kernel ([`DEFAULT_SPARSE_CHUNK_TILES`] by default). A list longer than
    /// one chunk is split over blocks whose partial results the last of them merges: larger
    /// chunks trade that merge's chain of global-memory round trips for more tiles per warp.
    /// `bench sparse --chunk-tiles` measures it.
    pub fn set_sparse_chunk_tiles(&mut self, tiles: usize) {
        self.sparse_chunk_tiles = tiles.max(1);
    }

    pub fn sparse_chunk_tiles(&self) -> usize {
        self.sparse_chunk_tiles
    }

    /// Which kernel runs the top-k selection; [`SelectionKernel::Auto`] by default. Every choice
    /// selects the same candidates; `bench sparse` measures the one the default did not take.
    pub fn set_selection_kernel(&mut self, kernel: SelectionKernel) {
        self.selection = kernel;
    }

    pub fn selection_kernel(&self) -> SelectionKernel {
        self.selection
    }

    /// The largest thread-block cluster a selection's register kernel spreads one row over:
    /// 1, 2, 4 or 8 ([`MAX_SELECT_CLUSTER`], the default on sm_90 and later; 1 before, which
    /// has no clusters). Rows of more scores than one CTA holds run on the fewest CTAs that
    /// hold them, if this limit allows that many (else the step takes the radix passes); 1
    /// keeps each row on one CTA. `bench sparse --select-clusters` measures it.
    ///
    /// # Errors
    /// [`Error::Parameter`] for any other size, and for a limit above 1 on a device before
    /// sm_90.
    pub fn set_selection_cluster_limit(&mut self, limit: u32) -> Result<()> {
        self.selection_cluster = checked_cluster_limit(limit, self.launches_clusters)?;
        Ok(())
    }

    pub fn selection_cluster_limit(&self) -> u32 {
        self.selection_cluster
    }

    /// Whether the kernels that run a block per row (the radix-pass selections, and the
    /// compaction where more than one of its blocks fits an SM) spread their blocks over the
    /// SMs when a step has few rows: on by default.
    /// Under launch overlap a kernel's blocks are placed while the previous kernel still holds
    /// the SMs, and without the spread the headline's 64 selection rows shared 18-25 SMs
    /// (`src/spread.rs`; bench/PERF-NOTES.md, v21).
    pub fn set_spread_rows(&mut self, on: bool) {
        self.spread_rows = on;
    }

    pub fn spread_rows(&self) -> bool {
        self.spread_rows
    }

    /// When each stage's kernel may be scheduled while the previous one finishes;
    /// [`LaunchOverlap::Auto`] by default.
    pub fn set_launch_overlap(&mut self, overlap: LaunchOverlap) {
        self.launch_overlap = overlap;
    }

    pub fn launch_overlap(&self) -> LaunchOverlap {
        self.launch_overlap
    }

    /// Whether the launches of a step of `rows` (request, KV head) rows overlap: asks the
    /// driver whether the stream is capturing a graph when that decides it.
    fn overlap_now(&self, rows: usize) -> Result<bool> {
        let capturing = || -> Result<bool> {
            let status = self
                .stream
                .capture_status()
                .map_err(|e| Error::driver("asking whether the stream captures", e))?;
            Ok(status != cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
        };
        Ok(self.programmatic_launch
            && match self.launch_overlap {
                LaunchOverlap::Off => false,
                LaunchOverlap::Always => true,
                LaunchOverlap::WhenLaunched => !capturing()?,
                LaunchOverlap::Auto => rows <= self.num_sms || !capturing()?,
            })
    }

    /// Threshold and compaction always fused (`true`) or always apart (`false`); see
    /// [`Decoder::set_prune_launch`] for the default, which chooses per step.
    pub fn set_fused_prune(&mut self, on: bool) {
        self.set_prune_launch(if on {
            PruneLaunch::Fused
        } else {
            PruneLaunch::Separate
        });
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

    /// The stages a step launches with threshold and compaction apart, in order (see
    /// [`Decoder::stages_for`] for what a given step launches).
    pub fn stages(&self) -> &[Stage] {
        &self.separate
    }

    /// The bounds of a step over `batch` requests of at most `max_len` tokens with budget B0.
    pub fn plan(
        &self,
        batch: usize,
        num_kv_heads: usize,
        max_len: usize,
        budget: usize,
    ) -> StepPlan {
        let tiling = &self.program.tiling;
        // A sparse step's chunks are whole multiples of the tile (see set_sparse_chunk_tiles).
        let tiles = if self.spec.is_dense() {
            1
        } else {
            self.sparse_chunk_tiles
        };
        let grid = match self.attention {
            AttentionKernel::CudaCores => AttentionGrid {
                tile: tiling.decode_tile_tokens(self.spec.head_dim) as usize * tiles,
                num_sms: self.num_sms,
                resident_blocks: None,
            },
            AttentionKernel::TensorCores => AttentionGrid {
                tile: tiling.attend_mma_tile_tokens() as usize * tiles,
                num_sms: self.num_sms,
                resident_blocks: self
                    .resident_attend_mma_blocks
                    .map(|slots| slots.saturating_mul(self.dense_waves)),
            },
        };
        StepPlan::new(
            &self.spec,
            budget,
            grid,
            batch.saturating_mul(num_kv_heads),
            max_len,
        )
    }

    /// Appends tokens: `k_new` and `v_new` are `[tokens, num_kv_heads, head_dim]`, the tokens
    /// of `appends[0]` first, in order. One launch writes K, V and every structure the variant
    /// derives from K, for decode and prefill alike.
    ///
    /// # Errors
    /// Shape, dtype or layout mismatches, a cache without the variant's metadata, unknown
    /// requests, a full cache, driver errors.
    pub fn append<T: KvElement>(
        &self,
        cache: &mut PagedKvCache<T>,
        appends: &[(RequestId, usize)],
        k_new: &CudaSlice<T>,
        v_new: &CudaSlice<T>,
    ) -> Result<()> {
        crate::append::append(&self.stream, &self.program, cache, appends, k_new, v_new)
    }

    /// The scratch a step of `plan` over `batch` requests and `num_kv_heads` KV heads uses:
    /// what [`Decoder::alloc_workspace`] allocates, so an engine can budget it once.
    ///
    /// # Errors
    /// A size that overflows.
    pub fn workspace_bytes(
        &self,
        plan: &StepPlan,
        batch: usize,
        num_kv_heads: usize,
    ) -> Result<usize> {
        Ok(WorkspaceSizes::new(&self.spec, plan, batch, num_kv_heads)?.bytes())
    }

    /// A workspace sized for steps of `plan` over `batch` requests and `num_kv_heads` KV
    /// heads: such steps allocate nothing (and can be captured in a CUDA graph). A step of
    /// another shape grows it when it needs more.
    ///
    /// # Errors
    /// A size that overflows, or a failed allocation.
    pub fn alloc_workspace(
        &self,
        plan: &StepPlan,
        batch: usize,
        num_kv_heads: usize,
    ) -> Result<Workspace> {
        let mut workspace = Workspace::default();
        workspace.ensure(&self.stream, &self.spec, plan, batch, num_kv_heads)?;
        Ok(workspace)
    }

    /// Writes new K/V rows into an engine's pool and updates its sidecar, in one launch:
    /// row `i` of `k_new`/`v_new` (`[slots.len(), num_kv_heads, head_dim]`) goes to
    /// `slots[i]` (vLLM's slot mapping: `page * page_size + offset`).
    ///
    /// The slots of one page must be consecutive offsets, given in one run (as a step's
    /// decode tokens or a prefill's are), each page at most once per call: one block owns a
    /// page and merges its Quest bounds. A run that starts at offset 0 starts the page afresh
    /// (a freed page that is reused gets new bounds); a run that starts later extends what
    /// earlier appends of that page's tokens wrote.
    ///
    /// # Errors
    /// A pool or sidecar that does not fit the variant; bad slots (see
    /// [`crate::append::check_slots`]); rows of the wrong length or alignment; driver errors.
    pub fn append_slots<'k, T: KvElement>(
        &self,
        pool: KvPoolMut<'_, T>,
        slots: &[i32],
        k_new: impl Into<DeviceRef<'k, T>>,
        v_new: impl Into<DeviceRef<'k, T>>,
    ) -> Result<()> {
        check_pool_for(&self.spec, pool.shape(), T::DTYPE)?;
        pool.check_sidecar_for(&self.spec)?;
        let rows = crate::append::Rows::new(pool.shape(), slots.len(), k_new.into(), v_new.into())?;
        crate::append::write_slots(&self.stream, &self.program, pool, slots, rows)
    }

    /// Updates `sidecar` from K the engine already wrote into its pool (after its own
    /// prefill or append kernel) at `slots`, in one launch that reads those keys in place and
    /// writes nothing but the sidecar. The slot rules of [`Decoder::append_slots`] apply; the
    /// pool's own sidecar, if any, is ignored.
    ///
    /// # Errors
    /// As [`Decoder::append_slots`], and a sidecar of another shape.
    pub fn update_sidecar<T: KvElement>(
        &self,
        pool: &KvPool<'_, T>,
        sidecar: &mut Sidecar<T>,
        slots: &[i32],
    ) -> Result<()> {
        check_pool_for(&self.spec, pool.shape(), T::DTYPE)?;
        crate::pool::check_sidecar_shape(&pool.shape(), &sidecar.shape())?;
        crate::pool::check_kinds(&self.spec, sidecar.kinds())?;
        crate::append::update_in_place(&self.stream, &self.program, pool, sidecar, slots)
    }

    /// One step of the pipeline into `out`, calling `before` with each stage just before its
    /// launch and with `None` after the last (to record CUDA events between stages, say).
    /// `q` is `[batch, num_qo_heads, head_dim]`; q, the table and the outputs may be twilight's
    /// buffers or an engine's (cudarc slices and views, raw pointers through
    /// [`DeviceRef::from_raw`]). With a workspace already sized ([`Decoder::alloc_workspace`],
    /// or one step of the same shape) it allocates and synchronizes nothing: it can be
    /// captured in a CUDA graph.
    ///
    /// # Errors
    /// Mismatches between the variant, q, the pool (and its sidecar), the table and the
    /// outputs; misaligned q or o; bad parameters; driver errors; what `before` returns.
    #[allow(clippy::too_many_arguments)]
    pub fn run_into<'q, 't, T: KvElement>(
        &self,
        q: impl Into<DeviceRef<'q, T>>,
        pool: &KvPool<'_, T>,
        table: impl Into<PageTableView<'t>>,
        params: &StepParams,
        mut out: StepOutputs<'_, T>,
        workspace: &mut Workspace,
        before: &mut dyn FnMut(Option<Stage>) -> Result<()>,
    ) -> Result<()> {
        let (q, table) = (q.into(), table.into());
        let (q, table) = (&q, &table);
        let spec = &self.spec;
        params.validate()?;
        let (batch, num_kv_heads, num_qo_heads, sm_scale) =
            check_step_inputs(spec, q, pool, table, params.sm_scale)?;
        pool.check_sidecar_for(spec)?;
        let plan = self.plan(batch, num_kv_heads, table.max_len(), params.budget);
        let rows = batch * num_kv_heads;
        out.o.check_aligned("o", VECTOR_ALIGN)?;
        out.lse.check_aligned("lse", 4)?;
        if out.o.len() != q.len() || out.lse.len() != batch * num_qo_heads {
            return Err(Error::shape(
                "o and lse",
                format!("{} and {}", q.len(), batch * num_qo_heads),
                format!("{} and {}", out.o.len(), out.lse.len()),
            ));
        }
        match (&out.kept, spec.is_dense()) {
            (None, true) => {}
            (Some((counts, slots)), false) => {
                counts.check_aligned("kept counts", 4)?;
                slots.check_aligned("kept slots", 4)?;
                if counts.len() != rows || slots.len() != rows * plan.max_cands {
                    return Err(Error::shape(
                        "kept lists (allocate outputs with SparseDecoder::alloc_output for this table)",
                        format!("{rows} counts and {rows} rows of {}", plan.max_cands),
                        format!("{} counts and {} slots", counts.len(), slots.len()),
                    ));
                }
            }
            (None, false) => {
                return Err(Error::Parameter(format!(
                    "variant {spec} keeps a list per (request, KV head): pass kept outputs"
                )))
            }
            (Some(_), true) => {
                return Err(Error::Parameter(format!(
                    "variant {spec} is dense decode and keeps no lists: pass no kept outputs"
                )))
            }
        }
        workspace.ensure(&self.stream, spec, &plan, batch, num_kv_heads)?;
        let step = Step {
            spec,
            tiling: self.program.tiling,
            plan,
            stream: &self.stream,
            q,
            pool,
            table,
            batch,
            num_kv_heads,
            streaming: self.streaming,
            sm_scale,
            budget_tokens: params.budget.min(plan.max_tokens),
            p: params.p,
            overlap: self.overlap_now(batch * num_kv_heads)?,
            attend_chunk_major: chunk_major_attention(spec, batch * num_kv_heads, self.num_sms),
        };
        let rows = batch * num_kv_heads;
        let spread = |spread: &RowSpread| {
            self.spread_rows
                .then(|| spread.padding(rows, self.num_sms))
                .flatten()
        };
        let quest_padding = spread(&self.quest_select_spread);
        let ds_padding = spread(&self.ds_select_spread);
        let compact_padding = spread(&self.compact_spread);
        for &planned in self.stages_for(rows) {
            if plan.selects_everything && planned.is_selector() {
                continue;
            }
            let passes_padding = match planned {
                Stage::QuestSelect => quest_padding,
                Stage::DsSelect => ds_padding,
                _ => None,
            };
            let (stage, cluster) = kernel_for(
                planned,
                self.selection,
                self.selection_cluster,
                rows,
                self.num_sms,
                passes_padding.is_some(),
                &step.tiling,
                &step.plan,
            );
            let stage =
                prune_kernel_for(stage, self.prune_blocks, step.plan.max_cands, &step.tiling);
            before(Some(stage))?;
            let f = stages::function(&self.program, spec, stage)?;
            let tiling = &step.tiling;
            match stage {
                Stage::QuestScore => stages::quest_score(&step, f, workspace)?,
                Stage::QuestSelect => stages::quest_select(
                    &step,
                    f,
                    tiling.quest_select_threads,
                    1,
                    passes_padding,
                    workspace,
                )?,
                Stage::QuestSelectInRegisters => stages::quest_select(
                    &step,
                    f,
                    tiling.quest_select_registers_threads,
                    cluster,
                    None,
                    workspace,
                )?,
                Stage::DsScore => stages::ds_score(&step, f, workspace)?,
                Stage::DsSelect => stages::ds_select(
                    &step,
                    f,
                    tiling.ds_select_threads,
                    1,
                    passes_padding,
                    workspace,
                )?,
                Stage::DsSelectInRegisters => stages::ds_select(
                    &step,
                    f,
                    tiling.ds_select_registers_threads,
                    cluster,
                    None,
                    workspace,
                )?,
                Stage::Estimate => stages::estimate(&step, f, workspace)?,
                Stage::Threshold => {
                    stages::threshold(&step, f, tiling.threshold_threads, workspace)?
                }
                Stage::ThresholdInSmallBlocks => {
                    stages::threshold(&step, f, tiling.threshold_small_threads, workspace)?
                }
                Stage::Compact | Stage::CompactInSmallBlocks | Stage::ThresholdCompact => {
                    let Some((counts, slots)) = out.kept.as_mut() else {
                        unreachable!("checked above: sparse variants have kept outputs");
                    };
                    if stage == Stage::Compact {
                        let threads = tiling.compact_threads;
                        let padding = compact_padding;
                        stages::compact(&step, f, threads, padding, workspace, counts, slots)?
                    } else if stage == Stage::CompactInSmallBlocks {
                        let threads = tiling.compact_small_threads;
                        stages::compact(&step, f, threads, None, workspace, counts, slots)?
                    } else {
                        stages::threshold_compact(&step, f, workspace, counts, slots)?
                    }
                }
                Stage::Attend => {
                    let threads = step.tiling.decode_threads;
                    stages::attend(&step, f, threads, 0, workspace, &mut out)?
                }
                Stage::AttendMma => {
                    let threads = step.tiling.attend_mma_threads;
                    let shared = step.tiling.attend_mma_shared_bytes;
                    stages::attend(&step, f, threads, shared, workspace, &mut out)?
                }
                Stage::Append => unreachable!("the append is not a step stage"),
            }
        }
        before(None)
    }
}

/// `limit` as a selection's cluster limit on a device that does or does not launch clusters.
fn checked_cluster_limit(limit: u32, launches_clusters: bool) -> Result<u32> {
    if !limit.is_power_of_two() || limit > MAX_SELECT_CLUSTER {
        return Err(Error::Parameter(format!(
            "the selection's cluster limit must be 1, 2, 4 or {MAX_SELECT_CLUSTER} CTAs, got {limit}"
        )));
    }
    if limit > 1 && !launches_clusters {
        return Err(Error::Parameter(format!(
            "a selection cluster of {limit} CTAs needs thread-block clusters (sm_90 and later); this device has none, so the limit is 1"
        )));
    }
    Ok(limit)
}

/// The kernel a planned stage launches for this step, and the CTAs per cluster it runs on. A
/// selection's register kernel spreads each row over a cluster of as many CTAs as hold it, one
/// CTA per SM ([`Tiling::quest_register_selection`]): it takes a step whose clusters fit the
/// SMs in one wave and whose longest row its register path holds (rows it does not hold it
/// takes in passes), or, where the passes cannot be spread (`spreads`), any step of at most one
/// row per SM. Rows that need the largest cluster (more scores than four CTAs hold) take it in
/// up to two waves: their passes are slow (8 selection passes over half a megabyte a row), and
/// 32 rows of 131072 tokens on clusters of 8 took 132.5 us against 184.7 in passes (v24).
/// Every other step goes to the kernel of passes only, in small blocks, several per SM: with
/// more waves the register kernel loses (1024 rows of 512 pages in eight, v20; 1024 token rows
/// of 32768 took 362 us against 284 in passes, v21; 256 rows of 32768 on clusters of 2, four
/// waves, 116 against 89, and 64 rows of 131072 on clusters of 8, four waves, 236 against 197,
/// v24), and the passes packed several to an SM under launch overlap put the headline's 64
/// rows on 18-25 SMs (v21; bench/PERF-NOTES.md).
#[allow(clippy::too_many_arguments)]
fn kernel_for(
    planned: Stage,
    selection: SelectionKernel,
    max_cluster: u32,
    rows: usize,
    num_sms: usize,
    spreads: bool,
    tiling: &Tiling,
    plan: &StepPlan,
) -> (Stage, u32) {
    let (
        stage,
        RegisterSelection {
            cluster,
            holds_longest_row,
        },
    ) = match planned {
        Stage::QuestSelect => (
            Stage::QuestSelectInRegisters,
            tiling.quest_register_selection(plan.max_pages, max_cluster),
        ),
        Stage::DsSelect => (
            Stage::DsSelectInRegisters,
            tiling.ds_register_selection(plan.max_tokens, max_cluster),
        ),
        _ => return (planned, 1),
    };
    let in_registers = match selection {
        SelectionKernel::Auto => {
            let ctas = rows * cluster as usize;
            let waves = if cluster >= MAX_SELECT_CLUSTER { 2 } else { 1 };
            (holds_longest_row && ctas <= waves * num_sms) || (!spreads && ctas <= num_sms)
        }
        SelectionKernel::RadixPasses => false,
        SelectionKernel::InRegisters => true,
    };
    if in_registers {
        (stage, cluster)
    } else {
        (planned, 1)
    }
}

/// The kernel `stage` launches as: the threshold's or the compaction's small blocks where
/// `blocks` says so; Auto takes them where they hold the longest row in one round. On the H200
/// the large threshold holds two blocks per SM (64 registers of 512 threads): 2048 query heads
/// of B0 2048 took eight waves of it, 49 us against 19 in small blocks, and even 256 (one wave)
/// took 9.8 against 9.1; but 256 rows of 8192 candidates, which small blocks take in passes
/// over the logits, 12 us against 28. The large compaction (1024 threads, 8 candidates each)
/// leaves three quarters of its threads idle on rows of 2048: 64 of them took 7.6 us against
/// 5.9 in small blocks, 256 of them 10.8 against 7.3 (bench/PERF-NOTES.md, v25).
fn prune_kernel_for(stage: Stage, blocks: PruneBlocks, max_cands: usize, tiling: &Tiling) -> Stage {
    let (small, small_capacity) = match stage {
        Stage::Threshold => (
            Stage::ThresholdInSmallBlocks,
            (tiling.threshold_small_threads * tiling.threshold_weights_per_thread) as usize,
        ),
        Stage::Compact => (
            Stage::CompactInSmallBlocks,
            (tiling.compact_small_threads * tiling.compact_items_per_thread) as usize,
        ),
        _ => return stage,
    };
    let take_small = match blocks {
        PruneBlocks::Auto => max_cands <= small_capacity,
        PruneBlocks::Large => false,
        PruneBlocks::Small => true,
    };
    if take_small {
        small
    } else {
        stage
    }
}

/// Dense decode (`selector = full, pruning = none`): the baseline every sparse variant is
/// measured against, and what layers 0 and 1 of a model run.
#[derive(Debug)]
pub struct DenseDecoder {
    decoder: Decoder,
}

impl DenseDecoder {
    /// Loads (from memory, disk or NVRTC) the kernels of a dense variant.
    ///
    /// # Errors
    /// An invalid spec, a variant that is not `full`/`none` (those take a budget: use
    /// [`crate::SparseDecoder`] or [`Decoder`]), a JIT or driver error.
    pub fn new(stream: Arc<CudaStream>, spec: VariantSpec) -> Result<Self> {
        spec.validate()?;
        if !spec.is_dense() {
            return Err(Error::Unsupported {
                variant: spec.name(),
                reason: "DenseDecoder runs `selector = full, pruning = none` variants".into(),
            });
        }
        Ok(DenseDecoder {
            decoder: Decoder::new(stream, spec)?,
        })
    }

    /// [`DenseDecoder::new`] for a variant declared with `#[twilight_kernel]`.
    ///
    /// # Errors
    /// As [`DenseDecoder::new`].
    pub fn for_variant<V: Variant>(stream: Arc<CudaStream>) -> Result<Self> {
        DenseDecoder::new(stream, V::SPEC)
    }

    /// The pipeline underneath.
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// See [`Decoder::set_attention_kernel`].
    pub fn set_attention_kernel(&mut self, kernel: AttentionKernel) {
        self.decoder.set_attention_kernel(kernel);
    }

    /// See [`Decoder::set_launch_overlap`].
    pub fn set_launch_overlap(&mut self, overlap: LaunchOverlap) {
        self.decoder.set_launch_overlap(overlap);
    }

    /// See [`Decoder::set_dense_waves`].
    pub fn set_dense_waves(&mut self, waves: usize) {
        self.decoder.set_dense_waves(waves);
    }

    pub fn spec(&self) -> &VariantSpec {
        self.decoder.spec()
    }

    pub fn program(&self) -> &Arc<LoadedProgram> {
        self.decoder.program()
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        self.decoder.stream()
    }

    /// The split of a step over `batch` requests of at most `max_len` tokens.
    pub fn plan(&self, batch: usize, num_kv_heads: usize, max_len: usize) -> SplitPlan {
        self.decoder.plan(batch, num_kv_heads, max_len, 0).split()
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
        let alloc = |what: &str, e| Error::driver(format!("allocating {what}"), e);
        let mut out = DecodeOutput {
            o: self
                .stream()
                .alloc_zeros::<T>(q.len())
                .map_err(|e| alloc("o", e))?,
            lse: self
                .stream()
                .alloc_zeros::<f32>(q.len() / self.spec().head_dim as usize)
                .map_err(|e| alloc("lse", e))?,
        };
        self.run_into(
            q,
            cache,
            table,
            sm_scale,
            &mut out,
            &mut Workspace::default(),
        )?;
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
        let outputs = StepOutputs::new(&mut out.o, &mut out.lse);
        self.decoder.run_into(
            q,
            &cache.pool(),
            table,
            &StepParams::dense(sm_scale),
            outputs,
            workspace,
            &mut |_| Ok(()),
        )
    }

    /// Appends new tokens (see [`Decoder::append`]).
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
}

/// The checks every step makes before launching: the variant, q, the pool and the table agree
/// on dtype, layout, page size, head_dim, page count and head counts. Returns `(batch,
/// num_kv_heads, num_qo_heads, sm_scale)`.
fn check_step_inputs<T: KvElement>(
    spec: &VariantSpec,
    q: &DeviceRef<'_, T>,
    pool: &KvPool<'_, T>,
    table: &PageTableView<'_>,
    sm_scale: Option<f32>,
) -> Result<(usize, usize, usize, f32)> {
    check_pool_for(spec, pool.shape(), T::DTYPE)?;
    let shape = pool.shape();
    if table.page_size() != shape.page_size || table.num_pages() != shape.num_pages {
        return Err(Error::PageTable(format!(
            "table was validated for {} pages of {} tokens, the pool has {} of {}",
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
    q.check_aligned("q", VECTOR_ALIGN)?;
    let sm_scale = sm_scale.unwrap_or(1.0 / (head_dim as f32).sqrt());
    check_sm_scale(sm_scale)?;
    Ok((batch, num_kv_heads, num_qo_heads, sm_scale))
}

/// The variant and a pool agree on dtype, layout, page size and head_dim: checked by steps
/// and appends alike.
pub(crate) fn check_pool_for(
    spec: &VariantSpec,
    shape: crate::host::CacheShape,
    dtype: twilight_jit::Dtype,
) -> Result<()> {
    let name = spec.name();
    if dtype != spec.dtype {
        return Err(Error::Dtype {
            variant: name,
            expected: spec.dtype,
            got: dtype,
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
            "pool page_size",
            spec.page_size,
            shape.page_size,
        ));
    }
    if shape.head_dim != spec.head_dim as usize {
        return Err(Error::shape("pool head_dim", spec.head_dim, shape.head_dim));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plan whose longest row holds `max_pages` pages of 16 tokens.
    fn plan_of(max_pages: usize) -> StepPlan {
        StepPlan {
            max_pages,
            max_tokens: max_pages * 16,
            budget_pages: 512,
            selected_stride: 512,
            max_cands: 8192,
            chunk_tokens: 96,
            num_chunks: 2,
            selects_everything: false,
        }
    }

    #[test]
    fn pruning_takes_small_blocks_for_rows_they_hold_in_one_round() {
        let spec = VariantSpec {
            selector: twilight_jit::Selector::Quest,
            pruning: twilight_jit::Pruning::TopP,
            ..VariantSpec::dense(
                16,
                128,
                twilight_jit::Dtype::F16,
                4,
                twilight_jit::KvLayout::Hnd,
            )
        };
        let tiling = Tiling::for_spec(&spec);
        let pick = |stage, blocks, max_cands| prune_kernel_for(stage, blocks, max_cands, &tiling);
        use PruneBlocks::*;
        // B0 2048: a small block holds every row, its weights in registers, its candidates
        // in one scan.
        assert_eq!(
            pick(Stage::Threshold, Auto, 2048),
            Stage::ThresholdInSmallBlocks
        );
        assert_eq!(
            pick(Stage::Compact, Auto, 2048),
            Stage::CompactInSmallBlocks
        );
        assert_eq!(pick(Stage::Compact, Auto, 1), Stage::CompactInSmallBlocks);
        // The headline's 8192 candidates, or one more than a small block holds: large.
        assert_eq!(pick(Stage::Threshold, Auto, 8192), Stage::Threshold);
        assert_eq!(pick(Stage::Threshold, Auto, 2049), Stage::Threshold);
        assert_eq!(pick(Stage::Compact, Auto, 2049), Stage::Compact);
        // Forced either way, whatever the rows; other stages are left alone.
        assert_eq!(
            pick(Stage::Threshold, Small, 8192),
            Stage::ThresholdInSmallBlocks
        );
        assert_eq!(pick(Stage::Compact, Large, 16), Stage::Compact);
        assert_eq!(pick(Stage::Estimate, Small, 16), Stage::Estimate);
        assert_eq!(
            pick(Stage::ThresholdCompact, Small, 16),
            Stage::ThresholdCompact
        );
    }

    #[test]
    fn cluster_limits_are_powers_of_two_up_to_eight_and_need_clusters_above_one() {
        for limit in [1, 2, 4, 8] {
            assert_eq!(checked_cluster_limit(limit, true).unwrap(), limit);
        }
        assert_eq!(checked_cluster_limit(1, false).unwrap(), 1);
        for limit in [0, 3, 6, 16, u32::MAX] {
            assert!(matches!(
                checked_cluster_limit(limit, true),
                Err(Error::Parameter(_))
            ));
        }
        for limit in [2, 4, 8] {
            let err = checked_cluster_limit(limit, false).unwrap_err();
            assert!(err.to_string().contains("sm_90"), "{err}");
        }
    }

    #[test]
    fn selections_take_their_register_kernels_where_clusters_that_hold_the_rows_fit_the_sms() {
        let spec: VariantSpec = "ps16_hd128_f16_g4_hnd_quest_topp".parse().unwrap();
        let tiling = Tiling::for_spec(&spec);
        let select = |planned, max_cluster, rows, pages, spreads| {
            kernel_for(
                planned,
                SelectionKernel::Auto,
                max_cluster,
                rows,
                132,
                spreads,
                &tiling,
                &plan_of(pages),
            )
        };
        use Stage::{DsSelect, DsSelectInRegisters, QuestSelect, QuestSelectInRegisters};
        let quest = |rows, pages, spreads| select(QuestSelect, 8, rows, pages, spreads);
        // The headline's 64 rows of 2048 pages fill less than half a CTA: passes spread over
        // the SMs, or one CTA per row of the register kernel where they cannot be spread.
        assert_eq!(quest(64, 2048, true), (QuestSelect, 1));
        assert_eq!(quest(64, 2048, false), (QuestSelectInRegisters, 1));
        assert_eq!(quest(132, 512, false), (QuestSelectInRegisters, 1));
        // Rows of 8192 pages (128k tokens): one CTA holds each, however few the rows.
        assert_eq!(quest(64, 8192, true), (QuestSelectInRegisters, 1));
        assert_eq!(quest(8, 8192, true), (QuestSelectInRegisters, 1));
        assert_eq!(quest(132, 8192, true), (QuestSelectInRegisters, 1));
        assert_eq!(quest(132, 8192, false), (QuestSelectInRegisters, 1));
        assert_eq!(quest(133, 8192, true), (QuestSelect, 1));
        // More CTAs than SMs: the passes.
        assert_eq!(quest(256, 8192, true), (QuestSelect, 1));
        assert_eq!(quest(1024, 8192, false), (QuestSelect, 1));
        assert_eq!(quest(133, 512, false), (QuestSelect, 1));
        assert_eq!(quest(1024, 2048, false), (QuestSelect, 1));
        // The largest cluster holds 8 x 8192 scored pages, the last page besides.
        assert_eq!(quest(16, 8 * 8192 + 1, true), (QuestSelectInRegisters, 8));
        assert_eq!(quest(16, 8 * 8192 + 2, true), (QuestSelect, 1));
        // Rows that need clusters of 8 take them in up to two waves; others in one.
        assert_eq!(quest(33, 8 * 8192, true), (QuestSelectInRegisters, 8));
        assert_eq!(quest(34, 8 * 8192, true), (QuestSelect, 1));
        assert_eq!(quest(34, 8 * 8192, false), (QuestSelect, 1));
        // Token rows (16 to a page, 16384 to a CTA).
        let ds = |rows, pages, spreads| select(DsSelect, 8, rows, pages, spreads);
        assert_eq!(ds(64, 2048, true), (DsSelectInRegisters, 2));
        assert_eq!(ds(8, 2048, true), (DsSelectInRegisters, 2));
        assert_eq!(ds(66, 2048, true), (DsSelectInRegisters, 2));
        assert_eq!(ds(67, 2048, true), (DsSelect, 1));
        assert_eq!(ds(16, 8192, true), (DsSelectInRegisters, 8));
        assert_eq!(ds(32, 8192, true), (DsSelectInRegisters, 8));
        assert_eq!(ds(33, 8192, false), (DsSelectInRegisters, 8));
        assert_eq!(ds(34, 8192, true), (DsSelect, 1));
        assert_eq!(ds(33, 4096, true), (DsSelectInRegisters, 4));
        assert_eq!(ds(34, 4096, true), (DsSelect, 1));
        assert_eq!(ds(64, 8192, true), (DsSelect, 1));
        assert_eq!(ds(64, 8192, false), (DsSelect, 1));
        assert_eq!(ds(16, 8193, true), (DsSelect, 1));
        assert_eq!(ds(64, 512, true), (DsSelect, 1));
        assert_eq!(ds(256, 2048, true), (DsSelect, 1));
        assert_eq!(ds(1024, 512, false), (DsSelect, 1));
        // A smaller cluster limit: rows a cluster of the limit cannot hold take the passes.
        assert_eq!(select(DsSelect, 2, 8, 2048, true), (DsSelectInRegisters, 2));
        assert_eq!(select(DsSelect, 1, 8, 2048, true), (DsSelect, 1));
        assert_eq!(
            select(DsSelect, 1, 8, 2048, false),
            (DsSelectInRegisters, 1)
        );
        assert_eq!(
            select(DsSelect, 1, 64, 1024, true),
            (DsSelectInRegisters, 1)
        );
        // Other stages are launched as planned.
        assert_eq!(
            select(Stage::Estimate, 8, 1024, 512, false),
            (Stage::Estimate, 1)
        );
        // An explicit choice holds at any row count and length.
        let forced = |selection, planned, rows, pages| {
            kernel_for(
                planned,
                selection,
                8,
                rows,
                132,
                false,
                &tiling,
                &plan_of(pages),
            )
        };
        use SelectionKernel::{InRegisters, RadixPasses};
        assert_eq!(forced(RadixPasses, QuestSelect, 64, 8192), (QuestSelect, 1));
        assert_eq!(forced(RadixPasses, DsSelect, 8, 2048), (DsSelect, 1));
        assert_eq!(
            forced(InRegisters, QuestSelect, 1024, 512),
            (QuestSelectInRegisters, 1)
        );
        assert_eq!(
            forced(InRegisters, DsSelect, 1024, 8192),
            (DsSelectInRegisters, 8)
        );
        assert_eq!(
            forced(RadixPasses, Stage::Estimate, 8, 512),
            (Stage::Estimate, 1)
        );
    }
}
