//! Realistic synthetic attention: q, K and V whose attention is peaked like a real model's.
//!
//! Uniformly random keys give flat attention, and top-p budgets no real head produces. Real
//! heads put their mass on a few attention sinks (the first tokens), a local window (the last
//! tokens), a few retrieval hits anywhere in the context, and spread the rest over a diffuse
//! background. This generator builds exactly that, per (request, KV head):
//!
//! - a random unit direction `u` shared by the group, and per query head `h` a unit direction
//!   `v_h` orthogonal to `u` and to the other heads' directions, all supported on the same
//!   `signal_channels` random channels (real keys put what q reads in a few large channels;
//!   spread over every channel, the structure would drown in per-channel noise and no page
//!   selector such as Quest could find the heavy pages);
//! - `q_h = c * sqrt(d) * (rho * u + sqrt(1 - rho^2) * v_h) + c * noise`, with `c` the
//!   `concentration` and `rho` the `group_agreement`;
//! - `k_t = spread_t * n_t + s_t * u + sum_h s'_{t,h} * v_h` with `n_t` standard normal
//!   noise, `spread_t` the `background_spread` (times `special_noise` for sink, window and hit
//!   tokens), `s_t` the strength of the token's class (sink, window, shared hit; background =
//!   0) and `s'_{t,h}` that of a hit private to head `h`; V is standard normal.
//!
//! With `sm_scale = 1/sqrt(d)` (the scale the generator is designed for) the logit of token t
//! for head h is about `c * (B_t + spread_t * z_t)` where `z_t ~ N(0, 1)` and `B_t` is the
//! designed boost of its class in natural-log units (0 for the background). The boosts are set
//! so that, at concentration 1, the classes hold the `*_share` fractions of the attention mass
//! in expectation, at every context length: e.g. `B_sink = ln(sink_share / background_share *
//! N_bg / sinks * exp(spread^2 / 2 - spread_special^2 / 2))`, clamped at 0. The background
//! holds what the other shares leave. Window tokens decay linearly in logit by `window_decay`
//! from the newest to the oldest.
//!
//! **`concentration`** multiplies every logit (it is an inverse temperature): higher is more
//! peaked, 0 is uniform attention. The presets share the structure and differ in it only.
//! Oracle top-p budgets at p = 0.9 (exact weights), 32k tokens, d = 128, as fractions of the
//! context (mean over heads, with the 10th-90th percentile of heads):
//!
//! | preset | concentration | budget at p = 0.9 |
//! |---|---|---|
//! | `focused` | 1.25 | 0.23% (0.14-0.33%), ~75 tokens |
//! | `default` | 1.0 | 2.6% (1.8-3.4%), inside the published 1-5% |
//! | `diffuse` | 0.5 | 49% (48-49%) |
//! | `uniform` | (1.0) | 61%: plain normal q and K (K scaled by the concentration) |
//!
//! The knob is steep around the default (0.9 -> 6.9%, 1.1 -> 0.8%), as real heads are.
//!
//! Random numbers come from SplitMix64 streams derived from the seed per page and per
//! (request, KV head), and normals from a 16-bit inverse-CDF table, so generation is fast,
//! parallel, and the same for a seed on every machine and thread count.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use rand::rngs::StdRng;
use rand::SeedableRng;

use twilight::element::round_to;
use twilight::{CacheShape, HostPageTable, KvElement, KvLayout};

use crate::error::{Error, Result};
use crate::synthetic::{check_request, shuffled_page_table, step_sizes, SyntheticStep};

/// A named attention shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Preset {
    /// Peaked like typical heads of long-context models: top-p budget at p = 0.9 of 1-5% of the
    /// context at 32k tokens.
    Default,
    /// More peaked: about a hundred tokens at 32k (the published LongBench budgets).
    Focused,
    /// Flat: about half of the context is needed to reach p = 0.9.
    Diffuse,
    /// Plain normal q and K, no structure (what `SyntheticStep::random` gives).
    Uniform,
}

impl Preset {
    pub const ALL: [Preset; 4] = [
        Preset::Default,
        Preset::Focused,
        Preset::Diffuse,
        Preset::Uniform,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Default => "default",
            Preset::Focused => "focused",
            Preset::Diffuse => "diffuse",
            Preset::Uniform => "uniform",
        }
    }

    /// The concentration the preset uses.
    pub fn concentration(self) -> f64 {
        match self {
            Preset::Default => 1.0,
            Preset::Focused => 1.25,
            Preset::Diffuse => 0.5,
            Preset::Uniform => 1.0,
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Preset> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                Error::Parameter(format!(
                    "unknown attention preset `{s}`; expected one of default, focused, diffuse, uniform"
                ))
            })
    }
}

