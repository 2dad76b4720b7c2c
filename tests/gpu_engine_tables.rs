//! The decode step on caches that look like an engine's after a while, on the GPU.
//!
//! Requests are appended round-robin in batches (a prefill in two pieces, then single-token
//! decode appends), and short-lived requests are removed between the pieces, so their pages
//! are reused and `kv_indices` is never 0, 1, 2, ... Every append is checked against an
//! independent oracle: each source row is placed where the host page table says it belongs,
//! and the downloaded K, V and derived metadata must equal what that placement gives, bit for
//! bit. Steps are then checked with tolerances relative to each output row's norm, with a random
//! sm_scale per case.
//!
//! Behaviours decided here (and documented in README.md):
//! - **NaN in q**: a NaN in query head h of request b makes that head's output unspecified
//!   (dense: NaN); every other request, and every other KV head's group of request b, is exact.
//! - **bf16 keys beyond f16's range**: the 4-bit copy of K stores its scale and min as f16, so
//!   they overflow to infinity exactly as the CPU reference stores them (compared bit for bit);
//!   the estimate of such a row is then meaningless and the pruner may keep any subset of the
//!   candidates, but never a token outside the request, and attention over what it keeps is
//!   exact.
//!
//! Run with `TWILIGHT_REQUIRE_GPU=1 cargo test --release --test gpu_engine_tables -- --ignored`.

mod common;

use std::sync::{Arc, Barrier};

use cudarc::driver::CudaStream;
use rand::{Rng, SeedableRng};
use twilight::reference::double_sparse::DsLabels;
use twilight::reference::quant::Quant4Cache;
use twilight::reference::quest::{valid_tokens_per_page, QuestMeta};
use twilight::reference::{attend, dense_decode, HostKv};
use twilight::twilight_jit::{DiskCache, Jit, Origin};
use twilight::{
    CacheShape, Decoder, DenseDecoder, Dtype, HostPageTable, KvElement, KvLayout, PagedKvCache,
    Pruning, RequestId, Selector, SparseDecoder, SparseParams, StepParams, VariantSpec,
};
use twilight_synth::generator::{generate, GeneratorParams, Preset};
use twilight_synth::synthetic::SyntheticStep;

/// Single-token decode appends after the prefill.
const DECODE_STEPS: usize = 4;

/// A cache filled like an engine fills one, with the rows that went in and where they went.
struct Engine<T: KvElement> {
    cache: PagedKvCache<T>,
    ids: Vec<RequestId>,
    table: HostPageTable,
    /// K and V as the oracle places them: each request's source rows at the slots the host
    /// page table gives, zero elsewhere.
    k: Vec<f32>,
    v: Vec<f32>,
    shape: CacheShape,
    channels: Vec<Vec<usize>>,
}

impl<T: KvElement> Engine<T> {
    fn kv(&self) -> HostKv<'_> {
        HostKv {
            shape: self.shape,
            k: &self.k,
            v: &self.v,
        }
    }
}

fn ds_channels(seed: u64, kv_heads: usize, head_dim: usize, r: usize) -> Vec<Vec<usize>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    (0..kv_heads)
        .map(|_| {
            let mut all: Vec<usize> = (0..head_dim).collect();
            for i in 0..r {
                let j = rng.random_range(i..head_dim);
                all.swap(i, j);
            }
            let mut picked = all[..r].to_vec();
            picked.sort_unstable();
            picked
        })
        .collect()
}

