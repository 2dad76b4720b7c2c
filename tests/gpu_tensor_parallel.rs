//! Tensor parallelism over two GPUs in one process, as engines shard a model: 32 query / 8 KV
//! heads split 4 + 4 KV heads, each GPU with its own context, thread, stream, KV pool and
//! sidecar, appending its half of every token's heads and running the sparse step for its
//! heads. The halves, gathered on the host, equal the one-GPU step over all heads (the same
//! kept sets and counts; o and lse up to the order of accumulation) and the CPU reference.
//! Both devices load the variant through one [`KernelStore`]: one compile, one load per
//! context.
//!
//! With one GPU the two-GPU test skips (and fails under `TWILIGHT_REQUIRE_GPU=2`); the split
//! is still checked on one GPU, two threads and two streams sharing its context.

mod common;

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::{Arc, Barrier};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use rand::{Rng, SeedableRng};
use twilight::reference::step::{decode_step, StepInputs, StepParams as RefParams};
use twilight::reference::{attend, HostKv, Quant4Cache, QuestMeta};
use twilight::twilight_jit::disk_cache::DiskCache;
use twilight::twilight_jit::{Jit, KernelStore, Origin, Stage};
use twilight::{
    CacheShape, Decoder, Dtype, HostPageTable, KvElement, KvLayout, KvPool, KvPoolMut,
    PageTableView, PruneLaunch, Pruning, Selector, Sidecar, StepOutputs, StepParams, VariantSpec,
};

type E = half::f16;

const KV_HEADS: usize = 8;
const GROUP: usize = 4;
const QO_HEADS: usize = KV_HEADS * GROUP;
const HEAD_DIM: usize = 128;
const PAGE: usize = 16;
const NUM_PAGES: usize = 640;
const BUDGET: usize = 256;
const P: f32 = 0.9;

fn spec() -> VariantSpec {
    VariantSpec {
        page_size: PAGE as u32,
        head_dim: HEAD_DIM as u32,
        dtype: Dtype::F16,
        group_size: GROUP as u32,
        kv_layout: KvLayout::Hnd,
        selector: Selector::Quest,
        pruning: Pruning::TopP,
    }
}

fn shape(kv_heads: usize) -> CacheShape {
    CacheShape {
        num_pages: NUM_PAGES,
        num_kv_heads: kv_heads,
        page_size: PAGE,
        head_dim: HEAD_DIM,
        layout: KvLayout::Hnd,
    }
}

/// One append of the engine: vLLM slots and the rows of all heads, `[slots, KV_HEADS,
/// HEAD_DIM]`.
struct Append {
    slots: Vec<i32>,
    k: Vec<E>,
    v: Vec<E>,
}

/// What every device is given: the engine's appends, its page table and q of all heads.
struct Workload {
    appends: Vec<Append>,
    table: HostPageTable,
    /// `[batch, QO_HEADS, HEAD_DIM]`.
    q: Vec<E>,
    /// The pool of all heads on the host, for the CPU reference.
    host_k: Vec<f32>,
    host_v: Vec<f32>,
    sm_scale: f32,
}