/// Every parameter of the generator. `Display` prints all of them, on one line.
#[derive(Clone, Debug, PartialEq)]
pub struct GeneratorParams {
    /// The preset these values came from; [`Preset::Uniform`] switches the structure off.
    pub preset: Preset,
    /// Inverse temperature of every logit: higher = more peaked (for `uniform`, the standard
    /// deviation of the logits).
    pub concentration: f64,
    /// Attention sinks: the first `sinks` tokens of every request.
    pub sinks: usize,
    /// Local window: the last `window` tokens of every request.
    pub window: usize,
    /// Logit drop across the window, from the newest token to the oldest.
    pub window_decay: f64,
    /// Retrieval hits per (request, KV head), shared by the group's query heads.
    pub hits: usize,
    /// Retrieval hits private to each query head.
    pub head_hits: usize,
    /// Shares of the attention mass (at concentration 1) held by the sinks, the window, the
    /// shared hits and each head's private hits; the background holds the rest.
    pub sink_share: f64,
    pub window_share: f64,
    pub hit_share: f64,
    pub head_hit_share: f64,
    /// Standard deviation of the background logits (at concentration 1).
    pub background_spread: f64,
    /// Noise of the keys of sinks, window and hit tokens relative to the background's, so
    /// that the few tokens of these classes hold their designed shares reliably.
    pub special_noise: f64,
    /// How much of each query head's direction is shared by its group (`rho`, in (0, 1)):
    /// the background logits of two heads of a group correlate as `rho^2`.
    pub group_agreement: f64,
    /// Standard deviation of the per-channel noise of q, relative to its per-channel size.
    pub query_noise: f64,
    /// Channels that carry the attention structure (the directions `u` and `v_h` live in a
    /// random set of this many channels per group). Real keys concentrate what q reads in a
    /// few large channels; with the structure spread over every channel, per-channel page
    /// bounds (Quest's) would be ruled by noise and no page selector would find the heavy
    /// pages. Clamped to head_dim.
    pub signal_channels: usize,
    pub seed: u64,
}

impl GeneratorParams {
    /// The parameters of a preset.
    pub fn preset(preset: Preset, seed: u64) -> GeneratorParams {
        GeneratorParams {
            preset,
            concentration: preset.concentration(),
            sinks: 4,
            window: 64,
            window_decay: 2.0,
            hits: 8,
            head_hits: 2,
            sink_share: 0.32,
            window_share: 0.22,
            hit_share: 0.10,
            head_hit_share: 0.04,
            background_spread: 2.5,
            special_noise: 0.25,
            group_agreement: 0.8,
            query_noise: 0.1,
            signal_channels: 8,
            seed,
        }
    }

    /// The share of the mass the background holds at concentration 1.
    pub fn background_share(&self) -> f64 {
        1.0 - self.sink_share - self.window_share - self.hit_share - self.head_hit_share
    }

    /// # Errors
    /// [`Error::Parameter`] naming the first bad value.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Parameter(format!("generator: {m}")));
        let finite_nonneg = [
            ("concentration", self.concentration),
            ("window_decay", self.window_decay),
            ("sink_share", self.sink_share),
            ("window_share", self.window_share),
            ("hit_share", self.hit_share),
            ("head_hit_share", self.head_hit_share),
            ("background_spread", self.background_spread),
            ("special_noise", self.special_noise),
            ("query_noise", self.query_noise),
        ];
        for (name, x) in finite_nonneg {
            if !(x.is_finite() && x >= 0.0) {
                return bad(format!("{name} = {x} must be finite and >= 0"));
            }
        }
        if self.background_share() <= 0.0 {
            return bad(format!(
                "the shares of sinks, window and hits sum to {} and leave no background",
                1.0 - self.background_share()
            ));
        }
        if !(self.group_agreement > 0.0 && self.group_agreement < 1.0) {
            return bad(format!(
                "group_agreement = {} must be in (0, 1)",
                self.group_agreement
            ));
        }
        Ok(())
    }
}

impl Default for GeneratorParams {
    fn default() -> Self {
        GeneratorParams::preset(Preset::Default, 0)
    }
}