/// Fills a cache of `spec` with the requests of `step` the way an engine would, checks every
/// append against the oracle, and returns it.
fn build_engine<T: KvElement>(
    stream: &Arc<CudaStream>,
    spec: VariantSpec,
    step: &SyntheticStep,
    seed: u64,
) -> Engine<T> {
    let s = step.shape;
    let (ps, kvh, d) = (s.page_size, s.num_kv_heads, s.head_dim);
    let row = kvh * d;
    let lens: Vec<usize> = (0..step.table.batch())
        .map(|b| step.table.len_of(b))
        .collect();
    assert!(lens.iter().all(|&l| l > DECODE_STEPS), "{lens:?}");
    // Two short-lived requests whose pages the others reuse.
    let victims = [3 * ps + 1, ps + 2];
    let pages: usize = lens
        .iter()
        .chain(&victims)
        .map(|l| l.div_ceil(ps))
        .sum::<usize>()
        + 1;
    let shape = CacheShape {
        num_pages: pages,
        ..s
    };
    let (mut cache, channels) = match spec.selector {
        Selector::DoubleSparse { channels: r } => {
            let channels = ds_channels(seed, kvh, d, r as usize);
            let cache =
                PagedKvCache::<T>::for_double_sparse(stream, shape, &spec, &channels).unwrap();
            (cache, channels)
        }
        _ => (
            PagedKvCache::<T>::for_variant(stream, shape, &spec).unwrap(),
            Vec::new(),
        ),
    };
    let appender = Decoder::new(stream.clone(), spec).unwrap();
    let rows: Vec<(Vec<T>, Vec<T>)> = (0..lens.len())
        .map(|b| step.request_rows::<T>(b).unwrap())
        .collect();
    let victim_ids: Vec<RequestId> = victims.iter().map(|_| cache.add_request()).collect();
    let ids: Vec<RequestId> = lens.iter().map(|_| cache.add_request()).collect();
    let mut done = vec![0usize; lens.len()];

    // One append call: `(request, count)` entries and their rows in order, as an engine batches.
    let append = |cache: &mut PagedKvCache<T>, entries: &[(RequestId, Vec<T>, Vec<T>)]| {
        let list: Vec<(RequestId, usize)> = entries
            .iter()
            .map(|(id, k, _)| (*id, k.len() / row))
            .collect();
        let k: Vec<T> = entries.iter().flat_map(|e| e.1.iter().copied()).collect();
        let v: Vec<T> = entries.iter().flat_map(|e| e.2.iter().copied()).collect();
        let (kd, vd) = (
            stream.clone_htod(&k).unwrap(),
            stream.clone_htod(&v).unwrap(),
        );
        appender.append(cache, &list, &kd, &vd).unwrap();
    };
    let take = |b: usize, from: usize, to: usize| -> (Vec<T>, Vec<T>) {
        let (k, v) = &rows[b];
        (
            k[from * row..to * row].to_vec(),
            v[from * row..to * row].to_vec(),
        )
    };
    let noise = |n: usize, salt: f32| -> Vec<T> {
        (0..n * row)
            .map(|i| T::from_f32(((i as f32 * 0.37 + salt).sin()) * 3.0))
            .collect()
    };

    // Prefill, first piece, interleaved with the victims' prefills.
    let mut batch = vec![(
        victim_ids[0],
        noise(victims[0], 1.0),
        noise(victims[0], 2.0),
    )];
    for (b, &len) in lens.iter().enumerate() {
        let first = ((len - DECODE_STEPS) / 2).max(1);
        let (k, v) = take(b, 0, first);
        batch.push((ids[b], k, v));
        done[b] = first;
        if b == 0 {
            batch.push((
                victim_ids[1],
                noise(victims[1], 3.0),
                noise(victims[1], 4.0),
            ));
        }
    }
    append(&mut cache, &batch);
    cache.remove_request(victim_ids[0]).unwrap();
    // The rest of the prefill, in reverse request order, over the freed pages.
    let mut batch = Vec::new();
    for b in (0..lens.len()).rev() {
        let to = lens[b] - DECODE_STEPS;
        if to > done[b] {
            let (k, v) = take(b, done[b], to);
            batch.push((ids[b], k, v));
            done[b] = to;
        }
    }
    if !batch.is_empty() {
        append(&mut cache, &batch);
    }
    cache.remove_request(victim_ids[1]).unwrap();
    // Decode: one token per request per step, round-robin.
    for _ in 0..DECODE_STEPS {
        let batch: Vec<_> = (0..lens.len())
            .map(|b| {
                let (k, v) = take(b, done[b], done[b] + 1);
                done[b] += 1;
                (ids[b], k, v)
            })
            .collect();
        append(&mut cache, &batch);
    }

    let table = cache.host_page_table(&ids).unwrap();
    let identity: Vec<i32> = (0..table.kv_indices().len() as i32).collect();
    assert_ne!(
        table.kv_indices(),
        identity.as_slice(),
        "the table should not be the identity"
    );

    // The oracle: every source row where the table says it belongs.
    let mut k = vec![0f32; shape.elements()];
    let mut v = vec![0f32; shape.elements()];
    for (b, (kr, vr)) in rows.iter().enumerate() {
        assert_eq!(table.len_of(b), lens[b]);
        for t in 0..lens[b] {
            let slot = table.try_slot(b, t).unwrap();
            for g in 0..kvh {
                let at = shape.try_offset(slot, g).unwrap();
                let src = (t * kvh + g) * d;
                for c in 0..d {
                    k[at + c] = kr[src + c].to_f32();
                    v[at + c] = vr[src + c].to_f32();
                }
            }
        }
    }
    let engine = Engine {
        cache,
        ids,
        table,
        k,
        v,
        shape,
        channels,
    };
    check_appends(
        stream,
        &engine,
        &format!("{spec} lens {lens:?} seed {seed}"),
    );
    engine
}