/// An engine's life: requests prefilled together, one removed and its pages reused by a new
/// one, then decode tokens round-robin; pages handed out in a shuffled order.
fn workload(seed: u64) -> Workload {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let full = shape(KV_HEADS);
    let mut free: Vec<i32> = (0..NUM_PAGES as i32).collect();
    for i in (1..free.len()).rev() {
        free.swap(i, rng.random_range(0..=i));
    }
    let mut requests: Vec<Option<(Vec<i32>, usize)>> = Vec::new();
    let mut host_k = vec![0f32; full.elements()];
    let mut host_v = vec![0f32; full.elements()];
    let mut appends = Vec::new();
    let reserve = |requests: &mut Vec<Option<(Vec<i32>, usize)>>,
                   free: &mut Vec<i32>,
                   id: usize,
                   count: usize| {
        let (pages, len) = requests[id].as_mut().unwrap();
        (0..count)
            .map(|_| {
                if len.is_multiple_of(PAGE) {
                    pages.push(free.pop().expect("the test pool is large enough"));
                }
                let slot = *pages.last().unwrap() as usize * PAGE + *len % PAGE;
                *len += 1;
                slot as i32
            })
            .collect::<Vec<i32>>()
    };
    let mut append = |rng: &mut rand::rngs::StdRng, slots: Vec<i32>| {
        let n = slots.len() * KV_HEADS * HEAD_DIM;
        // A few large channels make attention peaked enough to prune.
        let k: Vec<E> = (0..n)
            .map(|i| {
                let scale = if i % HEAD_DIM < 8 { 3.0 } else { 1.0 };
                E::from_f32(scale * (rng.random::<f32>() * 2.0 - 1.0))
            })
            .collect();
        let v: Vec<E> = (0..n)
            .map(|_| E::from_f32(rng.random::<f32>() * 2.0 - 1.0))
            .collect();
        for (i, &slot) in slots.iter().enumerate() {
            for h in 0..KV_HEADS {
                let src = (i * KV_HEADS + h) * HEAD_DIM;
                let dst = full.try_offset(slot as usize, h).unwrap();
                for c in 0..HEAD_DIM {
                    host_k[dst + c] = k[src + c].to_f32();
                    host_v[dst + c] = v[src + c].to_f32();
                }
            }
        }
        appends.push(Append { slots, k, v });
    };

    // Prefill of four requests in one append, the second one long enough for Quest to choose.
    let mut slots = Vec::new();
    for _ in 0..4 {
        requests.push(Some((Vec::new(), 0)));
        let (id, len) = (requests.len() - 1, rng.random_range(300..=1500));
        slots.extend(reserve(&mut requests, &mut free, id, len));
    }
    append(&mut rng, slots);
    // Request 1 ends; a fifth reuses its pages (freed last, handed out first).
    let (pages, _) = requests[1].take().unwrap();
    free.extend(pages.iter().rev());
    requests.push(Some((Vec::new(), 0)));
    let len = rng.random_range(200..=900);
    let slots = reserve(&mut requests, &mut free, 4, len);
    append(&mut rng, slots);
    let live = [0usize, 2, 3, 4];
    for _ in 0..3 {
        let slots: Vec<i32> = live
            .iter()
            .flat_map(|&id| reserve(&mut requests, &mut free, id, 1))
            .collect();
        append(&mut rng, slots);
    }
    let rows: Vec<(&[i32], usize)> = live
        .iter()
        .map(|&id| {
            let (pages, len) = requests[id].as_ref().unwrap();
            (pages.as_slice(), *len)
        })
        .collect();
    let table = HostPageTable::from_requests(&rows, PAGE, NUM_PAGES).unwrap();
    let q = (0..table.batch() * QO_HEADS * HEAD_DIM)
        .map(|_| E::from_f32(rng.random::<f32>() * 2.0 - 1.0))
        .collect();
    Workload {
        appends,
        table,
        q,
        host_k,
        host_v,
        sm_scale: 0.8 / (HEAD_DIM as f32).sqrt(),
    }
}

/// Rows `[n, heads, width]` of the heads in `range`, as one device of a split holds them.
fn heads_of<T: Copy>(rows: &[T], heads: usize, width: usize, range: &Range<usize>) -> Vec<T> {
    rows.chunks_exact(heads * width)
        .flat_map(|row| &row[range.start * width..range.end * width])
        .copied()
        .collect()
}

/// Puts a device's rows `[n, range.len(), width]` at the heads in `range` of `all`, `[n,
/// heads, width]`: the gather of a tensor-parallel engine.
fn gather<T: Copy>(all: &mut [T], part: &[T], heads: usize, width: usize, range: &Range<usize>) {
    let part_row = range.len() * width;
    for (row, src) in all
        .chunks_exact_mut(heads * width)
        .zip(part.chunks_exact(part_row))
    {
        row[range.start * width..range.end * width].copy_from_slice(src);
    }
}

/// One device's step over the KV heads `kv`, read back to the host.
struct DeviceStep {
    /// `[batch, heads, HEAD_DIM]` and `[batch, heads]` of this device's query heads.
    o: Vec<f32>,
    lse: Vec<f32>,
    /// `[batch, kv heads]` and `[batch, kv heads, max_cands]` of this device's KV heads.
    counts: Vec<i32>,
    kept: Vec<i32>,
    max_cands: usize,
    stages: Vec<Stage>,
    origin: Origin,
}

