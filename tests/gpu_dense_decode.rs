//! Dense paged decode on the GPU against the CPU reference, on fresh random inputs each run,
//! with the outputs poisoned (NaN) before every launch.

mod common;

use std::sync::Arc;

use cudarc::driver::CudaStream;
use rand::{Rng, SeedableRng};
use twilight::reference::dense_decode;
use twilight::{
    AttentionKernel, DecodeOutput, DenseDecoder, Dtype, KvElement, KvLayout, LaunchOverlap,
    PagedKvCache, VariantSpec, Workspace,
};
use twilight_synth::synthetic::{ragged_lengths, SyntheticStep};

/// (atol, rtol) of the output for a dtype: f32 accumulation, then one rounding to the dtype.
fn tolerance(dtype: Dtype) -> (f32, f32) {
    match dtype {
        Dtype::F16 => (2e-3, 8e-3),
        Dtype::Bf16 => (8e-3, 2e-2),
    }
}

struct Case {
    spec: VariantSpec,
    lens: Vec<usize>,
    num_kv_heads: usize,
}

fn check_case<T: KvElement>(stream: &Arc<CudaStream>, case: &Case, seed: u64) {
    let spec = case.spec;
    let step = SyntheticStep::random::<T>(
        seed,
        &case.lens,
        case.num_kv_heads,
        spec.group_size as usize,
        spec.page_size as usize,
        spec.head_dim as usize,
        spec.kv_layout,
        0.5,
    )
    .unwrap();
    let mut decoder = DenseDecoder::new(stream.clone(), spec).unwrap();
    // The cases cycle through the launch overlap choices (programmatic dependent launch).
    decoder.set_launch_overlap(
        [
            LaunchOverlap::Off,
            LaunchOverlap::Always,
            LaunchOverlap::WhenLaunched,
        ][(seed % 3) as usize],
    );
    let mut cache = PagedKvCache::<T>::new(stream, step.shape).unwrap();
    cache
        .upload(
            stream,
            &SyntheticStep::to_elements::<T>(&step.k),
            &SyntheticStep::to_elements::<T>(&step.v),
        )
        .unwrap();
    let table = twilight::PageTable::upload(stream, &step.table, step.shape.num_pages).unwrap();
    let q = stream
        .clone_htod(&SyntheticStep::to_elements::<T>(&step.q))
        .unwrap();
    let heads = case.lens.len() * step.num_qo_heads;
    let sm_scale = 1.0 / (spec.head_dim as f32).sqrt();
    let want = dense_decode(
        &step.q,
        step.num_qo_heads,
        &step.kv(),
        &step.table,
        sm_scale,
    )
    .unwrap();
    // Both attention kernels, each into freshly poisoned outputs; the tensor-core split is
    // planned for 1, 2 or 3 waves of blocks in turn (shorter chunks, more partials to merge).
    decoder.set_dense_waves(1 + (seed % 3) as usize);
    for kernel in [AttentionKernel::TensorCores, AttentionKernel::CudaCores] {
        decoder.set_attention_kernel(kernel);
        let mut out = DecodeOutput {
            o: stream.clone_htod(&vec![T::poison(); q.len()]).unwrap(),
            lse: stream.clone_htod(&vec![f32::NAN; heads]).unwrap(),
        };
        decoder
            .run_into(
                &q,
                &cache,
                &table,
                Some(sm_scale),
                &mut out,
                &mut Workspace::default(),
            )
            .unwrap();
        let o: Vec<f32> = stream
            .clone_dtoh(&out.o)
            .unwrap()
            .iter()
            .map(|x| x.to_f32())
            .collect();
        let lse = stream.clone_dtoh(&out.lse).unwrap();
        let plan = decoder.plan(case.lens.len(), case.num_kv_heads, step.table.max_len());
        let what = format!(
            "{spec} {kernel:?} kv_heads {} lens {:?} plan {plan:?} (waves {}) seed {seed}",
            case.num_kv_heads,
            if case.lens.len() > 6 {
                &case.lens[..6]
            } else {
                &case.lens[..]
            },
            decoder.decoder().dense_waves()
        );
        let (atol, rtol) = tolerance(spec.dtype);
        common::assert_close(&format!("o of {what}"), &o, &want.o, atol, rtol);
        common::assert_close(&format!("lse of {what}"), &lse, &want.lse, 1e-3, 1e-4);
    }
}

