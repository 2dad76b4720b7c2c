//! Rendering: a [`VariantSpec`] becomes one self-contained CUDA translation unit.
//!
//! Kernel logic lives in the headers under `templates/include/twilight/`; each stage's
//! `.cu.tera` file is thin glue (types, constants, the `extern "C"` entry) rendered through Tera
//! with a typed context. The headers are prepended from Rust behind `#line` markers rather than
//! included by Tera, which would read C++ braces as its own syntax. The same spec always renders
//! byte-identical source, so the source is part of the cache key.
//!
//! Templates are embedded at build time; `TWILIGHT_TEMPLATE_DIR` (see [`crate::env`]) names a
//! directory laid out like `templates/` whose files override them while a kernel is developed.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::env::JitEnv;
use crate::spec::{KvLayout, Pruning, Selector, VariantSpec};

/// One kernel entry of a variant's program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// Writes new tokens into their slots, with the variant's derived structures.
    Append,
    /// Quest: an upper bound of q.k per page.
    QuestScore,
    /// Quest: the budget's best pages, plus the last page, in radix passes over the scores
    /// (small blocks, many rows at once).
    QuestSelect,
    /// [`Stage::QuestSelect`] with every page score of a row in registers, spread over a
    /// cluster of CTAs per row (rows it does not hold take its passes on one CTA); the decoder
    /// launches it in its place for the rows that path holds and the steps whose clusters fit
    /// the SMs ([`Tiling::quest_register_selection`]).
    QuestSelectInRegisters,
    /// Double Sparsity: q.k over the calibrated channels per token, from the label cache.
    DsScore,
    /// Double Sparsity: the budget's best tokens, plus the newest, in radix passes.
    DsSelect,
    /// [`Stage::DsSelect`] with every token score of a row in registers; launched in its
    /// place as for [`Stage::QuestSelectInRegisters`] ([`Tiling::ds_register_selection`]).
    DsSelectInRegisters,
    /// Top-p: estimated logits of the candidates from the 4-bit K.
    Estimate,
    /// Top-p: the exact threshold weight per query head.
    Threshold,
    /// [`Stage::Threshold`] in blocks of [`Tiling::threshold_small_threads`]: several per SM,
    /// for steps of more query heads than the large blocks hold at once; the decoder launches
    /// it in its place for those.
    ThresholdInSmallBlocks,
    /// Top-p: threshold and compaction of a (request, KV head) in one launch, a cluster of the
    /// group's query heads (sm_90 and later); replaces `Threshold` and `Compact` when the
    /// decoder fuses them.
    ThresholdCompact,
    /// The kept candidates of each (request, KV head) as a list of token slots.
    Compact,
    /// [`Stage::Compact`] in blocks of [`Tiling::compact_small_threads`], launched in its place
    /// as [`Stage::ThresholdInSmallBlocks`] is.
    CompactInSmallBlocks,
    /// Attention: over every token (dense variants) or over the kept list (sparse ones); a
    /// list split over blocks is merged by (o, lse) in the same launch.
    Attend,
    /// The same attention on tensor cores, K and V streamed through shared memory by
    /// asynchronous copies (sm_80 and later); the decoder picks one of the two per step.
    AttendMma,
}

impl Stage {
    /// Whether the stage is a top-k selection (either kernel of either selector).
    pub fn is_selection(self) -> bool {
        matches!(
            self,
            Stage::QuestSelect
                | Stage::QuestSelectInRegisters
                | Stage::DsSelect
                | Stage::DsSelectInRegisters
        )
    }

    /// Whether the stage is the base selector's: its scoring or either kernel of its top-k.
    pub fn is_selector(self) -> bool {
        self.is_selection() || matches!(self, Stage::QuestScore | Stage::DsScore)
    }