/// The downloaded K, V and derived metadata equal the oracle's placement, bit for bit, at every
/// slot and page the live requests own.
fn check_appends<T: KvElement>(stream: &Arc<CudaStream>, e: &Engine<T>, what: &str) {
    let s = e.shape;
    let d = s.head_dim;
    let (k, v) = e.cache.download(stream).unwrap();
    for slot in e.table.valid_slots() {
        for g in 0..s.num_kv_heads {
            let at = s.try_offset(slot, g).unwrap();
            for c in 0..d {
                assert_eq!(
                    k[at + c].to_f32(),
                    e.k[at + c],
                    "{what}: K slot {slot} head {g} ch {c}"
                );
                assert_eq!(
                    v[at + c].to_f32(),
                    e.v[at + c],
                    "{what}: V slot {slot} head {g} ch {c}"
                );
            }
        }
    }
    let kv = e.kv();
    let derived = e.cache.derived();
    if let Some(bounds_dev) = &derived.page_bounds {
        let want = QuestMeta::build(&kv, &e.table).unwrap();
        let got = stream.clone_dtoh(bounds_dev).unwrap();
        let valid = valid_tokens_per_page(&e.table, s.num_pages).unwrap();
        for (page, _) in valid.iter().enumerate().filter(|(_, &n)| n > 0) {
            for g in 0..s.num_kv_heads {
                let at = want.try_offset(page, g).unwrap();
                // The device keeps (page, head)'s max row and then its min row.
                let got_at = 2 * at;
                for c in 0..d {
                    assert_eq!(
                        got[got_at + c].to_f32(),
                        want.page_max[at + c],
                        "{what}: page max p{page} g{g} c{c}"
                    );
                    assert_eq!(
                        got[got_at + d + c].to_f32(),
                        want.page_min[at + c],
                        "{what}: page min p{page} g{g} c{c}"
                    );
                }
            }
        }
    }
    if let (Some(codes_dev), Some(sm_dev)) = (&derived.k_q4, &derived.k_q4_scale_min) {
        let want = Quant4Cache::build(&kv, &e.table).unwrap();
        let codes = stream.clone_dtoh(codes_dev).unwrap();
        let sm = stream.clone_dtoh(sm_dev).unwrap();
        for slot in e.table.valid_slots() {
            for g in 0..s.num_kv_heads {
                let r = s.try_row(slot, g).unwrap();
                assert_eq!(
                    &codes[r * d / 2..][..d / 2],
                    want.try_codes_row(slot, g).unwrap(),
                    "{what}: codes slot {slot} g{g}"
                );
                let w = want.try_scale_min_row(slot, g).unwrap();
                assert_eq!(
                    [sm[2 * r].to_bits(), sm[2 * r + 1].to_bits()],
                    [w[0].to_bits(), w[1].to_bits()],
                    "{what}: scale/min slot {slot} g{g}"
                );
            }
        }
    }
    if let Some(labels_dev) = &derived.k_label {
        let want = DsLabels::build(&kv, &e.table, e.channels.clone()).unwrap();
        let got = stream.clone_dtoh(labels_dev).unwrap();
        for slot in e.table.valid_slots() {
            for g in 0..s.num_kv_heads {
                let at = s.try_row(slot, g).unwrap() * want.r;
                let got: Vec<f32> = got[at..at + want.r].iter().map(|x| x.to_f32()).collect();
                assert_eq!(
                    got.as_slice(),
                    want.try_label_row(slot, g).unwrap(),
                    "{what}: labels slot {slot} g{g}"
                );
            }
        }
    }
}

