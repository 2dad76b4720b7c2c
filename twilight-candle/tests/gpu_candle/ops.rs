//! The candle ops on the GPU: dense decode equals attention written with candle's own ops on
//! the same tensors, the sparse step equals twilight's CPU reference, the append writes each
//! row where the host page table says it belongs (and the sidecar the reference derives), and
//! tensors of another device or stream are refused.

use std::collections::{BTreeSet, HashSet};

use crate::common::{
    assert_close, assert_close_to_norm, candle_paged_attention, download, fresh_seed, gpu_device,
    pool_dims, upload,
};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use twilight::reference::step::{decode_step, StepInputs, StepParams as RefParams};
use twilight::reference::{attend, HostKv, Quant4Cache, QuestMeta, StepResult};
use twilight::{HostPageTable, KvLayout, VariantSpec};
use twilight_candle::{candle_dtype, PageTable, StepParams, TwilightAttention};
use twilight_synth::generator::{self, GeneratorParams, Preset};
use twilight_synth::synthetic::{ragged_lengths, SyntheticStep};

fn spec(name: &str) -> VariantSpec {
    name.parse().unwrap()
}

/// The step's pool, q and table as candle tensors on `device`.
fn tensors(
    step: &SyntheticStep,
    dtype: DType,
    device: &Device,
) -> (Tensor, Tensor, Tensor, PageTable) {
    let dims = pool_dims(&step.shape);
    let batch = step.table.batch();
    (
        upload(
            &step.q,
            &[batch, step.num_qo_heads, step.shape.head_dim],
            dtype,
            device,
        ),
        upload(&step.k, &dims, dtype, device),
        upload(&step.v, &dims, dtype, device),
        PageTable::from_host(&step.table, step.shape.num_pages, device).unwrap(),
    )
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn dense_equals_candle_attention() {
    let Some(device) = gpu_device() else { return };
    let seed = fresh_seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for name in [
        "ps16_hd128_f16_g4_hnd_full_none",
        "ps16_hd128_f16_g4_nhd_full_none",
        "ps16_hd128_bf16_g4_nhd_full_none",
        "ps8_hd64_f16_g1_nhd_full_none",
    ] {
        let spec = spec(name);
        let what = format!("{name} seed {seed}");
        let lens = ragged_lengths(&mut rng, 3, 900).unwrap();
        let (d, g) = (spec.head_dim as usize, spec.group_size as usize);
        let step = match spec.dtype {
            twilight::Dtype::F16 => SyntheticStep::random::<half::f16>(
                rng.random(),
                &lens,
                2,
                g,
                spec.page_size as usize,
                d,
                spec.kv_layout,
                1.0,
            ),
            twilight::Dtype::Bf16 => SyntheticStep::random::<half::bf16>(
                rng.random(),
                &lens,
                2,
                g,
                spec.page_size as usize,
                d,
                spec.kv_layout,
                1.0,
            ),
        }
        .unwrap();
        let dtype = candle_dtype(spec.dtype);
        let (q, k, v, table) = tensors(&step, dtype, &device);
        let sm_scale = 0.5 / (d as f32).sqrt() * rng.random_range(1.0..3.0f32);
        let mut attn = TwilightAttention::dense(&device, spec, Some(sm_scale)).unwrap();
        let out = attn.forward(&q, &k, &v, None, &table).unwrap();
        assert_eq!(out.o.dims(), q.dims(), "{what}");
        assert_eq!(out.o.dtype(), dtype, "{what}");
        assert_eq!(out.lse.dims(), &[lens.len(), step.num_qo_heads], "{what}");
        assert_eq!(out.lse.dtype(), DType::F32, "{what}");
        assert!(out.o.device().same_device(&device) && out.kept_counts.is_none());

        let (want_o, want_lse) =
            candle_paged_attention(&q, &k, &v, &step.shape, &step.table, sm_scale as f64).unwrap();
        let (got_o, want_o) = (download(&out.o), download(&want_o));
        if dtype == DType::BF16 {
            let norm = want_o.iter().fold(1f32, |m, x| m.max(x.abs()));
            assert_close(&format!("o, {what}"), &got_o, &want_o, 1e-2 * norm, 2e-2);
        } else {
            assert_close_to_norm(&format!("o, {what}"), &got_o, &want_o);
        }
        assert_close(
            &format!("lse, {what}"),
            &download(&out.lse),
            &download(&want_lse),
            2e-3,
            1e-4,
        );
    }
}

/// The reference step on the host copy of the pool, with the sidecar the reference derives.
fn reference(
    spec: &VariantSpec,
    step: &SyntheticStep,
    b0: usize,
    p: f32,
    sm_scale: f32,
) -> StepResult {
    let kv = HostKv {
        shape: step.shape,
        k: &step.k,
        v: &step.v,
    };
    let quest = QuestMeta::build(&kv, &step.table).unwrap();
    let quant = Quant4Cache::build(&kv, &step.table).unwrap();
    let mut params = RefParams::new(b0, p, sm_scale);
    params.record_weights = true;
    let inputs = StepInputs {
        q: &step.q,
        num_qo_heads: step.num_qo_heads,
        kv,
        table: &step.table,
        quest: Some(&quest),
        quant: Some(&quant),
        ds: None,
    };
    decode_step(spec, &params, &inputs).unwrap()
}

/// Checks a sparse step's outputs against the reference: each row keeps the reference's set,
/// or (at most one row, where the GPU's f32 estimate and the reference's f64 one fall on two
/// sides of the threshold) a set of candidates that still holds p of every head's estimated
/// mass; o and lse are exact attention over what the row kept.
fn check_sparse(
    spec: &VariantSpec,
    step: &SyntheticStep,
    out: &twilight_candle::AttentionOutput,
    want: &StepResult,
    sm_scale: f32,
    p: f32,
    what: &str,
) {
    let (o, lse) = (download(&out.o), download(&out.lse));
    let counts: Vec<i32> = out
        .kept_counts
        .as_ref()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let kept_t = out.kept.as_ref().unwrap();
    let max_cands = kept_t.dim(2).unwrap();
    let kept: Vec<i32> = kept_t.flatten_all().unwrap().to_vec1().unwrap();
    let kv = HostKv {
        shape: step.shape,
        k: &step.k,
        v: &step.v,
    };
    let (heads, g_size, d) = (
        step.shape.num_kv_heads,
        spec.group_size as usize,
        step.shape.head_dim,
    );
    let mut differing = 0;
    for b in 0..step.table.batch() {
        let valid: HashSet<usize> = step.table.slots_of(b).collect();
        for g in 0..heads {
            let row = b * heads + g;
            let count = counts[row];
            assert!(
                count >= 1 && count as usize <= max_cands,
                "{what}: kept count {count} of row {row}"
            );
            let list: Vec<usize> = kept[row * max_cands..][..count as usize]
                .iter()
                .map(|&s| s as usize)
                .collect();
            let set: BTreeSet<usize> = list.iter().copied().collect();
            assert_eq!(
                set.len(),
                list.len(),
                "{what}: row {row} keeps a slot twice"
            );
            assert!(
                set.iter().all(|s| valid.contains(s)),
                "{what}: row {row} keeps a slot outside request {b}"
            );
            let want_set: BTreeSet<usize> = want.kept[row].iter().copied().collect();
            if set != want_set {
                differing += 1;
                let cands = &want.candidates[row];
                assert!(
                    set.iter().all(|s| cands.contains(s)),
                    "{what}: row {row} keeps a non-candidate"
                );
                for h in 0..g_size {
                    let head = &want.heads[row * g_size + h];
                    let weights = head.weights.as_ref().unwrap();
                    let mass: f64 = cands
                        .iter()
                        .zip(weights)
                        .filter(|(s, _)| set.contains(s))
                        .map(|(_, w)| w)
                        .sum();
                    assert!(
                        mass >= p as f64 * (1.0 - 1e-4),
                        "{what}: row {row} head {h} keeps mass {mass} < p"
                    );
                }
            }
            for h in 0..g_size {
                let head = row * g_size + h;
                let (ref_o, ref_lse) =
                    attend(&step.q[head * d..][..d], &kv, g, &list, sm_scale as f64).unwrap();
                assert_close_to_norm(
                    &format!("{what}: o of head {head}"),
                    &o[head * d..][..d],
                    &ref_o,
                );
                assert_close(
                    &format!("{what}: lse of head {head}"),
                    &lse[head..head + 1],
                    &[ref_lse],
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
    if differing == 0 {
        let counts: Vec<usize> = counts.iter().map(|&c| c as usize).collect();
        assert_eq!(counts, want.kept_counts, "{what}: kept counts");
    }
}

/// All valid slots of a table, request by request in token order: each page's slots one run.
fn all_slots(table: &HostPageTable) -> Vec<i32> {
    (0..table.batch())
        .flat_map(|b| table.slots_of(b).map(|s| s as i32).collect::<Vec<_>>())
        .collect()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn sparse_equals_the_reference() {
    let Some(device) = gpu_device() else { return };
    let seed = fresh_seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (name, preset) in [
        ("ps16_hd128_f16_g4_nhd_quest_topp", Preset::Default),
        ("ps16_hd128_f16_g4_hnd_quest_topp", Preset::Focused),
        ("ps16_hd128_bf16_g4_hnd_quest_topp", Preset::Default),
    ] {
        let spec = spec(name);
        let what = format!("{name} {preset:?} seed {seed}");
        let lens = ragged_lengths(&mut rng, 3, 3000).unwrap();
        let params = GeneratorParams::preset(preset, rng.random());
        let step = match spec.dtype {
            twilight::Dtype::F16 => {
                generator::generate::<half::f16>(&params, &lens, 2, 4, 16, 128, spec.kv_layout)
            }
            twilight::Dtype::Bf16 => {
                generator::generate::<half::bf16>(&params, &lens, 2, 4, 16, 128, spec.kv_layout)
            }
        }
        .unwrap();
        let dtype = candle_dtype(spec.dtype);
        let (q, k, v, table) = tensors(&step, dtype, &device);
        let (b0, p) = (256usize, 0.9f32);
        let sm_scale = 1.0 / 128f32.sqrt();
        let mut attn = TwilightAttention::new(
            &device,
            spec,
            StepParams {
                budget: b0,
                p,
                sm_scale: Some(sm_scale),
            },
        )
        .unwrap();
        // The engine wrote K itself (the upload above): the sidecar follows from it in place.
        let mut sidecar = attn.new_sidecar(&k).unwrap();
        attn.update_sidecar(&k, &v, &mut sidecar, &all_slots(&step.table))
            .unwrap();
        let out = attn.forward(&q, &k, &v, Some(&sidecar), &table).unwrap();
        assert_eq!(out.kept_counts.as_ref().unwrap().dims(), &[lens.len(), 2]);
        let want = reference(&spec, &step, b0, p, sm_scale);
        check_sparse(&spec, &step, &out, &want, sm_scale, p, &what);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn append_writes_rows_where_the_table_says_and_keeps_the_sidecar() {
    let Some(device) = gpu_device() else { return };
    let seed = fresh_seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for name in [
        "ps16_hd128_f16_g4_nhd_quest_topp",
        "ps16_hd128_f16_g4_hnd_full_none",
    ] {
        let spec = spec(name);
        let what = format!("{name} seed {seed}");
        // The final step: requests of ragged lengths on shuffled pages; the pool starts empty,
        // is filled by a prefill append of all but the last token of each request, then one
        // decode append of each request's last token.
        let lens = ragged_lengths(&mut rng, 3, 1200).unwrap();
        let lens: Vec<usize> = lens.iter().map(|&l| l.max(2)).collect();
        let params = GeneratorParams::preset(Preset::Default, rng.random());
        let step = generator::generate::<half::f16>(&params, &lens, 2, 4, 16, 128, spec.kv_layout)
            .unwrap();
        let shape = step.shape;
        let dims = pool_dims(&shape);
        let k_pool = Tensor::zeros(dims.to_vec(), DType::F16, &device).unwrap();
        let v_pool = Tensor::zeros(dims.to_vec(), DType::F16, &device).unwrap();
        let b0 = 128;
        let p = 0.85;
        let attn_params = if spec.is_dense() {
            StepParams::dense(None)
        } else {
            StepParams {
                budget: b0,
                p,
                sm_scale: None,
            }
        };
        let mut attn = TwilightAttention::new(&device, spec, attn_params).unwrap();
        let mut sidecar = (!spec.is_dense()).then(|| attn.new_sidecar(&k_pool).unwrap());
        let rows_of = |slots: &[usize]| -> (Vec<f32>, Vec<f32>) {
            let (mut k, mut v) = (Vec::new(), Vec::new());
            for &s in slots {
                for h in 0..shape.num_kv_heads {
                    let at = shape.try_offset(s, h).unwrap();
                    k.extend_from_slice(&step.k[at..at + shape.head_dim]);
                    v.extend_from_slice(&step.v[at..at + shape.head_dim]);
                }
            }
            (k, v)
        };
        for phase in 0..2 {
            let slots: Vec<usize> = (0..step.table.batch())
                .flat_map(|b| {
                    let n = step.table.len_of(b);
                    let range = if phase == 0 { 0..n - 1 } else { n - 1..n };
                    range.map(move |t| (b, t))
                })
                .map(|(b, t)| step.table.try_slot(b, t).unwrap())
                .collect();
            let (k_rows, v_rows) = rows_of(&slots);
            let k_new = upload(
                &k_rows,
                &[slots.len(), shape.num_kv_heads, shape.head_dim],
                DType::F16,
                &device,
            );
            let v_new = upload(
                &v_rows,
                &[slots.len(), shape.num_kv_heads, shape.head_dim],
                DType::F16,
                &device,
            );
            let slots: Vec<i32> = slots.iter().map(|&s| s as i32).collect();
            attn.append(&k_pool, &v_pool, sidecar.as_mut(), &slots, &k_new, &v_new)
                .unwrap();
        }
        // Every valid row holds what the host table says; nothing else was written.
        let (got_k, got_v) = (download(&k_pool), download(&v_pool));
        let valid: HashSet<usize> = step.table.valid_slots().collect();
        for slot in 0..shape.num_pages * shape.page_size {
            for h in 0..shape.num_kv_heads {
                let at = shape.try_offset(slot, h).unwrap();
                let (gk, gv) = (
                    &got_k[at..at + shape.head_dim],
                    &got_v[at..at + shape.head_dim],
                );
                if valid.contains(&slot) {
                    assert_eq!(
                        gk,
                        &step.k[at..at + shape.head_dim],
                        "{what}: K of slot {slot} head {h}"
                    );
                    assert_eq!(
                        gv,
                        &step.v[at..at + shape.head_dim],
                        "{what}: V of slot {slot} head {h}"
                    );
                } else {
                    assert!(
                        gk.iter().chain(gv).all(|&x| x == 0.0),
                        "{what}: slot {slot} was written"
                    );
                }
            }
        }
        // The step over the appended pool: the sidecar the appends kept gives the reference's
        // selection (the reference derives its own from the host copy).
        let (q, _, _, table) = tensors(&step, DType::F16, &device);
        let out = attn
            .forward(&q, &k_pool, &v_pool, sidecar.as_ref(), &table)
            .unwrap();
        let mut host = step.clone();
        // Spare pages were never appended: they are zero in the pool.
        for slot in 0..shape.num_pages * shape.page_size {
            if !valid.contains(&slot) {
                for h in 0..shape.num_kv_heads {
                    let at = shape.try_offset(slot, h).unwrap();
                    host.k[at..at + shape.head_dim].fill(0.0);
                    host.v[at..at + shape.head_dim].fill(0.0);
                }
            }
        }
        let sm_scale = 1.0 / 128f32.sqrt();
        if spec.is_dense() {
            let (want_o, want_lse) =
                candle_paged_attention(&q, &k_pool, &v_pool, &shape, &step.table, sm_scale as f64)
                    .unwrap();
            assert_close_to_norm(&format!("o, {what}"), &download(&out.o), &download(&want_o));
            assert_close(
                &format!("lse, {what}"),
                &download(&out.lse),
                &download(&want_lse),
                2e-3,
                1e-4,
            );
        } else {
            let want = reference(&spec, &host, b0, p, sm_scale);
            check_sparse(&spec, &host, &out, &want, sm_scale, p, &what);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn other_devices_shared_storage_and_missing_sidecars_are_refused() {
    let Some(device) = gpu_device() else { return };
    let step = SyntheticStep::random::<half::f16>(7, &[40, 17], 2, 4, 16, 128, KvLayout::Nhd, 1.0)
        .unwrap();
    let (q, k, v, table) = tensors(&step, DType::F16, &device);
    let sparse = spec("ps16_hd128_f16_g4_nhd_quest_topp");
    let mut attn = TwilightAttention::new(
        &device,
        sparse,
        StepParams {
            budget: 64,
            p: 0.9,
            sm_scale: None,
        },
    )
    .unwrap();
    // A sparse step without the layer's sidecar.
    let err = attn.forward(&q, &k, &v, None, &table).unwrap_err();
    assert!(err.to_string().contains("sidecar"), "{err}");
    // A sidecar made for another pool.
    let other = Tensor::zeros((4, 16, 2, 128), DType::F16, &device).unwrap();
    let small = attn.new_sidecar(&other).unwrap();
    let err = attn.forward(&q, &k, &v, Some(&small), &table).unwrap_err();
    assert!(err.to_string().contains("sidecar"), "{err}");
    // q on another candle device of the same GPU: its own stream, so refused.
    let second = Device::new_cuda_with_stream(0).unwrap();
    let q2 = q.to_device(&second).unwrap();
    let mut sidecar = attn.new_sidecar(&k).unwrap();
    let err = attn
        .forward(&q2, &k, &v, Some(&sidecar), &table)
        .unwrap_err();
    assert!(
        matches!(err, candle_core::Error::DeviceMismatchBinaryOp { .. }),
        "{err}"
    );
    // q in host memory.
    let err = attn
        .forward(
            &q.to_device(&Device::Cpu).unwrap(),
            &k,
            &v,
            Some(&sidecar),
            &table,
        )
        .unwrap_err();
    assert!(err.to_string().contains("CUDA"), "{err}");
    // New rows that are a view of the pool being written.
    let rows = k.get(0).unwrap(); // [16, 2, 128]: one page of the NHD pool
    let slots: Vec<i32> = (0..16).collect();
    let err = attn
        .append(&k, &v, Some(&mut sidecar), &slots, &rows, &rows)
        .unwrap_err();
    assert!(err.to_string().contains("separate tensors"), "{err}");
    // K and V the same tensor.
    let fresh = Tensor::zeros((16, 2, 128), DType::F16, &device).unwrap();
    let err = attn
        .append(&k, &k, Some(&mut sidecar), &slots, &fresh, &fresh)
        .unwrap_err();
    assert!(err.to_string().contains("separate tensors"), "{err}");
    // Bad slots are twilight's errors, as candle errors.
    let err = attn
        .append(
            &k,
            &v,
            Some(&mut sidecar),
            &[0, 2, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
            &fresh,
            &fresh,
        )
        .unwrap_err();
    assert!(err.to_string().contains("consecutive"), "{err}");
    // After all of that, a good step still runs.
    attn.update_sidecar(&k, &v, &mut sidecar, &all_slots(&step.table))
        .unwrap();
    attn.forward(&q, &k, &v, Some(&sidecar), &table).unwrap();
}