    /// Suffix of the entry symbol: `<variant name>_<suffix>`.
    pub fn suffix(self) -> &'static str {
        match self {
            Stage::Append => "append",
            Stage::QuestScore => "quest_score",
            Stage::QuestSelect => "quest_select",
            Stage::QuestSelectInRegisters => "quest_select_in_registers",
            Stage::DsScore => "ds_score",
            Stage::DsSelect => "ds_select",
            Stage::DsSelectInRegisters => "ds_select_in_registers",
            Stage::Estimate => "estimate",
            Stage::Threshold => "threshold",
            Stage::ThresholdInSmallBlocks => "threshold_small",
            Stage::ThresholdCompact => "threshold_compact",
            Stage::Compact => "compact",
            Stage::CompactInSmallBlocks => "compact_small",
            Stage::Attend => "attend",
            Stage::AttendMma => "attend_mma",
        }
    }

    /// The template file holding the stage's entry (several stages may share one).
    pub fn template(self) -> &'static str {
        match self {
            Stage::Append => "append.cu.tera",
            Stage::QuestScore | Stage::QuestSelect | Stage::QuestSelectInRegisters => {
                "quest.cu.tera"
            }
            Stage::DsScore | Stage::DsSelect | Stage::DsSelectInRegisters => "ds.cu.tera",
            Stage::Estimate
            | Stage::Threshold
            | Stage::ThresholdInSmallBlocks
            | Stage::ThresholdCompact
            | Stage::Compact
            | Stage::CompactInSmallBlocks => "prune.cu.tera",
            Stage::Attend | Stage::AttendMma => "attend.cu.tera",
        }
    }
}

/// Headers in dependency order, prepended to every program.
const HEADERS: [&str; 12] = [
    "common.cuh",
    "dtype.cuh",
    "vec.cuh",
    "mma.cuh",
    "reduce.cuh",
    "paging.cuh",
    "append.cuh",
    "attend.cuh",
    "select.cuh",
    "quest.cuh",
    "ds.cuh",
    "prune.cuh",
];

/// Embeds template files, given relative to `templates/`, with their paths.
macro_rules! embed {
    ($($path:literal),* $(,)?) => {
        [$(($path, include_str!(concat!("../../templates/", $path)))),*]
    };
}

/// Every template file, relative to `templates/`, with its embedded text.
const EMBEDDED: [(&str, &str); 17] = embed![
    "include/twilight/common.cuh",
    "include/twilight/dtype.cuh",
    "include/twilight/vec.cuh",
    "include/twilight/mma.cuh",
    "include/twilight/reduce.cuh",
    "include/twilight/paging.cuh",
    "include/twilight/append.cuh",
    "include/twilight/attend.cuh",
    "include/twilight/select.cuh",
    "include/twilight/quest.cuh",
    "include/twilight/ds.cuh",
    "include/twilight/prune.cuh",
    "append.cu.tera",
    "attend.cu.tera",
    "quest.cu.tera",
    "ds.cu.tera",
    "prune.cu.tera",
];

/// Where template text comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateSource {
    /// The templates built into this binary.
    Embedded,
    /// A directory laid out like `templates/`; files missing there fall back to the embedded ones.
    Dir(PathBuf),
}

impl TemplateSource {
    /// `TWILIGHT_TEMPLATE_DIR` when set, else the embedded templates.
    pub fn from_env() -> TemplateSource {
        match &JitEnv::get().template_dir {
            Some(dir) => TemplateSource::Dir(dir.clone()),
            None => TemplateSource::Embedded,
        }
    }

    fn read(&self, name: &str) -> Result<String, RenderError> {
        let embedded = EMBEDDED
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, text)| *text)
            .expect("every template name used by the renderer is embedded");
        match self {
            TemplateSource::Embedded => Ok(embedded.to_string()),
            TemplateSource::Dir(dir) => {
                if !dir.is_dir() {
                    // A mistyped TWILIGHT_TEMPLATE_DIR must not fall back silently.
                    return Err(RenderError::TemplateFile {
                        path: dir.clone(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "template directory does not exist",
                        ),
                    });
                }
                let path = dir.join(name);
                match std::fs::read_to_string(&path) {
                    Ok(text) => Ok(text),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(embedded.to_string()),
                    Err(source) => Err(RenderError::TemplateFile { path, source }),
                }
            }
        }
    }
}

/// Why a program could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("template {template} failed to render for variant {variant}: {message}")]
    Template {
        template: String,
        variant: String,
        message: String,
    },
    #[error("cannot read template override {}: {source}", path.display())]
    TemplateFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Block shapes and unroll factors of a variant's kernels, decided here in Rust and handed both