/// Each row of `row_len` values within `rel` of its own largest magnitude (NaN never passes).
fn assert_close_to_norm(what: &str, got: &[f32], want: &[f32], row_len: usize, rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.chunks(row_len).zip(want.chunks(row_len)).enumerate() {
        let norm = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        let tol = rel * norm.max(1e-3);
        for (c, (&a, &b)) in g.iter().zip(w).enumerate() {
            let ok = (a - b).abs() <= tol;
            assert!(
                ok,
                "{what}: row {i} channel {c}: got {a}, expected {b}, tolerance {tol} (norm {norm})"
            );
        }
    }
}

/// Output tolerance relative to a row's norm: a few roundings of the dtype.
fn rel_tol(dtype: Dtype) -> f32 {
    match dtype {
        Dtype::F16 => 8.0 * 2f32.powi(-11),
        Dtype::Bf16 => 8.0 * 2f32.powi(-8),
    }
}

fn q_device<T: KvElement>(stream: &Arc<CudaStream>, q: &[f32]) -> cudarc::driver::CudaSlice<T> {
    stream
        .clone_htod(&SyntheticStep::to_elements::<T>(q))
        .unwrap()
}

fn dense_check<T: KvElement>(
    stream: &Arc<CudaStream>,
    e: &Engine<T>,
    spec: VariantSpec,
    q: &[f32],
    sm_scale: f32,
    what: &str,
) -> Vec<f32> {
    let decoder = DenseDecoder::new(stream.clone(), spec).unwrap();
    let table = e.cache.page_table(stream, &e.ids).unwrap();
    let out = decoder
        .run(&q_device::<T>(stream, q), &e.cache, &table, Some(sm_scale))
        .unwrap();
    let o: Vec<f32> = stream
        .clone_dtoh(&out.o)
        .unwrap()
        .iter()
        .map(|x| x.to_f32())
        .collect();
    let qo = e.shape.num_kv_heads * spec.group_size as usize;
    let want = dense_decode(q, qo, &e.kv(), &e.table, sm_scale).unwrap();
    let d = spec.head_dim as usize;
    // Rows whose query holds a NaN are checked by the caller.
    let clean: Vec<usize> = (0..o.len() / d)
        .filter(|&r| q[r * d..][..d].iter().all(|x| !x.is_nan()))
        .collect();
    let pick = |x: &[f32]| {
        clean
            .iter()
            .flat_map(|&r| x[r * d..][..d].to_vec())
            .collect::<Vec<f32>>()
    };
    assert_close_to_norm(
        &format!("dense o, {what}"),
        &pick(&o),
        &pick(&want.o),
        d,
        rel_tol(spec.dtype),
    );
    o
}

/// Runs the sparse step and checks every (request, KV head) row: a kept list of distinct valid
/// slots of the request, at most `max_cands` long, and attention over it exact for every query
/// head of the group whose query has no NaN. Returns the kept counts.
fn sparse_check<T: KvElement>(
    stream: &Arc<CudaStream>,
    e: &Engine<T>,
    spec: VariantSpec,
    params: SparseParams,
    q: &[f32],
    what: &str,
) -> Vec<i32> {
    let decoder = SparseDecoder::new(stream.clone(), spec, params).unwrap();
    let table = e.cache.page_table(stream, &e.ids).unwrap();
    let out = decoder
        .run(&q_device::<T>(stream, q), &e.cache, &table)
        .unwrap();
    let o: Vec<f32> = stream
        .clone_dtoh(&out.o)
        .unwrap()
        .iter()
        .map(|x| x.to_f32())
        .collect();
    let lse = stream.clone_dtoh(&out.lse).unwrap();
    let counts = stream.clone_dtoh(&out.kept_counts).unwrap();
    let kept = stream.clone_dtoh(&out.kept).unwrap();
    let (kvh, group, d) = (
        e.shape.num_kv_heads,
        spec.group_size as usize,
        spec.head_dim as usize,
    );
    let sm_scale = params.sm_scale.unwrap();
    let kv = e.kv();
    for b in 0..e.table.batch() {
        let valid: std::collections::HashSet<usize> = (0..e.table.len_of(b))
            .map(|t| e.table.try_slot(b, t).unwrap())
            .collect();
        for g in 0..kvh {
            let row = b * kvh + g;
            let n = counts[row];
            assert!(
                n >= 0 && n as usize <= out.max_cands,
                "{what}: row {row} kept {n} of at most {}",
                out.max_cands
            );
            let slots: Vec<usize> = kept[row * out.max_cands..][..n as usize]
                .iter()
                .map(|&s| s as usize)
                .collect();
            let distinct: std::collections::HashSet<usize> = slots.iter().copied().collect();
            assert_eq!(
                distinct.len(),
                slots.len(),
                "{what}: row {row} keeps a slot twice"
            );
            assert!(
                slots.iter().all(|s| valid.contains(s)),
                "{what}: row {row} keeps a slot outside request {b}"
            );
            if slots.is_empty() {
                continue;
            }
            for h in g * group..(g + 1) * group {
                let at = (b * kvh * group + h) * d;
                let qh = &q[at..at + d];
                if qh.iter().any(|x| x.is_nan()) {
                    continue;
                }
                let (want_o, want_lse) = attend(qh, &kv, g, &slots, sm_scale as f64).unwrap();
                assert_close_to_norm(
                    &format!("sparse o row ({b}, {h}), {what}"),
                    &o[at..at + d],
                    &want_o,
                    d,
                    rel_tol(spec.dtype),
                );
                let l = lse[b * kvh * group + h];
                assert!(
                    (l - want_lse).abs() <= 2e-3 * want_lse.abs().max(1.0),
                    "{what}: lse ({b}, {h}) {l} vs {want_lse}"
                );
            }
        }
    }
    counts
}

