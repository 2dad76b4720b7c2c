//! `twilight bench sparse`: one Select-then-Prune shape measured side by side with its base
//! selector alone (`quest` or `double_sparse(r)` with `none`) and dense decode on the same
//! caches, per stage and per step (plain launches and CUDA-graph replay), against DESIGN.md's
//! byte floors. The twilight step is also timed as an engine runs it, over the same memory
//! borrowed through raw device pointers (an engine-owned pool, see [`engine_step`]).
//! [`measure`] is also what `bench grid` runs per shape; the caches come from
//! [`super::caches`].

use std::sync::Arc;

use cudarc::driver::{CudaGraph, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use twilight::twilight_jit::{open_device, Stage};
use twilight::{
    AttentionKernel, DecodeOutput, Decoder, DenseDecoder, DeviceMut, DeviceRef, Dtype, KvElement,
    KvPool, LaunchOverlap, PageTableView, PruneBlocks, Pruning, SelectionKernel, Selector,
    SparseDecoder, SparseOutput, SparseParams, SparseWorkspace, StepOutputs, StepParams,
    VariantSpec, Workspace,
};
use twilight_synth::generator::{GeneratorParams, Preset};

use super::bytes::{selection_read_bytes, selection_step_bytes};
use super::caches::{build_instances, rotation_for, Instance};
use super::kernels::BenchKernels;
use super::report::{self, SparseReport};
use super::shape::{BenchShape, ShapeArgs};
use super::timing::{driver_error, time_stages, time_with_events, Timing};
use crate::{parse, CliResult};

#[derive(clap::Args, Debug)]
pub struct SparseArgs {
    #[command(flatten)]
    shape: ShapeArgs,
    /// B0, the selector's token budget.
    #[arg(long, default_value_t = 8192)]
    budget: usize,
    #[arg(long, default_value_t = 0.85)]
    p: f32,
    /// Attention preset of the synthetic generator: default, focused, diffuse, uniform.
    #[arg(long, default_value = "default", value_parser = parse::preset)]
    preset: Preset,
    /// Caches rotated between steps so the L2 does not hold them (1 where the selector's
    /// metadata alone, read first in every step, exceeds four times the L2).
    #[arg(long, default_value_t = 2)]
    rotation: usize,
    /// Base selector: quest or double_sparse(r) (channels calibrated on the generator's own
    /// activations).
    #[arg(long, default_value = "quest", value_parser = parse::selector)]
    selector: Selector,
    /// Also time the step with each kept list's smallest attention chunk this many tiles
    /// (comma-separated; see `Decoder::set_sparse_chunk_tiles` for the default).
    #[arg(long, value_delimiter = ',')]
    chunk_tiles: Vec<usize>,
    /// Also time the step with each of these selection kernels (comma-separated: passes,
    /// registers; see `Decoder::set_selection_kernel`).
    #[arg(long, value_delimiter = ',', value_parser = parse::selection_kernel)]
    selection_kernels: Vec<SelectionKernel>,
    /// Also time the step with the selection's register kernel limited to clusters of at most
    /// this many CTAs per row (comma-separated: 1, 2, 4, 8; see
    /// `Decoder::set_selection_cluster_limit` for the default).
    #[arg(long, value_delimiter = ',')]
    select_clusters: Vec<u32>,
    /// Also time the step with top-p's threshold and compaction, launched apart, in these
    /// blocks (comma-separated: large, small; see `Decoder::set_prune_blocks`).
    #[arg(long, value_delimiter = ',', value_parser = parse::prune_blocks)]
    prune_blocks: Vec<PruneBlocks>,
}

/// How each shape is measured.
#[derive(Clone, Debug)]
pub struct Method {
    pub preset: Preset,
    pub rotation: usize,
    pub warmup: usize,
    pub iters: usize,
    /// Smallest attention chunks (in tiles) to time the step with besides the default's.
    pub chunk_tiles: Vec<usize>,
    /// Selection kernels to time the step with besides the default's choice.
    pub selection_kernels: Vec<SelectionKernel>,
    /// Largest selection clusters to time the step with besides the default's.
    pub select_clusters: Vec<u32>,
    /// Blocks of the threshold and compaction to time the step with besides the default's.
    pub prune_blocks: Vec<PruneBlocks>,
}

pub fn run(args: SparseArgs) -> CliResult {
    let s = &args.shape;
    let shape = s.shape("cli", args.budget, args.p);
    shape.check_size(super::shape::host_limit())?;
    let method = Method {
        preset: args.preset,
        rotation: args.rotation,
        warmup: s.warmup,
        iters: s.iters,
        chunk_tiles: args.chunk_tiles.clone(),
        selection_kernels: args.selection_kernels.clone(),
        select_clusters: args.select_clusters.clone(),
        prune_blocks: args.prune_blocks.clone(),
    };
    let stream = graph_ready_stream()?;
    let tools = BenchKernels::new(&stream)?;
    let bandwidth = tools.read_bandwidth((s.probe_gib * (1u64 << 30) as f64) as usize)?;
    let report = measure(
        &stream,
        &tools,
        bandwidth,
        &shape,
        &method,
        &[args.selector],
    )?
    .pop()
    .ok_or("one selector gives one report")?;
    report::print(&report);
    if let Some(path) = &s.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

/// A stream of its own on GPU 0 with cudarc's cross-stream event tracking off: graph capture
/// needs both (tracking would record events inside the capture).
pub fn graph_ready_stream() -> Result<Arc<CudaStream>, Box<dyn std::error::Error>> {
    let ctx = open_device(0)?;
    // SAFETY: the benchmarks do all their work on the one stream returned here.
    unsafe { ctx.disable_event_tracking() };
    Ok(ctx.new_stream()?)
}

/// Measures one shape with each of `selectors` as the base (see the module documentation):
/// one report per selector. The caches are drawn once and appended into every selector's
/// caches, and dense decode is timed once, so several selectors cost little more than one.
///
/// # Errors
/// A bad shape, JIT, driver or generator errors.
pub fn measure(
    stream: &Arc<CudaStream>,
    tools: &BenchKernels,
    bandwidth: f64,
    shape: &BenchShape,
    method: &Method,
    selectors: &[Selector],
) -> Result<Vec<SparseReport>, Box<dyn std::error::Error>> {
    let dense = shape.dense_spec()?;
    if selectors.is_empty() || selectors.contains(&Selector::Full) {
        return Err("the base selectors must be quest or double_sparse(r), at least one".into());
    }
    let specs: Vec<VariantSpec> = selectors
        .iter()
        .map(|&selector| with(dense, selector, Pruning::TopP))
        .collect();
    for spec in &specs {
        spec.validate()?;
    }
    let l2 = l2_bytes(stream);
    match dense.dtype {
        Dtype::F16 => {
            measure_typed::<half::f16>(stream, tools, bandwidth, l2, &specs, shape, method)
        }
        Dtype::Bf16 => {
            measure_typed::<half::bf16>(stream, tools, bandwidth, l2, &specs, shape, method)
        }
    }
}

/// The device's L2 size in bytes (0 when the driver does not say).
pub fn l2_bytes(stream: &Arc<CudaStream>) -> f64 {
    stream
        .context()
        .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        .unwrap_or(0) as f64
}

fn with(spec: VariantSpec, selector: Selector, pruning: Pruning) -> VariantSpec {
    VariantSpec {
        selector,
        pruning,
        ..spec
    }
}

fn measure_typed<T: KvElement>(
    stream: &Arc<CudaStream>,
    tools: &BenchKernels,
    bandwidth: f64,
    l2: f64,
    specs: &[VariantSpec],
    shape: &BenchShape,
    method: &Method,
) -> Result<Vec<SparseReport>, Box<dyn std::error::Error>> {
    let params = SparseParams {
        budget: shape.budget,
        p: shape.p,
        sm_scale: None,
    };
    let decoders = specs
        .iter()
        .map(|&spec| SparseDecoder::new(stream.clone(), spec, params))
        .collect::<twilight::Result<Vec<_>>>()?;
    let generator = GeneratorParams::preset(method.preset, 2026);
    let rotations: Vec<usize> = specs
        .iter()
        .map(|spec| {
            let n = rotation_for(l2, shape, spec.selector, method.rotation);
            if n < method.rotation {
                eprintln!(
                    "  {}: {} reads {:.0} MiB per step, over 4x the {:.0} MiB L2: one cache, no rotation",
                    shape.name,
                    spec.selector.declared(),
                    selection_step_bytes(shape, spec.selector) / (1u64 << 20) as f64,
                    l2 / (1u64 << 20) as f64
                );
            }
            n
        })
        .collect();
    let instances = build_instances::<T>(stream, &decoders, &rotations, &generator, shape)?;

    // Dense decode reads K and V only, which every decoder's caches share: timed once, on the
    // caches of the selector that rotates over the most.
    let widest = (0..specs.len())
        .max_by_key(|&s| rotations[s])
        .ok_or("at least one selector")?;
    let dense_spec = with(specs[widest], Selector::Full, Pruning::None);
    let dense_default = AttentionKernel::default();
    let dense_t = time_dense(
        stream,
        dense_spec,
        dense_default,
        &instances[widest],
        shape,
        method,
    )?;
    let dense_other_t = time_dense(
        stream,
        dense_spec,
        other_kernel(dense_default),
        &instances[widest],
        shape,
        method,
    )?;

    let mut reports = Vec::new();
    for ((sparse, instances), spec) in decoders.iter().zip(&instances).zip(specs) {
        let base = SparseDecoder::new(
            stream.clone(),
            with(*spec, spec.selector, Pruning::None),
            params,
        )?;
        let timed = measure_selector(
            stream, bandwidth, sparse, &base, instances, &generator, &dense_t, shape, method,
        )?;
        let mut report = with_practical_floor(tools, l2, timed)?;
        report.dense_other_attention_us = Some(dense_other_t.median_us());
        reports.push(report);
    }
    Ok(reports)
}

/// Dense decode (`full` + `none`) over the caches' K and V.
fn time_dense<T: KvElement>(
    stream: &Arc<CudaStream>,
    spec: VariantSpec,
    kernel: AttentionKernel,
    instances: &[Instance<T>],
    shape: &BenchShape,
    method: &Method,
) -> Result<Timing, Box<dyn std::error::Error>> {
    let mut dense = DenseDecoder::new(stream.clone(), spec)?;
    dense.set_attention_kernel(kernel);
    let heads = shape.batch * shape.qo_heads;
    let mut out = DecodeOutput {
        o: stream.alloc_zeros::<T>(heads * shape.head_dim as usize)?,
        lse: stream.alloc_zeros::<f32>(heads)?,
    };
    let mut ws = Workspace::default();
    let n = instances.len();
    Ok(time_with_events(
        stream,
        method.warmup,
        method.iters,
        |i| {
            let x = &instances[i % n];
            dense.run_into(&x.q, &x.cache, &x.table, None, &mut out, &mut ws)
        },
    )?)
}

/// The twilight step of `sparse` and its base selector alone (`base`, pruning `none`) over
/// `instances`, per stage and per step, as one report.
#[allow(clippy::too_many_arguments)]
fn measure_selector<T: KvElement>(
    stream: &Arc<CudaStream>,
    bandwidth: f64,
    sparse: &SparseDecoder,
    base: &SparseDecoder,
    instances: &[Instance<T>],
    generator: &GeneratorParams,
    dense_t: &Timing,
    shape: &BenchShape,
    method: &Method,
) -> Result<SparseReport, Box<dyn std::error::Error>> {
    let twilight_spec = *sparse.spec();
    let selector = twilight_spec.selector;
    let n = instances.len();
    let (warmup, iters) = (method.warmup, method.iters);

    // Outputs and workspaces per cache, sized by the first step of each decoder.
    let outputs = |d: &SparseDecoder| -> twilight::Result<Vec<SparseOutput<T>>> {
        instances
            .iter()
            .map(|x| d.alloc_output(&x.table, shape.kv_heads))
            .collect()
    };
    let mut s_out = outputs(sparse)?;
    let mut q_out = outputs(base)?;
    let mut s_ws: Vec<SparseWorkspace> = (0..n).map(|_| SparseWorkspace::default()).collect();
    let mut q_ws: Vec<SparseWorkspace> = (0..n).map(|_| SparseWorkspace::default()).collect();

    // The same step with graphs captured without launch overlap (the default overlaps every
    // launch, and the captures of steps of at most one row per SM), and with no overlap at all.
    let mut captured_apart = SparseDecoder::new(stream.clone(), twilight_spec, *sparse.params())?;
    captured_apart.set_launch_overlap(LaunchOverlap::WhenLaunched);
    let mut not_overlapped = SparseDecoder::new(stream.clone(), twilight_spec, *sparse.params())?;
    not_overlapped.set_launch_overlap(LaunchOverlap::Off);
    // And with top-p's threshold and compaction fused into one cluster launch.
    let mut fused = SparseDecoder::new(stream.clone(), twilight_spec, *sparse.params())?;
    fused.set_fused_prune(true);
    // And with the attention on the other kernel.
    let other_attention = other_kernel(sparse.decoder().attention_kernel());
    let mut other = SparseDecoder::new(stream.clone(), twilight_spec, *sparse.params())?;
    other.set_attention_kernel(other_attention);
    // And with the blocks of kernels that run a block per row packed, not spread.
    let mut packed = SparseDecoder::new(stream.clone(), twilight_spec, *sparse.params())?;
    packed.set_spread_rows(false);
    // And with them always apart, for the default's choice to be judged against.
    let mut separate = SparseDecoder::new(stream.clone(), twilight_spec, *sparse.params())?;
    separate.set_fused_prune(false);
    let rows = shape.batch * shape.kv_heads;
    let default_fuses = sparse
        .decoder()
        .stages_for(rows)
        .contains(&Stage::ThresholdCompact);
    let (twilight_t, graph_t) =
        time_launched_and_replayed(stream, sparse, instances, &mut s_out, &mut s_ws, method)?;
    // The same step as an engine runs it (see `engine_step`), right after the owning path so
    // both see the same clocks: the same K/V, sidecar, table and outputs, borrowed through raw
    // device pointers, and workspaces sized from the plan as an engine sizes them.
    let raw: Vec<RawBuffers> = instances
        .iter()
        .zip(s_out.iter_mut())
        .map(|(x, out)| RawBuffers::new(stream, x, out))
        .collect();
    let mut e_ws = instances
        .iter()
        .map(|x| engine_workspace(sparse, x))
        .collect::<twilight::Result<Vec<_>>>()?;
    let engine_t = time_with_events(stream, warmup, iters, |i| {
        engine_step(sparse, &instances[i % n], &raw[i % n], &mut e_ws[i % n])
    })?;
    let base_t = time_with_events(stream, warmup, iters, |i| {
        let x = &instances[i % n];
        base.run_into(
            &x.q,
            &x.cache,
            &x.table,
            &mut q_out[i % n],
            &mut q_ws[i % n],
        )
    })?;

    let mut engine_graphs = Vec::new();
    for ((x, r), ws) in instances.iter().zip(&raw).zip(e_ws.iter_mut()) {
        engine_graphs.push(capture(stream, &mut || engine_step(sparse, x, r, ws))?);
    }
    let engine_graph_t = time_with_events(stream, warmup, iters, |i| {
        engine_graphs[i % n]
            .launch()
            .map_err(|e| driver_error("launching a graph", e))
    })?;
    let (apart_t, apart_graph_t) = time_launched_and_replayed(
        stream,
        &captured_apart,
        instances,
        &mut s_out,
        &mut s_ws,
        method,
    )?;
    let (no_overlap_t, _) = time_launched_and_replayed(
        stream,
        &not_overlapped,
        instances,
        &mut s_out,
        &mut s_ws,
        method,
    )?;
    let (packed_t, packed_graph_t) =
        time_launched_and_replayed(stream, &packed, instances, &mut s_out, &mut s_ws, method)?;
    let (separate_t, _) =
        time_launched_and_replayed(stream, &separate, instances, &mut s_out, &mut s_ws, method)?;
    let (fused_t, fused_graph_t) =
        time_launched_and_replayed(stream, &fused, instances, &mut s_out, &mut s_ws, method)?;
    let (other_t, other_graph_t) =
        time_launched_and_replayed(stream, &other, instances, &mut s_out, &mut s_ws, method)?;
    let other_stages = time_stages_of(stream, &other, instances, &mut s_out, &mut s_ws, method)?;
    let fused_stages = time_stages_of(stream, &fused, instances, &mut s_out, &mut s_ws, method)?;
    let stages = time_stages_of(stream, sparse, instances, &mut s_out, &mut s_ws, method)?;
    // A step with one setting changed: launched, replayed, and the stage `is_stage` names.
    let mut time_variant = |decoder: &SparseDecoder, is_stage: &dyn Fn(Stage) -> bool| {
        let (t, g) =
            time_launched_and_replayed(stream, decoder, instances, &mut s_out, &mut s_ws, method)?;
        let stage = time_stages_of(stream, decoder, instances, &mut s_out, &mut s_ws, method)?
            .iter()
            .find(|(s, _)| is_stage(*s))
            .map_or(f64::NAN, |(_, t)| t.median_us());
        Ok::<_, Box<dyn std::error::Error>>((t.median_us(), g.median_us(), stage))
    };
    let mut chunk_tiles = Vec::new();
    for &tiles in &method.chunk_tiles {
        let mut chunked = SparseDecoder::new(stream.clone(), twilight_spec, *sparse.params())?;
        chunked.set_sparse_chunk_tiles(tiles);
        let attention = chunked.decoder().attention_kernel().stage();
        let (t, g, stage) = time_variant(&chunked, &|s| s == attention)?;
        chunk_tiles.push((tiles, t, g, stage));
    }
    let mut selection_kernels = Vec::new();
    for &kernel in &method.selection_kernels {
        let mut chosen = SparseDecoder::new(stream.clone(), twilight_spec, *sparse.params())?;
        chosen.set_selection_kernel(kernel);
        let (t, g, stage) = time_variant(&chosen, &|s| s.is_selection())?;
        selection_kernels.push((format!("{kernel:?}"), t, g, stage));
    }
    for &limit in &method.select_clusters {
        let mut limited = SparseDecoder::new(stream.clone(), twilight_spec, *sparse.params())?;
        limited.set_selection_cluster_limit(limit)?;
        let (t, g, stage) = time_variant(&limited, &|s| s.is_selection())?;
        selection_kernels.push((format!("clusters of at most {limit}"), t, g, stage));
    }
    let mut prune_blocks = Vec::new();
    for &blocks in &method.prune_blocks {
        let mut chosen = SparseDecoder::new(stream.clone(), twilight_spec, *sparse.params())?;
        chosen.set_prune_blocks(blocks);
        // Threshold and compaction apart, so that the blocks asked for are the ones launched.
        chosen.set_fused_prune(false);
        let (t, g) =
            time_launched_and_replayed(stream, &chosen, instances, &mut s_out, &mut s_ws, method)?;
        let stages = time_stages_of(stream, &chosen, instances, &mut s_out, &mut s_ws, method)?;
        let stage_us = |of: &[Stage]| {
            stages
                .iter()
                .find(|(s, _)| of.contains(s))
                .map_or(f64::NAN, |(_, t)| t.median_us())
        };
        prune_blocks.push((
            format!("{blocks:?}"),
            t.median_us(),
            g.median_us(),
            stage_us(&[Stage::Threshold, Stage::ThresholdInSmallBlocks]),
            stage_us(&[Stage::Compact, Stage::CompactInSmallBlocks]),
        ));
    }

    // Kept budgets of the last step on cache 0.
    stream.synchronize()?;
    let counts: Vec<i32> = stream.clone_dtoh(&s_out[0].kept_counts)?;
    let mean = counts.iter().map(|&c| c as f64).sum::<f64>() / counts.len() as f64;
    let std = (counts
        .iter()
        .map(|&c| (c as f64 - mean).powi(2))
        .sum::<f64>()
        / counts.len() as f64)
        .sqrt();

    // DESIGN.md's byte model per (request, KV head), d = head_dim, 2-byte dtype.
    let d = shape.head_dim as f64;
    let pairs = (shape.batch * shape.kv_heads) as f64;
    let floor_us = |bytes: f64| bytes * pairs / bandwidth * 1e6;
    let (cands, select_bytes) = selection_read_bytes(shape, selector);
    let select_floor = floor_us(select_bytes);
    let estimate_floor = floor_us(cands * (d / 2.0 + 4.0));
    let attend_floor = floor_us(mean * 4.0 * d);
    let stage_floor = |stage: Stage| match stage {
        Stage::QuestScore | Stage::DsScore => Some(select_floor),
        Stage::Estimate => Some(estimate_floor),
        Stage::Attend | Stage::AttendMma => Some(attend_floor),
        _ => None,
    };
    Ok(SparseReport {
        shape: shape.clone(),
        selector: selector.declared(),
        variant: twilight_spec.name(),
        generator: generator.to_string(),
        read_bandwidth_gbps: bandwidth * 1e-9,
        rotation: n,
        iters,
        kept_mean: mean,
        kept_std: std,
        kept_min: counts.iter().copied().min().unwrap_or(0),
        kept_max: counts.iter().copied().max().unwrap_or(0),
        stages_us: stages
            .iter()
            .map(|(s, t)| (format!("{s:?}"), t.median_us(), stage_floor(*s)))
            .collect(),
        twilight_us: twilight_t.median_us(),
        twilight_graph_us: graph_t.median_us(),
        twilight_engine_pool_us: Some(engine_t.median_us()),
        twilight_engine_pool_graph_us: Some(engine_graph_t.median_us()),
        other_attention: Some(format!("{other_attention:?}")),
        twilight_other_attention_us: Some(other_t.median_us()),
        twilight_other_attention_graph_us: Some(other_graph_t.median_us()),
        other_attention_stage_us: other_stages
            .iter()
            .find(|(s, _)| *s == other_attention.stage())
            .map(|(_, t)| t.median_us()),
        dense_other_attention_us: None,
        twilight_captured_apart_us: Some(apart_t.median_us()),
        twilight_captured_apart_graph_us: Some(apart_graph_t.median_us()),
        twilight_no_overlap_us: Some(no_overlap_t.median_us()),
        twilight_packed_us: Some(packed_t.median_us()),
        twilight_packed_graph_us: Some(packed_graph_t.median_us()),
        twilight_fused_us: Some(fused_t.median_us()),
        twilight_separate_us: Some(separate_t.median_us()),
        default_fuses_prune: Some(default_fuses),
        chunk_tiles,
        selection_kernels,
        prune_blocks,
        twilight_fused_graph_us: Some(fused_graph_t.median_us()),
        fused_stage_us: fused_stages
            .iter()
            .find(|(s, _)| *s == Stage::ThresholdCompact)
            .map(|(_, t)| t.median_us()),
        step_bytes_per_row: select_bytes + cands * (d / 2.0 + 4.0) + mean * 4.0 * d,
        practical_floor_us: None,
        practical_floor_ctas: None,
        twilight_floor_us: select_floor + estimate_floor + attend_floor,
        base_none_us: base_t.median_us(),
        base_none_floor_us: select_floor + floor_us(cands * 4.0 * d),
        dense_us: dense_t.median_us(),
        dense_floor_us: floor_us(shape.len as f64 * 4.0 * d),
    })
}

/// The attention kernel that is not `kernel`.
fn other_kernel(kernel: AttentionKernel) -> AttentionKernel {
    match kernel {
        AttentionKernel::CudaCores => AttentionKernel::TensorCores,
        AttentionKernel::TensorCores => AttentionKernel::CudaCores,
    }
}

/// One cache's buffers as an engine on another cudarc line holds them: device addresses with
/// element counts, read once before any step. K and V are the cache's own, the table the
/// cache's device table, q the instance's, the outputs the owning path's (`SparseOutput`), so
/// the two paths run over the very same memory and differ only in how it is borrowed.
struct RawBuffers {
    q: (u64, usize),
    k: (u64, usize),
    v: (u64, usize),
    kv_indptr: (u64, usize),
    kv_indices: (u64, usize),
    kv_last_page_len: (u64, usize),
    o: (u64, usize),
    lse: (u64, usize),
    kept_counts: (u64, usize),
    kept: (u64, usize),
}

impl RawBuffers {
    fn new<T: KvElement>(
        stream: &Arc<CudaStream>,
        x: &Instance<T>,
        out: &mut SparseOutput<T>,
    ) -> RawBuffers {
        let (kv_indptr, kv_indices, kv_last_page_len) = x.table.buffers();
        RawBuffers {
            q: address(stream, &x.q),
            k: address(stream, x.cache.k()),
            v: address(stream, x.cache.v()),
            kv_indptr: address(stream, kv_indptr),
            kv_indices: address(stream, kv_indices),
            kv_last_page_len: address(stream, kv_last_page_len),
            o: address_mut(stream, &mut out.o),
            lse: address_mut(stream, &mut out.lse),
            kept_counts: address_mut(stream, &mut out.kept_counts),
            kept: address_mut(stream, &mut out.kept),
        }
    }
}

/// The address and length of a buffer a step reads. cudarc's guard, dropped here, records a
/// read event on `stream` only while cudarc tracks events across streams; the benchmarks turn
/// that off ([`graph_ready_stream`]) and queue all their work on that one stream, so stream
/// order alone orders every later step after the writes that filled the buffer, and dropping
/// the guard now orders nothing away.
fn address<T>(stream: &Arc<CudaStream>, s: &CudaSlice<T>) -> (u64, usize) {
    let (ptr, _guard) = s.device_ptr(stream);
    (ptr, s.len())
}

/// The address and length of a buffer a step writes (as [`address`]).
fn address_mut<T>(stream: &Arc<CudaStream>, s: &mut CudaSlice<T>) -> (u64, usize) {
    let len = s.len();
    let (ptr, _guard) = s.device_ptr_mut(stream);
    (ptr, len)
}

/// The workspace an engine allocates for steps of `x`'s shape: sized once from the plan, so
/// no step allocates (and each can be captured).
fn engine_workspace<T: KvElement>(
    sparse: &SparseDecoder,
    x: &Instance<T>,
) -> twilight::Result<Workspace> {
    let (decoder, table) = (sparse.decoder(), &x.table);
    let heads = x.cache.shape().num_kv_heads;
    let plan = decoder.plan(
        table.batch(),
        heads,
        table.max_len(),
        sparse.params().budget,
    );
    decoder.alloc_workspace(&plan, table.batch(), heads)
}

/// `sparse`'s step over `x` as an engine runs it over a pool it owns, through the engine entry
/// point ([`Decoder::run_into`]): every call builds the layer's pool view from K and V's raw
/// addresses ([`KvPool::new`] over `DeviceRef::from_raw`) with the cache's sidecar beside it,
/// the table view from the device table's raw addresses ([`PageTableView::from_device`]) and
/// the outputs from raw addresses (`DeviceMut::from_raw`), so the time includes every check
/// an engine's step pays for these views.
fn engine_step<T: KvElement>(
    sparse: &SparseDecoder,
    x: &Instance<T>,
    raw: &RawBuffers,
    workspace: &mut Workspace,
) -> twilight::Result<()> {
    let shape = x.cache.shape();
    let params: &StepParams = sparse.params();
    // SAFETY: every address is a live allocation of this benchmark (the cache's K, V and
    // device table, q, and the owning path's outputs), given with the length it was allocated
    // with, all of which outlive every step and graph made over them. All work runs on the
    // one stream of the decoder, in order, so nothing writes K, V, q or the table while a step
    // reads them, and nothing touches the outputs while a step writes them. The table was
    // validated on the host when it was uploaded (`PageTable::upload`) and `max_len` is its
    // own.
    let (q, pool, table, outputs) = unsafe {
        let ref_of = |(ptr, len): (u64, usize)| DeviceRef::<i32>::from_raw(ptr, len);
        (
            DeviceRef::<T>::from_raw(raw.q.0, raw.q.1),
            KvPool::new(
                shape,
                DeviceRef::<T>::from_raw(raw.k.0, raw.k.1),
                DeviceRef::<T>::from_raw(raw.v.0, raw.v.1),
            )?
            .with_sidecar(x.cache.derived())?,
            PageTableView::from_device(
                ref_of(raw.kv_indptr),
                ref_of(raw.kv_indices),
                ref_of(raw.kv_last_page_len),
                x.table.batch(),
                x.table.max_len(),
                &shape,
            )?,
            StepOutputs::new(
                DeviceMut::<T>::from_raw(raw.o.0, raw.o.1),
                DeviceMut::<f32>::from_raw(raw.lse.0, raw.lse.1),
            )
            .with_kept(
                DeviceMut::<i32>::from_raw(raw.kept_counts.0, raw.kept_counts.1),
                DeviceMut::<i32>::from_raw(raw.kept.0, raw.kept.1),
            ),
        )
    };
    let decoder: &Decoder = sparse.decoder();
    decoder.run_into(
        q,
        &pool,
        &table,
        params,
        outputs,
        workspace,
        &mut |_| Ok(()),
    )
}

/// The report with its practical floor: a bare read of the step's bytes per (request, KV
/// head) with the best CTAs per row, measured now.
fn with_practical_floor(
    tools: &BenchKernels,
    l2: f64,
    mut report: SparseReport,
) -> Result<SparseReport, Box<dyn std::error::Error>> {
    let rows = report.shape.batch * report.shape.kv_heads;
    let (us, ctas) = tools.practical_floor(
        rows,
        report.step_bytes_per_row as usize,
        l2,
        report.iters.min(20),
    )?;
    report.practical_floor_us = Some(us);
    report.practical_floor_ctas = Some(ctas);
    Ok(report)
}

/// Each stage of `decoder`'s step, timed with events between the stages, over `instances`.
fn time_stages_of<T: KvElement>(
    stream: &Arc<CudaStream>,
    decoder: &SparseDecoder,
    instances: &[Instance<T>],
    outs: &mut [SparseOutput<T>],
    workspaces: &mut [SparseWorkspace],
    method: &Method,
) -> Result<Vec<(Stage, Timing)>, Box<dyn std::error::Error>> {
    let n = instances.len();
    Ok(time_stages(
        stream,
        method.warmup,
        method.iters,
        |i, hook| {
            let x = &instances[i % n];
            decoder.run_instrumented(
                &x.q,
                &x.cache,
                &x.table,
                &mut outs[i % n],
                &mut workspaces[i % n],
                hook,
            )
        },
    )?)
}

/// A decoder's step over every cache, launched, then replayed as CUDA graphs (one captured per
/// cache).
fn time_launched_and_replayed<T: KvElement>(
    stream: &Arc<CudaStream>,
    decoder: &SparseDecoder,
    instances: &[Instance<T>],
    outs: &mut [SparseOutput<T>],
    workspaces: &mut [SparseWorkspace],
    method: &Method,
) -> Result<(Timing, Timing), Box<dyn std::error::Error>> {
    let n = instances.len();
    let launched = time_with_events(stream, method.warmup, method.iters, |i| {
        let x = &instances[i % n];
        decoder.run_into(
            &x.q,
            &x.cache,
            &x.table,
            &mut outs[i % n],
            &mut workspaces[i % n],
        )
    })?;
    let mut graphs = Vec::new();
    for ((x, out), ws) in instances
        .iter()
        .zip(outs.iter_mut())
        .zip(workspaces.iter_mut())
    {
        graphs.push(capture(stream, &mut || {
            decoder.run_into(&x.q, &x.cache, &x.table, out, ws)
        })?);
    }
    let replayed = time_with_events(stream, method.warmup, method.iters, |i| {
        graphs[i % n]
            .launch()
            .map_err(|e| driver_error("launching a graph", e))
    })?;
    Ok((launched, replayed))
}

fn capture(
    stream: &Arc<CudaStream>,
    run: &mut dyn FnMut() -> twilight::Result<()>,
) -> Result<CudaGraph, Box<dyn std::error::Error>> {
    stream.begin_capture(
        cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
    )?;
    let result = run();
    let graph = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))?;
    result?;
    graph.ok_or_else(|| "empty capture".into())
}