/// to the templates (as constants) and to the launcher (as grid and block sizes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Tiling {
    pub decode_threads: u32,
    /// Tokens each row of lanes loads before it computes, to keep loads in flight.
    pub decode_unroll: u32,
    /// Warps per block of the tensor-core attention, each streaming its own 16-token tiles,
    /// and the depth of each warp's copy pipeline: warps * stages tiles of K and V
    /// (warps * stages * 64 * head_dim bytes) sit in shared memory.
    pub attend_mma_warps: u32,
    pub attend_mma_stages: u32,
    pub attend_mma_threads: u32,
    /// Dynamic shared memory of a tensor-core attention block: its tile buffers, or the
    /// warps' states merged over them at the end, whichever is larger.
    pub attend_mma_shared_bytes: u32,
    pub append_threads: u32,
    pub select_threads: u32,
    /// Depth of each Quest scoring warp's ring of asynchronous copies, in 2 KB stages: three
    /// fill the 48 KB of static shared memory of a block of `select_threads`.
    pub quest_score_stages: u32,
    /// Tokens each block of the Double Sparsity scoring walks.
    pub ds_score_tokens: u32,
    /// Quest's selection in radix passes ([`Stage::QuestSelect`]): its block, and the blocks
    /// per SM its registers must allow (6 x 256 threads: 40 registers, no spills; left free
    /// it took 60, 4 blocks).
    pub quest_select_threads: u32,
    pub quest_select_min_blocks: u32,
    /// Quest's selection with page scores in registers ([`Stage::QuestSelectInRegisters`]):
    /// its block and the scores each thread keeps, so 512 x 16 = 8192 pages per CTA (128k
    /// tokens at page 16), on clusters of up to [`MAX_SELECT_CLUSTER`] CTAs per row
    /// ([`Tiling::quest_register_selection`]). It takes rows of more than 4096 pages;
    /// shorter rows were measured faster in passes (2048 pages; select.cuh's
    /// REGISTERS_FROM). 32 keys on 256 threads spilled.
    pub quest_select_registers_threads: u32,
    pub quest_select_keys: u32,
    /// The token selection in radix passes ([`Stage::DsSelect`]): its block, and the blocks
    /// per SM its registers must allow (3 x 512 threads: 40 registers and 4 bytes of spills;
    /// left free it took 53, 2 blocks).
    pub ds_select_threads: u32,
    pub ds_select_min_blocks: u32,
    /// The token selection with scores in registers ([`Stage::DsSelectInRegisters`]): 512 x
    /// 32 = 16384 tokens per CTA, on clusters as Quest's; it takes rows of more than 8192
    /// tokens. One CTA of 512 x 64 per 32k-token row (v23) needed 96 bytes of stack and
    /// counted on one SM per row (bench/PERF-NOTES.md, v24).
    pub ds_select_registers_threads: u32,
    pub ds_select_keys: u32,
    pub estimate_threads: u32,
    /// Depth of each estimate warp's ring of asynchronous copies, in groups of 32 candidates
    /// (2 KB of codes at head_dim 128): STAGES - 1 groups are in flight while one is
    /// multiplied. Three keep a block's shared memory under 29 KB at head_dim 128, so that
    /// registers, not rings, bound the blocks per SM; two at head_dim 256 (4 KB groups).
    pub estimate_stages: u32,
    pub threshold_threads: u32,
    /// Blocks of [`Stage::ThresholdInSmallBlocks`]: 128 threads hold 2048 weights (16 each,
    /// the exact path of twilight/reduce.cuh's tw_mass_radix), B0 2048 of every query head;
    /// 64 registers allow 8 blocks per SM where 512-thread blocks fit 2.
    pub threshold_small_threads: u32,
    /// Weights per thread the threshold keeps in registers (twilight/reduce.cuh,
    /// tw_mass_radix's CACHED; the template asserts the two agree): a small block holds rows of
    /// up to `threshold_small_threads` times as many.
    pub threshold_weights_per_thread: u32,
    pub compact_threads: u32,
    /// Blocks of [`Stage::CompactInSmallBlocks`]: 256 threads take 2048 candidates (8 each) in
    /// one round of their scan, 6 blocks per SM where 1024-thread blocks fit 1 or 2.
    pub compact_small_threads: u32,
    /// Candidates per thread in one round of the compaction's scan (twilight/prune.cuh,
    /// tw_prune's COMPACT_ITEMS; the template asserts the two agree).
    pub compact_items_per_thread: u32,
}

