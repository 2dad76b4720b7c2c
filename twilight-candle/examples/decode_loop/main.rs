//! A decode loop of a Llama-shaped candle model (random weights; by default 8 layers, 32 query
//! / 8 KV heads, head_dim 128, RoPE, RMSNorm, SwiGLU MLP) over a KV cache of 32k tokens per
//! request, with three attention paths on the same caches: candle's own (matmul + softmax over
//! a contiguous cache), twilight dense, and twilight sparse (layers 0 and 1 dense, the others
//! Quest + top-p). Prints the per-token latency, the attention's share of it (CUDA events
//! around each layer's append + attention) and the kept budget per sparse layer, at each batch.
//!
//! Two kinds of K/V:
//! - `random`: normal K and V, as a random-weights model would attend to: attention is flat,
//!   so top-p keeps a large share of the B0 candidates.
//! - `peaked`: K/V (the same for every layer) and the attention's q drawn from twilight-synth's
//!   generator (sinks, a local window, retrieval hits over a diffuse background), so attention
//!   is peaked as in real long-context models; the model's own q projections still run.
//!
//! ```text
//! cargo run --release --example decode_loop -- [--batch 1,8] [--context 32768] [--steps 16]
//!     [--warmup 4] [--layers 8] [--kv random,peaked] [--budget 8192] [--p 0.9]
//! ```
//!
//! The GPU test binary (`tests/gpu_candle`) runs the same report as its `decode_loop_report`
//! test (flags from `DECODE_LOOP_ARGS`), so a GPU host without Rust needs one binary for both.

pub(crate) mod model;

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use cudarc::driver::sys::CUevent_flags;
use model::{candle_attention, twilight_attention, Caches, Config, Model, Path, TwilightOps};
use twilight_synth::generator::{self, GeneratorParams, Preset};

pub struct Args {
    batches: Vec<usize>,
    context: usize,
    steps: usize,
    warmup: usize,
    layers: usize,
    kv: Vec<String>,
    budget: usize,
    p: f32,
}

/// The report's settings from command-line style flags.
pub fn parse_args(flags: impl Iterator<Item = String>) -> std::result::Result<Args, String> {
    let mut args = Args {
        batches: vec![1, 8],
        context: 32768,
        steps: 16,
        warmup: 4,
        layers: 8,
        kv: vec!["random".into(), "peaked".into()],
        budget: 8192,
        p: 0.9,
    };
    let mut it = flags;
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<usize>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--batch" => {
                args.batches = value
                    .split(',')
                    .map(num)
                    .collect::<std::result::Result<_, _>>()?
            }
            "--context" => args.context = num(&value)?,
            "--steps" => args.steps = num(&value)?.max(1),
            "--warmup" => args.warmup = num(&value)?,
            "--layers" => args.layers = num(&value)?.max(1),
            "--kv" => args.kv = value.split(',').map(str::to_string).collect(),
            "--budget" => args.budget = num(&value)?,
            "--p" => args.p = value.parse().map_err(|e| format!("--p {value}: {e}"))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if let Some(bad) = args.kv.iter().find(|k| *k != "random" && *k != "peaked") {
        return Err(format!("--kv takes random and/or peaked, not {bad}"));
    }
    Ok(args)
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TWILIGHT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    report(&parse_args(std::env::args().skip(1))?)
}

/// Runs every path at every batch and kind of K/V, printing the figures.
pub fn report(args: &Args) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let device = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            println!("this example needs a CUDA GPU: {e}");
            return Ok(());
        }
    };
    let cfg = Config {
        layers: args.layers,
        ..Config::llama_8_layers()
    };
    println!(
        "model: {} layers, hidden {}, {} query / {} KV heads, head_dim {}, MLP {}, vocab {}, f16, random weights",
        cfg.layers, cfg.hidden, cfg.qo_heads, cfg.kv_heads, cfg.head_dim, cfg.intermediate, cfg.vocab
    );
    println!(
        "context {} tokens per request, pages of {} (NHD); sparse: B0 = {}, p = {}; {} tokens timed after {} warm-up",
        args.context, cfg.page_size, args.budget, args.p, args.steps, args.warmup
    );
    let model = Model::random(cfg, &device, 7)?;
    let mut ops = TwilightOps::new(&cfg, &device, Some((args.budget, args.p)))?;
    for kv in &args.kv {
        for &batch in &args.batches {
            run(args, &model, &mut ops, &device, kv, batch)?;
        }
    }
    Ok(())
}