fn spec_of(
    ps: u32,
    dtype: Dtype,
    group: u32,
    layout: KvLayout,
    selector: Selector,
    pruning: Pruning,
) -> VariantSpec {
    VariantSpec {
        page_size: ps,
        head_dim: 128,
        dtype,
        group_size: group,
        kv_layout: layout,
        selector,
        pruning,
    }
}

fn random_step<T: KvElement>(
    seed: u64,
    lens: &[usize],
    kvh: usize,
    spec: VariantSpec,
    key_scale: f32,
) -> SyntheticStep {
    SyntheticStep::random::<T>(
        seed,
        lens,
        kvh,
        spec.group_size as usize,
        spec.page_size as usize,
        spec.head_dim as usize,
        spec.kv_layout,
        key_scale,
    )
    .unwrap()
}

fn engine_case<T: KvElement>(stream: &Arc<CudaStream>, spec: VariantSpec, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let lens: Vec<usize> = (0..5)
        .map(|_| rng.random_range(DECODE_STEPS + 1..=1500))
        .collect();
    let sm_scale = rng.random_range(0.02f32..0.3);
    let step = random_step::<T>(seed, &lens, 2, spec, 1.5);
    let what = format!("{spec} lens {lens:?} sm_scale {sm_scale} seed {seed}");
    let e = build_engine::<T>(stream, spec, &step, seed);
    if spec.is_dense() {
        dense_check(stream, &e, spec, &step.q, sm_scale, &what);
    } else {
        let budget = rng.random_range(1..=2048);
        let p = rng.random_range(0.5f32..0.99);
        let params = SparseParams {
            budget,
            p,
            sm_scale: Some(sm_scale),
        };
        sparse_check(
            stream,
            &e,
            spec,
            params,
            &step.q,
            &format!("{what} B0 {budget} p {p}"),
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn engine_tables_dense_and_sparse() {
    let Some(stream) = common::gpu_stream() else {
        return;
    };
    let seed = common::fresh_seed();
    let ds16 = Selector::DoubleSparse { channels: 16 };
    let cases = [
        (8, Dtype::F16, KvLayout::Hnd, Selector::Full, Pruning::None),
        (
            32,
            Dtype::Bf16,
            KvLayout::Nhd,
            Selector::Full,
            Pruning::None,
        ),
        (8, Dtype::F16, KvLayout::Nhd, Selector::Quest, Pruning::TopP),
        (
            32,
            Dtype::Bf16,
            KvLayout::Hnd,
            Selector::Quest,
            Pruning::TopP,
        ),
        (16, Dtype::F16, KvLayout::Hnd, ds16, Pruning::TopP),
        (32, Dtype::F16, KvLayout::Hnd, Selector::Full, Pruning::TopP),
        (
            8,
            Dtype::Bf16,
            KvLayout::Hnd,
            Selector::Quest,
            Pruning::None,
        ),
    ];
    common::warm_jit(
        &stream,
        cases.iter().map(|&(ps, dtype, layout, selector, pruning)| {
            spec_of(ps, dtype, 4, layout, selector, pruning)
        }),
    );
    for (i, (ps, dtype, layout, selector, pruning)) in cases.into_iter().enumerate() {
        let spec = spec_of(ps, dtype, 4, layout, selector, pruning);
        let seed = seed.wrapping_add(i as u64);
        match dtype {
            Dtype::F16 => engine_case::<half::f16>(&stream, spec, seed),
            Dtype::Bf16 => engine_case::<half::bf16>(&stream, spec, seed),
        }
    }
}

/// Long peaked rows from the generator: a context past 65,536 tokens and more than 8192
/// candidates, so the threshold's uncached path runs.
#[test]
#[ignore = "needs a CUDA GPU"]
fn long_peaked_rows_past_65536_tokens() {
    let Some(stream) = common::gpu_stream() else {
        return;
    };
    let seed = common::fresh_seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let lens = [70_001usize, 9_000];
    let params = GeneratorParams::preset(Preset::Default, seed);
    for (selector, budget) in [
        (Selector::Quest, 16_384usize),
        (Selector::Full, StepParams::MAX_BUDGET),
    ] {
        let spec = spec_of(16, Dtype::F16, 4, KvLayout::Hnd, selector, Pruning::TopP);
        let step = generate::<half::f16>(&params, &lens, 2, 4, 16, 128, KvLayout::Hnd).unwrap();
        let e = build_engine::<half::f16>(&stream, spec, &step, seed);
        let sm_scale = rng.random_range(0.05f32..0.15);
        let p = 0.9;
        let what = format!("{spec} long rows B0 {budget} sm_scale {sm_scale} seed {seed}");
        let counts = sparse_check(
            &stream,
            &e,
            spec,
            SparseParams {
                budget,
                p,
                sm_scale: Some(sm_scale),
            },
            &step.q,
            &what,
        );
        // Peaked rows are pruned below their candidates, far below at the generator's own
        // scale or sharper (a flatter softmax, sm_scale below 1/sqrt(d), keeps more: 57% of a
        // 70,001-token row at 0.057 in one run).
        let bound = if sm_scale >= 1.0 / 128f32.sqrt() {
            8192
        } else {
            lens[0]
        };
        assert!(
            counts[0] > 0 && (counts[0] as usize) < bound,
            "{what}: kept {counts:?}, bound {bound}"
        );
    }
}

/// Edge parameters: B0 in {1, page_size - 1, far above the length, 2^31 - 1}, p in {1e-6,
/// 0.999, 1 - 2^-24}, page sizes 8 and 32.
#[test]
#[ignore = "needs a CUDA GPU"]
fn edge_budgets_and_thresholds() {
    let Some(stream) = common::gpu_stream() else {
        return;
    };
    let seed = common::fresh_seed();
    let lens = [700usize, 33, 9];
    for ps in [8u32, 32] {
        for selector in [Selector::Quest, Selector::Full] {
            let spec = spec_of(ps, Dtype::F16, 2, KvLayout::Hnd, selector, Pruning::TopP);
            let step = random_step::<half::f16>(seed ^ ps as u64, &lens, 2, spec, 1.0);
            let e = build_engine::<half::f16>(&stream, spec, &step, seed);
            for budget in [1, ps as usize - 1, 100_000, StepParams::MAX_BUDGET] {
                for p in [1e-6f32, 0.999, 1.0 - 2f32.powi(-24)] {
                    let what = format!("{spec} B0 {budget} p {p} seed {seed}");
                    let params = SparseParams {
                        budget,
                        p,
                        sm_scale: Some(0.1),
                    };
                    let counts = sparse_check(&stream, &e, spec, params, &step.q, &what);
                    // Something is always kept, and never more than B0 allows.
                    for (row, &n) in counts.iter().enumerate() {
                        let len = lens[row / 2];
                        let most = match selector {
                            Selector::Quest => budget.div_ceil(ps as usize).max(1) * ps as usize,
                            _ => len,
                        };
                        assert!(
                            n >= 1 && n as usize <= most.min(len),
                            "{what}: row {row} kept {n}"
                        );
                    }
                }
            }
        }
    }
    // Above 2^31 - 1 is an error before anything runs.
    let spec = spec_of(
        8,
        Dtype::F16,
        2,
        KvLayout::Hnd,
        Selector::Quest,
        Pruning::TopP,
    );
    let too_big = SparseParams {
        budget: StepParams::MAX_BUDGET + 1,
        p: 0.9,
        sm_scale: None,
    };
    assert!(SparseDecoder::new(stream.clone(), spec, too_big).is_err());
}

/// A NaN in one query head: that head's output is unspecified (dense: NaN); other requests and
/// the other KV heads' groups are exact.
#[test]
#[ignore = "needs a CUDA GPU"]
fn nan_in_q_stays_in_its_row() {
    let Some(stream) = common::gpu_stream() else {
        return;
    };
    let seed = common::fresh_seed();
    let lens = [300usize, 200];
    let (kvh, group, d) = (2usize, 4usize, 128usize);
    for (selector, pruning) in [
        (Selector::Full, Pruning::None),
        (Selector::Quest, Pruning::TopP),
    ] {
        let spec = spec_of(
            16,
            Dtype::F16,
            group as u32,
            KvLayout::Hnd,
            selector,
            pruning,
        );
        let step = random_step::<half::f16>(seed, &lens, kvh, spec, 1.0);
        let e = build_engine::<half::f16>(&stream, spec, &step, seed);
        let mut q = step.q.clone();
        // Request 0, query head 1 (KV head 0), channel 5.
        q[d + 5] = f32::NAN;
        let what = format!("{spec} NaN in q seed {seed}");
        if spec.is_dense() {
            let o = dense_check(&stream, &e, spec, &q, 0.1, &what);
            assert!(
                o[d..2 * d].iter().all(|x| x.is_nan()),
                "{what}: the NaN head's output is not NaN"
            );
        } else {
            let params = SparseParams {
                budget: 128,
                p: 0.9,
                sm_scale: Some(0.1),
            };
            sparse_check(&stream, &e, spec, params, &q, &what);
        }
    }
}

/// bf16 keys beyond f16's range: the 4-bit scale and min overflow in f16 exactly as the
/// reference stores them (checked bit for bit by the append oracle), and attention over what
/// is kept stays exact.
#[test]
#[ignore = "needs a CUDA GPU"]
fn bf16_keys_beyond_f16_range() {
    let Some(stream) = common::gpu_stream() else {
        return;
    };
    let seed = common::fresh_seed();
    let lens = [500usize, 77];
    let spec = spec_of(
        16,
        Dtype::Bf16,
        2,
        KvLayout::Nhd,
        Selector::Quest,
        Pruning::TopP,
    );
    // Keys of about 2e5 (f16 ends at 65504): ranges and minima beyond f16.
    let step = random_step::<half::bf16>(seed, &lens, 2, spec, 2e5);
    let e = build_engine::<half::bf16>(&stream, spec, &step, seed);
    let quant = Quant4Cache::build(&e.kv(), &e.table).unwrap();
    assert!(
        quant.scale_min.iter().any(|x| x.is_infinite()),
        "the test should reach f16's overflow"
    );
    let params = SparseParams {
        budget: 256,
        p: 0.9,
        sm_scale: Some(1e-4),
    };
    sparse_check(
        &stream,
        &e,
        spec,
        params,
        &step.q,
        &format!("{spec} huge keys seed {seed}"),
    );
}

/// Many threads loading one variant through one JIT compile it once and share the program.
#[test]
#[ignore = "needs a CUDA GPU"]
fn threads_loading_one_variant_compile_it_once() {
    let Some(stream) = common::gpu_stream() else {
        return;
    };
    // A JIT with no disk cache, so the first load must compile.
    let jit =
        Arc::new(Jit::new(stream.context().clone(), DiskCache::open(None, None), false).unwrap());
    let spec = spec_of(
        8,
        Dtype::Bf16,
        2,
        KvLayout::Nhd,
        Selector::Quest,
        Pruning::TopP,
    );
    let threads = 16;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (jit, barrier) = (jit.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                jit.load(&spec).unwrap()
            })
        })
        .collect();
    let programs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(matches!(programs[0].origin, Origin::Compiled(_)));
    for p in &programs[1..] {
        assert!(Arc::ptr_eq(&programs[0], p), "a thread got its own compile");
    }
    assert!(Arc::ptr_eq(&programs[0], &jit.load(&spec).unwrap()));
}
