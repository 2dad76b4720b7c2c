//! `twilight bench sparse`: one Select-then-Prune shape measured side by side with Quest alone
//! and dense decode on the same caches, per stage and per step (plain launches and CUDA-graph
//! replay), against DESIGN.md's byte floors.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaGraph, CudaStream};
use twilight::bench::{time_with_events, BenchKernels, Timing};
use twilight::generator::{generate, GeneratorParams, Preset};
use twilight::twilight_jit::{open_device, Stage};
use twilight::{
    CacheShape, DecodeOutput, DenseDecoder, Dtype, KvElement, PageTable, PagedKvCache, Pruning,
    Selector, SparseDecoder, SparseOutput, SparseParams, SparseWorkspace, VariantSpec, Workspace,
};

use super::bench::ShapeArgs;
use super::CliResult;

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
    #[arg(long, default_value = "default")]
    preset: Preset,
    /// Caches rotated between steps so the L2 does not hold them.
    #[arg(long, default_value_t = 2)]
    rotation: usize,
}

pub fn run(args: SparseArgs) -> CliResult {
    let dense = args.shape.dense_spec()?;
    let ctx = open_device(0)?;
    // Graph capture needs a stream of its own, and cudarc's cross-stream event tracking would
    // record events inside the capture.
    // SAFETY: this command uses the one stream created here for all its work.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream()?;
    match dense.dtype {
        Dtype::F16 => typed::<half::f16>(&stream, dense, &args),
        Dtype::Bf16 => typed::<half::bf16>(&stream, dense, &args),
    }
}

struct Instance<T: KvElement> {
    cache: PagedKvCache<T>,
    table: PageTable,
    q: cudarc::driver::CudaSlice<T>,
}

fn with(spec: VariantSpec, selector: Selector, pruning: Pruning) -> VariantSpec {
    VariantSpec {
        selector,
        pruning,
        ..spec
    }
}

