//! A Llama-shaped decoder in candle with random weights (RMSNorm, RoPE, grouped-query
//! attention, SwiGLU MLP) whose attention runs through one of three paths: candle's own
//! (matmul + softmax over a contiguous cache), twilight dense, or twilight sparse (layers 0 and
//! 1 dense, the others Quest + top-p). Every path reads the same K/V values: the caches are
//! filled from one source, so the paths' outputs differ only by what the attention computes.

use candle_core::{DType, Device, Result, Tensor, D};
use twilight::{HostPageTable, StepParams, VariantSpec};
use twilight_candle::{LayerSidecar, PageTable, TwilightAttention};

/// The shape of the model and of its caches.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub layers: usize,
    pub hidden: usize,
    pub qo_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub rope_theta: f64,
    pub rms_eps: f64,
    pub page_size: usize,
}

impl Config {
    /// 8 layers of Llama-3-8B's shape (32 query / 8 KV heads, head_dim 128).
    pub fn llama_8_layers() -> Config {
        Config {
            layers: 8,
            hidden: 4096,
            qo_heads: 32,
            kv_heads: 8,
            head_dim: 128,
            intermediate: 14336,
            vocab: 32000,
            rope_theta: 500000.0,
            rms_eps: 1e-5,
            page_size: 16,
        }
    }

    pub fn group(&self) -> usize {
        self.qo_heads / self.kv_heads
    }
}

/// Which attention the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Candle,
    TwilightDense,
    TwilightSparse,
}

impl Path {
    pub const ALL: [Path; 3] = [Path::Candle, Path::TwilightDense, Path::TwilightSparse];

    pub fn name(self) -> &'static str {
        match self {
            Path::Candle => "candle (matmul + softmax)",
            Path::TwilightDense => "twilight dense",
            Path::TwilightSparse => "twilight sparse (layers 0-1 dense, Quest + top-p)",
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    mlp_norm: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
}

/// Random weights, scaled so that activations stay of order one through the layers.
pub struct Model {
    pub cfg: Config,
    device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
}

fn linear(out: usize, inp: usize, device: &Device) -> Result<Tensor> {
    Tensor::randn(0f32, (1.0 / inp as f64).sqrt() as f32, (out, inp), device)?.to_dtype(DType::F16)
}

fn ones(n: usize, device: &Device) -> Result<Tensor> {
    Tensor::ones(n, DType::F16, device)
}

impl Model {
    pub fn random(cfg: Config, device: &Device, seed: u64) -> Result<Model> {
        device.set_seed(seed)?;
        let (h, kv) = (cfg.hidden, cfg.kv_heads * cfg.head_dim);
        let mut layers = Vec::with_capacity(cfg.layers);
        for _ in 0..cfg.layers {
            layers.push(Layer {
                attn_norm: ones(h, device)?,
                wq: linear(cfg.qo_heads * cfg.head_dim, h, device)?,
                wk: linear(kv, h, device)?,
                wv: linear(kv, h, device)?,
                wo: linear(h, cfg.qo_heads * cfg.head_dim, device)?,
                mlp_norm: ones(h, device)?,
                w_gate: linear(cfg.intermediate, h, device)?,
                w_up: linear(cfg.intermediate, h, device)?,
                w_down: linear(h, cfg.intermediate, device)?,
            });
        }
        Ok(Model {
            cfg,
            device: device.clone(),
            embed: Tensor::randn(0f32, 1.0, (cfg.vocab, h), device)?.to_dtype(DType::F16)?,
            layers,
            norm: ones(h, device)?,
            lm_head: linear(cfg.vocab, h, device)?,
        })
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let x32 = x.to_dtype(DType::F32)?;
        let scale = (x32.sqr()?.mean_keepdim(D::Minus1)? + self.cfg.rms_eps)?
            .sqrt()?
            .recip()?;
        x32.broadcast_mul(&scale)?
            .to_dtype(DType::F16)?
            .broadcast_mul(weight)
    }