impl Tiling {
    pub fn for_spec(spec: &VariantSpec) -> Tiling {
        Tiling {
            decode_threads: 128,
            // Eight query heads per KV head already hold 128 accumulators per lane; a deeper
            // unroll would spill.
            decode_unroll: if spec.group_size >= 8 { 2 } else { 4 },
            attend_mma_warps: attend_mma_warps(spec.head_dim),
            attend_mma_stages: ATTEND_MMA_STAGES,
            attend_mma_threads: 32 * attend_mma_warps(spec.head_dim),
            attend_mma_shared_bytes: attend_mma_shared_bytes(
                spec,
                attend_mma_warps(spec.head_dim),
                ATTEND_MMA_STAGES,
            ),
            append_threads: 128,
            select_threads: 256,
            quest_score_stages: 3,
            ds_score_tokens: 1024,
            quest_select_threads: 256,
            quest_select_min_blocks: 6,
            quest_select_registers_threads: 512,
            quest_select_keys: 16,
            ds_select_threads: 512,
            ds_select_min_blocks: 3,
            ds_select_registers_threads: 512,
            ds_select_keys: 32,
            estimate_threads: 128,
            estimate_stages: if spec.head_dim >= 256 { 2 } else { 3 },
            threshold_threads: 512,
            threshold_small_threads: 128,
            threshold_weights_per_thread: 16,
            // One block walks a whole candidate list in order: make each step of it wide.
            compact_threads: 1024,
            compact_small_threads: 256,
            compact_items_per_thread: 8,
        }
    }

    /// How [`Stage::QuestSelectInRegisters`] would run a step whose rows hold at most
    /// `max_pages` pages, in clusters of at most `max_cluster` CTAs.
    pub fn quest_register_selection(
        &self,
        max_pages: usize,
        max_cluster: u32,
    ) -> RegisterSelection {
        RegisterSelection::plan(self.quest_select_per_cta(), max_pages, max_cluster)
    }

    /// As [`Tiling::quest_register_selection`], for Double Sparsity's rows of at most
    /// `max_tokens` tokens.
    pub fn ds_register_selection(&self, max_tokens: usize, max_cluster: u32) -> RegisterSelection {
        RegisterSelection::plan(self.ds_select_per_cta(), max_tokens, max_cluster)
    }

    /// Page scores one CTA of [`Stage::QuestSelectInRegisters`] holds.
    pub fn quest_select_per_cta(&self) -> usize {
        self.quest_select_registers_threads as usize * self.quest_select_keys as usize
    }

    /// Token scores one CTA of [`Stage::DsSelectInRegisters`] holds.
    pub fn ds_select_per_cta(&self) -> usize {
        self.ds_select_registers_threads as usize * self.ds_select_keys as usize
    }

    /// Tokens one decode block consumes per iteration; split-KV chunks are multiples of it.
    pub fn decode_tile_tokens(&self, head_dim: u32) -> u32 {
        self.decode_threads / (head_dim / 8) * self.decode_unroll
    }

    /// Tokens one round of the tensor-core attention's warps consumes (16 per warp).
    pub fn attend_mma_tile_tokens(&self) -> u32 {
        16 * self.attend_mma_warps
    }
}

/// The largest cluster a register selection runs on (the portable cluster size).
pub const MAX_SELECT_CLUSTER: u32 = 8;

/// How a selection's register kernel runs a step: a cluster of `cluster` CTAs per row (the
/// launch sets it; select.cuh spreads each row over its cluster), and whether its register
/// path takes the step's longest row (select.cuh's rule, `tw_top_k`: a row whose scored items,
/// all but the last, fill more than half of one CTA and fit the cluster; other rows it
/// chooses in passes on the cluster's first CTA).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegisterSelection {
    pub cluster: u32,
    pub holds_longest_row: bool,
}

