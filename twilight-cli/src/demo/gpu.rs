//! The demo on the GPU: the cache filled through the variant's append kernel, one step with
//! poisoned outputs, CUDA-event timings of the whole step and of each stage, dense decode on the
//! same cache for the speedup, and checks of every output against the CPU reference.

use std::error::Error;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaSlice, CudaStream};
use twilight::reference::{dense_decode, HostKv};
use twilight::twilight_jit::{LoadedProgram, Origin, Stage};
use twilight::{
    DecodeOutput, DenseDecoder, KvElement, PageTable, PagedKvCache, Pruning, RequestId, Selector,
    SparseDecoder, SparseWorkspace, VariantSpec, Workspace,
};
use twilight_synth::synthetic::SyntheticStep;

use super::check::{attend_kept, exactness, kept_lists, reference_step};
use super::{HostCache, Inputs, Outcome};
use crate::bench::{dense_decode_bytes, time_stages, time_with_events, Timing};

/// How many times each step runs after the checked one.
#[derive(Clone, Copy, Debug)]
struct Runs {
    warmup: usize,
    /// Timed runs of the whole step.
    timed: usize,
    /// Instrumented runs (an event before each stage).
    staged: usize,
}

impl Runs {
    /// 50 timed runs by default (`--runs`), after at most 5 warm-up ones, and at most 20
    /// instrumented ones.
    fn of(x: &Inputs) -> Runs {
        Runs {
            warmup: x.runs.min(5),
            timed: x.runs,
            staged: x.runs.min(20),
        }
    }
}

type Res<T> = Result<T, Box<dyn Error>>;

/// The outputs of one step on the device, downloaded, and its timings.
struct GpuStep {
    o: Vec<f32>,
    lse: Vec<f32>,
    /// Sparse only: kept counts, kept rows and their length.
    kept: Option<(Vec<i32>, Vec<i32>, usize)>,
    timing: Timing,
    /// Median microseconds per stage, in launch order (sparse only).
    stages: Vec<(Stage, f64)>,
}

pub(super) fn run<T: KvElement>(stream: &Arc<CudaStream>, x: &Inputs) -> Res<Outcome> {
    let ctx = stream.context();
    let name = ctx.name()?;
    let (major, minor) = ctx.compute_capability()?;
    println!("  ran on: {name} (sm_{major}{minor})");
    let dense_spec = VariantSpec {
        selector: Selector::Full,
        pruning: Pruning::None,
        ..x.spec
    };
    let sparse = if x.is_dense() {
        None
    } else {
        let mut decoder = SparseDecoder::new(stream.clone(), x.spec, x.sparse_params())?;
        decoder.set_selection_kernel(x.selection_kernel);
        decoder.set_spread_rows(x.spread_rows);
        print_origin(&format!("kernels of {}", x.spec), decoder.program());
        Some(decoder)
    };
    let dense = DenseDecoder::new(stream.clone(), dense_spec)?;
    print_origin(&format!("kernels of {dense_spec}"), dense.program());

    let (cache, ids) = fill_cache::<T>(stream, x, sparse.as_ref(), &dense)?;
    let table = cache.page_table(stream, &ids)?;
    let host_table = cache.host_page_table(&ids)?;
    let q = stream.clone_htod(&SyntheticStep::to_elements::<T>(&x.step.q))?;

    let runs = Runs::of(x);
    let dense_run = run_dense(stream, &dense, &q, &cache, &table, runs)?;
    let main = match &sparse {
        Some(decoder) => Some(run_sparse(stream, decoder, &q, &cache, &table, runs)?),
        None => None,
    };
    print_timings(x, main.as_ref(), &dense_run, &dense, &table);
    if let Some(decoder) = &sparse {
        let plan = decoder.plan(x.batch(), x.num_kv_heads(), table.max_len());
        println!(
            "  sparse plan: longest request {} pages; at most {} candidates per (request, KV head); attention spread over at most {} block(s) per list, in chunks of at least {} tokens",
            plan.max_pages, plan.max_cands, plan.num_chunks, plan.chunk_tokens
        );
    }

    let (k, v) = cache.download(stream)?;
    let host = HostCache {
        shape: cache.shape(),
        table: host_table,
        k: k.iter().map(|e| e.to_f32()).collect(),
        v: v.iter().map(|e| e.to_f32()).collect(),
    };
    let kv = HostKv {
        shape: host.shape,
        k: &host.k,
        v: &host.v,
    };
    let start = Instant::now();
    let want_dense = dense_decode(&x.step.q, x.num_qo_heads(), &kv, &host.table, x.sm_scale)?;
    let dense_ms = start.elapsed().as_secs_f64() * 1e3;

    let mut failures = Vec::new();
    let mut others = Vec::new();
    let (o, lse, kept) = match main {
        Some(step) => {
            let (counts, rows, row_len) = step.kept.expect("a sparse step returns kept lists");
            let kept = kept_lists(x, &host.table, &counts, &rows, row_len)?;
            let (want_o, want_lse) = attend_kept(x, &kv, &kept)?;
            failures.extend(exactness(
                x,
                "sparse step vs the reference attention over its own kept lists",
                &step.o,
                &step.lse,
                &want_o,
                &want_lse,
            ));
            let reference = reference_step(x, &kv, &host.table, &kept)?;
            others.push(("CPU reference step".to_string(), reference.0, reference.1));
            failures.extend(exactness(
                x,
                "dense decode (full/none) vs dense attention",
                &dense_run.o,
                &dense_run.lse,
                &want_dense.o,
                &want_dense.lse,
            ));
            others.push((
                "GPU dense decode (full/none)".to_string(),
                dense_run.o,
                dense_run.lse,
            ));
            (step.o, step.lse, kept)
        }
        None => {
            failures.extend(exactness(
                x,
                "dense decode vs dense attention",
                &dense_run.o,
                &dense_run.lse,
                &want_dense.o,
                &want_dense.lse,
            ));
            let kept = (0..x.batch())
                .flat_map(|b| {
                    let table = &host.table;
                    let mut all: Vec<usize> = table.slots_of(b).collect();
                    all.sort_unstable();
                    std::iter::repeat_n(all, x.num_kv_heads())
                })
                .collect();
            (dense_run.o, dense_run.lse, kept)
        }
    };
    Ok(Outcome {
        ran_on: format!("gpu: {name}"),
        cache: Some(host),
        o,
        lse,
        kept,
        dense: want_dense,
        dense_ms,
        others,
        failure: (!failures.is_empty()).then(|| failures.join("; ")),
    })
}

