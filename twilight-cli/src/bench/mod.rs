//! `twilight bench`: performance figures measured with CUDA events on the GPU, each printed
//! with its shape, its byte floor and the ratio to it.

mod caches;
mod grid;
mod sparse;
pub mod timing;

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::CudaStream;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use timing::{dense_decode_bytes, time_with_events, BenchKernels};
use twilight::twilight_jit::disk_cache::DiskCache;
use twilight::twilight_jit::{open_device, Jit, Origin};
use twilight::{
    CacheShape, DecodeOutput, DenseDecoder, Dtype, HostPageTable, KvElement, KvLayout, PageTable,
    PagedKvCache, VariantSpec, Workspace,
};

use crate::CliResult;

#[derive(clap::Subcommand, Debug)]
pub enum What {
    /// Dense paged decode (`full`/`none`) against the card's read-bandwidth floor.
    Dense(ShapeArgs),
    /// The Select-then-Prune step beside Quest alone and dense decode, per stage and per step.
    Sparse(sparse::SparseArgs),
    /// Every shape of bench/shapes.json: dense, Quest alone and the twilight step, as a table.
    Grid(grid::GridArgs),
    /// The table of earlier `bench grid` results (several runs merged), with no GPU.
    Table(grid::TableArgs),
    /// JIT costs: cold compile, warm disk-cache load and memory-cache hit, per variant.
    Jit {
        /// Variants (default: the dense Llama-3 shape in f16 and bf16).
        variants: Vec<VariantSpec>,
    },
}

/// The shape and the timing knobs every benchmark takes.
#[derive(clap::Args, Debug)]
pub struct ShapeArgs {
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 32)]
    pub qo_heads: usize,
    #[arg(long, default_value_t = 8)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    pub head_dim: u32,
    /// Tokens per request (all requests this long).
    #[arg(long, default_value_t = 32768)]
    pub len: usize,
    #[arg(long, default_value_t = 16)]
    pub page_size: u32,
    #[arg(long, default_value = "f16")]
    pub dtype: String,
    #[arg(long, default_value = "hnd")]
    pub layout: String,
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    #[arg(long, default_value_t = 100)]
    pub iters: usize,
    /// Size of the read-bandwidth probe in GiB.
    #[arg(long, default_value_t = 4.0)]
    pub probe_gib: f64,
    /// Also write the result as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

impl ShapeArgs {
    /// The dense (`full`/`none`) variant of this shape.
    pub fn dense_spec(&self) -> Result<VariantSpec, Box<dyn std::error::Error>> {
        dense_spec(
            self.qo_heads,
            self.kv_heads,
            self.page_size,
            self.head_dim,
            &self.dtype,
            &self.layout,
        )
    }
}

/// The dense (`full`/`none`) variant of a benchmark shape, whose flags and shape-list entries
/// spell dtype and layout as text.
///
/// # Errors
/// Query heads that are not a multiple of the KV heads, or a spec that does not validate.
pub fn dense_spec(
    qo_heads: usize,
    kv_heads: usize,
    page_size: u32,
    head_dim: u32,
    dtype: &str,
    layout: &str,
) -> Result<VariantSpec, Box<dyn std::error::Error>> {
    if kv_heads == 0 || qo_heads % kv_heads != 0 {
        return Err(
            format!("{qo_heads} query heads are not a multiple of {kv_heads} KV heads").into(),
        );
    }
    Ok(format!(
        "page_size={page_size},head_dim={head_dim},dtype={dtype},group_size={},kv_layout={layout},selector=full,pruning=none",
        qo_heads / kv_heads
    )
    .parse()?)
}

pub fn run(what: What) -> CliResult {
    match what {
        What::Dense(args) => dense(args),
        What::Sparse(args) => sparse::run(args),
        What::Grid(args) => grid::run(args),
        What::Table(args) => grid::table(args),
        What::Jit { variants } => jit(variants),
    }
}

fn dense(args: ShapeArgs) -> CliResult {
    let spec = args.dense_spec()?;
    let stream = open_device(0)?.default_stream();
    match spec.dtype {
        Dtype::F16 => dense_typed::<half::f16>(&stream, spec, &args),
        Dtype::Bf16 => dense_typed::<half::bf16>(&stream, spec, &args),
    }
}

/// One cache of the rotation: its own K/V pools and shuffled page table.
struct Instance<T: KvElement> {
    cache: PagedKvCache<T>,
    table: PageTable,
}