impl RegisterSelection {
    /// For rows of at most `max_items` items, `per_cta` scores to a CTA and clusters of at most
    /// `max_cluster` CTAs (a power of two, 1 to [`MAX_SELECT_CLUSTER`]): the fewest CTAs that
    /// hold the longest row, a power of two (a cluster's CTAs share a GPC). Spreading a row
    /// over more CTAs than it needs measured no faster: batch 1's 8 rows of 8192 pages took
    /// 19.4 us on one CTA each, 20.6 on 4 and 26.9 on 8; of 32768 tokens 31.7 on 2, 29.6 on 4
    /// and 31.6 on 8 (bench/PERF-NOTES.md, v24). A step whose longest row the path does not
    /// take gets one CTA per row.
    pub fn plan(per_cta: usize, max_items: usize, max_cluster: u32) -> RegisterSelection {
        let max_cluster = max_cluster.clamp(1, MAX_SELECT_CLUSTER) as usize;
        let scored = max_items.saturating_sub(1);
        let needed = scored.div_ceil(per_cta.max(1)).max(1).next_power_of_two();
        if scored <= per_cta / 2 || needed > max_cluster {
            return RegisterSelection {
                cluster: 1,
                holds_longest_row: false,
            };
        }
        RegisterSelection {
            cluster: needed as u32,
            holds_longest_row: true,
        }
    }
}

/// Two stages: with six warps per block a third one measured no faster at the headline and
/// slower at batch 1 (bench/PERF-NOTES.md, v15).
const ATTEND_MMA_STAGES: u32 = 2;

/// The kernel's `shared_state` (attend.cuh, tw_attend_mma): `warps * stages` tiles of 16 rows
/// of K and V, or the merge state (per warp and head: max, sum and head_dim outputs; a
/// ticket), whichever is larger, rounded to 16 bytes. The kernel checks it with a
/// static_assert.
fn attend_mma_shared_bytes(spec: &VariantSpec, warps: u32, stages: u32) -> u32 {
    let (head_dim, group) = (spec.head_dim, spec.group_size);
    let tiles = warps * stages * 2 * 16 * head_dim * 2;
    let merge = 4 * (warps * group * (2 + head_dim) + 1);
    tiles.max(merge).next_multiple_of(16)
}

/// 96 KB of tiles per block at every head_dim (two blocks, twelve warps' copies in flight per
/// SM): of 2 to 8 warps at head_dim 128, six measured best over batch 8 and batch 1 (v15).
fn attend_mma_warps(head_dim: u32) -> u32 {
    (768 / head_dim.max(1)).max(1)
}

/// The typed context every stage template sees.
#[derive(Serialize)]
struct KernelContext<'a> {
    variant: &'a str,
    dtype: &'static str,
    page_size: u32,
    head_dim: u32,
    group_size: u32,
    /// `true` for the `hnd` layout, as a C++ literal.
    hnd: &'static str,
    /// Attention over every token of the request (selector `full`, pruning `none`).
    dense: bool,
    /// The append maintains Quest's page min/max.
    quest: bool,
    /// The append maintains the 4-bit K (the top-p pruner reads it).
    quant4: bool,
    top_p: bool,
    /// Label channels per token kept by the append (Double Sparsity's r), 0 for none.
    labels: u32,
    /// The C++ type mapping a candidate to its token slot.
    candidates: String,
    #[serde(flatten)]
    tiling: Tiling,
}

/// A variant's whole program: the source and the entry symbol of each stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedProgram {
    pub spec: VariantSpec,
    /// The whole translation unit: the banner, the headers, the parameter structs, the glue.
    pub source: String,
    pub stages: Vec<Stage>,
    pub tiling: Tiling,
    /// The headers the source pulls in, in order: (path as its `#line` marker names it, text).
    pub headers: Vec<(String, String)>,
    /// What is particular to the variant: the source without its headers (the banner, the
    /// parameter structs rendered from their Rust definitions, and each stage's glue).
    pub glue: String,
}

impl RenderedProgram {
    /// The `extern "C"` symbol of a stage.
    pub fn entry(&self, stage: Stage) -> String {
        format!("{}_{}", self.spec.name(), stage.suffix())
    }
}

/// The entries a variant's program holds: the append and every stage of [`pipeline_of`], with
/// the selection both in passes and in registers, the top-p pruner's threshold and compaction
/// both apart and fused, and the attention both on CUDA cores and on tensor cores.
pub fn stages_of(spec: &VariantSpec) -> Vec<Stage> {
    let mut stages = vec![Stage::Append];
    for stage in pipeline_of(spec, false) {
        stages.push(stage);
        match stage {
            Stage::QuestSelect => stages.push(Stage::QuestSelectInRegisters),
            Stage::DsSelect => stages.push(Stage::DsSelectInRegisters),
            Stage::Threshold => stages.push(Stage::ThresholdInSmallBlocks),
            Stage::Compact => stages.push(Stage::CompactInSmallBlocks),
            _ => {}
        }
    }
    if spec.pruning == Pruning::TopP {
        let at = stages.len() - 1;
        stages.insert(at, Stage::ThresholdCompact);
    }
    stages.push(Stage::AttendMma);
    stages
}

