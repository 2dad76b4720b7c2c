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
    /// [`Stage::QuestSelect`] with every page score of a row in registers, one block per SM
    /// (rows it does not hold take its passes); the decoder launches it in its place for the
    /// rows that path holds ([`Tiling::quest_select_in_registers`]) and for steps of at most
    /// one row per SM.
    QuestSelectInRegisters,
    /// Double Sparsity: q.k over the calibrated channels per token, from the label cache.
    DsScore,
    /// Double Sparsity: the budget's best tokens, plus the newest, in radix passes.
    DsSelect,
    /// [`Stage::DsSelect`] with every token score of a row in registers; launched in its
    /// place as for [`Stage::QuestSelectInRegisters`] ([`Tiling::ds_select_in_registers`]).
    DsSelectInRegisters,
    /// Top-p: estimated logits of the candidates from the 4-bit K.
    Estimate,
    /// Top-p: the exact threshold weight per query head.
    Threshold,
    /// Top-p: threshold and compaction of a (request, KV head) in one launch, a cluster of the
    /// group's query heads (sm_90 and later); replaces `Threshold` and `Compact` when the
    /// decoder fuses them.
    ThresholdCompact,
    /// The kept candidates of each (request, KV head) as a list of token slots.
    Compact,
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
            Stage::ThresholdCompact => "threshold_compact",
            Stage::Compact => "compact",
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
            Stage::Estimate | Stage::Threshold | Stage::ThresholdCompact | Stage::Compact => {
                "prune.cu.tera"
            }
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
    /// its block and the scores each thread keeps. It takes rows of 4097 to 512 x 16 = 8192
    /// pages (128k tokens at page 16); shorter rows were measured faster in passes (2048
    /// pages; select.cuh's REGISTERS_FROM). 32 keys on 256 threads spilled.
    pub quest_select_registers_threads: u32,
    pub quest_select_keys: u32,
    /// The token selection in radix passes ([`Stage::DsSelect`]): its block, and the blocks
    /// per SM its registers must allow (3 x 512 threads: 40 registers and 4 bytes of spills;
    /// left free it took 53, 2 blocks).
    pub ds_select_threads: u32,
    pub ds_select_min_blocks: u32,
    /// The token selection with scores in registers ([`Stage::DsSelectInRegisters`]): 512 x
    /// 64 hold a 32k-token row; it takes rows of 16385 to 32768 tokens.
    pub ds_select_registers_threads: u32,
    pub ds_select_keys: u32,
    pub estimate_threads: u32,
    /// Depth of each estimate warp's ring of asynchronous copies, in groups of 32 candidates
    /// (2 KB of codes at head_dim 128): STAGES - 1 groups are in flight while one is
    /// multiplied. Three keep a block's shared memory under 29 KB at head_dim 128, so that
    /// registers, not rings, bound the blocks per SM; two at head_dim 256 (4 KB groups).
    pub estimate_stages: u32,
    pub threshold_threads: u32,
    pub compact_threads: u32,
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
            ds_select_keys: 64,
            estimate_threads: 128,
            estimate_stages: if spec.head_dim >= 256 { 2 } else { 3 },
            threshold_threads: 512,
            // One block walks a whole candidate list in order: make each step of it wide.
            compact_threads: 1024,
        }
    }

    /// Whether the register path of [`Stage::QuestSelectInRegisters`] holds a row of
    /// `max_pages` pages (rows it does not hold it chooses in passes, a block per SM).
    pub fn quest_select_in_registers(&self, max_pages: usize) -> bool {
        registers_take(
            self.quest_select_registers_threads,
            self.quest_select_keys,
            max_pages,
        )
    }

    /// As [`Tiling::quest_select_in_registers`], for Double Sparsity's rows of `max_tokens`
    /// tokens.
    pub fn ds_select_in_registers(&self, max_tokens: usize) -> bool {
        registers_take(
            self.ds_select_registers_threads,
            self.ds_select_keys,
            max_tokens,
        )
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

/// select.cuh's rule (`tw_top_k`): a row of `items` items, the last always kept, takes the
/// register path when its `items - 1` scored ones fill more than half of `threads * keys`.
fn registers_take(threads: u32, keys: u32, items: usize) -> bool {
    let capacity = threads as usize * keys as usize;
    let scored = items.saturating_sub(1);
    scored > capacity / 2 && scored <= capacity
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
    fn the_register_paths_hold_rows_of_half_to_all_of_their_capacity() {
        let spec: VariantSpec = "ps16_hd128_f16_g4_hnd_quest_topp".parse().unwrap();
        let tiling = Tiling::for_spec(&spec);
        // 512 threads x 16 keys: rows of 4097 to 8192 scored pages, the last page besides.
        let quest = |pages| tiling.quest_select_in_registers(pages);
        assert!(!quest(0) && !quest(1) && !quest(4097));
        assert!(quest(4098) && quest(6000) && quest(8193));
        assert!(!quest(8194) && !quest(20_000));
        // 512 x 64: token rows of 16385 to 32768 scored tokens.
        let tokens = |len| tiling.ds_select_in_registers(len);
        assert!(!tokens(16_385) && tokens(16_386) && tokens(32_769) && !tokens(32_770));
    }
}
