//! What `bench sparse` and `bench grid` measure for one shape and selector, and how it prints.

use serde::{Deserialize, Serialize};

use super::shape::BenchShape;

/// Everything measured for one shape; times are medians in microseconds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SparseReport {
    pub shape: BenchShape,
    /// The base selector, as declared (`quest`, `double_sparse(32)`).
    pub selector: String,
    pub variant: String,
    pub generator: String,
    pub read_bandwidth_gbps: f64,
    pub rotation: usize,
    pub iters: usize,
    pub kept_mean: f64,
    pub kept_std: f64,
    pub kept_min: i32,
    pub kept_max: i32,
    /// (stage, median us, floor us); the floor is `None` for stages the byte model does not
    /// cover (selection, threshold and compaction work on data already on chip or in L2).
    pub stages_us: Vec<(String, f64, Option<f64>)>,
    pub twilight_us: f64,
    pub twilight_graph_us: f64,
    /// The same twilight step as an engine runs it over a pool it owns, launched and as a
    /// graph: the same K/V, sidecar, device table, q and outputs borrowed through raw device
    /// pointers (`KvPool`, `PageTableView::from_device`, `StepOutputs` of `DeviceRef`s and
    /// `DeviceMut`s made with `from_raw`, rebuilt every step) and run by `Decoder::run_into`.
    #[serde(default)]
    pub twilight_engine_pool_us: Option<f64>,
    #[serde(default)]
    pub twilight_engine_pool_graph_us: Option<f64>,
    /// The step with the attention on the kernel the sparse decoder does not use by default
    /// (named here), launched and as a graph, and that attention stage alone; dense decode on
    /// the kernel dense decode does not use by default.
    #[serde(default)]
    pub other_attention: Option<String>,
    #[serde(default)]
    pub twilight_other_attention_us: Option<f64>,
    #[serde(default)]
    pub twilight_other_attention_graph_us: Option<f64>,
    #[serde(default)]
    pub other_attention_stage_us: Option<f64>,
    #[serde(default)]
    pub dense_other_attention_us: Option<f64>,
    /// The step with launch overlap (programmatic dependent launch) off while a graph is
    /// captured, launched and as a graph (the default also overlaps the captures of steps of at
    /// most one row per SM).
    #[serde(default)]
    pub twilight_captured_apart_us: Option<f64>,
    #[serde(default)]
    pub twilight_captured_apart_graph_us: Option<f64>,
    /// The step with the blocks of kernels that run a block per row packed on the SMs (not
    /// spread), launched and as a graph.
    #[serde(default)]
    pub twilight_packed_us: Option<f64>,
    #[serde(default)]
    pub twilight_packed_graph_us: Option<f64>,
    /// The step with launch overlap off, launched.
    #[serde(default)]
    pub twilight_no_overlap_us: Option<f64>,
    /// The step with top-p's threshold and compaction fused (one cluster launch), launched and
    /// as a graph, and the fused stage alone.
    #[serde(default)]
    pub twilight_fused_us: Option<f64>,
    #[serde(default)]
    pub twilight_fused_graph_us: Option<f64>,
    #[serde(default)]
    pub fused_stage_us: Option<f64>,
    /// The step with threshold and compaction always apart, and whether the default (fused
    /// when every row's cluster is resident) fused them at this shape.
    #[serde(default)]
    pub twilight_separate_us: Option<f64>,
    #[serde(default)]
    pub default_fuses_prune: Option<bool>,
    /// The step with a kept list's smallest attention chunk set to other numbers of tiles
    /// (`bench sparse --chunk-tiles`): (tiles, step us, graph replay us, attention stage us).
    #[serde(default)]
    pub chunk_tiles: Vec<(usize, f64, f64, f64)>,
    /// The step with each selection kernel asked for: (kernel, launched, graph replay, the
    /// selection stage), microseconds.
    #[serde(default)]
    pub selection_kernels: Vec<(String, f64, f64, f64)>,
    /// The step with threshold and compaction apart in each choice of blocks asked for:
    /// (choice, launched, graph replay, threshold stage, compaction stage), microseconds.
    #[serde(default)]
    pub prune_blocks: Vec<(String, f64, f64, f64, f64)>,
    pub twilight_floor_us: f64,
    /// DESIGN.md's bytes of one step per (request, KV head): the selector's reads, the 4-bit
    /// estimate of the candidates and K/V of the kept tokens (mean).
    #[serde(default)]
    pub step_bytes_per_row: f64,
    /// A kernel that only streams those bytes, with the best CTAs per row, in the same run.
    #[serde(default)]
    pub practical_floor_us: Option<f64>,
    #[serde(default)]
    pub practical_floor_ctas: Option<u32>,
    /// The base selector alone (`none` pruning) at the same B0.
    pub base_none_us: f64,
    pub base_none_floor_us: f64,
    pub dense_us: f64,
    pub dense_floor_us: f64,
}