/// Everything one device does, on its own stream: the pool of its heads, their appends, the
/// step. `launch` pins how top-p is launched (`None`: the decoder's default); `start` lines
/// devices up so that they ask for the kernels at once.
fn run_device(
    ctx: &Arc<CudaContext>,
    jit: &Jit,
    w: &Workload,
    kv: Range<usize>,
    launch: Option<PruneLaunch>,
    start: &Barrier,
) -> DeviceStep {
    let stream: Arc<CudaStream> = ctx.new_stream().unwrap();
    let heads = kv.len();
    let qo = kv.start * GROUP..kv.end * GROUP;
    let shape = shape(heads);
    start.wait();
    let mut decoder = Decoder::with_jit(stream.clone(), spec(), jit).unwrap();
    if let Some(how) = launch {
        decoder.set_prune_launch(how);
    }
    let mut k = stream.alloc_zeros::<E>(shape.elements()).unwrap();
    let mut v = stream.alloc_zeros::<E>(shape.elements()).unwrap();
    let mut sidecar = Sidecar::<E>::for_variant(&stream, shape, &spec()).unwrap();
    for a in &w.appends {
        let k_new = stream
            .clone_htod(&heads_of(&a.k, KV_HEADS, HEAD_DIM, &kv))
            .unwrap();
        let v_new = stream
            .clone_htod(&heads_of(&a.v, KV_HEADS, HEAD_DIM, &kv))
            .unwrap();
        let pool = KvPoolMut::from_layer(shape, &mut k, &mut v, 0)
            .unwrap()
            .with_sidecar(&mut sidecar)
            .unwrap();
        decoder
            .append_slots(pool, &a.slots, &k_new, &v_new)
            .unwrap();
    }
    let batch = w.table.batch();
    let indptr = stream.clone_htod(w.table.kv_indptr()).unwrap();
    let indices = stream.clone_htod(w.table.kv_indices()).unwrap();
    let last = stream.clone_htod(w.table.kv_last_page_len()).unwrap();
    // SAFETY: uploaded from a HostPageTable validated against this pool's page count, with its
    // own batch and longest request.
    let table = unsafe {
        PageTableView::from_device(&indptr, &indices, &last, batch, w.table.max_len(), &shape)
    }
    .unwrap();
    let q = stream
        .clone_htod(&heads_of(&w.q, QO_HEADS, HEAD_DIM, &qo))
        .unwrap();
    let plan = decoder.plan(batch, heads, w.table.max_len(), BUDGET);
    let rows = batch * heads;
    let mut ws = decoder.alloc_workspace(&plan, batch, heads).unwrap();
    // Outputs poisoned, so that anything a kernel fails to write shows.
    let mut o: CudaSlice<E> = stream
        .clone_htod(&vec![E::poison(); batch * qo.len() * HEAD_DIM])
        .unwrap();
    let mut lse = stream
        .clone_htod(&vec![f32::NAN; batch * qo.len()])
        .unwrap();
    let mut counts = stream.clone_htod(&vec![-1i32; rows]).unwrap();
    let mut kept = stream
        .clone_htod(&vec![-7i32; rows * plan.max_cands])
        .unwrap();
    let pool = KvPool::from_layer(shape, &k, &v, 0)
        .unwrap()
        .with_sidecar(&sidecar)
        .unwrap();
    let params = StepParams {
        budget: BUDGET,
        p: P,
        sm_scale: Some(w.sm_scale),
    };
    decoder
        .run_into(
            &q,
            &pool,
            table,
            &params,
            StepOutputs::new(&mut o, &mut lse).with_kept(&mut counts, &mut kept),
            &mut ws,
            &mut |_| Ok(()),
        )
        .unwrap();
    // Waits for this device's stream alone: the other device runs on.
    stream.synchronize().unwrap();
    DeviceStep {
        o: stream
            .clone_dtoh(&o)
            .unwrap()
            .into_iter()
            .map(|x| x.to_f32())
            .collect(),
        lse: stream.clone_dtoh(&lse).unwrap(),
        counts: stream.clone_dtoh(&counts).unwrap(),
        kept: stream.clone_dtoh(&kept).unwrap(),
        max_cands: plan.max_cands,
        stages: decoder.stages_for(rows).to_vec(),
        origin: decoder.program().origin,
    }
}

/// Tolerances relative to the output's norm: f32 accumulation, then one rounding to f16.
fn assert_close_to_norm(what: &str, got: &[f32], want: &[f32]) {
    let norm = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1.0);
    common::assert_close(what, got, want, 2e-3 * norm, 8e-3);
}

