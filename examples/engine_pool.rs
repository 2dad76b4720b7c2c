//! One decode step of a 2-layer model over a KV pool the engine owns.
//!
//! The engine keeps K and V of every layer in one allocation each (`[layers, pages, kv_heads,
//! page_size, head_dim]`, HND), hands out pages itself, writes new tokens with its own copies
//! and keeps a FlashInfer page table on the device. Twilight adds a sidecar for the sparse
//! layer and runs each layer's step over a view of the engine's memory: no copy of the pool.
//! Layer 0 runs dense attention, layer 1 Quest + top-p.
//!
//!     cargo run --release --example engine_pool

use twilight::{
    CacheShape, Decoder, KvLayout, KvPool, KvPoolMut, PageTableView, Sidecar, StepOutputs,
    StepParams, VariantSpec,
};

type E = half::f16;
const LAYERS: usize = 2;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ctx = match twilight::twilight_jit::open_device(0) {
        Ok(ctx) => ctx,
        Err(e) => {
            println!("this example needs a CUDA GPU: {e}");
            return Ok(());
        }
    };
    let stream = ctx.default_stream();

    // The model's attention: layer 0 dense, layer 1 sparse.
    let dense_spec: VariantSpec = "ps16_hd128_f16_g4_hnd_full_none".parse()?;
    let sparse_spec: VariantSpec = "ps16_hd128_f16_g4_hnd_quest_topp".parse()?;
    let dense = Decoder::new(stream.clone(), dense_spec)?;
    let sparse = Decoder::new(stream.clone(), sparse_spec)?;

    // The engine's pool: one layer's shape, every layer in one K and one V allocation.
    let shape = CacheShape {
        num_pages: 256,
        num_kv_heads: 2,
        page_size: 16,
        head_dim: 128,
        layout: KvLayout::Hnd,
    };
    let layer_offset = |layer: usize| layer * shape.elements();
    let mut k_pool = stream.alloc_zeros::<E>(LAYERS * shape.elements())?;
    let mut v_pool = stream.alloc_zeros::<E>(LAYERS * shape.elements())?;
    // Twilight's sidecar for the sparse layer: Quest page bounds and the 4-bit K.
    let mut sidecar = Sidecar::<E>::for_variant(&stream, shape, &sparse_spec)?;

    // Two requests of 1000 and 300 tokens on pages the engine picked (not in order).
    let lens = [1000usize, 300];
    let mut next_page = shape.num_pages as i32;
    let mut pages: Vec<Vec<i32>> = Vec::new();
    let mut slots = Vec::new(); // vLLM's slot mapping: page * page_size + offset
    for &len in &lens {
        let mut mine = Vec::new();
        for t in 0..len {
            if t % shape.page_size == 0 {
                next_page -= 1;
                mine.push(next_page);
            }
            let page = mine[t / shape.page_size];
            slots.push(page * shape.page_size as i32 + (t % shape.page_size) as i32);
        }
        pages.push(mine);
    }

    // Prefill. The engine writes each layer's K/V with its own kernel (here: a scatter on the
    // host and one copy); for the sparse layer twilight then derives its sidecar from the keys
    // the engine wrote, reading them in place.
    for layer in 0..LAYERS {
        let (k, v) = engine_prefill(shape, &slots, layer)?;
        let range = layer_offset(layer)..layer_offset(layer + 1);
        stream.memcpy_htod(&k, &mut k_pool.slice_mut(range.clone()))?;
        stream.memcpy_htod(&v, &mut v_pool.slice_mut(range))?;
    }
    let pool = KvPool::from_layer(shape, &k_pool, &v_pool, layer_offset(1))?;
    sparse.update_sidecar(&pool, &mut sidecar, &slots)?;

    // One decode token per request: for the sparse layer, one twilight launch writes the new
    // rows into the engine's pool and updates the sidecar; the dense layer takes a plain copy.
    let mut new_slots = Vec::new();
    let mut new_lens = lens;
    for (b, len) in new_lens.iter_mut().enumerate() {
        if *len % shape.page_size == 0 {
            next_page -= 1;
            pages[b].push(next_page);
        }
        let page = pages[b][*len / shape.page_size];
        new_slots.push(page * shape.page_size as i32 + (*len % shape.page_size) as i32);
        *len += 1;
    }
    let row = shape.num_kv_heads * shape.head_dim;
    let k_new = stream.clone_htod(&random(new_slots.len() * row, 11))?;
    let v_new = stream.clone_htod(&random(new_slots.len() * row, 12))?;
    let pool = KvPoolMut::from_layer(shape, &mut k_pool, &mut v_pool, layer_offset(1))?
        .with_sidecar(&mut sidecar)?;
    sparse.append_slots(pool, &new_slots, &k_new, &v_new)?;
    // Layer 0's new rows, written by the engine (here: one copy per row of each token).
    let (k_new0, v_new0) = (
        random(new_slots.len() * row, 21),
        random(new_slots.len() * row, 22),
    );
    for (t, &slot) in new_slots.iter().enumerate() {
        for h in 0..shape.num_kv_heads {
            let at = layer_offset(0) + shape.try_offset(slot as usize, h)?;
            let src = (t * shape.num_kv_heads + h) * shape.head_dim;
            let (dst, d) = (at..at + shape.head_dim, shape.head_dim);
            stream.memcpy_htod(&k_new0[src..src + d], &mut k_pool.slice_mut(dst.clone()))?;
            stream.memcpy_htod(&v_new0[src..src + d], &mut v_pool.slice_mut(dst))?;
        }
    }

    // The engine's page table, already on the device.
    let mut indptr = vec![0i32];
    let mut indices = Vec::new();
    let mut last_page_len = Vec::new();
    for (b, &len) in new_lens.iter().enumerate() {
        let used = len.div_ceil(shape.page_size);
        indices.extend_from_slice(&pages[b][..used]);
        indptr.push(indices.len() as i32);
        last_page_len.push((len - (used - 1) * shape.page_size) as i32);
    }
    let (indptr, indices, last_page_len) = (
        stream.clone_htod(&indptr)?,
        stream.clone_htod(&indices)?,
        stream.clone_htod(&last_page_len)?,
    );
    let batch = new_lens.len();
    let max_len = *new_lens.iter().max().unwrap_or(&1);
    // SAFETY: the table was built above from the engine's own page lists: indptr starts at 0
    // and grows, page ids lie in the pool, last page lengths in 1..=16, no request is longer
    // than max_len; nothing writes it while the steps run.
    let table = unsafe {
        PageTableView::from_device(&indptr, &indices, &last_page_len, batch, max_len, &shape)?
    };

    // Outputs in the engine's buffers; workspaces sized once from the plan.
    let qo_heads = shape.num_kv_heads * 4;
    let q = stream.clone_htod(&random(batch * qo_heads * shape.head_dim, 13))?;
    let mut o = stream.alloc_zeros::<E>(batch * qo_heads * shape.head_dim)?;
    let mut lse = stream.alloc_zeros::<f32>(batch * qo_heads)?;
    let params = StepParams {
        budget: 256,
        p: 0.9,
        sm_scale: None,
    };
    let plan = sparse.plan(batch, shape.num_kv_heads, max_len, params.budget);
    let mut kept_counts = stream.alloc_zeros::<i32>(batch * shape.num_kv_heads)?;
    let mut kept = stream.alloc_zeros::<i32>(batch * shape.num_kv_heads * plan.max_cands)?;
    let mut sparse_ws = sparse.alloc_workspace(&plan, batch, shape.num_kv_heads)?;
    let dense_plan = dense.plan(batch, shape.num_kv_heads, max_len, 0);
    let mut dense_ws = dense.alloc_workspace(&dense_plan, batch, shape.num_kv_heads)?;
    println!(
        "workspace: {} bytes (dense layer), {} bytes (sparse layer)",
        dense.workspace_bytes(&dense_plan, batch, shape.num_kv_heads)?,
        sparse.workspace_bytes(&plan, batch, shape.num_kv_heads)?
    );

    // The step of each layer (q would differ per layer in a model).
    let layer0 = KvPool::from_layer(shape, &k_pool, &v_pool, layer_offset(0))?;
    dense.run_into(
        &q,
        &layer0,
        &table,
        &StepParams::dense(None),
        StepOutputs::new(&mut o, &mut lse),
        &mut dense_ws,
        &mut |_| Ok(()),
    )?;
    let layer1 =
        KvPool::from_layer(shape, &k_pool, &v_pool, layer_offset(1))?.with_sidecar(&sidecar)?;
    sparse.run_into(
        &q,
        &layer1,
        &table,
        &params,
        StepOutputs::new(&mut o, &mut lse).with_kept(&mut kept_counts, &mut kept),
        &mut sparse_ws,
        &mut |_| Ok(()),
    )?;
    let counts = stream.clone_dtoh(&kept_counts)?;
    println!(
        "layer 1 kept {counts:?} tokens per (request, KV head) of {new_lens:?} (B0 = {})",
        params.budget
    );
    Ok(())
}