/// The report of one shape as text: its parameters, the kept budget and a table of every
/// stage and step against its floor.
pub fn print(r: &SparseReport) {
    let s = &r.shape;
    println!(
        "Select-then-Prune step {}: batch {}, {} query / {} KV heads, head_dim {}, {} tokens, B0 = {}, p = {}",
        r.variant, s.batch, s.qo_heads, s.kv_heads, s.head_dim, s.len, s.budget, s.p
    );
    println!("  generator: {}", r.generator);
    println!(
        "  read bandwidth {:.0} GB/s; medians of {} runs, rotating {} caches",
        r.read_bandwidth_gbps, r.iters, r.rotation
    );
    println!(
        "  kept budget per (request, KV head): mean {:.1} tokens ({:.2}% of the context), std {:.1}, min {}, max {}",
        r.kept_mean,
        100.0 * r.kept_mean / s.len as f64,
        r.kept_std,
        r.kept_min,
        r.kept_max
    );
    println!();
    println!("| what | median us | floor us | ratio to floor |");
    println!("|---|---|---|---|");
    let row = |name: &str, t: f64, floor: f64| {
        println!("| {name} | {t:.1} | {floor:.1} | {:.2} |", t / floor)
    };
    for (stage, t, floor) in &r.stages_us {
        match floor {
            Some(floor) => row(&format!("stage {stage}"), *t, *floor),
            None => println!("| stage {stage} | {t:.1} | - | - |"),
        }
    }
    row(
        &format!("twilight step ({} + top_p)", r.selector),
        r.twilight_us,
        r.twilight_floor_us,
    );
    row(
        "twilight step, graph replay",
        r.twilight_graph_us,
        r.twilight_floor_us,
    );
    if let Some(t) = r.twilight_engine_pool_us {
        row(
            "twilight step, engine-owned pool (raw pointers)",
            t,
            r.twilight_floor_us,
        );
    }
    if let Some(g) = r.twilight_engine_pool_graph_us {
        row(
            "twilight step, engine-owned pool (raw pointers), graph replay",
            g,
            r.twilight_floor_us,
        );
    }
    if let (Some(t), Some(fuses)) = (r.twilight_separate_us, r.default_fuses_prune) {
        row(
            "twilight step, threshold + compaction apart",
            t,
            r.twilight_floor_us,
        );
        println!(
            "|   (the default step above ran them {}) | | | |",
            if fuses { "fused" } else { "apart" }
        );
    }
    if let Some(t) = r.fused_stage_us {
        println!("| stage ThresholdCompact (fused) | {t:.1} | - | - |");
    }
    if let (Some(t), Some(g)) = (r.twilight_fused_us, r.twilight_fused_graph_us) {
        row(
            "twilight step, threshold + compaction fused",
            t,
            r.twilight_floor_us,
        );
        row(
            "twilight step, threshold + compaction fused, graph replay",
            g,
            r.twilight_floor_us,
        );
    }
    if let (Some(kernel), Some(t), Some(g)) = (
        &r.other_attention,
        r.twilight_other_attention_us,
        r.twilight_other_attention_graph_us,
    ) {
        row(
            &format!("twilight step, attention on {kernel}"),
            t,
            r.twilight_floor_us,
        );
        row(
            &format!("twilight step, attention on {kernel}, graph replay"),
            g,
            r.twilight_floor_us,
        );
        if let Some(stage) = r.other_attention_stage_us {
            println!("| stage attention on {kernel} | {stage:.1} | - | - |");
        }
    }
    for &(tiles, t, g, stage) in &r.chunk_tiles {
        row(
            &format!("twilight step, attention chunks of {tiles} tiles"),
            t,
            r.twilight_floor_us,
        );
        row(
            &format!("twilight step, attention chunks of {tiles} tiles, graph replay"),
            g,
            r.twilight_floor_us,
        );
        println!("| stage attention, chunks of {tiles} tiles | {stage:.1} | - | - |");
    }
    for (kernel, t, g, stage) in &r.selection_kernels {
        row(
            &format!("twilight step, selection {kernel}"),
            *t,
            r.twilight_floor_us,
        );
        row(
            &format!("twilight step, selection {kernel}, graph replay"),
            *g,
            r.twilight_floor_us,
        );
        println!("| stage selection {kernel} | {stage:.1} | - | - |");
    }
    for (blocks, t, g, threshold, compact) in &r.prune_blocks {
        let what = format!("twilight step, pruning apart in {blocks} blocks");
        row(&what, *t, r.twilight_floor_us);
        row(&format!("{what}, graph replay"), *g, r.twilight_floor_us);
        println!("| stage threshold, {blocks} blocks | {threshold:.1} | - | - |");
        println!("| stage compaction, {blocks} blocks | {compact:.1} | - | - |");
    }
    if let (Some(t), Some(g)) = (
        r.twilight_captured_apart_us,
        r.twilight_captured_apart_graph_us,
    ) {
        row(
            "twilight step, graph captured without overlap",
            t,
            r.twilight_floor_us,
        );
        row(
            "twilight step, graph captured without overlap, graph replay",
            g,
            r.twilight_floor_us,
        );
    }
    if let (Some(t), Some(g)) = (r.twilight_packed_us, r.twilight_packed_graph_us) {
        row(
            "twilight step, rows packed (not spread)",
            t,
            r.twilight_floor_us,
        );
        row(
            "twilight step, rows packed (not spread), graph replay",
            g,
            r.twilight_floor_us,
        );
    }
    if let Some(t) = r.twilight_no_overlap_us {
        row(
            "twilight step, launches never overlapped",
            t,
            r.twilight_floor_us,
        );
    }
    row(
        &format!("{} + none, same B0", r.selector),
        r.base_none_us,
        r.base_none_floor_us,
    );
    row("dense decode (ours)", r.dense_us, r.dense_floor_us);
    if let Some(t) = r.dense_other_attention_us {
        row(
            "dense decode (ours), the other attention kernel",
            t,
            r.dense_floor_us,
        );
    }
    println!();
    if let (Some(floor), Some(ctas)) = (r.practical_floor_us, r.practical_floor_ctas) {
        println!(
            "  practical floor: a bare read of the step's {:.2} MB takes {floor:.1} us ({ctas} CTAs per row), {:.2}x the bandwidth floor; the step is {:.2}x it ({:.2}x as a graph)",
            r.step_bytes_per_row * (s.batch * s.kv_heads) as f64 * 1e-6,
            floor / r.twilight_floor_us,
            r.twilight_us / floor,
            r.twilight_graph_us / floor
        );
    }
    if let Some(line) = engine_pool_line(r) {
        println!("{line}");
    }
    println!(
        "  speedup of the twilight step: {:.2}x over {} alone, {:.2}x over our dense decode (graph replay: {:.2}x, {:.2}x)",
        r.base_none_us / r.twilight_us,
        r.selector,
        r.dense_us / r.twilight_us,
        r.base_none_us / r.twilight_graph_us,
        r.dense_us / r.twilight_graph_us
    );
}

/// The engine-owned pool's step against the owning path's (`PagedKvCache`): time ratios,
/// launched and as a graph; `None` for reports without the engine path.
pub fn engine_pool_line(r: &SparseReport) -> Option<String> {
    let t = r.twilight_engine_pool_us?;
    let mut line = format!(
        "  engine-owned pool (raw pointers) vs PagedKvCache: {:.3}x the step's time ({:+.1}%)",
        t / r.twilight_us,
        100.0 * (t / r.twilight_us - 1.0)
    );
    if let Some(g) = r.twilight_engine_pool_graph_us {
        line.push_str(&format!(
            ", {:.3}x as a graph replay ({:+.1}%)",
            g / r.twilight_graph_us,
            100.0 * (g / r.twilight_graph_us - 1.0)
        ));
    }
    line.push_str("; the target is within 3%");
    Some(line)
}