/// The stages of one decode step, in launch order; with `fuse_prune`, top-p's threshold and
/// compaction are one launch ([`Stage::ThresholdCompact`]).
pub fn pipeline_of(spec: &VariantSpec, fuse_prune: bool) -> Vec<Stage> {
    use Stage::*;
    let mut stages = match spec.selector {
        Selector::Full => vec![],
        Selector::Quest => vec![QuestScore, QuestSelect],
        Selector::DoubleSparse { .. } => vec![DsScore, DsSelect],
    };
    match (spec.selector, spec.pruning) {
        (Selector::Full, Pruning::None) => {}
        (_, Pruning::None) => stages.push(Compact),
        (_, Pruning::TopP) if fuse_prune => stages.extend([Estimate, ThresholdCompact]),
        (_, Pruning::TopP) => stages.extend([Estimate, Threshold, Compact]),
    }
    stages.push(Attend);
    stages
}

/// Renders a variant with the templates of [`TemplateSource::from_env`].
///
/// # Errors
/// See [`render_with`].
pub fn render(spec: &VariantSpec) -> Result<RenderedProgram, RenderError> {
    render_with(spec, &TemplateSource::from_env())
}

/// Renders a variant's whole program: a banner, every header behind a `#line` marker, then the
/// glue of each stage.
///
/// # Errors
/// An override file that cannot be read, or a template error.
pub fn render_with(
    spec: &VariantSpec,
    templates: &TemplateSource,
) -> Result<RenderedProgram, RenderError> {
    let stages = stages_of(spec);
    let name = spec.name();
    let tiling = Tiling::for_spec(spec);
    let derived = spec.derived_kinds();
    let context = KernelContext {
        variant: &name,
        dtype: spec.dtype.cpp(),
        page_size: spec.page_size,
        head_dim: spec.head_dim,
        group_size: spec.group_size,
        hnd: match spec.kv_layout {
            KvLayout::Hnd => "true",
            KvLayout::Nhd => "false",
        },
        dense: spec.is_dense(),
        quest: derived.quest,
        quant4: derived.quant4,
        top_p: spec.pruning == Pruning::TopP,
        labels: derived.labels as u32,
        candidates: match spec.selector {
            Selector::Quest => format!("tw_page_candidates<{}, true>", spec.page_size),
            Selector::Full => format!("tw_page_candidates<{}, false>", spec.page_size),
            Selector::DoubleSparse { .. } => format!("tw_token_candidates<{}>", spec.page_size),
        },
        tiling,
    };
    let template_error = |template: &str, message: String| RenderError::Template {
        template: template.to_string(),
        variant: name.clone(),
        message,
    };
    let tera_context = tera::Context::from_serialize(&context)
        .map_err(|e| template_error("<context>", e.to_string()))?;

    let mut glue = String::new();
    let VariantSpec {
        page_size,
        head_dim,
        dtype,
        group_size,
        kv_layout,
        selector,
        pruning,
    } = *spec;
    let _ = writeln!(
        glue,
        "// twilight variant {name}\n// page_size={page_size} head_dim={head_dim} dtype={} group_size={group_size} kv_layout={} selector={} pruning={}\n// Generated by twilight-jit {}; do not edit.",
        dtype.short(),
        kv_layout.short(),
        selector.declared(),
        pruning.declared(),
        env!("CARGO_PKG_VERSION")
    );
    let mut source = glue.clone();
    let mut headers = Vec::with_capacity(HEADERS.len());
    for header in HEADERS {
        let text = templates.read(&format!("include/twilight/{header}"))?;
        let path = format!("twilight/{header}");
        let _ = writeln!(source, "\n#line 1 \"{path}\"");
        source.push_str(&text);
        headers.push((path, text));
    }
    let mut variant_part = String::new();
    let _ = writeln!(
        variant_part,
        "\n#line 1 \"twilight/params (rendered from the Rust parameter structs)\""
    );
    // Entries that share a parameter struct (the two attentions) define it once.
    let mut definitions: Vec<String> = Vec::new();
    for stage in &stages {
        let definition = stage.params_cpp(spec.dtype.cpp());
        if !definitions.contains(&definition) {
            variant_part.push_str(&definition);
            definitions.push(definition);
        }
    }
    let mut templates_used: Vec<&str> = Vec::new();
    for stage in &stages {
        let template = stage.template();
        if templates_used.contains(&template) {
            continue;
        }
        templates_used.push(template);
        let text = templates.read(template)?;
        let mut tera = tera::Tera::default();
        tera.autoescape_on(Vec::<&str>::new());
        tera.add_raw_template(template, &text)
            .map_err(|e| template_error(template, error_chain(&e)))?;
        let rendered = tera
            .render(template, &tera_context)
            .map_err(|e| template_error(template, error_chain(&e)))?;
        let _ = writeln!(variant_part, "\n#line 1 \"{template}\"");
        variant_part.push_str(rendered.trim_start());
    }
    source.push_str(&variant_part);
    glue.push_str(&variant_part);
    Ok(RenderedProgram {
        spec: *spec,
        source,
        stages,
        tiling,
        headers,
        glue,
    })
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let _ = write!(text, ": {e}");
        cause = e.source();
    }
    text
}

