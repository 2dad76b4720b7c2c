//! `twilight bench dense`: dense paged decode (`full`/`none`) over random caches, against the
//! card's read-bandwidth floor.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use twilight::twilight_jit::open_device;
use twilight::{
    AttentionKernel, CacheShape, DecodeOutput, DenseDecoder, Dtype, HostPageTable, KvElement,
    LaunchOverlap, PageTable, PagedKvCache, SplitPlan, VariantSpec, Workspace,
};

use super::bytes::dense_decode_bytes;
use super::kernels::BenchKernels;
use super::shape::ShapeArgs;
use super::timing::{time_with_events, Timing};
use crate::CliResult;

pub fn run(args: ShapeArgs) -> CliResult {
    let shape = args.shape("cli", 0, 1.0);
    shape.check_size(super::shape::host_limit())?;
    let spec = shape.dense_spec()?;
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

/// How one configuration of the dense bench is timed and printed.
struct Line<'a> {
    args: &'a ShapeArgs,
    floor_us: f64,
    bytes: u64,
}

impl Line<'_> {
    /// Times `decoder` over the rotated caches and prints one line named `label`: the median,
    /// its ratio to the floor, the bandwidth it achieved and the split it ran.
    fn time<T: KvElement>(
        &self,
        stream: &Arc<CudaStream>,
        decoder: &DenseDecoder,
        instances: &[Instance<T>],
        q: &CudaSlice<T>,
        out: &mut DecodeOutput<T>,
        label: &str,
    ) -> Result<(Timing, SplitPlan), Box<dyn std::error::Error>> {
        let args = self.args;
        let mut workspace = Workspace::default();
        let timing = time_with_events(stream, args.warmup, args.iters, |i| {
            let inst = &instances[i % instances.len()];
            decoder.run_into(q, &inst.cache, &inst.table, None, out, &mut workspace)
        })?;
        let plan = decoder.plan(args.batch, args.kv_heads, args.len);
        let median = timing.median_us();
        println!(
            "  {label}: median {median:.1} us (min {:.1}, max {:.1}); ratio to floor {:.3}; achieved {:.0} GB/s; split {} chunk(s) of {} tokens",
            timing.min_us(),
            timing.max_us(),
            median / self.floor_us,
            self.bytes as f64 / median * 1e-3,
            plan.num_chunks,
            plan.chunk_tokens
        );
        Ok((timing, plan))
    }
}

fn dense_typed<T: KvElement>(
    stream: &Arc<CudaStream>,
    spec: VariantSpec,
    args: &ShapeArgs,
) -> CliResult {
    let tools = BenchKernels::new(stream)?;
    let bandwidth = tools.read_bandwidth((args.probe_gib * (1u64 << 30) as f64) as usize)?;
    let mut decoder = DenseDecoder::new(stream.clone(), spec)?;
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
        if !args.pages_in_order {
            pages.shuffle(&mut rng);
        }
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
    let bytes = dense_decode_bytes(
        &vec![args.len; args.batch],
        args.kv_heads,
        args.head_dim as usize,
        2,
    );
    let floor_us = bytes as f64 / bandwidth * 1e6;
    println!(
        "dense decode {spec}: batch {}, {} query heads / {} KV heads, head_dim {}, {} tokens per request",
        args.batch, args.qo_heads, args.kv_heads, args.head_dim, args.len
    );
    println!(
        "  K/V bytes {:.3} GiB; measured read bandwidth {:.0} GB/s; floor {floor_us:.1} us; rotating {rotation} caches of {:.2} GiB; pages {}; {} runs after {} warm-up",
        bytes as f64 / (1u64 << 30) as f64,
        bandwidth * 1e-9,
        cache_bytes as f64 / (1u64 << 30) as f64,
        if args.pages_in_order { "in order" } else { "shuffled" },
        args.iters,
        args.warmup,
    );
    // The default kernel first (its figures go to the JSON), then the other one.
    let default_kernel = decoder.decoder().attention_kernel();
    let mut kernels = vec![default_kernel];
    kernels.extend(
        [AttentionKernel::TensorCores, AttentionKernel::CudaCores]
            .into_iter()
            .filter(|k| *k != default_kernel),
    );
    let line = Line {
        args,
        floor_us,
        bytes,
    };
    let mut time_as = |decoder: &DenseDecoder, label: &str| {
        line.time(stream, decoder, &instances, &q, &mut out, label)
    };
    let mut measured = Vec::new();
    for kernel in kernels {
        decoder.set_attention_kernel(kernel);
        let default = if kernel == default_kernel {
            " (default)"
        } else {
            ""
        };
        let (timing, plan) = time_as(&decoder, &format!("{kernel:?}{default}"))?;
        measured.push((kernel, timing, plan));
    }
    decoder.set_attention_kernel(AttentionKernel::TensorCores);
    for &waves in args.waves.iter().filter(|&&w| w > 1) {
        decoder.set_dense_waves(waves);
        time_as(&decoder, &format!("TensorCores, split for {waves} waves"))?;
    }
    decoder.set_dense_waves(1);
    decoder.set_attention_kernel(default_kernel);
    // The default again with launch overlap off: consecutive steps then never share the SMs.
    decoder.set_launch_overlap(LaunchOverlap::Off);
    time_as(
        &decoder,
        &format!("{default_kernel:?}, launches never overlapped"),
    )?;
    decoder.set_launch_overlap(LaunchOverlap::default());
    let (_, timing, plan) = &measured[0];
    let median = timing.median_us();
    let other = measured
        .get(1)
        .map(|(k, t, _)| (format!("{k:?}"), t.median_us()));
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "variant": spec.name(),
            "batch": args.batch, "qo_heads": args.qo_heads, "kv_heads": args.kv_heads,
            "head_dim": args.head_dim, "len": args.len, "page_size": args.page_size,
            "median_us": median, "min_us": timing.min_us(), "max_us": timing.max_us(),
            "iters": args.iters, "bytes": bytes, "read_bandwidth_gbps": bandwidth * 1e-9,
            "floor_us": floor_us, "ratio_to_floor": median / floor_us,
            "chunks": plan.num_chunks, "chunk_tokens": plan.chunk_tokens,
            "attention_kernel": format!("{default_kernel:?}"),
            "other_kernel": other.as_ref().map(|o| &o.0),
            "other_kernel_median_us": other.as_ref().map(|o| o.1),
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}