fn dense_typed<T: KvElement>(
    stream: &Arc<CudaStream>,
    spec: VariantSpec,
    args: &ShapeArgs,
) -> CliResult {
    let tools = BenchKernels::new(stream)?;
    let bandwidth = tools.read_bandwidth((args.probe_gib * (1u64 << 30) as f64) as usize)?;
    let decoder = DenseDecoder::new(stream.clone(), spec)?;
    let pages_per_request = args.len.div_ceil(args.page_size as usize);
    let shape = CacheShape {
        num_pages: args.batch * pages_per_request,
        num_kv_heads: args.kv_heads,
        page_size: args.page_size as usize,
        head_dim: args.head_dim as usize,
        layout: spec.kv_layout,
    };
    let cache_bytes = 2 * shape.elements() * 2;
    // Enough caches that consecutive steps never find their K/V in the 50 MB L2.
    let rotation = (2usize << 30).div_ceil(cache_bytes).clamp(2, 16);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut instances = Vec::new();
    for i in 0..rotation {
        let mut cache = PagedKvCache::<T>::new(stream, shape)?;
        let (k, v) = cache.k_v_mut();
        tools.fill(k, 2 * i as u32, 0.5)?;
        tools.fill(v, 2 * i as u32 + 1, 1.0)?;
        let mut pages: Vec<i32> = (0..shape.num_pages as i32).collect();
        pages.shuffle(&mut rng);
        let rows: Vec<(&[i32], usize)> = pages
            .chunks(pages_per_request)
            .map(|p| (p, args.len))
            .collect();
        let host = HostPageTable::from_requests(&rows, shape.page_size, shape.num_pages)?;
        let table = PageTable::upload(stream, &host, shape.num_pages)?;
        instances.push(Instance { cache, table });
    }
    let q_len = args.batch * args.qo_heads * args.head_dim as usize;
    let mut q = stream.alloc_zeros::<T>(q_len)?;
    tools.fill(&mut q, 99, 1.0)?;
    let mut out = DecodeOutput {
        o: stream.alloc_zeros::<T>(q_len)?,
        lse: stream.alloc_zeros::<f32>(args.batch * args.qo_heads)?,
    };
    let mut workspace = Workspace::default();
    let timing = time_with_events(stream, args.warmup, args.iters, |i| {
        let inst = &instances[i % instances.len()];
        decoder.run_into(&q, &inst.cache, &inst.table, None, &mut out, &mut workspace)
    })?;
    let bytes = dense_decode_bytes(
        &vec![args.len; args.batch],
        args.kv_heads,
        args.head_dim as usize,
        2,
    );
    let floor_us = bytes as f64 / bandwidth * 1e6;
    let plan = decoder.plan(args.batch, args.kv_heads, args.len);
    let median = timing.median_us();
    println!(
        "dense decode {spec}: batch {}, {} query heads / {} KV heads, head_dim {}, {} tokens per request",
        args.batch, args.qo_heads, args.kv_heads, args.head_dim, args.len
    );
    println!(
        "  median {median:.1} us (min {:.1}, max {:.1}) over {} runs after {} warm-up, rotating {rotation} caches of {:.2} GiB",
        timing.min_us(),
        timing.max_us(),
        args.iters,
        args.warmup,
        cache_bytes as f64 / (1u64 << 30) as f64
    );
    println!(
        "  K/V bytes {:.3} GiB; measured read bandwidth {:.0} GB/s; floor {floor_us:.1} us; ratio {:.3}; achieved {:.0} GB/s",
        bytes as f64 / (1u64 << 30) as f64,
        bandwidth * 1e-9,
        median / floor_us,
        bytes as f64 / median * 1e-3
    );
    println!(
        "  split: {} chunk(s) of {} tokens per (request, KV head)",
        plan.num_chunks, plan.chunk_tokens
    );
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "variant": spec.name(),
            "batch": args.batch, "qo_heads": args.qo_heads, "kv_heads": args.kv_heads,
            "head_dim": args.head_dim, "len": args.len, "page_size": args.page_size,
            "median_us": median, "min_us": timing.min_us(), "max_us": timing.max_us(),
            "iters": args.iters, "bytes": bytes, "read_bandwidth_gbps": bandwidth * 1e-9,
            "floor_us": floor_us, "ratio_to_floor": median / floor_us,
            "chunks": plan.num_chunks, "chunk_tokens": plan.chunk_tokens,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}

fn jit(mut variants: Vec<VariantSpec>) -> CliResult {
    if variants.is_empty() {
        variants = vec![
            VariantSpec::dense(16, 128, Dtype::F16, 4, KvLayout::Hnd),
            VariantSpec::dense(16, 128, Dtype::Bf16, 4, KvLayout::Hnd),
        ];
    }
    let ctx = open_device(0)?;
    let dir = std::env::temp_dir().join(format!("twilight-bench-jit-{}", std::process::id()));
    println!(
        "JIT costs on {}, scratch cache {}",
        ctx.name()?,
        dir.display()
    );
    for spec in variants {
        let _ = std::fs::remove_dir_all(&dir);
        let cold = Jit::new(ctx.clone(), DiskCache::open(Some(dir.clone()), None), false)?;
        let start = Instant::now();
        let program = cold.load(&spec)?;
        let cold_ms = start.elapsed().as_secs_f64() * 1e3;
        let Origin::Compiled(compile) = program.origin else {
            return Err("the scratch cache was not empty".into());
        };
        let warm = Jit::new(ctx.clone(), DiskCache::open(Some(dir.clone()), None), false)?;
        let start = Instant::now();
        let from_disk = warm.load(&spec)?;
        let disk_ms = start.elapsed().as_secs_f64() * 1e3;
        if from_disk.origin != Origin::Disk {
            return Err("the second load did not come from the disk cache".into());
        }
        let hits = 100_000;
        let start = Instant::now();
        for _ in 0..hits {
            std::hint::black_box(warm.load(&spec)?);
        }
        let hit_ns = start.elapsed().as_secs_f64() * 1e9 / hits as f64;
        println!(
            "  {spec}: cold {cold_ms:.0} ms (NVRTC {:.0} ms), warm disk load {disk_ms:.2} ms, memory hit {hit_ns:.0} ns (mean of {hits})",
            compile.as_secs_f64() * 1e3
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