/// Per-token results of one path: latency and attention time (ms) per timed token, and the
/// kept counts of each sparse layer at the last token.
struct PathResult {
    token_ms: Vec<f64>,
    attention_ms: Vec<f64>,
    kept: Vec<Option<Vec<i32>>>,
}

fn run(
    args: &Args,
    model: &Model,
    ops: &mut TwilightOps,
    device: &Device,
    kv: &str,
    batch: usize,
) -> Result<()> {
    let cfg = model.cfg;
    let ctx = args.context;
    let capacity = ctx + args.warmup + args.steps;
    // The attention's q in peaked mode: the generator's, designed for its K.
    let mut peaked_q = None;
    let mut caches = if kv == "peaked" {
        let params = GeneratorParams::preset(Preset::Default, 11);
        println!("\n== K/V peaked: twilight-synth generator, {params}");
        let lens = vec![ctx; batch];
        let plan = generator::plan::<half::f16>(
            &params,
            &lens,
            cfg.kv_heads,
            cfg.group(),
            cfg.page_size,
            cfg.head_dim,
            twilight::KvLayout::Nhd,
        )
        .map_err(candle_core::Error::wrap)?;
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for b in 0..batch {
            let (kb, vb) = plan
                .request_rows::<half::f16>(b)
                .map_err(candle_core::Error::wrap)?;
            k.extend(kb);
            v.extend(vb);
        }
        let dims = (batch, ctx, cfg.kv_heads, cfg.head_dim);
        let (k, v) = (
            Tensor::from_vec(k, dims, device)?,
            Tensor::from_vec(v, dims, device)?,
        );
        peaked_q = Some(
            Tensor::from_slice(&plan.q, (batch, cfg.qo_heads, cfg.head_dim), device)?
                .to_dtype(DType::F16)?,
        );
        Caches::new(cfg, batch, capacity, device, &mut |_| {
            Ok((k.clone(), v.clone()))
        })?
    } else {
        println!("\n== K/V random: normal K and V (what random weights give: flat attention)");
        Caches::new(cfg, batch, capacity, device, &mut |_| {
            let dims = (batch, ctx, cfg.kv_heads, cfg.head_dim);
            Ok((
                Tensor::randn(0f32, 1.0, dims, device)?.to_dtype(DType::F16)?,
                Tensor::randn(0f32, 1.0, dims, device)?.to_dtype(DType::F16)?,
            ))
        })?
    };
    ops.build_sidecars(&mut caches, ctx)?;
    device.synchronize()?;
    println!("batch {batch}:");
    if peaked_q.is_none() {
        // The model's own q: both paths compute the same attention, up to f16 rounding.
        let (candle, twilight) = model::first_logits(model, &mut caches, ops, ctx, device)?;
        let diff = (candle.clone() - twilight)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        let scale = candle.abs()?.max_all()?.to_scalar::<f32>()?;
        println!("  first logits, candle attention vs twilight dense: max |diff| {diff:.4} of max |logit| {scale:.3}");
    }
    println!(
        "  {:<52} {:>10} {:>14} {:>7}   kept tokens per (request, KV head), sparse layers: mean [min, max]",
        "attention path", "token ms", "attention ms", "share"
    );
    for path in Path::ALL {
        let r = decode(
            args,
            model,
            ops,
            &mut caches,
            device,
            path,
            peaked_q.as_ref(),
        )?;
        let token = median(&r.token_ms);
        let attention = median(&r.attention_ms);
        let kept: Vec<String> = r
            .kept
            .iter()
            .enumerate()
            .filter_map(|(l, k)| k.as_ref().map(|k| (l, k)))
            .map(|(l, k)| {
                let mean = k.iter().map(|&x| x as f64).sum::<f64>() / k.len().max(1) as f64;
                let (lo, hi) = (k.iter().min().unwrap_or(&0), k.iter().max().unwrap_or(&0));
                format!("L{l} {mean:.0} [{lo}, {hi}]")
            })
            .collect();
        println!(
            "  {:<52} {:>10.3} {:>14.3} {:>6.1}%   {}",
            path.name(),
            token,
            attention,
            100.0 * attention / token,
            if kept.is_empty() {
                "-".to_string()
            } else {
                kept.join(", ")
            }
        );
    }
    Ok(())
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Decodes `warmup + steps` tokens greedily through `path`, from position `context` on.
fn decode(
    args: &Args,
    model: &Model,
    ops: &mut TwilightOps,
    caches: &mut Caches,
    device: &Device,
    path: Path,
    peaked_q: Option<&Tensor>,
) -> Result<PathResult> {
    let cfg = model.cfg;
    let batch = caches.batch;
    let stream = device.as_cuda_device()?.cuda_stream();
    let ctx = stream.context().clone();
    let event = || {
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(candle_core::Error::wrap)
    };
    let events: Vec<_> = (0..2 * cfg.layers)
        .map(|_| event())
        .collect::<Result<_>>()?;
    let mut tokens = Tensor::from_vec((0..batch as u32).collect::<Vec<_>>(), batch, device)?;
    let mut result = PathResult {
        token_ms: Vec::new(),
        attention_ms: Vec::new(),
        kept: vec![None; cfg.layers],
    };
    let total = args.warmup + args.steps;
    for step in 0..total {
        let pos = args.context + step;
        let positions = vec![pos; batch];
        device.synchronize()?;
        let start = Instant::now();
        let table = match path {
            Path::Candle => None,
            _ => Some(caches.table(pos + 1, device)?),
        };
        let mut kept_now: Vec<Option<Tensor>> = vec![None; cfg.layers];
        let record = |i: usize| events[i].record(&stream).map_err(candle_core::Error::wrap);
        let logits = model.step(&tokens, &positions, &mut |l, q, k, v| {
            let q = peaked_q.unwrap_or(q);
            record(2 * l)?;
            let o = match (&table, path) {
                (Some(table), Path::TwilightDense | Path::TwilightSparse) => {
                    let sparse = path == Path::TwilightSparse;
                    let (o, kept) =
                        twilight_attention(ops, caches, table, sparse, l, pos, q, k, v)?;
                    kept_now[l] = kept;
                    o
                }
                _ => candle_attention(caches, l, pos, q, k, v)?,
            };
            record(2 * l + 1)?;
            Ok(o)
        })?;
        tokens = model::argmax(&logits)?;
        device.synchronize()?;
        let token_ms = start.elapsed().as_secs_f64() * 1e3;
        let mut attention_ms = 0.0;
        for l in 0..cfg.layers {
            attention_ms += events[2 * l]
                .elapsed_ms(&events[2 * l + 1])
                .map_err(candle_core::Error::wrap)? as f64;
        }
        if step >= args.warmup {
            result.token_ms.push(token_ms);
            result.attention_ms.push(attention_ms);
        }
        if step + 1 == total {
            for (l, k) in kept_now.iter().enumerate() {
                if let Some(k) = k {
                    result.kept[l] = Some(k.flatten_all()?.to_vec1::<i32>()?);
                }
            }
        }
    }
    // Only twilight's sparse layers report a budget.
    if path != Path::TwilightSparse {
        result.kept = vec![None; cfg.layers];
    }
    Ok(result)
}