impl fmt::Display for GeneratorParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Destructured so that a new field does not compile until it is printed.
        let GeneratorParams {
            preset,
            concentration,
            sinks,
            window,
            window_decay,
            hits,
            head_hits,
            sink_share,
            window_share,
            hit_share,
            head_hit_share,
            background_spread,
            special_noise,
            group_agreement,
            query_noise,
            signal_channels,
            seed,
        } = self;
        if *preset == Preset::Uniform {
            return write!(
                f,
                "attention=uniform (normal q and K, K scaled by concentration) \
                 concentration={concentration} seed={seed}"
            );
        }
        write!(
            f,
            "attention={preset} concentration={concentration} sinks={sinks} window={window} \
             window_decay={window_decay} hits={hits} head_hits={head_hits} \
             shares(sink/window/hits/head_hits/background)={sink_share}/{window_share}/\
             {hit_share}/{head_hit_share}/{:.4} background_spread={background_spread} \
             special_noise={special_noise} group_agreement={group_agreement} query_noise={query_noise} \
             signal_channels={signal_channels} seed={seed}",
            self.background_share()
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Random numbers.

/// SplitMix64: tiny, fast, and fixed forever (unlike `SmallRng`), so outputs are reproducible.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0); the modulo bias is irrelevant here.
    fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() >> 11) % n as u64) as usize
    }
    /// Fills `out` with standard normals times `scale` (four per 64-bit draw).
    fn fill_normal(&mut self, out: &mut [f32], scale: f32) {
        let table = normal_table();
        for chunk in out.chunks_mut(4) {
            let mut bits = self.next_u64();
            for x in chunk {
                *x = scale * table[(bits & 0xFFFF) as usize];
                bits >>= 16;
            }
        }
    }
}

/// A seed for one stream, from the user's seed and the stream's coordinates.
fn derive_seed(seed: u64, parts: &[u64]) -> u64 {
    let mut h = SplitMix64::new(seed ^ 0x7477_696C_6967_6874).next_u64();
    for &p in parts {
        h = SplitMix64::new(h ^ p.wrapping_mul(0xD6E8_FEB8_6659_FD93)).next_u64();
    }
    h
}

const STREAM_GROUP: u64 = 1;
const STREAM_PAGE: u64 = 2;

/// The normal quantiles at `(i + 0.5) / 65536`: a 16-bit draw indexes a standard normal.
fn normal_table() -> &'static [f32; 65536] {
    static TABLE: OnceLock<Box<[f32; 65536]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = Box::new([0f32; 65536]);
        for (i, x) in t.iter_mut().enumerate() {
            *x = inverse_normal_cdf((i as f64 + 0.5) / 65536.0) as f32;
        }
        t
    })
}

/// Acklam's rational approximation of the standard normal quantile (relative error < 1.2e-9).
fn inverse_normal_cdf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    const P_LOW: f64 = 0.02425;
    if p < P_LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p <= 1.0 - P_LOW {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    }
}

// ---------------------------------------------------------------------------------------------
// Structure.

/// The attention structure of one (request, KV head).
struct Group {
    /// Shared unit direction.
    u: Vec<f32>,
    /// Per query head unit direction, orthogonal to `u` and to each other.
    v: Vec<Vec<f32>>,
    /// Strength along `u` per token of the request.
    shared: Vec<f32>,
    /// Whether the token is a sink, window or hit token (of any head): its key noise is
    /// scaled by `special_noise`.
    special: Vec<bool>,
    /// Private hits: (token, head, strength along `v[head]`), sorted by token.
    private: Vec<(usize, usize, f32)>,
}

/// `count` distinct values of `lo..hi` (all of them when the range is smaller).
fn distinct_positions(rng: &mut SplitMix64, lo: usize, hi: usize, count: usize) -> Vec<usize> {
    let n = hi.saturating_sub(lo);
    let count = count.min(n);
    if count * 2 >= n {
        // Partial Fisher-Yates over the whole range.
        let mut all: Vec<usize> = (lo..hi).collect();
        for i in 0..count {
            let j = i + rng.below(n - i);
            all.swap(i, j);
        }
        all.truncate(count);
        return all;
    }
    let mut chosen = std::collections::HashSet::with_capacity(count);
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let x = lo + rng.below(n);
        if chosen.insert(x) {
            out.push(x);
        }
    }
    out
}

/// `count` orthonormal unit vectors of `d` channels, all supported on the same random set of
/// `support` channels (clamped to `count..=d`).
fn orthonormal_on_channels(
    rng: &mut SplitMix64,
    d: usize,
    count: usize,
    support: usize,
) -> Vec<Vec<f32>> {
    let m = support.clamp(count, d);
    let channels = distinct_positions(rng, 0, d, m);
    orthonormal(rng, m, count)
        .into_iter()
        .map(|small| {
            let mut full = vec![0f32; d];
            for (&c, &x) in channels.iter().zip(&small) {
                full[c] = x;
            }
            full
        })
        .collect()
}