fn print_origin(what: &str, program: &LoadedProgram) {
    let key = &program.key.hex()[..16];
    match program.origin {
        Origin::Compiled(d) => println!(
            "  {what}: compiled by NVRTC in {:.0} ms (ready in {:.0} ms), key {key}",
            d.as_secs_f64() * 1e3,
            program.load_time.as_secs_f64() * 1e3
        ),
        Origin::Disk => println!(
            "  {what}: loaded from the disk cache in {:.1} ms, key {key}",
            program.load_time.as_secs_f64() * 1e3
        ),
        Origin::Shared => println!(
            "  {what}: loaded from this process's binaries in {:.1} ms, key {key}",
            program.load_time.as_secs_f64() * 1e3
        ),
    }
}

/// A device cache for the variant (with its Quest bounds and 4-bit K when it reads them), filled
/// through the variant's append kernel one request at a time, as an engine's prefill would.
fn fill_cache<T: KvElement>(
    stream: &Arc<CudaStream>,
    x: &Inputs,
    sparse: Option<&SparseDecoder>,
    dense: &DenseDecoder,
) -> Res<(PagedKvCache<T>, Vec<RequestId>)> {
    let shape = x.step.shape;
    let mut cache = match &x.ds_channels {
        Some(channels) => PagedKvCache::<T>::for_double_sparse(stream, shape, &x.spec, channels)?,
        None => PagedKvCache::<T>::for_variant(stream, shape, &x.spec)?,
    };
    let mut ids = Vec::with_capacity(x.batch());
    let start = Instant::now();
    for b in 0..x.batch() {
        let id = cache.add_request();
        ids.push(id);
        let (k_rows, v_rows) = x.step.request_rows::<T>(b)?;
        let k_new = stream.clone_htod(&k_rows)?;
        let v_new = stream.clone_htod(&v_rows)?;
        let appends = [(id, x.lens[b])];
        match sparse {
            Some(decoder) => decoder.append(&mut cache, &appends, &k_new, &v_new)?,
            None => dense.append(&mut cache, &appends, &k_new, &v_new)?,
        }
    }
    stream.synchronize()?;
    let kinds = cache.derived_kinds();
    let mut kept = Vec::new();
    if kinds.quest {
        kept.push("Quest page bounds".to_string());
    }
    if kinds.labels > 0 {
        kept.push(format!("{}-channel labels", kinds.labels));
    }
    if kinds.quant4 {
        kept.push("4-bit K".to_string());
    }
    let derived = if kept.is_empty() {
        String::new()
    } else {
        format!(", with {}", kept.join(" and "))
    };
    println!(
        "  append: {} tokens into {} pages{derived} in {:.1} ms (host copies included)",
        x.lens.iter().sum::<usize>(),
        shape.num_pages - cache.free_pages(),
        start.elapsed().as_secs_f64() * 1e3
    );
    Ok((cache, ids))
}

fn download<T: KvElement>(stream: &Arc<CudaStream>, o: &CudaSlice<T>) -> Res<Vec<f32>> {
    Ok(stream.clone_dtoh(o)?.iter().map(|e| e.to_f32()).collect())
}