fn check<T: KvElement>(stream: &Arc<CudaStream>, case: &Case, seed: u64) {
    assert_eq!(T::DTYPE, case.spec.dtype);
    check_case::<T>(stream, case, seed)
}

fn run_case(stream: &Arc<CudaStream>, case: &Case, seed: u64) {
    match case.spec.dtype {
        Dtype::F16 => check::<half::f16>(stream, case, seed),
        Dtype::Bf16 => check::<half::bf16>(stream, case, seed),
    }
}

/// Compiles every variant of `cases` on all cores first (NVRTC is thread-safe), so the test
/// spends its time on the kernels, not on serial compiles.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_dense_decode_matches_reference_over_the_variant_matrix() {
    let Some(stream) = common::gpu_stream() else {
        return;
    };
    let seed = common::fresh_seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut cases = Vec::new();
    let head_dims = [64, 128, 256];
    let mut i = 0;
    for dtype in [Dtype::F16, Dtype::Bf16] {
        for layout in [KvLayout::Nhd, KvLayout::Hnd] {
            for group_size in [1, 2, 4, 8] {
                for page_size in [1, 16, 64] {
                    let head_dim = head_dims[i % 3];
                    i += 1;
                    let batch = rng.random_range(1..=16);
                    // Mostly short contexts; every fourth case long enough to split over blocks.
                    let max_len = if i % 4 == 0 {
                        rng.random_range(4000..=20000)
                    } else {
                        rng.random_range(1..=3000)
                    };
                    cases.push(Case {
                        spec: VariantSpec::dense(page_size, head_dim, dtype, group_size, layout),
                        lens: ragged_lengths(&mut rng, batch, max_len).unwrap(),
                        num_kv_heads: rng.random_range(1..=3),
                    });
                }
            }
        }
    }
    common::warm_jit(&stream, cases.iter().map(|c| c.spec));
    for (n, case) in cases.iter().enumerate() {
        run_case(&stream, case, seed.wrapping_add(n as u64));
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_dense_decode_long_ragged_batch_splits_and_merges() {
    let Some(stream) = common::gpu_stream() else {
        return;
    };
    let seed = common::fresh_seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (dtype, layout) in [(Dtype::F16, KvLayout::Hnd), (Dtype::Bf16, KvLayout::Nhd)] {
        let case = Case {
            spec: VariantSpec::dense(16, 128, dtype, 4, layout),
            lens: vec![
                20_000,
                1,
                17,
                16,
                4097,
                rng.random_range(1..20_000),
                20_000,
                333,
            ],
            num_kv_heads: 2,
        };
        run_case(&stream, &case, seed);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_append_then_decode_matches_reference() {
    let Some(stream) = common::gpu_stream() else {
        return;
    };
    let seed = common::fresh_seed();
    let spec = VariantSpec::dense(16, 128, Dtype::F16, 2, KvLayout::Nhd);
    let (kv_heads, d) = (2usize, 128usize);
    let decoder = DenseDecoder::new(stream.clone(), spec).unwrap();
    let shape = twilight::CacheShape {
        num_pages: 64,
        num_kv_heads: kv_heads,
        page_size: 16,
        head_dim: d,
        layout: spec.kv_layout,
    };
    let mut cache = PagedKvCache::<half::f16>::new(&stream, shape).unwrap();
    let requests = [
        cache.add_request(),
        cache.add_request(),
        cache.add_request(),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut random_rows = |n: usize| -> Vec<half::f16> {
        (0..n * kv_heads * d)
            .map(|_| half::f16::from_f32(twilight_synth::synthetic::standard_normal(&mut rng)))
            .collect()
    };
    // Prefill (pages partly filled), then two decode steps of one token per request.
    for appends in [
        vec![(requests[0], 37), (requests[1], 16), (requests[2], 1)],
        vec![(requests[0], 1), (requests[1], 1), (requests[2], 1)],
        vec![(requests[2], 20), (requests[0], 1)],
    ] {
        let tokens: usize = appends.iter().map(|a| a.1).sum();
        let k = stream.clone_htod(&random_rows(tokens)).unwrap();
        let v = stream.clone_htod(&random_rows(tokens)).unwrap();
        decoder.append(&mut cache, &appends, &k, &v).unwrap();
    }
    assert_eq!(cache.len(requests[0]).unwrap(), 39);
    assert_eq!(cache.len(requests[2]).unwrap(), 22);
    let host_table = cache.host_page_table(&requests).unwrap();
    let table = cache.page_table(&stream, &requests).unwrap();
    let (k, v) = cache.download(&stream).unwrap();
    let k: Vec<f32> = k.iter().map(|x| x.to_f32()).collect();
    let v: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
    let q_host: Vec<f32> = (0..3 * 4 * d)
        .map(|_| {
            twilight::element::round_to::<half::f16>(twilight_synth::synthetic::standard_normal(
                &mut rand::rng(),
            ))
        })
        .collect();
    let q = stream
        .clone_htod(&SyntheticStep::to_elements::<half::f16>(&q_host))
        .unwrap();
    let out = decoder.run(&q, &cache, &table, None).unwrap();
    let o: Vec<f32> = stream
        .clone_dtoh(&out.o)
        .unwrap()
        .iter()
        .map(|x| x.to_f32())
        .collect();
    let want = dense_decode(
        &q_host,
        4,
        &twilight::reference::HostKv {
            shape,
            k: &k,
            v: &v,
        },
        &host_table,
        1.0 / (d as f32).sqrt(),
    )
    .unwrap();
    common::assert_close("o after appends", &o, &want.o, 2e-3, 8e-3);
    // The appended values are where the page table says: a zero-filled cache would give a
    // different answer, and the reference reads the downloaded pool through the same table.
    assert!(k.iter().any(|&x| x != 0.0));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_bad_inputs_are_errors_not_panics() {
    let Some(stream) = common::gpu_stream() else {
        return;
    };
    let spec = VariantSpec::dense(16, 64, Dtype::F16, 4, KvLayout::Hnd);
    let decoder = DenseDecoder::new(stream.clone(), spec).unwrap();
    let step =
        SyntheticStep::random::<half::f16>(1, &[40, 7], 2, 4, 16, 64, KvLayout::Hnd, 0.5).unwrap();
    let cache = PagedKvCache::<half::f16>::new(&stream, step.shape).unwrap();
    let table = twilight::PageTable::upload(&stream, &step.table, step.shape.num_pages).unwrap();
    let short_q = stream.alloc_zeros::<half::f16>(5).unwrap();
    let err = decoder.run(&short_q, &cache, &table, None).unwrap_err();
    assert!(
        err.to_string()
            .contains("q [batch, num_qo_heads, head_dim]"),
        "{err}"
    );
    let q = stream.alloc_zeros::<half::f16>(2 * 8 * 64).unwrap();
    assert!(decoder
        .run(&q, &cache, &table, Some(f32::NAN))
        .unwrap_err()
        .to_string()
        .contains("sm_scale"));
    // Wrong dtype, wrong layout, wrong head_dim.
    let bf_cache = PagedKvCache::<half::bf16>::new(&stream, step.shape).unwrap();
    let bf_q = stream.alloc_zeros::<half::bf16>(2 * 8 * 64).unwrap();
    assert!(matches!(
        decoder.run(&bf_q, &bf_cache, &table, None),
        Err(twilight::Error::Dtype { .. })
    ));
    let nhd = PagedKvCache::<half::f16>::new(
        &stream,
        twilight::CacheShape {
            layout: KvLayout::Nhd,
            ..step.shape
        },
    )
    .unwrap();
    assert!(matches!(
        decoder.run(&q, &nhd, &table, None),
        Err(twilight::Error::Layout { .. })
    ));
    // Head counts that do not match group_size: 3 KV heads x 4 = 12 query heads, q has 8.
    let three = PagedKvCache::<half::f16>::new(
        &stream,
        twilight::CacheShape {
            num_kv_heads: 3,
            ..step.shape
        },
    )
    .unwrap();
    assert!(decoder.run(&q, &three, &table, None).is_err());
    // A table validated against another pool.
    let small =
        twilight::PageTable::upload(&stream, &step.table, step.shape.num_pages + 5).unwrap();
    assert!(matches!(
        decoder.run(&q, &cache, &small, None),
        Err(twilight::Error::PageTable(_))
    ));
    // A sparse variant is not a dense decoder.
    assert!(DenseDecoder::new(
        stream.clone(),
        VariantSpec {
            selector: twilight::Selector::Quest,
            ..spec
        }
    )
    .is_err());
}
