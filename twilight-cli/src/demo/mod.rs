//! `twilight demo`: the main job. Generates a realistic synthetic cache (peaked attention, see
//! [`twilight_synth::generator`]), runs one Select-then-Prune decode step on the GPU when there
//! is one (else on the CPU reference), and reports the kept budget per head, the time per stage, and
//! the error against dense attention beside the errors the algorithm accepts by design (the
//! oracle top-p and the selector alone, see [`baselines`]). `--dump DIR` writes every input and
//! output as NumPy files so that any independent implementation can check the step.
//!
//! `--selector full --pruning none` is dense paged decode through the same structure.
//!
//! `--selector double_sparse(r)` calibrates its `r` channels per KV head on the generated
//! activations first (see [`calibrate`]), or reads them from a channel config (`--channels`).

mod baselines;
mod calibrate;
mod check;
mod cpu;
mod dump;
mod gpu;
mod memory;
mod reference;
mod report;

use std::path::PathBuf;
use std::time::Instant;

use rand::SeedableRng;
use twilight::calibration::{CalibrationMode, ChannelConfig};
use twilight::reference::{DecodeResult, HostKv};
use twilight::twilight_jit::open_device;
use twilight::{
    CacheShape, Dtype, HostPageTable, KvElement, KvLayout, Pruning, SelectionKernel, Selector,
    SparseParams, VariantSpec,
};
use twilight_synth::generator::{generate, GeneratorParams, Preset};
use twilight_synth::synthetic::{ragged_lengths, SyntheticStep};

use crate::{parse, CliResult};

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
    #[arg(long, default_value = "f16", value_parser = parse::dtype)]
    dtype: Dtype,
    /// hnd or nhd.
    #[arg(long, default_value = "hnd", value_parser = parse::layout)]
    layout: KvLayout,
    /// Candidate selector: quest, full (every token) or double_sparse(r) (r label channels per
    /// token, r in 16, 32, 64 and below head_dim; `double_sparse` alone is r = 16; channels
    /// calibrated on the generated activations unless --channels gives a config).
    #[arg(long, default_value = "quest", value_parser = parse::selector)]
    selector: Selector,
    /// Pruning of the candidates: top_p or none. `--selector full --pruning none` is dense.
    #[arg(long, default_value = "top_p", value_parser = parse::pruning)]
    pruning: Pruning,
    /// B0: the selector's token budget per (request, KV head).
    #[arg(long, default_value_t = 2048)]
    budget: usize,
    /// Top-p threshold in (0, 1].
    #[arg(long, default_value_t = 0.85)]
    p: f32,
    /// Attention shape of the generator: default, focused, diffuse or uniform.
    #[arg(long, default_value = "default", value_parser = parse::preset)]
    preset: Preset,
    #[arg(long, default_value_t = 2026)]
    seed: u64,
    /// double_sparse: take the channels from this config (the Double Sparsity tooling's JSON,
    /// or one saved by twilight::calibration) instead of calibrating on the generated step.
    #[arg(long, value_name = "FILE")]
    channels: Option<PathBuf>,
    /// With --channels: the layer whose channels to use, and the mode whose keys to read.
    #[arg(long, default_value_t = 0)]
    channel_layer: usize,
    #[arg(long, default_value = "qk", value_parser = parse::calibration_mode)]
    channel_mode: CalibrationMode,
    /// With --channels: the model's layer count (every layer must be in the file).
    #[arg(long, default_value_t = 32)]
    num_layers: usize,
    /// The top-k selection's kernel: auto, passes or registers (every choice selects the same
    /// candidates).
    #[arg(long, default_value = "auto", value_parser = parse::selection_kernel)]
    selection_kernel: SelectionKernel,
    /// Leave the blocks of kernels that run a block per row packed on the SMs as their
    /// occupancy allows (`Decoder::set_spread_rows(false)`).
    #[arg(long)]
    packed_rows: bool,
    /// Timed runs of each step on the GPU after the checked one (with up to 5 warm-up and 20
    /// instrumented runs); 1 keeps a run under compute-sanitizer short.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
    /// Run the CPU reference even where a GPU is present.
    #[arg(long)]
    cpu: bool,
    /// Refuse a shape whose estimated host or device memory is above this many GiB (default:
    /// 80% of the host's available memory, 90% of the device's free memory).
    #[arg(long, value_name = "GIB", value_parser = parse_gib)]
    max_gib: Option<f64>,
    /// Write every input and output of the step as NumPy files (and params.json) into DIR.
    #[arg(long, value_name = "DIR")]
    dump: Option<PathBuf>,
}