/// One sparse step into poisoned outputs (downloaded), then the timed runs.
fn run_sparse<T: KvElement>(
    stream: &Arc<CudaStream>,
    decoder: &SparseDecoder,
    q: &CudaSlice<T>,
    cache: &PagedKvCache<T>,
    table: &PageTable,
    runs: Runs,
) -> Res<GpuStep> {
    let mut out = decoder.alloc_output::<T>(table, cache.shape().num_kv_heads)?;
    stream.memcpy_htod(&vec![T::poison(); out.o.len()], &mut out.o)?;
    stream.memcpy_htod(&vec![f32::NAN; out.lse.len()], &mut out.lse)?;
    stream.memcpy_htod(&vec![-7i32; out.kept.len()], &mut out.kept)?;
    stream.memcpy_htod(&vec![-1i32; out.kept_counts.len()], &mut out.kept_counts)?;
    let mut ws = SparseWorkspace::default();
    decoder.run_into(q, cache, table, &mut out, &mut ws)?;
    let o = download(stream, &out.o)?;
    let lse = stream.clone_dtoh(&out.lse)?;
    let counts = stream.clone_dtoh(&out.kept_counts)?;
    let kept = stream.clone_dtoh(&out.kept)?;
    let max_cands = out.max_cands;

    let timing = time_with_events(stream, runs.warmup, runs.timed, |_| {
        decoder.run_into(q, cache, table, &mut out, &mut ws)
    })?;
    let stages = time_stages(stream, 0, runs.staged, |_, hook| {
        decoder.run_instrumented(q, cache, table, &mut out, &mut ws, hook)
    })?
    .into_iter()
    .map(|(stage, timing)| (stage, timing.median_us()))
    .collect();
    Ok(GpuStep {
        o,
        lse,
        kept: Some((counts, kept, max_cands)),
        timing,
        stages,
    })
}

/// One dense step (`full`/`none`) into poisoned outputs (downloaded), then the timed runs.
fn run_dense<T: KvElement>(
    stream: &Arc<CudaStream>,
    decoder: &DenseDecoder,
    q: &CudaSlice<T>,
    cache: &PagedKvCache<T>,
    table: &PageTable,
    runs: Runs,
) -> Res<GpuStep> {
    let heads = q.len() / decoder.spec().head_dim as usize;
    let mut out = DecodeOutput {
        o: stream.clone_htod(&vec![T::poison(); q.len()])?,
        lse: stream.clone_htod(&vec![f32::NAN; heads])?,
    };
    let mut ws = Workspace::default();
    decoder.run_into(q, cache, table, None, &mut out, &mut ws)?;
    let o = download(stream, &out.o)?;
    let lse = stream.clone_dtoh(&out.lse)?;
    let timing = time_with_events(stream, runs.warmup, runs.timed, |_| {
        decoder.run_into(q, cache, table, None, &mut out, &mut ws)
    })?;
    Ok(GpuStep {
        o,
        lse,
        kept: None,
        timing,
        stages: Vec::new(),
    })
}

fn print_timings(
    x: &Inputs,
    sparse: Option<&GpuStep>,
    dense: &GpuStep,
    dense_decoder: &DenseDecoder,
    table: &PageTable,
) {
    let runs = Runs::of(x);
    let plan = dense_decoder.plan(x.batch(), x.num_kv_heads(), table.max_len());
    let bytes = dense_decode_bytes(&x.lens, x.num_kv_heads(), x.head_dim(), 2);
    let dense_line = format!(
        "median {:.1} us (min {:.1}, max {:.1}) over {} runs; {} chunk(s) of {} tokens; {:.0} GB/s of K/V",
        dense.timing.median_us(),
        dense.timing.min_us(),
        dense.timing.max_us(),
        runs.timed,
        plan.num_chunks,
        plan.chunk_tokens,
        bytes as f64 / dense.timing.median_us() * 1e-3
    );
    let Some(step) = sparse else {
        println!("  decode step: {dense_line}");
        return;
    };
    println!(
        "  sparse step: median {:.1} us (min {:.1}, max {:.1}) over {} runs after {} warm-up, CUDA events",
        step.timing.median_us(),
        step.timing.min_us(),
        step.timing.max_us(),
        runs.timed,
        runs.warmup
    );
    let parts: Vec<String> = step
        .stages
        .iter()
        .map(|(s, us)| format!("{} {us:.1}", s.suffix()))
        .collect();
    let sum: f64 = step.stages.iter().map(|(_, us)| us).sum();
    println!(
        "  per stage, us (median of {} runs, an event before each launch): {} | sum {sum:.1}",
        runs.staged,
        parts.join(" | ")
    );
    println!("  dense decode (full/none) on the same cache: {dense_line}");
    println!(
        "  speedup over dense decode: {:.2}x",
        dense.timing.median_us() / step.timing.median_us()
    );
}
