//! `twilight bench tp`: the sparse step sharded over GPUs by heads, as tensor-parallel engines
//! shard attention. In one process it times (CUDA events, medians after warm-up) the one-GPU
//! step over every head on device 0, then each device's step over its share of the KV heads,
//! all devices at once, one thread and one stream per device; it checks that the gathered
//! kept counts equal the one-GPU step's, and prints how often the process compiled each
//! variant (once per architecture: the devices share one kernel store and disk cache).

use std::ops::Range;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use twilight::twilight_jit::{device_count, open_device, Jit, KernelStore};
use twilight::{
    CacheShape, Decoder, Dtype, KvElement, PageTable, PagedKvCache, Pruning, Selector, StepOutputs,
    StepParams, VariantSpec, Workspace,
};
use twilight_synth::generator::{plan, GeneratorParams, Preset};
use twilight_synth::synthetic::SyntheticStep;

use super::shape::ShapeArgs;
use super::timing::{time_with_events, Timing};
use crate::{parse, CliResult};

#[derive(clap::Args, Debug)]
pub struct TpArgs {
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
    /// GPUs the KV heads are split over (devices 0..N, an equal share each).
    #[arg(long, default_value_t = 2)]
    devices: usize,
    /// Caches rotated between steps so the L2 does not hold them.
    #[arg(long, default_value_t = 2)]
    rotation: usize,
}

pub fn run(args: TpArgs) -> CliResult {
    match args.shape.dtype {
        Dtype::F16 => measure::<half::f16>(&args),
        Dtype::Bf16 => measure::<half::bf16>(&args),
    }
}

/// One device's part: its stream, decoder, caches of its heads (rotated), q and outputs.
struct Part<T: KvElement> {
    kv: Range<usize>,
    stream: Arc<CudaStream>,
    decoder: Decoder,
    caches: Vec<PagedKvCache<T>>,
    tables: Vec<PageTable>,
    q: CudaSlice<T>,
    o: CudaSlice<T>,
    lse: CudaSlice<f32>,
    counts: CudaSlice<i32>,
    kept: CudaSlice<i32>,
    workspace: Workspace,
}

impl<T: KvElement> Part<T> {
    fn step(&mut self, i: usize, params: &StepParams) -> twilight::Result<()> {
        let at = i % self.caches.len();
        self.decoder.run_into(
            &self.q,
            &self.caches[at].pool(),
            &self.tables[at],
            params,
            StepOutputs::new(&mut self.o, &mut self.lse)
                .with_kept(&mut self.counts, &mut self.kept),
            &mut self.workspace,
            &mut |_| Ok(()),
        )
    }
}

/// Rows `[n, heads, width]` of the heads in `range`.
fn heads_of<T: Copy>(rows: &[T], heads: usize, width: usize, range: &Range<usize>) -> Vec<T> {
    rows.chunks_exact(heads * width)
        .flat_map(|row| &row[range.start * width..range.end * width])
        .copied()
        .collect()
}

/// A stream of its own on `ctx`, with cudarc's per-buffer event tracking off: each device's
/// work goes to this one stream, so nothing needs it, and no event couples the devices.
fn bench_stream(ctx: &Arc<CudaContext>) -> Result<Arc<CudaStream>, Box<dyn std::error::Error>> {
    // SAFETY: every buffer of this device is used on the one stream returned here.
    unsafe { ctx.disable_event_tracking() };
    Ok(ctx.new_stream()?)
}