/// Orthonormal directions: `count` unit vectors of `d` channels (Gram-Schmidt in f64).
fn orthonormal(rng: &mut SplitMix64, d: usize, count: usize) -> Vec<Vec<f32>> {
    let mut basis: Vec<Vec<f64>> = Vec::with_capacity(count);
    let mut buf = vec![0f32; d];
    while basis.len() < count {
        rng.fill_normal(&mut buf, 1.0);
        let mut x: Vec<f64> = buf.iter().map(|&a| a as f64).collect();
        for e in &basis {
            let dot: f64 = x.iter().zip(e).map(|(a, b)| a * b).sum();
            for (a, b) in x.iter_mut().zip(e) {
                *a -= dot * b;
            }
        }
        let norm = x.iter().map(|a| a * a).sum::<f64>().sqrt();
        if norm > 1e-3 {
            basis.push(x.iter().map(|a| a / norm).collect());
        }
    }
    basis
        .into_iter()
        .map(|e| e.into_iter().map(|a| a as f32).collect())
        .collect()
}

/// Builds the structure and the query rows of one (request, KV head).
fn build_group(
    params: &GeneratorParams,
    b: usize,
    g: usize,
    len: usize,
    group_size: usize,
    head_dim: usize,
) -> (Group, Vec<f32>) {
    let mut rng = SplitMix64::new(derive_seed(
        params.seed,
        &[STREAM_GROUP, b as u64, g as u64],
    ));
    let d = head_dim;
    let c = params.concentration as f32;
    if params.preset == Preset::Uniform {
        let mut q = vec![0f32; group_size * d];
        rng.fill_normal(&mut q, 1.0);
        let group = Group {
            u: vec![0.0; d],
            v: Vec::new(),
            shared: Vec::new(),
            special: Vec::new(),
            private: Vec::new(),
        };
        return (group, q);
    }
    let mut dirs = orthonormal_on_channels(&mut rng, d, group_size + 1, params.signal_channels);
    let u = dirs.remove(0);
    let v = dirs;
    let rho = params.group_agreement;
    let rho_priv = (1.0 - rho * rho).sqrt();

    // Classes: sinks first, then the window, then hits in the middle.
    let n_sink = params.sinks.min(len);
    let n_win = params.window.min(len - n_sink);
    let (mid_lo, mid_hi) = (n_sink, len - n_win);
    let n_hits = params.hits.min(mid_hi - mid_lo);
    let per_head = params
        .head_hits
        .min((mid_hi - mid_lo - n_hits) / group_size.max(1));
    let picks = distinct_positions(&mut rng, mid_lo, mid_hi, n_hits + per_head * group_size);
    let n_bg = (len - n_sink - n_win - n_hits - per_head).max(1) as f64;
    let bg_share = params.background_share();
    // E[exp(noise)] of a background token over that of a special one: the shares hold in
    // expectation.
    let sigma = params.background_spread;
    let sigma_special = sigma * params.special_noise;
    let noise_ratio = (sigma * sigma / 2.0 - sigma_special * sigma_special / 2.0).exp();
    let boost = |share: f64, weight: f64| -> f64 {
        if weight <= 0.0 || share <= 0.0 {
            0.0
        } else {
            (share / bg_share * n_bg * noise_ratio / weight)
                .ln()
                .max(0.0)
        }
    };
    let mut shared = vec![0f32; len];
    let b_sink = boost(params.sink_share, n_sink as f64);
    for s in &mut shared[..n_sink] {
        *s = (b_sink / rho) as f32;
    }
    let decay = |delta: usize| params.window_decay * delta as f64 / n_win.max(1) as f64;
    let z_win: f64 = (0..n_win).map(|delta| (-decay(delta)).exp()).sum();
    let b_win = boost(params.window_share, z_win);
    for delta in 0..n_win {
        shared[len - 1 - delta] = ((b_win - decay(delta)).max(0.0) / rho) as f32;
    }
    let b_hit = boost(params.hit_share, n_hits as f64);
    for &t in &picks[..n_hits] {
        shared[t] = (b_hit / rho) as f32;
    }
    let b_head = boost(params.head_hit_share, per_head as f64);
    let mut private: Vec<(usize, usize, f32)> = picks[n_hits..]
        .iter()
        .enumerate()
        .map(|(i, &t)| (t, i / per_head.max(1), (b_head / rho_priv) as f32))
        .collect();
    private.sort_unstable_by_key(|&(t, h, _)| (t, h));
    let mut special = vec![false; len];
    special[..n_sink].fill(true);
    special[len - n_win..].fill(true);
    for &t in &picks {
        special[t] = true;
    }

    // Queries: c * sqrt(d) * (rho u + sqrt(1 - rho^2) v_h) + c * noise.
    let amp = c * (d as f32).sqrt();
    let mut q = vec![0f32; group_size * d];
    rng.fill_normal(&mut q, c * params.query_noise as f32);
    for (h, qh) in q.chunks_mut(d).enumerate() {
        for i in 0..d {
            qh[i] += amp * (rho as f32 * u[i] + rho_priv as f32 * v[h][i]);
        }
    }
    (
        Group {
            u,
            v,
            shared,
            special,
            private,
        },
        q,
    )
}

