//! Tensor parallelism: the KV heads of one decode step split over GPUs, as engines shard a
//! model that outgrows one GPU. Each GPU has its own context, thread, stream, KV cache (its
//! share of every token's heads) and decoder; they share the process's kernel binaries, so
//! the variant is compiled once per architecture and loaded once per GPU. The halves are
//! gathered on the host and compared with the one-GPU step over every head.
//!
//!     cargo run --release --example tensor_parallel [-- GPUS [TOKENS]]
//!
//! GPUS defaults to 2 (1 splits the heads over two streams of one GPU); TOKENS per request
//! to 4096.

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::CudaContext;
use twilight::twilight_jit::{device_count, open_device, KernelStore};
use twilight::{
    twilight_kernel, PagedKvCache, SparseDecoder, SparseOutput, SparseParams, Variant, VariantSpec,
};
use twilight_synth::generator::{generate, GeneratorParams, Preset};
use twilight_synth::synthetic::SyntheticStep;

type E = half::f16;
type Error = Box<dyn std::error::Error + Send + Sync>;

#[twilight_kernel(page_size = 16, head_dim = 128, dtype = f16, group_size = 4,
                  kv_layout = hnd, selector = quest, pruning = top_p)]
pub struct Llama3Twilight;

const KV_HEADS: usize = 8;
const GROUP: usize = 4;
const HEAD_DIM: usize = 128;

/// Rows `[n, heads, width]` of the heads in `range`: one GPU's share.
fn heads_of<T: Copy>(rows: &[T], heads: usize, width: usize, range: &Range<usize>) -> Vec<T> {
    rows.chunks_exact(heads * width)
        .flat_map(|row| &row[range.start * width..range.end * width])
        .copied()
        .collect()
}

/// What one GPU returns: o `[batch, its query heads, head_dim]` and the kept count per
/// (request, its KV head).
struct Share {
    o: Vec<f32>,
    kept: Vec<i32>,
}

/// The step over the KV heads `kv`, on a stream of its own on `ctx`.
fn run_share(
    ctx: &Arc<CudaContext>,
    step: &SyntheticStep,
    spec: VariantSpec,
    params: SparseParams,
    kv: &Range<usize>,
) -> Result<Share, Error> {
    let stream = ctx.new_stream()?;
    let decoder = SparseDecoder::new(stream.clone(), spec, params)?;
    let shape = twilight::CacheShape {
        num_kv_heads: kv.len(),
        ..step.shape
    };
    let mut cache = PagedKvCache::<E>::for_variant(&stream, shape, &spec)?;
    let mut ids = Vec::new();
    for b in 0..step.table.batch() {
        let (k, v) = step.request_rows::<E>(b)?;
        let (k, v) = (
            heads_of(&k, KV_HEADS, HEAD_DIM, kv),
            heads_of(&v, KV_HEADS, HEAD_DIM, kv),
        );
        let id = cache.add_request();
        decoder.append(
            &mut cache,
            &[(id, step.table.len_of(b))],
            &stream.clone_htod(&k)?,
            &stream.clone_htod(&v)?,
        )?;
        ids.push(id);
    }
    let table = cache.page_table(&stream, &ids)?;
    let q_all = SyntheticStep::to_elements::<E>(&step.q);
    let qo = kv.start * GROUP..kv.end * GROUP;
    let q = stream.clone_htod(&heads_of(&q_all, KV_HEADS * GROUP, HEAD_DIM, &qo))?;
    let SparseOutput { o, kept_counts, .. } = decoder.run(&q, &cache, &table)?;
    Ok(Share {
        o: stream.clone_dtoh(&o)?.iter().map(|x| x.to_f32()).collect(),
        kept: stream.clone_dtoh(&kept_counts)?,
    })
}

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let gpus: usize = args.next().map_or(Ok(2), |a| a.parse())?;
    let tokens: usize = args.next().map_or(Ok(4096), |a| a.parse())?;
    let found = device_count().unwrap_or(0);
    if found == 0 {
        println!("no GPU: nothing to split (see examples/03_decode.rs for the CPU reference)");
        return Ok(());
    }
    if gpus == 0 || !KV_HEADS.is_multiple_of(gpus) {
        return Err(format!("{KV_HEADS} KV heads do not split over {gpus} GPU(s)").into());
    }
    // With fewer GPUs than asked for, the shares take turns on the GPUs there are.
    let contexts: Vec<Arc<CudaContext>> = (0..gpus)
        .map(|i| open_device(i % found))
        .collect::<Result<_, _>>()?;
    let spec = Llama3Twilight::SPEC;
    let params = SparseParams {
        budget: 1024,
        p: 0.9,
        sm_scale: None,
    };
    let step = generate::<E>(
        &GeneratorParams::preset(Preset::Default, 7),
        &[tokens, tokens / 2 + 1, tokens / 3 + 7],
        KV_HEADS,
        GROUP,
        16,
        HEAD_DIM,
        spec.kv_layout,
    )?;

    // Each GPU on its own thread, all at once: nothing synchronizes one with another.
    let per = KV_HEADS / gpus;
    let shares: Vec<(Range<usize>, Share)> = std::thread::scope(|s| {
        let handles: Vec<_> = contexts
            .iter()
            .enumerate()
            .map(|(i, ctx)| {
                let step = &step;
                s.spawn(move || {
                    let kv = i * per..(i + 1) * per;
                    run_share(ctx, step, spec, params, &kv).map(|share| (kv, share))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a GPU's thread does not panic"))
            .collect::<Result<_, Error>>()
    })?;

    // The gather, then the one-GPU step over every head on GPU 0.
    let qo_heads = KV_HEADS * GROUP;
    let batch = step.table.batch();
    let mut o = vec![0f32; batch * qo_heads * HEAD_DIM];
    let mut kept = vec![0i32; batch * KV_HEADS];
    for (kv, share) in &shares {
        let (q0, q1) = (kv.start * GROUP * HEAD_DIM, kv.end * GROUP * HEAD_DIM);
        for b in 0..batch {
            let part = (q1 - q0) * b;
            o[b * qo_heads * HEAD_DIM + q0..][..q1 - q0]
                .copy_from_slice(&share.o[part..part + q1 - q0]);
            kept[b * KV_HEADS + kv.start..][..kv.len()]
                .copy_from_slice(&share.kept[b * kv.len()..][..kv.len()]);
        }
    }
    let one = run_share(&contexts[0], &step, spec, params, &(0..KV_HEADS))?;
    let worst = o
        .iter()
        .zip(&one.o)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let stats = KernelStore::global().stats();
    println!(
        "{}: {gpus} share(s) of {per} KV heads on {found} GPU(s), {batch} requests of up to \
         {tokens} tokens",
        Llama3Twilight::NAME
    );
    println!("kept tokens per (request, KV head), gathered: {kept:?}");
    // The same kernels over the same rows keep the same tokens; a near-tie decided the other
    // way (the split of work over blocks depends on how many rows share a GPU) may move one.
    let differing = kept.iter().zip(&one.kept).filter(|(a, b)| a != b).count();
    println!(
        "against the one-GPU step: {differing} of {} kept counts differ, largest |o difference| \
         {worst:.2e}",
        kept.len()
    );
    println!(
        "kernels: {} compile(s), {} disk-cache read(s), {} shared between GPUs",
        stats.compiles, stats.disk_reads, stats.shared
    );
    if differing > 1 || (differing == 0 && worst > 2e-2) {
        return Err("the gathered shares differ from the one-GPU step".into());
    }
    Ok(())
}