/// The embedded template files, relative to `templates/` (for tooling and tests).
pub fn embedded_template_names() -> impl Iterator<Item = &'static Path> {
    EMBEDDED.iter().map(|(name, _)| Path::new(*name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_register_paths_hold_rows_from_half_a_cta_to_the_largest_cluster() {
        let spec: VariantSpec = "ps16_hd128_f16_g4_hnd_quest_topp".parse().unwrap();
        let tiling = Tiling::for_spec(&spec);
        // 512 threads x 16 keys a CTA, up to 8 CTAs: rows of 4097 to 65536 scored pages, the
        // last page besides.
        let quest = |pages, max_cluster| {
            tiling
                .quest_register_selection(pages, max_cluster)
                .holds_longest_row
        };
        assert!(!quest(0, 8) && !quest(1, 8) && !quest(4097, 8));
        assert!(quest(4098, 8) && quest(8193, 8) && quest(8194, 8) && quest(65_537, 8));
        assert!(!quest(65_538, 8) && !quest(200_000, 8));
        // Clusters of one CTA: the rows one CTA holds.
        assert!(quest(8193, 1) && !quest(8194, 1) && quest(16_385, 2) && !quest(16_386, 2));
        // 512 x 32 a CTA: token rows of 8193 to 131072 scored tokens.
        let tokens = |len| {
            tiling
                .ds_register_selection(len, MAX_SELECT_CLUSTER)
                .holds_longest_row
        };
        assert!(!tokens(8_193) && tokens(8_194) && tokens(32_769) && tokens(131_073));
        assert!(!tokens(131_074));
    }

    #[test]
    fn a_register_selection_takes_the_fewest_ctas_that_hold_the_longest_row() {
        let cluster =
            |items, max_cluster| RegisterSelection::plan(16_384, items, max_cluster).cluster;
        // The headline's rows of 32768 tokens: two CTAs hold a row.
        assert_eq!(cluster(32_768, 8), 2);
        // One CTA holds 16384 scored items, two hold one more.
        assert_eq!(cluster(16_385, 8), 1);
        assert_eq!(cluster(16_386, 8), 2);
        // A row of 3 CTAs' scores takes a cluster of 4; 8 at most.
        assert_eq!(cluster(40_000, 8), 4);
        assert_eq!(cluster(131_073, 8), 8);
        // Rows the path does not take: one CTA each.
        assert_eq!(cluster(8_193, 8), 1);
        assert_eq!(cluster(131_074, 8), 1);
        assert_eq!(cluster(0, 8), 1);
        // A smaller largest cluster that still holds the row changes nothing; one that does not
        // leaves the row to the passes.
        assert_eq!(cluster(32_768, 2), 2);
        assert!(!RegisterSelection::plan(16_384, 32_768, 1).holds_longest_row);
        assert!(RegisterSelection::plan(16_384, 16_385, 1).holds_longest_row);
    }
}