    /// Rotates `x [batch, heads, head_dim]` by the angles of each request's position
    /// (`cos`/`sin`: `[batch, 1, head_dim / 2]`), pairing channel i with i + head_dim / 2.
    fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let half = x.dim(D::Minus1)? / 2;
        let x = x.to_dtype(DType::F32)?;
        let (x1, x2) = (
            x.narrow(D::Minus1, 0, half)?,
            x.narrow(D::Minus1, half, half)?,
        );
        let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
        let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
        Tensor::cat(&[r1, r2], D::Minus1)?.to_dtype(DType::F16)
    }

    /// cos and sin of every request's position: `[batch, 1, head_dim / 2]` each.
    fn rope_tables(&self, positions: &[usize]) -> Result<(Tensor, Tensor)> {
        let half = self.cfg.head_dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for i in 0..half {
                let freq = self
                    .cfg
                    .rope_theta
                    .powf(-(2.0 * i as f64) / self.cfg.head_dim as f64);
                let angle = p as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let shape = (positions.len(), 1, half);
        Ok((
            Tensor::from_vec(cos, shape, &self.device)?,
            Tensor::from_vec(sin, shape, &self.device)?,
        ))
    }

    /// One decode token for every request: `tokens [batch]` (u32) at `positions` (every
    /// request's new token position, equal to its cached length) through `attention`, which
    /// appends the new K/V and attends for one layer. Returns the logits `[batch, vocab]` (f32).
    pub fn step(
        &self,
        tokens: &Tensor,
        positions: &[usize],
        attention: &mut dyn FnMut(usize, &Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let batch = positions.len();
        let (cos, sin) = self.rope_tables(positions)?;
        let mut x = self.embed.embedding(tokens)?; // [batch, hidden]
        for (l, layer) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &layer.attn_norm)?;
            let q = h
                .matmul(&layer.wq.t()?)?
                .reshape((batch, cfg.qo_heads, cfg.head_dim))?;
            let k = h
                .matmul(&layer.wk.t()?)?
                .reshape((batch, cfg.kv_heads, cfg.head_dim))?;
            let v = h
                .matmul(&layer.wv.t()?)?
                .reshape((batch, cfg.kv_heads, cfg.head_dim))?;
            let (q, k) = (Self::rope(&q, &cos, &sin)?, Self::rope(&k, &cos, &sin)?);
            let o = attention(l, &q, &k, &v.contiguous()?)?;
            let o = o.reshape((batch, cfg.qo_heads * cfg.head_dim))?;
            x = (x + o.matmul(&layer.wo.t()?)?)?;
            let h = self.rms_norm(&x, &layer.mlp_norm)?;
            let gate = h.matmul(&layer.w_gate.t()?)?.silu()?;
            let up = h.matmul(&layer.w_up.t()?)?;
            x = (x + (gate * up)?.matmul(&layer.w_down.t()?)?)?;
        }
        let x = self.rms_norm(&x, &self.norm)?;
        x.matmul(&self.lm_head.t()?)?.to_dtype(DType::F32)
    }
}

/// The K/V of every layer, for all three paths: candle's contiguous cache `[batch, kv_heads,
/// capacity, head_dim]` and twilight's NHD page pool `[pages, page_size, kv_heads, head_dim]`,
/// request b owning pages `b * pages_per_request ..` in order, plus the sparse layers'
/// sidecars. The pool's pages and the contiguous cache hold the same values.
pub struct Caches {
    pub cfg: Config,
    pub batch: usize,
    /// Token slots per request (a multiple of the page size).
    pub capacity: usize,
    pub candle_k: Vec<Tensor>,
    pub candle_v: Vec<Tensor>,
    pub pool_k: Vec<Tensor>,
    pub pool_v: Vec<Tensor>,
    pub sidecars: Vec<Option<LayerSidecar>>,
}