/// Everything of a generated step but K and V: the page table, q, and the attention structure
/// of every (request, KV head). K and V come from [`GeneratedPlan::request_rows`] one request at
/// a time (so a benchmark can fill a device cache far larger than host memory would hold as a
/// pool), or all at once from [`GeneratedPlan::into_step`]. Either way every page is drawn from
/// its own random stream, so both give the same values.
pub struct GeneratedPlan {
    params: GeneratorParams,
    /// The shape the private tables below were made for; `shape` is public, so it is checked
    /// against this before a page is drawn.
    planned_shape: CacheShape,
    pub shape: CacheShape,
    pub num_qo_heads: usize,
    pub table: HostPageTable,
    /// `[batch, num_qo_heads, head_dim]`, rounded to the dtype.
    pub q: Vec<f32>,
    groups: Vec<Group>,
    /// Per page id: (request, position in its page list, valid tokens), `None` for spare pages.
    owner: Vec<Option<(usize, usize, usize)>>,
}

/// Plans one decode step with realistic attention (see the module documentation). Pages are
/// handed out in the same shuffled order as [`SyntheticStep::random`] with the same seed, with
/// [`crate::synthetic::SPARE_PAGES`] spare pages of noise; every value is rounded to `T`.
///
/// # Errors
/// [`Error::Parameter`] for bad parameters or a head_dim too small for the group's
/// `group_size + 1` orthogonal directions; a page table error for a zero-length request.
#[allow(clippy::too_many_arguments)]
pub fn plan<T: KvElement>(
    params: &GeneratorParams,
    lens: &[usize],
    num_kv_heads: usize,
    group_size: usize,
    page_size: usize,
    head_dim: usize,
    layout: KvLayout,
) -> Result<GeneratedPlan> {
    params.validate()?;
    if page_size == 0 || head_dim == 0 || num_kv_heads == 0 || group_size == 0 {
        return Err(Error::Parameter(format!(
            "generator: page_size {page_size}, head_dim {head_dim}, num_kv_heads {num_kv_heads} \
             and group_size {group_size} must all be positive"
        )));
    }
    if params.preset != Preset::Uniform && head_dim < group_size + 1 {
        return Err(Error::Parameter(format!(
            "generator: head_dim {head_dim} has no room for {} orthogonal directions",
            group_size + 1
        )));
    }
    // The page table, exactly as SyntheticStep::random builds it.
    let (table, num_pages) =
        shuffled_page_table(&mut StdRng::seed_from_u64(params.seed), lens, page_size)?;
    let shape = CacheShape {
        num_pages,
        num_kv_heads,
        page_size,
        head_dim,
        layout,
    };
    let (num_qo_heads, q_len) = step_sizes(&shape, lens.len(), group_size)?;
    let d = head_dim;

    // Structure and q per (request, KV head).
    let mut groups = Vec::with_capacity(lens.len() * num_kv_heads);
    let mut q = vec![0f32; q_len];
    for (b, &len) in lens.iter().enumerate() {
        for g in 0..num_kv_heads {
            let (group, qg) = build_group(params, b, g, len, group_size, d);
            let at = (b * num_qo_heads + g * group_size) * d;
            for (dst, &x) in q[at..at + group_size * d].iter_mut().zip(&qg) {
                *dst = round_to::<T>(x);
            }
            groups.push(group);
        }
    }
    let mut owner: Vec<Option<(usize, usize, usize)>> = vec![None; num_pages];
    for b in 0..lens.len() {
        let pages = table.pages_of(b);
        let n = pages.len();
        for (pos, &page) in pages.iter().enumerate() {
            let valid = if pos + 1 == n {
                table.kv_last_page_len()[b] as usize
            } else {
                page_size
            };
            owner[page as usize] = Some((b, pos, valid));
        }
    }
    Ok(GeneratedPlan {
        params: params.clone(),
        planned_shape: shape,
        shape,
        num_qo_heads,
        table,
        q,
        groups,
        owner,
    })
}

/// Generates one whole decode step: [`plan`], then every page.
///
/// # Errors
/// As [`plan`].
#[allow(clippy::too_many_arguments)]
pub fn generate<T: KvElement>(
    params: &GeneratorParams,
    lens: &[usize],
    num_kv_heads: usize,
    group_size: usize,
    page_size: usize,
    head_dim: usize,
    layout: KvLayout,
) -> Result<SyntheticStep> {
    plan::<T>(
        params,
        lens,
        num_kv_heads,
        group_size,
        page_size,
        head_dim,
        layout,
    )?
    .into_step::<T>()
}