fn kept_set(step: &DeviceStep, row: usize) -> BTreeSet<i32> {
    let n = step.counts[row] as usize;
    step.kept[row * step.max_cands..][..n]
        .iter()
        .copied()
        .collect()
}

/// The gathered halves against the one-GPU step over all heads: equal kept counts and sets
/// (the same kernels on the same rows), o and lse up to accumulation order (the attention's
/// split depends on how many rows share the GPU).
fn check_against_one_gpu(gathered: &DeviceStep, one: &DeviceStep, what: &str) {
    assert_eq!(gathered.counts, one.counts, "{what}: kept counts");
    for row in 0..one.counts.len() {
        assert_eq!(
            kept_set(gathered, row),
            kept_set(one, row),
            "{what}: kept slots of row {row}"
        );
    }
    assert_close_to_norm(&format!("{what}: o"), &gathered.o, &one.o);
    common::assert_close(&format!("{what}: lse"), &gathered.lse, &one.lse, 1e-3, 1e-4);
}

/// The one-GPU step against the CPU reference: kept tokens of their request, attention exact
/// over what was kept, and the reference's kept sets except for a rare near-tie (one row).
fn check_against_reference(one: &DeviceStep, w: &Workload, what: &str) {
    let kv = HostKv {
        shape: shape(KV_HEADS),
        k: &w.host_k,
        v: &w.host_v,
    };
    let quest = QuestMeta::build(&kv, &w.table).unwrap();
    let quant = Quant4Cache::build(&kv, &w.table).unwrap();
    let q: Vec<f32> = w.q.iter().map(|x| x.to_f32()).collect();
    let inputs = StepInputs {
        q: &q,
        num_qo_heads: QO_HEADS,
        kv,
        table: &w.table,
        quest: Some(&quest),
        quant: Some(&quant),
        ds: None,
    };
    let want = decode_step(&spec(), &RefParams::new(BUDGET, P, w.sm_scale), &inputs).unwrap();
    let mut differing = 0;
    for b in 0..w.table.batch() {
        let valid: BTreeSet<i32> = (0..w.table.len_of(b))
            .map(|t| w.table.try_slot(b, t).unwrap() as i32)
            .collect();
        for g in 0..KV_HEADS {
            let row = b * KV_HEADS + g;
            let set = kept_set(one, row);
            assert!(
                one.counts[row] >= 1 && set.len() == one.counts[row] as usize,
                "{what}: row {row} keeps {} slots, {} distinct",
                one.counts[row],
                set.len()
            );
            assert!(
                set.is_subset(&valid),
                "{what}: row {row} keeps a slot outside request {b}"
            );
            let want_set: BTreeSet<i32> = want.kept[row].iter().map(|&s| s as i32).collect();
            differing += usize::from(set != want_set);
            let list: Vec<usize> = set.iter().map(|&s| s as usize).collect();
            for h in 0..GROUP {
                let head = row * GROUP + h;
                let (o, lse) = attend(
                    &q[head * HEAD_DIM..][..HEAD_DIM],
                    &inputs.kv,
                    g,
                    &list,
                    w.sm_scale as f64,
                )
                .unwrap();
                assert_close_to_norm(
                    &format!("{what}: o of head {head}"),
                    &one.o[head * HEAD_DIM..][..HEAD_DIM],
                    &o,
                );
                common::assert_close(
                    &format!("{what}: lse of head {head}"),
                    &one.lse[head..head + 1],
                    &[lse],
                    1e-3,
                    1e-4,
                );
            }
        }
    }
    assert!(
        differing <= 1,
        "{what}: {differing} rows keep another set than the reference"
    );
}