fn measure<T: KvElement>(args: &TpArgs) -> CliResult {
    let s = &args.shape;
    let devices = args.devices.max(1);
    let found = device_count()?;
    if found < devices {
        return Err(format!("bench tp needs {devices} GPUs; this host has {found}").into());
    }
    if s.kv_heads == 0
        || !s.kv_heads.is_multiple_of(devices)
        || !s.qo_heads.is_multiple_of(s.kv_heads)
    {
        return Err(format!(
            "{} KV heads do not split evenly over {devices} GPUs, or {} query heads are not a \
             multiple of them",
            s.kv_heads, s.qo_heads
        )
        .into());
    }
    let group = s.qo_heads / s.kv_heads;
    let spec = VariantSpec {
        selector: Selector::Quest,
        pruning: Pruning::TopP,
        ..VariantSpec::dense(s.page_size, s.head_dim, s.dtype, group as u32, s.layout)
    };
    spec.validate()?;
    let contexts: Vec<Arc<CudaContext>> =
        (0..devices).map(open_device).collect::<Result<_, _>>()?;
    let streams: Vec<Arc<CudaStream>> = contexts
        .iter()
        .map(bench_stream)
        .collect::<Result<_, _>>()?;
    let per = s.kv_heads / devices;

    // Every device asks for the kernels at once, each through its context's JIT over the
    // process's store: one compile per architecture, one load per context.
    let start = Instant::now();
    let barrier = Barrier::new(devices);
    let decoders: Vec<Decoder> = std::thread::scope(|scope| {
        let handles: Vec<_> = streams
            .iter()
            .map(|stream| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    Decoder::new(stream.clone(), spec)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("loading kernels does not panic"))
            .collect::<twilight::Result<_>>()
    })?;
    let full_decoder = Decoder::new(streams[0].clone(), spec)?;
    let load_ms = start.elapsed().as_secs_f64() * 1e3;

    // The caches: drawn once by the realistic generator, all heads, then appended per part.
    let generator = GeneratorParams::preset(args.preset, 2026);
    let lens = vec![s.len; s.batch];
    let (ps, d) = (s.page_size as usize, s.head_dim as usize);
    let draw_start = Instant::now();
    let planned = plan::<T>(&generator, &lens, s.kv_heads, group, ps, d, s.layout)?;
    let q_all: Vec<T> = SyntheticStep::to_elements(&planned.q);
    let pages = s.batch * s.len.div_ceil(ps);
    let shape = |heads: usize| CacheShape {
        num_pages: pages,
        num_kv_heads: heads,
        page_size: ps,
        head_dim: d,
        layout: s.layout,
    };
    let rotation = args.rotation.max(1);
    let mut parts: Vec<Part<T>> = Vec::new();
    let layout = std::iter::once((0, 0..s.kv_heads, full_decoder)).chain(
        decoders
            .into_iter()
            .enumerate()
            .map(|(i, dec)| (i, i * per..(i + 1) * per, dec)),
    );
    for (device, kv, decoder) in layout {
        let stream = streams[device].clone();
        let caches = (0..rotation)
            .map(|_| PagedKvCache::<T>::for_variant(&stream, shape(kv.len()), &spec))
            .collect::<twilight::Result<Vec<_>>>()?;
        let qo = kv.start * group..kv.end * group;
        let q = stream.clone_htod(&heads_of(&q_all, s.qo_heads, d, &qo))?;
        let rows = s.batch * kv.len();
        let plan = decoder.plan(s.batch, kv.len(), s.len, args.budget);
        let workspace = decoder.alloc_workspace(&plan, s.batch, kv.len())?;
        parts.push(Part {
            o: stream.alloc_zeros::<T>(q.len())?,
            lse: stream.alloc_zeros::<f32>(s.batch * qo.len())?,
            counts: stream.alloc_zeros::<i32>(rows)?,
            kept: stream.alloc_zeros::<i32>(rows * plan.max_cands)?,
            kv,
            stream,
            decoder,
            caches,
            tables: Vec::new(),
            q,
            workspace,
        });
    }
    // Request by request, so the host holds one request's rows at a time; every part gets its
    // heads of the same rows, and every cache hands out the same pages.
    let mut ids = vec![Vec::new(); parts.len()];
    for (b, &len) in lens.iter().enumerate() {
        let (k, v) = planned.request_rows::<T>(b)?;
        for (part, ids) in parts.iter_mut().zip(&mut ids) {
            let k_dev = part
                .stream
                .clone_htod(&heads_of(&k, s.kv_heads, d, &part.kv))?;
            let v_dev = part
                .stream
                .clone_htod(&heads_of(&v, s.kv_heads, d, &part.kv))?;
            let mut id = None;
            for cache in &mut part.caches {
                let request = cache.add_request();
                part.decoder
                    .append(cache, &[(request, len)], &k_dev, &v_dev)?;
                id = Some(request);
            }
            ids.extend(id);
        }
    }
    for (part, ids) in parts.iter_mut().zip(&ids) {
        part.tables = part
            .caches
            .iter()
            .map(|cache| cache.page_table(&part.stream, ids))
            .collect::<twilight::Result<_>>()?;
        part.stream.synchronize()?;
    }
    let draw_s = draw_start.elapsed().as_secs_f64();

    let params = StepParams {
        budget: args.budget,
        p: args.p,
        sm_scale: None,
    };
    let (warmup, iters) = (s.warmup, s.iters.max(1));
    // The one-GPU step over every head, on device 0 alone.
    let (full, halves) = parts.split_first_mut().ok_or("no parts")?;
    let stream = full.stream.clone();
    let one = time_with_events(&stream, warmup, iters, |i| full.step(i, &params))?;
    // Every device's share at once: a thread and a stream each, started together; each
    // device's events and its final synchronize concern its own stream alone.
    let barrier = Barrier::new(halves.len());
    let wall = Instant::now();
    let shares: Vec<Timing> = std::thread::scope(|scope| {
        let handles: Vec<_> = halves
            .iter_mut()
            .map(|part| {
                let (barrier, params) = (&barrier, &params);
                scope.spawn(move || {
                    let stream = part.stream.clone();
                    barrier.wait();
                    time_with_events(&stream, warmup, iters, |i| part.step(i, params))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("timing does not panic"))
            .collect::<twilight::Result<_>>()
    })?;
    let wall_us = wall.elapsed().as_secs_f64() * 1e6 / (warmup + iters) as f64;

    // The gathered kept counts of the last step of each part's cache are the one-GPU step's.
    let last = (warmup + iters - 1) % rotation;
    full.step(last, &params)?;
    let want = full.stream.clone_dtoh(&full.counts)?;
    let mut gathered = vec![-1i32; want.len()];
    for part in halves.iter_mut() {
        part.step(last, &params)?;
        let got = part.stream.clone_dtoh(&part.counts)?;
        let width = part.kv.len();
        for (b, row) in got.chunks_exact(width).enumerate() {
            gathered[b * s.kv_heads + part.kv.start..][..width].copy_from_slice(row);
        }
    }
    let mean_kept = want.iter().map(|&c| c as f64).sum::<f64>() / want.len().max(1) as f64;

    println!(
        "bench tp: {spec}, batch {}, {} query / {} KV heads, head_dim {d}, {} tokens per \
         request, page {ps}, B0 {}, p {}",
        s.batch, s.qo_heads, s.kv_heads, s.len, args.budget, args.p
    );
    println!(
        "generator: preset {} (concentration {:.2}, seed {}); caches drawn and appended in \
         {draw_s:.1} s; {rotation} rotated per part; {warmup} warm-up, median of {iters}",
        args.preset.name(),
        generator.concentration,
        generator.seed
    );
    for (i, ctx) in contexts.iter().enumerate() {
        println!(
            "device {i}: {}, sm_{}{}",
            ctx.name()?,
            ctx.compute_capability()?.0,
            ctx.compute_capability()?.1
        );
    }
    println!(
        "one GPU, all {} KV heads (device 0):  median {:8.1} us  (min {:.1}, max {:.1})",
        s.kv_heads,
        one.median_us(),
        one.min_us(),
        one.max_us()
    );
    let mut slowest: f64 = 0.0;
    for (part, timing) in halves.iter().zip(&shares) {
        slowest = slowest.max(timing.median_us());
        println!(
            "device {}, KV heads {}..{} (concurrent): median {:8.1} us  (min {:.1}, max {:.1})",
            part.stream.context().ordinal(),
            part.kv.start,
            part.kv.end,
            timing.median_us(),
            timing.min_us(),
            timing.max_us()
        );
    }
    println!(
        "split step: {slowest:.1} us (slowest device), {:.2}x the one-GPU step's speed; host \
         wall time per concurrent step {wall_us:.1} us",
        one.median_us() / slowest
    );
    let differing = gathered.iter().zip(&want).filter(|(a, b)| a != b).count();
    println!(
        "kept tokens per (request, KV head): mean {mean_kept:.0}; gathered from the devices: \
         {differing} of {} counts differ from the one-GPU step's",
        want.len()
    );
    let stats = KernelStore::global().stats();
    println!(
        "kernels: {} compile(s), {} disk-cache read(s), {} shared between contexts, for {} \
         device(s) of {} architecture(s); loaded in {load_ms:.0} ms",
        stats.compiles,
        stats.disk_reads,
        stats.shared,
        devices,
        contexts
            .iter()
            .map(|c| c.compute_capability().unwrap_or((0, 0)))
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    );
    for ctx in &contexts {
        for program in Jit::for_context(ctx)?.loaded() {
            println!(
                "  device {}: {} {:?}",
                ctx.ordinal(),
                program.spec,
                program.origin
            );
        }
    }
    Ok(())
}