/// Fills one page: `(page index, K of the page, V of the page)`.
type PageFill<'a> = dyn Fn(usize, &mut [f32], &mut [f32]) + Sync + 'a;

/// Runs `fill(page_index, k_page, v_page)` over consecutive page-sized chunks of `k` and `v`
/// on every core.
fn fill_pages_parallel(k: &mut [f32], v: &mut [f32], page_elems: usize, fill: &PageFill) {
    let pages = k.len() / page_elems.max(1);
    if pages == 0 {
        return;
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 16)
        .min(pages);
    let per = pages.div_ceil(threads);
    std::thread::scope(|sc| {
        let work = k
            .chunks_mut(per * page_elems)
            .zip(v.chunks_mut(per * page_elems));
        for (i, (kc, vc)) in work.enumerate() {
            sc.spawn(move || {
                let chunks = kc.chunks_mut(page_elems).zip(vc.chunks_mut(page_elems));
                for (j, (kp, vp)) in chunks.enumerate() {
                    fill(i * per + j, kp, vp);
                }
            });
        }
    });
}

impl GeneratedPlan {
    /// Checks that the public fields still describe the plan: the shape it was made for, and
    /// a table of that pool. Drawing a page indexes private tables sized from them.
    fn check(&self) -> Result<()> {
        if self.shape != self.planned_shape {
            return Err(Error::Parameter(format!(
                "the plan was made for {:?}, its shape is now {:?}",
                self.planned_shape, self.shape
            )));
        }
        if self.table.page_size() != self.shape.page_size {
            return Err(Error::Parameter(format!(
                "the plan's table has pages of {}, its pool pages of {}",
                self.table.page_size(),
                self.shape.page_size
            )));
        }
        self.table.validate(self.shape.num_pages)?;
        Ok(())
    }

    /// Where each (KV head g, token offset off) row starts within a page, at `g * page_size +
    /// off`: the same in every page, since both layouts keep a page's rows together, so page
    /// 0's addresses serve them all.
    fn page_offsets(&self) -> Result<Vec<usize>> {
        let s = &self.shape;
        let mut offsets = Vec::with_capacity(s.num_kv_heads * s.page_size);
        for g in 0..s.num_kv_heads {
            for off in 0..s.page_size {
                offsets.push(s.try_offset(off, g)?);
            }
        }
        Ok(offsets)
    }

    fn page_elems(&self) -> usize {
        self.shape.num_kv_heads * self.shape.page_size * self.shape.head_dim
    }

    /// Draws page `pid` (its K and V in the cache's layout, rounded to `T`) from the page's own
    /// random stream.
    fn fill_page<T: KvElement>(
        &self,
        pid: usize,
        offsets: &[usize],
        kp: &mut [f32],
        vp: &mut [f32],
    ) {
        let params = &self.params;
        let shape = &self.shape;
        let d = shape.head_dim;
        let spread = if params.preset == Preset::Uniform {
            params.concentration as f32
        } else {
            params.background_spread as f32
        };
        let mut rng = SplitMix64::new(derive_seed(params.seed, &[STREAM_PAGE, pid as u64]));
        for g in 0..shape.num_kv_heads {
            for off in 0..shape.page_size {
                let at = offsets[g * shape.page_size + off];
                let krow = &mut kp[at..at + d];
                let token =
                    self.owner[pid]
                        .filter(|&(_, _, valid)| off < valid)
                        .map(|(b, pos, _)| {
                            (
                                &self.groups[b * shape.num_kv_heads + g],
                                pos * shape.page_size + off,
                            )
                        });
                match token {
                    Some((grp, t)) if !grp.special.is_empty() && grp.special[t] => {
                        rng.fill_normal(krow, spread * params.special_noise as f32)
                    }
                    _ => rng.fill_normal(krow, spread),
                }
                if let Some((grp, t)) = token {
                    if !grp.shared.is_empty() {
                        let s = grp.shared[t];
                        if s != 0.0 {
                            for (k, &u) in krow.iter_mut().zip(&grp.u) {
                                *k += s * u;
                            }
                        }
                        let first = grp.private.partition_point(|&(pt, _, _)| pt < t);
                        for &(_, h, s) in grp.private[first..].iter().take_while(|e| e.0 == t) {
                            for (k, &v) in krow.iter_mut().zip(&grp.v[h]) {
                                *k += s * v;
                            }
                        }
                    }
                }
                for k in krow.iter_mut() {
                    *k = round_to::<T>(*k);
                }
                let vrow = &mut vp[at..at + d];
                rng.fill_normal(vrow, 1.0);
                for v in vrow.iter_mut() {
                    *v = round_to::<T>(*v);
                }
            }
        }
    }