/// Splits the KV heads over `contexts` (one thread and stream each, all at once), gathers the
/// halves and checks them against the all-heads step on the first context and the CPU
/// reference. Returns the store the devices shared.
fn split_and_check(contexts: &[Arc<CudaContext>], seed: u64, what: &str) -> Arc<KernelStore> {
    let w = workload(seed);
    // A store of its own and no disk cache: whatever the environment's cache holds, the
    // variant is compiled exactly once here, however many devices load it.
    let store = Arc::new(KernelStore::new(DiskCache::open(None, None), false));
    // One JIT per distinct context; threads of one context share it.
    let mut jits: Vec<Arc<Jit>> = Vec::new();
    for (i, ctx) in contexts.iter().enumerate() {
        let same = contexts[..i]
            .iter()
            .position(|c| c.cu_ctx() == ctx.cu_ctx());
        jits.push(match same {
            Some(j) => jits[j].clone(),
            None => Arc::new(Jit::with_store(ctx.clone(), store.clone()).unwrap()),
        });
    }
    let parts = contexts.len();
    let per = KV_HEADS / parts;
    let start = Barrier::new(parts);
    let halves: Vec<(Range<usize>, DeviceStep)> = std::thread::scope(|s| {
        let handles: Vec<_> = contexts
            .iter()
            .zip(&jits)
            .enumerate()
            .map(|(i, (ctx, jit))| {
                let kv = i * per..(i + 1) * per;
                let (w, start) = (&w, &start);
                s.spawn(move || {
                    let step = run_device(ctx, jit, w, kv.clone(), None, start);
                    (kv, step)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let batch = w.table.batch();
    let max_cands = halves[0].1.max_cands;
    let mut gathered = DeviceStep {
        o: vec![f32::NAN; batch * QO_HEADS * HEAD_DIM],
        lse: vec![f32::NAN; batch * QO_HEADS],
        counts: vec![-1; batch * KV_HEADS],
        kept: vec![-7; batch * KV_HEADS * max_cands],
        max_cands,
        stages: halves[0].1.stages.clone(),
        origin: halves[0].1.origin,
    };
    for (kv, half) in &halves {
        assert_eq!(
            half.max_cands, max_cands,
            "{what}: one plan on every device"
        );
        let qo = kv.start * GROUP..kv.end * GROUP;
        gather(&mut gathered.o, &half.o, QO_HEADS, HEAD_DIM, &qo);
        gather(&mut gathered.lse, &half.lse, QO_HEADS, 1, &qo);
        gather(&mut gathered.counts, &half.counts, KV_HEADS, 1, kv);
        gather(&mut gathered.kept, &half.kept, KV_HEADS, max_cands, kv);
    }

    // The one-GPU step over every head, on the first device, with top-p launched as the first
    // device's half was, so that both run the same kernels.
    let fused = halves[0].1.stages.contains(&Stage::ThresholdCompact);
    let launch = if fused {
        PruneLaunch::Fused
    } else {
        PruneLaunch::Separate
    };
    let one = run_device(
        &contexts[0],
        &jits[0],
        &w,
        0..KV_HEADS,
        Some(launch),
        &Barrier::new(1),
    );
    eprintln!(
        "{what}: {} requests of up to {} tokens, kept counts {:?}; stages {:?}",
        batch,
        w.table.max_len(),
        one.counts,
        one.stages
    );
    check_against_one_gpu(&gathered, &one, what);
    check_against_reference(&one, &w, what);

    // Each context loaded the variant once; the one-GPU step hit the first context's memory.
    for (i, jit) in jits.iter().enumerate() {
        let loaded = jit.loaded();
        assert_eq!(loaded.len(), 1, "{what}: programs loaded in context {i}");
        assert!(Arc::ptr_eq(&loaded[0], &jit.load(&spec()).unwrap()));
    }
    assert_eq!(one.origin, halves[0].1.origin, "{what}: a memory hit");
    store
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn heads_split_over_two_gpus_equal_the_one_gpu_step() {
    let Some(contexts) = common::gpu_contexts(2) else {
        return;
    };
    let what = format!(
        "{} and {}",
        contexts[0].name().unwrap(),
        contexts[1].name().unwrap()
    );
    let store = split_and_check(&contexts, common::fresh_seed(), &what);
    // Two devices of one architecture: one compile, and the other context got its binary.
    let stats = store.stats();
    let arches: BTreeSet<(i32, i32)> = contexts
        .iter()
        .map(|c| c.compute_capability().unwrap())
        .collect();
    assert_eq!(stats.compiles, arches.len(), "{what}: compiles {stats:?}");
    assert_eq!(stats.disk_reads, 0, "{what}: {stats:?}");
    eprintln!("{what}: {stats:?}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn heads_split_over_two_streams_of_one_gpu_equal_the_one_gpu_step() {
    let Some(contexts) = common::gpu_contexts(1) else {
        return;
    };
    let both = vec![contexts[0].clone(), contexts[0].clone()];
    let store = split_and_check(&both, common::fresh_seed(), "one GPU, two streams");
    assert_eq!(store.stats().compiles, 1);
}

/// The reference step of the heads in `kv` alone, over the pool those heads would have on a
/// device of their own.
fn reference_of_heads(w: &Workload, kv: &Range<usize>) -> DeviceStep {
    let (full, part) = (shape(KV_HEADS), shape(kv.len()));
    let (mut k, mut v) = (vec![0f32; part.elements()], vec![0f32; part.elements()]);
    for slot in 0..NUM_PAGES * PAGE {
        for (h, g) in kv.clone().enumerate() {
            let (src, dst) = (
                full.try_offset(slot, g).unwrap(),
                part.try_offset(slot, h).unwrap(),
            );
            k[dst..dst + HEAD_DIM].copy_from_slice(&w.host_k[src..src + HEAD_DIM]);
            v[dst..dst + HEAD_DIM].copy_from_slice(&w.host_v[src..src + HEAD_DIM]);
        }
    }
    let kv_host = HostKv {
        shape: part,
        k: &k,
        v: &v,
    };
    let qo = kv.start * GROUP..kv.end * GROUP;
    let q: Vec<f32> = heads_of(&w.q, QO_HEADS, HEAD_DIM, &qo)
        .iter()
        .map(|x| x.to_f32())
        .collect();
    let quest = QuestMeta::build(&kv_host, &w.table).unwrap();
    let quant = Quant4Cache::build(&kv_host, &w.table).unwrap();
    let inputs = StepInputs {
        q: &q,
        num_qo_heads: qo.len(),
        kv: kv_host,
        table: &w.table,
        quest: Some(&quest),
        quant: Some(&quant),
        ds: None,
    };
    let want = decode_step(&spec(), &RefParams::new(BUDGET, P, w.sm_scale), &inputs).unwrap();
    let max_cands = BUDGET.div_ceil(PAGE) * PAGE;
    let mut kept = vec![-7i32; want.kept.len() * max_cands];
    for (row, list) in want.kept.iter().enumerate() {
        for (i, &slot) in list.iter().enumerate() {
            kept[row * max_cands + i] = slot as i32;
        }
    }
    DeviceStep {
        o: want.o,
        lse: want.lse,
        counts: want.kept_counts.iter().map(|&c| c as i32).collect(),
        kept,
        max_cands,
        stages: Vec::new(),
        origin: Origin::Disk,
    }
}

/// The host side of the test, on the CPU reference: the reference of each half, gathered,
/// is the reference of all heads (a KV head's step depends on its own heads alone), and
/// passes the checks the GPU results must pass.
#[test]
fn halves_of_the_reference_gather_into_the_reference_of_all_heads() {
    let w = workload(common::fresh_seed());
    let one = reference_of_heads(&w, &(0..KV_HEADS));
    let max_cands = one.max_cands;
    let batch = w.table.batch();
    let mut gathered = DeviceStep {
        o: vec![f32::NAN; batch * QO_HEADS * HEAD_DIM],
        lse: vec![f32::NAN; batch * QO_HEADS],
        counts: vec![-1; batch * KV_HEADS],
        kept: vec![-7; batch * KV_HEADS * max_cands],
        max_cands,
        stages: Vec::new(),
        origin: Origin::Disk,
    };
    for kv in [0..KV_HEADS / 2, KV_HEADS / 2..KV_HEADS] {
        let half = reference_of_heads(&w, &kv);
        let qo = kv.start * GROUP..kv.end * GROUP;
        gather(&mut gathered.o, &half.o, QO_HEADS, HEAD_DIM, &qo);
        gather(&mut gathered.lse, &half.lse, QO_HEADS, 1, &qo);
        gather(&mut gathered.counts, &half.counts, KV_HEADS, 1, &kv);
        gather(&mut gathered.kept, &half.kept, KV_HEADS, max_cands, &kv);
    }
    assert_eq!(gathered.o, one.o);
    assert_eq!(gathered.lse, one.lse);
    check_against_one_gpu(&gathered, &one, "reference halves");
    check_against_reference(&gathered, &w, "reference halves");
    // Pruning did prune: the peaked keys keep fewer tokens than Quest selects.
    assert!(
        one.counts.iter().any(|&c| (c as usize) < BUDGET),
        "kept counts {:?}",
        one.counts
    );
}