/// What every path runs on: the variant, the step's parameters and the generated inputs.
pub(super) struct Inputs {
    pub spec: VariantSpec,
    pub budget: usize,
    pub p: f32,
    pub sm_scale: f32,
    pub lens: Vec<usize>,
    pub generator: GeneratorParams,
    /// q and the cache as the generator built them (values exact in the dtype).
    pub step: SyntheticStep,
    /// `double_sparse(r)` only: the calibrated channels, `[num_kv_heads][r]`, each ascending.
    pub ds_channels: Option<Vec<Vec<usize>>>,
    /// Where the channels came from: a config file, or `None` when calibrated on the step.
    pub ds_channels_file: Option<PathBuf>,
    pub selection_kernel: SelectionKernel,
    pub spread_rows: bool,
    /// Timed runs of each step on the GPU after the checked one.
    pub runs: usize,
}

impl Inputs {
    pub fn is_dense(&self) -> bool {
        self.spec.selector == Selector::Full && self.spec.pruning == Pruning::None
    }
    pub fn sparse_params(&self) -> SparseParams {
        SparseParams {
            budget: self.budget,
            p: self.p,
            sm_scale: Some(self.sm_scale),
        }
    }
    pub fn batch(&self) -> usize {
        self.lens.len()
    }
    pub fn num_kv_heads(&self) -> usize {
        self.step.shape.num_kv_heads
    }
    pub fn num_qo_heads(&self) -> usize {
        self.step.num_qo_heads
    }
    pub fn group(&self) -> usize {
        self.spec.group_size as usize
    }
    pub fn head_dim(&self) -> usize {
        self.spec.head_dim as usize
    }
}

/// K, V and the page table of a cache on the host.
pub(super) struct HostCache {
    pub shape: CacheShape,
    pub table: HostPageTable,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// What a run produced, on the host.
pub(super) struct Outcome {
    /// `gpu: <name>` or `cpu reference`.
    pub ran_on: String,
    /// The cache the step read when it is not the generator's own (the GPU's, after append,
    /// has its own page assignment).
    pub cache: Option<HostCache>,
    /// `[batch, num_qo_heads, head_dim]`, values of the dtype (GPU) or f32 (CPU reference).
    pub o: Vec<f32>,
    /// `[batch, num_qo_heads]`.
    pub lse: Vec<f32>,
    /// Kept token slots per (request, KV head), ascending.
    pub kept: Vec<Vec<usize>>,
    /// Dense attention (CPU reference, f64) on the same cache, and how long it took.
    pub dense: DecodeResult,
    pub dense_ms: f64,
    /// Other outputs worth comparing with dense attention (label, o, lse).
    pub others: Vec<(String, Vec<f32>, Vec<f32>)>,
    /// Set when a check failed: the demo reports and dumps, then exits with this error.
    pub failure: Option<String>,
}

impl Outcome {
    pub fn kv<'a>(&'a self, x: &'a Inputs) -> HostKv<'a> {
        match &self.cache {
            Some(c) => HostKv {
                shape: c.shape,
                k: &c.k,
                v: &c.v,
            },
            None => x.step.kv(),
        }
    }
    pub fn table<'a>(&'a self, x: &'a Inputs) -> &'a HostPageTable {
        match &self.cache {
            Some(c) => &c.table,
            None => &x.step.table,
        }
    }
}

pub fn run(args: Args) -> CliResult {
    let inputs = prepare(&args)?;
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
    let outcome = match stream {
        Some(stream) => {
            check_device_memory(&args, &stream)?;
            match args.dtype {
                Dtype::F16 => gpu::run::<half::f16>(&stream, &inputs)?,
                Dtype::Bf16 => gpu::run::<half::bf16>(&stream, &inputs)?,
            }
        }
        None => cpu::run(&inputs)?,
    };
    let oracle = baselines::Oracle::compute(&inputs, &outcome)?;
    report::budget(&inputs, &outcome, &oracle);
    let baselines = baselines::compute(&inputs, &outcome, &oracle)?;
    report::errors(&inputs, &outcome, &baselines);
    if let Some(dir) = &args.dump {
        dump::write(dir, &inputs, &outcome)?;
        println!(
            "  dump: every input and output written to {}",
            dir.display()
        );
    }
    match outcome.failure {
        Some(failure) => Err(failure.into()),
        None => Ok(()),
    }
}

fn memory_request(args: &Args, spec: VariantSpec) -> memory::Request {
    memory::Request {
        spec,
        batch: args.batch,
        max_len: args.max_len,
        kv_heads: args.kv_heads,
    }
}

/// Refuses a run whose device estimate is above the limit, before the cache is uploaded.
fn check_device_memory(
    args: &Args,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
) -> Result<(), String> {
    let spec = VariantSpec {
        page_size: args.page_size,
        head_dim: args.head_dim,
        dtype: args.dtype,
        group_size: args.group_size,
        kv_layout: args.layout,
        selector: args.selector,
        pruning: args.pruning,
    };
    let need = memory::estimate(&memory_request(args, spec))?;
    let (free, _) = stream
        .context()
        .mem_get_info()
        .map_err(|e| format!("cannot read the device's free memory: {e}"))?;
    memory::check(
        "device",
        need.device,
        memory::device_limit(args.max_gib, free as f64),
    )
}

/// The request lengths as printed: all of them for a small batch, else the first few.
fn shown_lengths(lens: &[usize]) -> String {
    const SHOWN: usize = 16;
    if lens.len() <= SHOWN {
        return format!("{lens:?}");
    }
    let head: Vec<String> = lens[..SHOWN].iter().map(usize::to_string).collect();
    format!("[{}, ... ({} more)]", head.join(", "), lens.len() - SHOWN)
}

fn parse_gib(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(g) if g.is_finite() && g > 0.0 => Ok(g),
        _ => Err(format!("`{text}` is not a positive number of GiB")),
    }
}