    /// The K and V rows of request `b`, `[tokens, num_kv_heads, head_dim]` in token order
    /// (what `append` takes), drawing only that request's pages.
    ///
    /// # Errors
    /// [`Error::Parameter`] when the plan has no request `b`, or when its public fields no
    /// longer describe the plan.
    pub fn request_rows<T: KvElement>(&self, b: usize) -> Result<(Vec<T>, Vec<T>)> {
        check_request(b, self.table.batch())?;
        self.check()?;
        let shape = &self.shape;
        let page_elems = self.page_elems();
        let offsets = self.page_offsets()?;
        let pages = self.table.pages_of(b);
        // A table may name a page twice, so a request's pages are not bounded by the pool's.
        let values = pages.len().checked_mul(page_elems).ok_or_else(|| {
            Error::Parameter(format!(
                "request {b}: {} pages of {page_elems} values do not fit in memory",
                pages.len()
            ))
        })?;
        let mut k = vec![0f32; values];
        let mut v = vec![0f32; values];
        fill_pages_parallel(&mut k, &mut v, page_elems, &|i, kp, vp| {
            self.fill_page::<T>(pages[i] as usize, &offsets, kp, vp)
        });
        // From the pages' own layout to token rows.
        let len = self.table.len_of(b);
        // `len` tokens fit in the pages drawn above.
        let (mut k_rows, mut v_rows) = (Vec::with_capacity(values), Vec::with_capacity(values));
        for t in 0..len {
            let (i, off) = (t / shape.page_size, t % shape.page_size);
            for g in 0..shape.num_kv_heads {
                let at = offsets[g * shape.page_size + off] + i * page_elems;
                k_rows.extend(k[at..at + shape.head_dim].iter().map(|&x| T::from_f32(x)));
                v_rows.extend(v[at..at + shape.head_dim].iter().map(|&x| T::from_f32(x)));
            }
        }
        Ok((k_rows, v_rows))
    }

