//! `twilight demo`: the main job. Builds a paged cache from synthetic data, runs a dense decode
//! step on the GPU when there is one (else on the CPU reference), and reports what ran, the
//! timings and the error against the reference.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::CudaStream;
use rand::SeedableRng;
use twilight::bench::time_with_events;
use twilight::reference::{dense_decode, DecodeResult, HostKv};
use twilight::synthetic::{ragged_lengths, SyntheticStep};
use twilight::twilight_jit::{open_device, Origin};
use twilight::{
    DecodeOutput, DenseDecoder, Dtype, KvElement, KvLayout, PagedKvCache, VariantSpec, Workspace,
};

use super::CliResult;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Requests in the batch (lengths are ragged; one has exactly --max-len tokens).
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 8192)]
    max_len: usize,
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    #[arg(long, default_value_t = 4)]
    group_size: u32,
    #[arg(long, default_value_t = 128)]
    head_dim: u32,
    #[arg(long, default_value_t = 16)]
    page_size: u32,
    /// f16 or bf16.
    #[arg(long, default_value = "f16", value_parser = parse_dtype)]
    dtype: Dtype,
    /// hnd or nhd.
    #[arg(long, default_value = "hnd", value_parser = parse_layout)]
    layout: KvLayout,
    #[arg(long, default_value_t = 2026)]
    seed: u64,
    /// Run the CPU reference even where a GPU is present.
    #[arg(long)]
    cpu: bool,
}

fn parse_dtype(s: &str) -> Result<Dtype, String> {
    match twilight::twilight_jit::spec::parse_value(twilight::twilight_jit::SpecField::Dtype, s) {
        Ok(twilight::twilight_jit::spec::FieldValue::Dtype(d)) => Ok(d),
        _ => Err(format!("`{s}` is not f16 or bf16")),
    }
}

fn parse_layout(s: &str) -> Result<KvLayout, String> {
    match twilight::twilight_jit::spec::parse_value(twilight::twilight_jit::SpecField::KvLayout, s)
    {
        Ok(twilight::twilight_jit::spec::FieldValue::KvLayout(l)) => Ok(l),
        _ => Err(format!("`{s}` is not hnd or nhd")),
    }
}