/// What the engine's prefill kernel would write for one layer: each token's rows at its slot
/// of a layer laid out HND. Returns the whole layer (zeros where no token lies).
fn engine_prefill(
    shape: CacheShape,
    slots: &[i32],
    layer: usize,
) -> Result<(Vec<E>, Vec<E>), twilight::HostError> {
    let row = shape.num_kv_heads * shape.head_dim;
    let k_rows = random(slots.len() * row, 2 * layer as u64);
    let v_rows = random(slots.len() * row, 2 * layer as u64 + 1);
    let mut k = vec![E::ZERO; shape.elements()];
    let mut v = vec![E::ZERO; shape.elements()];
    for (t, &slot) in slots.iter().enumerate() {
        for h in 0..shape.num_kv_heads {
            let dst = shape.try_offset(slot as usize, h)?;
            let src = (t * shape.num_kv_heads + h) * shape.head_dim;
            k[dst..dst + shape.head_dim].copy_from_slice(&k_rows[src..src + shape.head_dim]);
            v[dst..dst + shape.head_dim].copy_from_slice(&v_rows[src..src + shape.head_dim]);
        }
    }
    Ok((k, v))
}

/// Deterministic values in [-1, 1) (a small linear congruential generator).
fn random(n: usize, seed: u64) -> Vec<E> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            E::from_f32(((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        })
        .collect()
}