    /// The whole step: every page of the pool drawn on every core.
    ///
    /// # Errors
    /// [`Error::Parameter`] when the plan's public fields no longer describe the plan.
    pub fn into_step<T: KvElement>(self) -> Result<SyntheticStep> {
        self.check()?;
        let page_elems = self.page_elems();
        let offsets = self.page_offsets()?;
        let mut k = vec![0f32; self.shape.elements()];
        let mut v = vec![0f32; self.shape.elements()];
        fill_pages_parallel(&mut k, &mut v, page_elems, &|pid, kp, vp| {
            self.fill_page::<T>(pid, &offsets, kp, vp)
        });
        Ok(SyntheticStep {
            shape: self.shape,
            num_qo_heads: self.num_qo_heads,
            table: self.table,
            q: self.q,
            k,
            v,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oracle::oracle_top_p_budget;
    use half::f16;

    fn mean(x: &[f64]) -> f64 {
        x.iter().sum::<f64>() / x.len() as f64
    }

    fn budgets(preset: Preset, len: usize, kv_heads: usize, group: usize) -> Vec<f64> {
        let params = GeneratorParams::preset(preset, 7);
        let step =
            generate::<f16>(&params, &[len], kv_heads, group, 16, 128, KvLayout::Hnd).unwrap();
        oracle_top_p_budget(&step, 1.0 / (128f32).sqrt(), 0.9).unwrap()
    }

    #[test]
    fn normal_table_is_standard() {
        let t = normal_table();
        let m = t.iter().map(|&x| x as f64).sum::<f64>() / 65536.0;
        let var = t.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / 65536.0;
        assert!(m.abs() < 1e-6, "{m}");
        assert!((var - 1.0).abs() < 2e-3, "{var}");
        assert!((inverse_normal_cdf(0.975) - 1.959_963_985).abs() < 1e-8);
        assert!((inverse_normal_cdf(0.001) + 3.090_232_306).abs() < 1e-8);
    }

    #[test]
    fn deterministic_for_a_seed_and_different_across_seeds() {
        let params = GeneratorParams::preset(Preset::Default, 3);
        let gen = |p: &GeneratorParams| {
            generate::<f16>(p, &[300, 41], 2, 4, 16, 64, KvLayout::Nhd).unwrap()
        };
        let (a, b) = (gen(&params), gen(&params));
        assert_eq!((&a.q, &a.k, &a.v, &a.table), (&b.q, &b.k, &b.v, &b.table));
        let other = gen(&GeneratorParams {
            seed: 4,
            ..params.clone()
        });
        assert_ne!(a.k, other.k);
        // Same table as SyntheticStep::random for the seed.
        let plain =
            SyntheticStep::random::<f16>(3, &[300, 41], 2, 4, 16, 64, KvLayout::Nhd, 1.0).unwrap();
        assert_eq!(a.table, plain.table);
        // Values are exact in the dtype.
        assert!(a.k.iter().all(|&x| round_to::<f16>(x) == x));
    }

    #[test]
    fn display_prints_every_parameter_and_presets_parse() {
        let text = GeneratorParams::preset(Preset::Focused, 9).to_string();
        for needle in [
            "attention=focused",
            "concentration=1.25",
            "sinks=4",
            "window=64",
            "window_decay=2",
            "hits=8",
            "head_hits=2",
            "background_spread=2.5",
            "special_noise=0.25",
            "shares(sink/window/hits/head_hits/background)=0.32/0.22/0.1/0.04/0.3200",
            "group_agreement=0.8",
            "query_noise=0.1",
            "seed=9",
        ] {
            assert!(text.contains(needle), "{needle} not in {text}");
        }
        for p in Preset::ALL {
            assert_eq!(p.name().parse::<Preset>().unwrap(), p);
        }
        assert!("peaky".parse::<Preset>().is_err());
        let bad = GeneratorParams {
            sink_share: 0.9,
            ..GeneratorParams::default()
        };
        assert!(bad.validate().is_err());
    }

    /// Streaming one request at a time yields exactly the rows of the whole pool, in both
    /// layouts and with partial last pages.
    #[test]
    fn streamed_request_rows_equal_the_pool() {
        for layout in [KvLayout::Hnd, KvLayout::Nhd] {
            for preset in [Preset::Default, Preset::Uniform] {
                let params = GeneratorParams::preset(preset, 9);
                let lens = [37, 16, 1, 300];
                let planned = plan::<f16>(&params, &lens, 2, 2, 16, 64, layout).unwrap();
                let streamed: Vec<_> = (0..lens.len())
                    .map(|b| planned.request_rows::<f16>(b).unwrap())
                    .collect();
                let step = planned.into_step::<f16>().unwrap();
                for (b, (k, v)) in streamed.iter().enumerate() {
                    let (k_pool, v_pool) = step.request_rows::<f16>(b).unwrap();
                    assert_eq!(k, &k_pool, "{layout:?} {preset:?} request {b}: K");
                    assert_eq!(v, &v_pool, "{layout:?} {preset:?} request {b}: V");
                }
            }
        }
    }

    /// The calibration: at 32k tokens and p = 0.9, `default` needs 1-5% of the context, the
    /// other presets fall on their sides of it.
    #[test]
    fn preset_budgets_at_32k() {
        let len = 32768;
        let default = budgets(Preset::Default, len, 2, 4);
        let avg = mean(&default);
        assert!((0.01..=0.05).contains(&avg), "default: {avg}, {default:?}");
        let sane = default
            .iter()
            .filter(|&&x| (0.005..=0.10).contains(&x))
            .count();
        assert!(
            sane * 8 >= default.len() * 7,
            "default per head: {default:?}"
        );
        let focused = mean(&budgets(Preset::Focused, len, 1, 4));
        assert!(focused < avg * 0.6, "focused {focused} vs default {avg}");
        let diffuse = mean(&budgets(Preset::Diffuse, len, 1, 4));
        assert!(diffuse > 0.3, "diffuse {diffuse}");
        let uniform = mean(&budgets(Preset::Uniform, len, 1, 2));
        assert!(uniform > 0.3, "uniform {uniform}");
    }

    /// Prints budgets and generation speed per preset: `cargo test --release -p
    /// twilight-synth --lib generator::tests::report -- --ignored --nocapture`.
    #[test]
    #[ignore = "a report, not a check"]
    fn report() {
        let lens = vec![32768; 8];
        for preset in Preset::ALL {
            let params = GeneratorParams::preset(preset, 1);
            let t0 = std::time::Instant::now();
            let step = generate::<f16>(&params, &lens, 8, 4, 16, 128, KvLayout::Hnd).unwrap();
            let gen_s = t0.elapsed().as_secs_f64();
            let t1 = std::time::Instant::now();
            let mut b = oracle_top_p_budget(&step, 1.0 / (128f32).sqrt(), 0.9).unwrap();
            let oracle_s = t1.elapsed().as_secs_f64();
            b.sort_by(f64::total_cmp);
            println!(
                "{params}\n  8 x 32768 tokens, 8 kv heads x 4, d 128: generate {gen_s:.2} s, \
                 oracle {oracle_s:.2} s; budget at p=0.9: mean {:.4} min {:.4} median {:.4} \
                 max {:.4}",
                mean(&b),
                b[0],
                b[b.len() / 2],
                b[b.len() - 1]
            );
        }
    }
}
