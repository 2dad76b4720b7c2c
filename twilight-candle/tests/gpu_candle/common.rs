//! Helpers shared by the GPU tests.
#![allow(dead_code)]

use candle_core::{DType, Device, IndexOp, Result, Tensor};
use twilight::{CacheShape, HostPageTable, KvLayout};

/// CUDA device 0, or `None` (with the reason printed) where there is none.
/// `TWILIGHT_REQUIRE_GPU=1` turns a missing GPU into a failure.
pub fn gpu_device() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(device) => Some(device),
        Err(e) if std::env::var("TWILIGHT_REQUIRE_GPU").as_deref() != Ok("1") => {
            eprintln!("SKIPPED: no CUDA GPU ({e})");
            None
        }
        Err(e) => panic!("TWILIGHT_REQUIRE_GPU=1 but no GPU: {e}"),
    }
}

/// A new random seed for each run, printed so that a failure can be replayed.
pub fn fresh_seed() -> u64 {
    let seed = rand::Rng::random(&mut rand::rng());
    eprintln!("seed {seed}");
    seed
}

/// Element-wise comparison with an absolute plus relative tolerance; on failure reports the
/// worst element. NaN never passes.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst: Option<(usize, f32)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let excess = (g - w).abs() - (atol + rtol * w.abs());
        // NaN compares false everywhere, so it fails `within`.
        let within = excess <= 0.0;
        if !within && worst.is_none_or(|(_, e)| excess.is_nan() || excess > e) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: element {i}: got {}, expected {}, tolerance {atol} + {rtol} * |expected|",
            got[i], want[i]
        );
    }
}

/// [`assert_close`] with a tolerance that scales with the expected output's largest value
/// (an f16 output carries about 3 significant digits).
pub fn assert_close_to_norm(what: &str, got: &[f32], want: &[f32]) {
    let norm = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1.0);
    assert_close(what, got, want, 2e-3 * norm, 8e-3);
}

/// A host array as a device tensor of `dtype` (values already exact in it).
pub fn upload(values: &[f32], dims: &[usize], dtype: DType, device: &Device) -> Tensor {
    Tensor::from_slice(values, dims.to_vec(), device)
        .and_then(|t| t.to_dtype(dtype))
        .unwrap()
}

/// A tensor's values as f32 on the host, flattened.
pub fn download(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .unwrap()
}

/// The pool dims of `shape` in its layout.
pub fn pool_dims(shape: &CacheShape) -> [usize; 4] {
    match shape.layout {
        KvLayout::Hnd => [
            shape.num_pages,
            shape.num_kv_heads,
            shape.page_size,
            shape.head_dim,
        ],
        KvLayout::Nhd => [
            shape.num_pages,
            shape.page_size,
            shape.num_kv_heads,
            shape.head_dim,
        ],
    }
}

/// Attention written with candle's own ops (gather, matmul, softmax, in f32) over a paged
/// pool: for each request, its tokens' K and V rows gathered through the page table, then
/// `softmax(sm_scale * q k^T) v` for every query head of each KV head's group. Returns `o
/// [batch, qo_heads, head_dim]` and `lse [batch, qo_heads]`.
pub fn candle_paged_attention(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    shape: &CacheShape,
    table: &HostPageTable,
    sm_scale: f64,
) -> Result<(Tensor, Tensor)> {
    let (kvh, d) = (shape.num_kv_heads, shape.head_dim);
    // Token rows [slots, kv_heads, head_dim], whatever the page layout.
    let rows = |pool: &Tensor| -> Result<Tensor> {
        let pool = pool.to_dtype(DType::F32)?;
        let pool = match shape.layout {
            KvLayout::Hnd => pool.transpose(1, 2)?.contiguous()?,
            KvLayout::Nhd => pool,
        };
        pool.reshape((shape.num_pages * shape.page_size, kvh, d))
    };
    let (k_rows, v_rows) = (rows(k_pool)?, rows(v_pool)?);
    let q = q.to_dtype(DType::F32)?;
    let qo = q.dim(1)?;
    let group = qo / kvh;
    let (mut os, mut lses) = (Vec::new(), Vec::new());
    for b in 0..table.batch() {
        let slots: Vec<u32> = table.slots_of(b).map(|s| s as u32).collect();
        let len = slots.len();
        let ids = Tensor::from_vec(slots, len, q.device())?;
        // [kv_heads, len, d]
        let k = k_rows
            .index_select(&ids, 0)?
            .transpose(0, 1)?
            .contiguous()?;
        let v = v_rows
            .index_select(&ids, 0)?
            .transpose(0, 1)?
            .contiguous()?;
        // [kv_heads, group, d]
        let qb = q.i(b)?.reshape((kvh, group, d))?;
        let logits = (qb.matmul(&k.t()?)? * sm_scale)?; // [kv_heads, group, len]
        let max = logits.max_keepdim(2)?;
        let e = logits.broadcast_sub(&max)?.exp()?;
        let sum = e.sum_keepdim(2)?;
        let o = e.broadcast_div(&sum)?.matmul(&v)?; // [kv_heads, group, d]
        let lse = (sum.log()? + max)?;
        os.push(o.reshape((qo, d))?);
        lses.push(lse.reshape(qo)?);
    }
    Ok((Tensor::stack(&os, 0)?, Tensor::stack(&lses, 0)?))
}