impl Caches {
    /// Caches of `capacity` tokens per request holding the prefill tokens of layer `l`'s K/V
    /// from `fill(l)`, `[batch, prefill, kv_heads, head_dim]` f16 tensors.
    pub fn new(
        cfg: Config,
        batch: usize,
        capacity: usize,
        device: &Device,
        fill: &mut dyn FnMut(usize) -> Result<(Tensor, Tensor)>,
    ) -> Result<Caches> {
        let capacity = capacity.div_ceil(cfg.page_size) * cfg.page_size;
        let pages = batch * capacity / cfg.page_size;
        let (mut candle_k, mut candle_v, mut pool_k, mut pool_v) = (vec![], vec![], vec![], vec![]);
        for l in 0..cfg.layers {
            let (k, v) = fill(l)?;
            for (rows, candle, pool) in [
                (&k, &mut candle_k, &mut pool_k),
                (&v, &mut candle_v, &mut pool_v),
            ] {
                let all = Tensor::zeros(
                    (batch, capacity, cfg.kv_heads, cfg.head_dim),
                    DType::F16,
                    device,
                )?;
                all.slice_set(rows, 1, 0)?;
                candle.push(all.transpose(1, 2)?.contiguous()?);
                pool.push(all.reshape((pages, cfg.page_size, cfg.kv_heads, cfg.head_dim))?);
            }
        }
        Ok(Caches {
            cfg,
            batch,
            capacity,
            candle_k,
            candle_v,
            pool_k,
            pool_v,
            sidecars: (0..cfg.layers).map(|_| None).collect(),
        })
    }

    pub fn pages_per_request(&self) -> usize {
        self.capacity / self.cfg.page_size
    }

    /// The slot of token `t` of request `b`.
    pub fn slot(&self, b: usize, t: usize) -> i32 {
        let ps = self.cfg.page_size;
        ((b * self.pages_per_request() + t / ps) * ps + t % ps) as i32
    }

    /// The page table of requests holding `len` tokens each.
    pub fn table(&self, len: usize, device: &Device) -> Result<PageTable> {
        let ppr = self.pages_per_request();
        let pages: Vec<Vec<i32>> = (0..self.batch)
            .map(|b| {
                ((b * ppr) as i32..(b * ppr + len.div_ceil(self.cfg.page_size)) as i32).collect()
            })
            .collect();
        let rows: Vec<(&[i32], usize)> = pages.iter().map(|p| (p.as_slice(), len)).collect();
        let num_pages = self.batch * ppr;
        let host = HostPageTable::from_requests(&rows, self.cfg.page_size, num_pages)
            .map_err(candle_core::Error::wrap)?;
        PageTable::from_host(&host, num_pages, device)
    }
}

/// The twilight ops of a model: one per distinct variant, the sparse layers' sidecars in the
/// caches.
pub struct TwilightOps {
    pub dense: TwilightAttention,
    pub sparse: Option<TwilightAttention>,
    pub sparse_layers: Vec<bool>,
}

impl TwilightOps {
    /// `budget`/`p` for the sparse variant; `None` runs every layer dense.
    pub fn new(cfg: &Config, device: &Device, sparse: Option<(usize, f32)>) -> Result<TwilightOps> {
        let name = |sel: &str| {
            format!(
                "ps{}_hd{}_f16_g{}_nhd_{sel}",
                cfg.page_size,
                cfg.head_dim,
                cfg.group()
            )
        };
        let spec = |s: String| s.parse::<VariantSpec>().map_err(candle_core::Error::wrap);
        let dense = TwilightAttention::dense(device, spec(name("full_none"))?, None)?;
        let sparse = match sparse {
            Some((budget, p)) => Some(TwilightAttention::new(
                device,
                spec(name("quest_topp"))?,
                StepParams {
                    budget,
                    p,
                    sm_scale: None,
                },
            )?),
            None => None,
        };
        let sparse_layers = (0..cfg.layers)
            .map(|l| sparse.is_some() && l >= 2)
            .collect();
        Ok(TwilightOps {
            dense,
            sparse,
            sparse_layers,
        })
    }

    /// Derives the sparse layers' sidecars from the K already in the pools.
    pub fn build_sidecars(&self, caches: &mut Caches, prefill: usize) -> Result<()> {
        let Some(sparse) = &self.sparse else {
            return Ok(());
        };
        let slots: Vec<i32> = (0..caches.batch)
            .flat_map(|b| (0..prefill).map(move |t| (b, t)))
            .map(|(b, t)| caches.slot(b, t))
            .collect();
        for l in 0..caches.cfg.layers {
            if self.sparse_layers[l] {
                let mut sidecar = sparse.new_sidecar(&caches.pool_k[l])?;
                sparse.update_sidecar(
                    &caches.pool_k[l],
                    &caches.pool_v[l],
                    &mut sidecar,
                    &slots,
                )?;
                caches.sidecars[l] = Some(sidecar);
            }
        }
        Ok(())
    }
}