fn typed<T: KvElement>(
    stream: &Arc<CudaStream>,
    dense_spec: VariantSpec,
    args: &SparseArgs,
) -> CliResult {
    let tools = BenchKernels::new(stream)?;
    let bandwidth = tools.read_bandwidth((args.shape.probe_gib * (1u64 << 30) as f64) as usize)?;
    let twilight_spec = with(dense_spec, Selector::Quest, Pruning::TopP);
    let params = SparseParams {
        budget: args.budget,
        p: args.p,
        sm_scale: None,
    };
    let sparse = SparseDecoder::new(stream.clone(), twilight_spec, params)?;
    let quest = SparseDecoder::new(
        stream.clone(),
        with(dense_spec, Selector::Quest, Pruning::None),
        params,
    )?;
    let dense = DenseDecoder::new(stream.clone(), dense_spec)?;
    let generator = GeneratorParams::preset(args.preset, 2026);
    let lens = vec![args.shape.len; args.shape.batch];
    let group = args.shape.qo_heads / args.shape.kv_heads;

    let mut instances = Vec::new();
    for i in 0..args.rotation.max(1) {
        let start = Instant::now();
        let mut g = generator.clone();
        g.seed = generator.seed + i as u64;
        let step = generate::<T>(
            &g,
            &lens,
            args.shape.kv_heads,
            group,
            args.shape.page_size as usize,
            args.shape.head_dim as usize,
            dense_spec.kv_layout,
        )?;
        let shape = CacheShape {
            num_pages: step.shape.num_pages,
            ..step.shape
        };
        let mut cache = PagedKvCache::<T>::for_variant(stream, shape, &twilight_spec)?;
        let mut ids = Vec::new();
        for b in 0..args.shape.batch {
            let id = cache.add_request();
            let (k, v) = step.request_rows::<T>(b);
            let (k, v) = (stream.clone_htod(&k)?, stream.clone_htod(&v)?);
            sparse.append(&mut cache, &[(id, args.shape.len)], &k, &v)?;
            ids.push(id);
        }
        let table = cache.page_table(stream, &ids)?;
        let q = stream.clone_htod(&twilight::synthetic::SyntheticStep::to_elements::<T>(
            &step.q,
        ))?;
        stream.synchronize()?;
        eprintln!(
            "cache {}/{} generated and appended in {:.1} s",
            i + 1,
            args.rotation,
            start.elapsed().as_secs_f64()
        );
        instances.push(Instance { cache, table, q });
    }
    let pick = |i: usize| &instances[i % instances.len()];

    // Outputs and workspaces, sized by one step of each decoder.
    let mut s_out: Vec<SparseOutput<T>> = instances
        .iter()
        .map(|x| sparse.alloc_output(&x.table, args.shape.kv_heads))
        .collect::<Result<_, _>>()?;
    let mut s_ws: Vec<SparseWorkspace> = instances
        .iter()
        .map(|_| SparseWorkspace::default())
        .collect();
    let mut q_out: Vec<SparseOutput<T>> = instances
        .iter()
        .map(|x| quest.alloc_output(&x.table, args.shape.kv_heads))
        .collect::<Result<_, _>>()?;
    let mut q_ws: Vec<SparseWorkspace> = instances
        .iter()
        .map(|_| SparseWorkspace::default())
        .collect();
    let heads = args.shape.batch * args.shape.qo_heads;
    let mut d_out = DecodeOutput {
        o: stream.alloc_zeros::<T>(heads * args.shape.head_dim as usize)?,
        lse: stream.alloc_zeros::<f32>(heads)?,
    };
    let mut d_ws = Workspace::default();

    let n = instances.len();
    let twilight_t = time_with_events(stream, args.shape.warmup, args.shape.iters, |i| {
        let x = pick(i);
        sparse.run_into(
            &x.q,
            &x.cache,
            &x.table,
            &mut s_out[i % n],
            &mut s_ws[i % n],
        )
    })?;
    let quest_t = time_with_events(stream, args.shape.warmup, args.shape.iters, |i| {
        let x = pick(i);
        quest.run_into(
            &x.q,
            &x.cache,
            &x.table,
            &mut q_out[i % n],
            &mut q_ws[i % n],
        )
    })?;
    let dense_t = time_with_events(stream, args.shape.warmup, args.shape.iters, |i| {
        let x = pick(i);
        dense.run_into(&x.q, &x.cache, &x.table, None, &mut d_out, &mut d_ws)
    })?;

    // The same steps replayed as CUDA graphs (one per cache).
    let capture = |run: &mut dyn FnMut() -> twilight::Result<()>| -> Result<CudaGraph, Box<dyn std::error::Error>> {
        stream.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let result = run();
        let graph = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))?;
        result?;
        graph.ok_or_else(|| "empty capture".into())
    };
    let mut graphs = Vec::new();
    for i in 0..n {
        let x = pick(i);
        let (out, ws) = (&mut s_out[i], &mut s_ws[i]);
        graphs.push(capture(&mut || {
            sparse.run_into(&x.q, &x.cache, &x.table, out, ws)
        })?);
    }
    let graph_t = time_with_events(stream, args.shape.warmup, args.shape.iters, |i| {
        graphs[i % n].launch().map_err(|e| twilight::Error::Driver {
            what: "graph launch".into(),
            message: e.to_string(),
        })
    })?;

    // Per stage: events between the launches of one step.
    let stages = stage_times(
        stream,
        &sparse,
        &instances,
        &mut s_out,
        &mut s_ws,
        args.shape.warmup,
        args.shape.iters,
    )?;

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
    let (min, max) = (
        *counts.iter().min().unwrap_or(&0),
        *counts.iter().max().unwrap_or(&0),
    );
    let mut sorted = counts.clone();
    sorted.sort_unstable();
    let pct = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];

    // DESIGN.md's byte model per (request, KV head), d = head_dim, 2-byte dtype.
    let d = args.shape.head_dim as f64;
    let pairs = (args.shape.batch * args.shape.kv_heads) as f64;
    let pages = args.shape.len.div_ceil(args.shape.page_size as usize) as f64;
    let cands = (args.budget.div_ceil(args.shape.page_size as usize)
        * args.shape.page_size as usize)
        .min(args.shape.len) as f64;
    let floor_us = |bytes: f64| bytes * pairs / bandwidth * 1e6;
    let select_floor = floor_us(pages * 4.0 * d);
    let estimate_floor = floor_us(cands * (d / 2.0 + 4.0));
    let attend_floor = floor_us(mean * 4.0 * d);
    let step_floor = select_floor + estimate_floor + attend_floor;
    let quest_floor = select_floor + floor_us(cands * 4.0 * d);
    let dense_floor = floor_us(args.shape.len as f64 * 4.0 * d);

    println!("Select-then-Prune step {twilight_spec}: batch {}, {} query / {} KV heads, head_dim {}, {} tokens, B0 = {}, p = {}", args.shape.batch, args.shape.qo_heads, args.shape.kv_heads, args.shape.head_dim, args.shape.len, args.budget, args.p);
    println!("  generator: {generator}");
    println!("  read bandwidth {:.0} GB/s (probe of {} GiB); medians of {} runs after {} warm-up, rotating {n} caches", bandwidth * 1e-9, args.shape.probe_gib, args.shape.iters, args.shape.warmup);
    println!("  kept budget per (request, KV head): mean {mean:.1} tokens ({:.2}% of the context), std {std:.1}, min {min}, p10 {}, median {}, p90 {}, max {max}", 100.0 * mean / args.shape.len as f64, pct(0.1), pct(0.5), pct(0.9));
    println!();
    println!("| what | median us | floor us | ratio to floor |");
    println!("|---|---|---|---|");
    let row = |name: &str, t: &Timing, floor: f64| {
        println!(
            "| {name} | {:.1} | {floor:.1} | {:.2} |",
            t.median_us(),
            t.median_us() / floor
        )
    };
    for (stage, t) in &stages {
        let floor = match stage {
            Stage::QuestScore => select_floor,
            Stage::Estimate => estimate_floor,
            Stage::Attend => attend_floor,
            _ => f64::NAN,
        };
        row(&format!("stage {stage:?}"), t, floor);
    }
    row("twilight step (quest + top_p)", &twilight_t, step_floor);
    row("twilight step, graph replay", &graph_t, step_floor);
    row("quest + none, same B0", &quest_t, quest_floor);
    row("dense decode (ours)", &dense_t, dense_floor);
    println!();
    println!(
        "  speedup of the twilight step: {:.2}x over Quest alone, {:.2}x over our dense decode (graph replay: {:.2}x, {:.2}x)",
        quest_t.median_us() / twilight_t.median_us(),
        dense_t.median_us() / twilight_t.median_us(),
        quest_t.median_us() / graph_t.median_us(),
        dense_t.median_us() / graph_t.median_us()
    );
    if let Some(path) = &args.shape.json {
        let stage_json: serde_json::Map<String, serde_json::Value> = stages
            .iter()
            .map(|(s, t)| (format!("{s:?}"), t.median_us().into()))
            .collect();
        let json = serde_json::json!({
            "variant": twilight_spec.name(), "batch": args.shape.batch, "qo_heads": args.shape.qo_heads, "kv_heads": args.shape.kv_heads,
            "head_dim": args.shape.head_dim, "len": args.shape.len, "page_size": args.shape.page_size, "budget": args.budget, "p": args.p,
            "generator": generator.to_string(), "read_bandwidth_gbps": bandwidth * 1e-9,
            "kept": {"mean": mean, "std": std, "min": min, "max": max},
            "stages_us": stage_json,
            "twilight_us": twilight_t.median_us(), "twilight_graph_us": graph_t.median_us(), "twilight_floor_us": step_floor,
            "quest_none_us": quest_t.median_us(), "quest_none_floor_us": quest_floor,
            "dense_us": dense_t.median_us(), "dense_floor_us": dense_floor,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}

/// Median time of each stage: events recorded before every launch of a step and after its last.
fn stage_times<T: KvElement>(
    stream: &Arc<CudaStream>,
    decoder: &SparseDecoder,
    instances: &[Instance<T>],
    outs: &mut [SparseOutput<T>],
    workspaces: &mut [SparseWorkspace],
    warmup: usize,
    iters: usize,
) -> Result<Vec<(Stage, Timing)>, Box<dyn std::error::Error>> {
    let ctx = stream.context();
    let mut per_run: Vec<Vec<(Option<Stage>, cudarc::driver::CudaEvent)>> = Vec::new();
    for i in 0..warmup + iters {
        let n = instances.len();
        let x = &instances[i % n];
        let mut marks = Vec::new();
        decoder.run_instrumented(
            &x.q,
            &x.cache,
            &x.table,
            &mut outs[i % n],
            &mut workspaces[i % n],
            &mut |stage| {
                let event = ctx
                    .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(|e| twilight::Error::Driver {
                        what: "creating an event".into(),
                        message: e.to_string(),
                    })?;
                event.record(stream).map_err(|e| twilight::Error::Driver {
                    what: "recording an event".into(),
                    message: e.to_string(),
                })?;
                marks.push((stage, event));
                Ok(())
            },
        )?;
        if i >= warmup {
            per_run.push(marks);
        }
    }
    stream.synchronize()?;
    let mut result: Vec<(Stage, Timing)> = Vec::new();
    for run in &per_run {
        for pair in run.windows(2) {
            let (Some(stage), _) = (pair[0].0, ()) else {
                continue;
            };
            let us = pair[0].1.elapsed_ms(&pair[1].1)? as f64 * 1e3;
            match result.iter_mut().find(|(s, _)| *s == stage) {
                Some((_, t)) => t.samples_us.push(us),
                None => result.push((
                    stage,
                    Timing {
                        samples_us: vec![us],
                    },
                )),
            }
        }
    }
    Ok(result)
}