/// Checks the flags, generates the inputs and prints what will run.
fn prepare(args: &Args) -> Result<Inputs, Box<dyn std::error::Error>> {
    let spec = VariantSpec {
        page_size: args.page_size,
        head_dim: args.head_dim,
        dtype: args.dtype,
        group_size: args.group_size,
        kv_layout: args.layout,
        selector: args.selector,
        pruning: args.pruning,
    };
    spec.validate()?;
    if args.batch == 0 || args.max_len == 0 || args.kv_heads == 0 {
        return Err("--batch, --max-len and --kv-heads must be at least 1".into());
    }
    // Before anything is allocated: a shape that cannot fit is refused with its estimate.
    let need = memory::estimate(&memory_request(args, spec))?;
    memory::check("host", need.host, memory::host_limit(args.max_gib))?;
    let sm_scale = 1.0 / (args.head_dim as f32).sqrt();
    SparseParams {
        budget: args.budget,
        p: args.p,
        sm_scale: Some(sm_scale),
    }
    .validate()?;
    if let Some(dir) = &args.dump {
        dump::prepare_dir(dir)?;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let lens = ragged_lengths(&mut rng, args.batch, args.max_len)?;
    let generator = GeneratorParams::preset(args.preset, args.seed);
    let what = if spec.selector == Selector::Full && spec.pruning == Pruning::None {
        "dense paged decode".to_string()
    } else {
        format!(
            "Select-then-Prune sparse decode ({} selector, {} pruning)",
            spec.selector.declared(),
            spec.pruning.declared()
        )
    };
    println!(
        "twilight demo: {what}, variant {spec}\n  batch {} with lengths {}, {} KV heads x group {} = {} query heads, head_dim {}, page_size {}",
        args.batch,
        shown_lengths(&lens),
        args.kv_heads,
        args.group_size,
        args.kv_heads * args.group_size as usize,
        args.head_dim,
        args.page_size
    );
    println!(
        "  B0 = {} tokens, p = {}, sm_scale = {sm_scale:.6} (1/sqrt(head_dim))",
        args.budget, args.p
    );
    println!("  generator: {generator}");
    let start = Instant::now();
    let step = match args.dtype {
        Dtype::F16 => gen::<half::f16>(&generator, &lens, args, spec)?,
        Dtype::Bf16 => gen::<half::bf16>(&generator, &lens, args, spec)?,
    };
    println!(
        "  synthetic cache ({} pages) generated on the host in {:.0} ms",
        step.shape.num_pages,
        start.elapsed().as_secs_f64() * 1e3
    );
    let ds_channels = match (spec.selector, &args.channels) {
        (Selector::DoubleSparse { channels: r }, Some(path)) => Some(load_channels(
            args,
            path,
            r as usize,
            spec.group_size as usize,
        )?),
        (Selector::DoubleSparse { channels: r }, None) => {
            Some(calibrate_channels(&step, r as usize)?)
        }
        (_, Some(_)) => return Err("--channels needs --selector double_sparse(r)".into()),
        _ => None,
    };
    Ok(Inputs {
        spec,
        budget: args.budget,
        p: args.p,
        sm_scale,
        lens,
        generator,
        step,
        ds_channels,
        ds_channels_file: args.channels.clone(),
        selection_kernel: args.selection_kernel,
        spread_rows: !args.packed_rows,
        runs: args.runs as usize,
    })
}

/// The channels of `double_sparse(r)` from a config file: the lists of one layer, one per query
/// head (the Double Sparsity tooling's `q`/`qk` configs) or per KV head, merged per KV head.
fn load_channels(
    args: &Args,
    path: &std::path::Path,
    r: usize,
    group_size: usize,
) -> Result<Vec<Vec<usize>>, Box<dyn std::error::Error>> {
    // The file says whether its lists are per query head or per KV head.
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read channel config {}: {e}", path.display()))?;
    let key = args.channel_mode.json_key(args.channel_layer);
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    let lists = value
        .get(&key)
        .and_then(|v| v.as_array())
        .map(Vec::len)
        .ok_or_else(|| format!("{}: no channel lists under `{key}`", path.display()))?;
    let (qo, kv) = (args.kv_heads * group_size, args.kv_heads);
    if lists != qo && lists != kv {
        return Err(format!(
            "{}: `{key}` has {lists} channel lists; this shape has {qo} query and {kv} KV heads",
            path.display()
        )
        .into());
    }
    let config = ChannelConfig::from_json(
        &text,
        args.channel_mode,
        args.num_layers,
        lists,
        args.head_dim as usize,
        r,
    )
    .map_err(|e| format!("{}: {e}", path.display()))?;
    let channels = config.kv_head_channels(args.channel_layer, kv)?;
    let first: Vec<String> = channels[0].iter().map(usize::to_string).collect();
    println!(
        "  channels: {r} per KV head from {} (layer {}, mode {}, {lists} lists); KV head 0: [{}]",
        path.display(),
        args.channel_layer,
        args.channel_mode,
        first.join(", ")
    );
    Ok(channels)
}

/// Calibrates the channels of `double_sparse(r)` on the step and prints what came out.
fn calibrate_channels(
    step: &SyntheticStep,
    r: usize,
) -> Result<Vec<Vec<usize>>, Box<dyn std::error::Error>> {
    let c = calibrate::calibrate(step, r)?;
    println!(
        "  calibration: {r} channels per KV head ranked by mean |q*k| (mode qk) over {} tokens (up to {} evenly spread positions per request, the request's query at each) in {:.1} ms",
        c.tokens,
        calibrate::TOKENS_PER_REQUEST,
        c.ms
    );
    let (mean, min, _) = report::stats(c.captured.iter().copied());
    let first: Vec<String> = c.channels[0].iter().map(usize::to_string).collect();
    println!(
        "    KV head 0: [{}]; the channels hold {:.1}% of each request's own |q*k| mass (mean over (request, KV head); min {:.1}%)",
        first.join(", "),
        mean * 100.0,
        min * 100.0
    );
    Ok(c.channels)
}

fn gen<T: KvElement>(
    params: &GeneratorParams,
    lens: &[usize],
    args: &Args,
    spec: VariantSpec,
) -> twilight_synth::Result<SyntheticStep> {
    generate::<T>(
        params,
        lens,
        args.kv_heads,
        spec.group_size as usize,
        spec.page_size as usize,
        spec.head_dim as usize,
        spec.kv_layout,
    )
}