/// Candle's own attention for one layer: appends the new K/V at `pos` of the contiguous cache,
/// then `softmax(q k^T / sqrt(d)) v` over the first `pos + 1` tokens (softmax in f32).
pub fn candle_attention(
    caches: &Caches,
    l: usize,
    pos: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<Tensor> {
    let cfg = &caches.cfg;
    let batch = q.dim(0)?;
    caches.candle_k[l].slice_set(&k.unsqueeze(2)?, 2, pos)?;
    caches.candle_v[l].slice_set(&v.unsqueeze(2)?, 2, pos)?;
    let len = pos + 1;
    let kc = caches.candle_k[l].narrow(2, 0, len)?;
    let vc = caches.candle_v[l].narrow(2, 0, len)?;
    let q = q.reshape((batch, cfg.kv_heads, cfg.group(), cfg.head_dim))?;
    let scale = 1.0 / (cfg.head_dim as f64).sqrt();
    let logits = (q.matmul(&kc.t()?)?.to_dtype(DType::F32)? * scale)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let e = logits.broadcast_sub(&max)?.exp()?;
    let w = e
        .broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        .to_dtype(DType::F16)?;
    w.matmul(&vc)?.reshape((batch, cfg.qo_heads, cfg.head_dim))
}

/// Twilight's attention for one layer: one launch appends the new K/V (and the sidecar of a
/// sparse layer) at each request's slot `pos`, then the step over the table. With `sparse`
/// off every layer runs dense (the twilight dense path). Returns o and the kept counts of a
/// sparse layer.
#[allow(clippy::too_many_arguments)]
pub fn twilight_attention(
    ops: &mut TwilightOps,
    caches: &mut Caches,
    table: &PageTable,
    sparse: bool,
    l: usize,
    pos: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<(Tensor, Option<Tensor>)> {
    let slots: Vec<i32> = (0..caches.batch).map(|b| caches.slot(b, pos)).collect();
    let sparse = sparse && ops.sparse_layers[l];
    let attn = match (&mut ops.sparse, sparse) {
        (Some(s), true) => s,
        _ => &mut ops.dense,
    };
    let sidecar = if sparse {
        caches.sidecars[l].as_mut()
    } else {
        None
    };
    attn.append(&caches.pool_k[l], &caches.pool_v[l], sidecar, &slots, k, v)?;
    let sidecar = if sparse {
        caches.sidecars[l].as_ref()
    } else {
        None
    };
    let out = attn.forward(q, &caches.pool_k[l], &caches.pool_v[l], sidecar, table)?;
    Ok((out.o, out.kept_counts))
}

/// The greedy next tokens of `logits [batch, vocab]`.
pub fn argmax(logits: &Tensor) -> Result<Tensor> {
    logits.argmax(D::Minus1)
}

/// The first decode token's logits through candle's attention and through twilight dense, on
/// the same caches (random K/V). Each path writes the new token at the same position, so the
/// second sees what the first wrote overwritten with identical values.
pub fn first_logits(
    model: &Model,
    caches: &mut Caches,
    ops: &mut TwilightOps,
    prefill: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let tokens = Tensor::from_vec(
        (0..caches.batch as u32).collect::<Vec<_>>(),
        caches.batch,
        device,
    )?;
    let positions = vec![prefill; caches.batch];
    let candle = model.step(&tokens, &positions, &mut |l, q, k, v| {
        candle_attention(caches, l, prefill, q, k, v)
    })?;
    let table = caches.table(prefill + 1, device)?;
    let twilight = model.step(&tokens, &positions, &mut |l, q, k, v| {
        twilight_attention(ops, caches, &table, false, l, prefill, q, k, v).map(|(o, _)| o)
    })?;
    Ok((candle, twilight))
}