pub fn run(args: Args) -> CliResult {
    let spec = VariantSpec::dense(
        args.page_size,
        args.head_dim,
        args.dtype,
        args.group_size,
        args.layout,
    );
    spec.validate()?;
    if args.batch == 0 || args.max_len == 0 || args.kv_heads == 0 {
        return Err("--batch, --max-len and --kv-heads must be at least 1".into());
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let lens = ragged_lengths(&mut rng, args.batch, args.max_len);
    println!(
        "twilight demo: dense paged decode, variant {spec}\n  batch {} with lengths {:?}, {} KV heads x group {} = {} query heads, head_dim {}",
        args.batch,
        lens,
        args.kv_heads,
        args.group_size,
        args.kv_heads * args.group_size as usize,
        args.head_dim
    );
    let start = Instant::now();
    let step = match args.dtype {
        Dtype::F16 => synthetic::<half::f16>(&args, &lens, spec)?,
        Dtype::Bf16 => synthetic::<half::bf16>(&args, &lens, spec)?,
    };
    println!(
        "  synthetic cache built on the host in {:.0} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    let stream = if args.cpu {
        println!("  --cpu: running the CPU reference");
        None
    } else {
        match open_device(0) {
            Ok(ctx) => Some(ctx.default_stream()),
            Err(e) => {
                println!("  no GPU ({e})\n  running the CPU reference instead");
                None
            }
        }
    };
    match stream {
        Some(stream) => match args.dtype {
            Dtype::F16 => run_gpu::<half::f16>(&stream, spec, &step),
            Dtype::Bf16 => run_gpu::<half::bf16>(&stream, spec, &step),
        },
        None => run_cpu(spec, &step),
    }
}

fn synthetic<T: KvElement>(
    args: &Args,
    lens: &[usize],
    spec: VariantSpec,
) -> twilight::Result<SyntheticStep> {
    SyntheticStep::random::<T>(
        args.seed,
        lens,
        args.kv_heads,
        spec.group_size as usize,
        spec.page_size as usize,
        spec.head_dim as usize,
        spec.kv_layout,
        0.5,
    )
}

fn reference(
    spec: VariantSpec,
    step: &SyntheticStep,
    kv: &HostKv,
    table: &twilight::HostPageTable,
) -> (DecodeResult, f64) {
    let start = Instant::now();
    let want = dense_decode(
        &step.q,
        step.num_qo_heads,
        kv,
        table,
        1.0 / (spec.head_dim as f32).sqrt(),
    );
    (want, start.elapsed().as_secs_f64() * 1e3)
}

fn run_cpu(spec: VariantSpec, step: &SyntheticStep) -> CliResult {
    let (result, ms) = reference(spec, step, &step.kv(), &step.table);
    let norm =
        (result.o.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / result.o.len() as f64).sqrt();
    println!("  ran on: CPU reference (f64 accumulation), one thread");
    println!("  decode step: {ms:.1} ms");
    println!(
        "  output: {} values, rms {norm:.4}, lse range {:.3}..{:.3}",
        result.o.len(),
        result.lse.iter().cloned().fold(f32::INFINITY, f32::min),
        result.lse.iter().cloned().fold(f32::NEG_INFINITY, f32::max)
    );
    println!("  (the CPU reference is the oracle itself: no error to report)");
    Ok(())
}

fn run_gpu<T: KvElement>(
    stream: &Arc<CudaStream>,
    spec: VariantSpec,
    step: &SyntheticStep,
) -> CliResult {
    let ctx = stream.context();
    println!(
        "  ran on: {} (sm_{}{})",
        ctx.name()?,
        ctx.compute_capability()?.0,
        ctx.compute_capability()?.1
    );
    let decoder = DenseDecoder::new(stream.clone(), spec)?;
    let program = decoder.program();
    match program.origin {
        Origin::Compiled(d) => println!(
            "  kernels: compiled by NVRTC in {:.0} ms (ready in {:.0} ms), key {}",
            d.as_secs_f64() * 1e3,
            program.load_time.as_secs_f64() * 1e3,
            &program.key.hex()[..16]
        ),
        Origin::Disk => println!(
            "  kernels: loaded from the disk cache in {:.1} ms, key {}",
            program.load_time.as_secs_f64() * 1e3,
            &program.key.hex()[..16]
        ),
    }

    // Fill the device cache through the append kernel, request by request as an engine's
    // prefill would, from the synthetic pool's token rows.
    let shape = twilight::CacheShape {
        num_pages: step.shape.num_pages,
        ..step.shape
    };
    let mut cache = PagedKvCache::<T>::new(stream, shape)?;
    let mut ids = Vec::new();
    let append_start = Instant::now();
    let mut tokens = 0;
    for b in 0..step.table.batch() {
        let id = cache.add_request();
        ids.push(id);
        let (k_rows, v_rows) = step.request_rows::<T>(b);
        let k_new = stream.clone_htod(&k_rows)?;
        let v_new = stream.clone_htod(&v_rows)?;
        decoder.append(&mut cache, &[(id, step.table.len_of(b))], &k_new, &v_new)?;
        tokens += step.table.len_of(b);
    }
    stream.synchronize()?;
    println!(
        "  append: {tokens} tokens into {} pages in {:.1} ms (host copies included)",
        shape.num_pages - cache.free_pages(),
        append_start.elapsed().as_secs_f64() * 1e3
    );

    let table = cache.page_table(stream, &ids)?;
    let q = stream.clone_htod(&SyntheticStep::to_elements::<T>(&step.q))?;
    let mut out = DecodeOutput {
        o: stream.clone_htod(&vec![T::poison(); q.len()])?,
        lse: stream.clone_htod(&vec![f32::NAN; step.table.batch() * step.num_qo_heads])?,
    };
    let mut workspace = Workspace::default();
    let plan = decoder.plan(step.table.batch(), shape.num_kv_heads, table.max_len());
    let timing = time_with_events(stream, 5, 50, |_| {
        decoder.run_into(&q, &cache, &table, None, &mut out, &mut workspace)
    })?;
    let bytes = twilight::bench::dense_decode_bytes(
        &(0..step.table.batch())
            .map(|b| step.table.len_of(b))
            .collect::<Vec<_>>(),
        shape.num_kv_heads,
        shape.head_dim,
        2,
    );
    println!(
        "  decode step: median {:.1} us over 50 runs (min {:.1}, max {:.1}); {} chunk(s) of {} tokens; {:.0} GB/s of K/V",
        timing.median_us(),
        timing.min_us(),
        timing.max_us(),
        plan.num_chunks,
        plan.chunk_tokens,
        bytes as f64 / timing.median_us() * 1e-3
    );

    let o: Vec<f32> = stream
        .clone_dtoh(&out.o)?
        .iter()
        .map(|x| x.to_f32())
        .collect();
    let lse = stream.clone_dtoh(&out.lse)?;
    let host_table = cache.host_page_table(&ids)?;
    let (k, v) = cache.download(stream)?;
    let (k, v): (Vec<f32>, Vec<f32>) = (
        k.iter().map(|x| x.to_f32()).collect(),
        v.iter().map(|x| x.to_f32()).collect(),
    );
    let (want, ref_ms) = reference(
        spec,
        step,
        &HostKv {
            shape,
            k: &k,
            v: &v,
        },
        &host_table,
    );
    let max_o = o
        .iter()
        .zip(&want.o)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let diff2: f64 = o
        .iter()
        .zip(&want.o)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let ref2: f64 = want.o.iter().map(|b| (*b as f64).powi(2)).sum();
    let max_lse = lse
        .iter()
        .zip(&want.lse)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let unwritten =
        o.iter().filter(|x| x.is_nan()).count() + lse.iter().filter(|x| x.is_nan()).count();
    println!(
        "  error vs the CPU reference ({ref_ms:.0} ms on the CPU): max |o - ref| {max_o:.2e}, relative L2 {:.2e}, max |lse - ref| {max_lse:.2e}, unwritten outputs {unwritten}",
        (diff2 / ref2).sqrt()
    );
    if unwritten > 0 || !(max_o.is_finite() && max_lse < 1e-2) {
        return Err("the GPU result disagrees with the reference".into());
    }
    Ok(())
}
