//! The candle ops' input checks, on the CPU: bad ranks, shapes, dtypes and devices are candle
//! errors, raised before anything reaches a GPU.

use candle_core::{DType, Device, Error, Tensor};
use twilight::{HostPageTable, KvLayout};
use twilight_candle::{
    check_append, check_devices, check_step, pool_shape, PageTable, StepParams, TwilightAttention,
    VariantSpec,
};

const PAGES: usize = 8;

fn spec(name: &str) -> VariantSpec {
    name.parse().unwrap()
}

fn zeros(dims: &[usize], dtype: DType) -> Tensor {
    Tensor::zeros(dims.to_vec(), dtype, &Device::Cpu).unwrap()
}

/// Two requests of 20 and 5 tokens on pages 3, 0 and 6 of 16 tokens.
fn table() -> PageTable {
    let host = HostPageTable::new(vec![0, 2, 3], vec![3, 0, 6], vec![4, 5], 16, PAGES).unwrap();
    PageTable::from_host(&host, PAGES, &Device::Cpu).unwrap()
}

/// A pool of `spec`'s layout: 8 pages, 2 KV heads.
fn pool(spec: &VariantSpec, dtype: DType) -> (Tensor, Tensor) {
    let dims = match spec.kv_layout {
        KvLayout::Hnd => [PAGES, 2, 16, 128],
        KvLayout::Nhd => [PAGES, 16, 2, 128],
    };
    (zeros(&dims, dtype), zeros(&dims, dtype))
}

fn q(dtype: DType) -> Tensor {
    zeros(&[2, 8, 128], dtype)
}

#[test]
fn good_inputs_pass_the_device_free_checks() {
    for name in [
        "ps16_hd128_f16_g4_hnd_full_none",
        "ps16_hd128_f16_g4_nhd_quest_topp",
    ] {
        let spec = spec(name);
        let (k, v) = pool(&spec, DType::F16);
        let step = check_step(&spec, &q(DType::F16), &k, &v, &table()).unwrap();
        assert_eq!((step.batch, step.num_qo_heads), (2, 8));
        assert_eq!(step.pool.num_kv_heads, 2);
        assert_eq!(step.pool.layout, spec.kv_layout);
        let rows = zeros(&[3, 2, 128], DType::F16);
        check_append(&spec, &k, &v, 3, &rows, &rows).unwrap();
    }
}

#[test]
fn bad_ranks_and_shapes_are_candle_errors() {
    let spec = spec("ps16_hd128_f16_g4_hnd_full_none");
    let (k, v) = pool(&spec, DType::F16);
    let table = table();
    // q of rank 2.
    let err = check_step(&spec, &zeros(&[2, 1024], DType::F16), &k, &v, &table).unwrap_err();
    assert!(err.to_string().contains("rank"), "{err}");
    // q with the wrong head count (group size 4, 2 KV heads: 8 query heads).
    let err = check_step(&spec, &zeros(&[2, 6, 128], DType::F16), &k, &v, &table).unwrap_err();
    assert!(matches!(err, Error::UnexpectedShape { .. }), "{err}");
    // q with a batch other than the table's.
    let err = check_step(&spec, &zeros(&[3, 8, 128], DType::F16), &k, &v, &table).unwrap_err();
    assert!(matches!(err, Error::UnexpectedShape { .. }), "{err}");
    // A pool of another page size or head_dim than the variant.
    for dims in [[PAGES, 2, 8, 128], [PAGES, 2, 16, 64]] {
        let bad = zeros(&dims, DType::F16);
        let err = check_step(&spec, &q(DType::F16), &bad, &bad, &table).unwrap_err();
        assert!(
            matches!(err, Error::UnexpectedShape { .. }),
            "{dims:?}: {err}"
        );
    }
    // V of another shape than K.
    let err = check_step(
        &spec,
        &q(DType::F16),
        &k,
        &zeros(&[PAGES, 2, 16, 64], DType::F16),
        &table,
    )
    .unwrap_err();
    assert!(err.to_string().contains("V pool"), "{err}");
    // A table made for another pool.
    let small = zeros(&[4, 2, 16, 128], DType::F16);
    let err = check_step(&spec, &q(DType::F16), &small, &small, &table).unwrap_err();
    assert!(err.to_string().contains("page table"), "{err}");
    // New rows of the wrong count or head count.
    let err = check_append(
        &spec,
        &k,
        &v,
        3,
        &zeros(&[2, 2, 128], DType::F16),
        &zeros(&[3, 2, 128], DType::F16),
    )
    .unwrap_err();
    assert!(matches!(err, Error::UnexpectedShape { .. }), "{err}");
    let err = check_append(
        &spec,
        &k,
        &v,
        3,
        &zeros(&[3, 2, 128], DType::F16),
        &zeros(&[3, 1, 128], DType::F16),
    )
    .unwrap_err();
    assert!(matches!(err, Error::UnexpectedShape { .. }), "{err}");
}

#[test]
fn bad_dtypes_are_candle_errors() {
    let f16 = spec("ps16_hd128_f16_g4_hnd_full_none");
    let bf16 = spec("ps16_hd128_bf16_g4_hnd_full_none");
    let (k, v) = pool(&f16, DType::F16);
    let table = table();
    for (spec, q_dtype) in [(&f16, DType::BF16), (&f16, DType::F32), (&bf16, DType::F16)] {
        let (k, v) = pool(spec, spec_dtype(spec));
        let err = check_step(spec, &q(q_dtype), &k, &v, &table).unwrap_err();
        assert!(matches!(err, Error::UnexpectedDType { .. }), "{err}");
    }
    // A pool of f32, or of the other half type.
    let (k32, v32) = pool(&f16, DType::F32);
    let err = check_step(&f16, &q(DType::F16), &k32, &v32, &table).unwrap_err();
    assert!(matches!(err, Error::UnexpectedDType { .. }), "{err}");
    let err = pool_shape(&bf16, &k, &v).unwrap_err();
    assert!(matches!(err, Error::UnexpectedDType { .. }), "{err}");
    // New rows of another dtype.
    let err = check_append(
        &f16,
        &k,
        &v,
        3,
        &zeros(&[3, 2, 128], DType::BF16),
        &zeros(&[3, 2, 128], DType::F16),
    )
    .unwrap_err();
    assert!(matches!(err, Error::UnexpectedDType { .. }), "{err}");
    // A device table that is not i32.
    let err = unsafe_table(DType::U32).unwrap_err();
    assert!(matches!(err, Error::UnexpectedDType { .. }), "{err}");
    unsafe_table(DType::I32).unwrap();
}

fn spec_dtype(spec: &VariantSpec) -> DType {
    twilight_candle::candle_dtype(spec.dtype)
}

fn unsafe_table(dtype: DType) -> candle_core::Result<PageTable> {
    let indptr = Tensor::new(&[0i32, 2, 3], &Device::Cpu)?.to_dtype(dtype)?;
    let indices = Tensor::new(&[3i32, 0, 6], &Device::Cpu)?.to_dtype(dtype)?;
    let last = Tensor::new(&[4i32, 5], &Device::Cpu)?.to_dtype(dtype)?;
    // SAFETY: the same valid table as `table()`; it is never launched on (CPU tensors).
    unsafe { PageTable::from_tensors(indptr, indices, last, 20, PAGES, 16) }
}

#[test]
fn cpu_tensors_and_devices_are_refused() {
    let spec = spec("ps16_hd128_f16_g4_hnd_full_none");
    // The op itself needs a CUDA device.
    let err = TwilightAttention::new(&Device::Cpu, spec, StepParams::dense(None)).unwrap_err();
    assert!(err.to_string().contains("CUDA device"), "{err}");
    let err = TwilightAttention::dense(&Device::Cpu, spec, None).unwrap_err();
    assert!(err.to_string().contains("CUDA device"), "{err}");
    // A sparse variant is not a dense one.
    let err = TwilightAttention::dense(
        &Device::Cpu,
        self::spec("ps16_hd128_f16_g4_hnd_quest_topp"),
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("not dense"), "{err}");
    // Inputs in host memory are refused by the device check every op makes.
    let (k, v) = pool(&spec, DType::F16);
    let err = check_devices(
        &Device::Cpu,
        &[&q(DType::F16), &k, &v],
        "twilight attention",
    )
    .unwrap_err();
    assert!(err.to_string().contains("CUDA device"), "{err}");
    // Bad step parameters are refused before any device is touched.
    let params = StepParams {
        budget: 0,
        p: 0.9,
        sm_scale: None,
    };
    assert!(params.validate().is_err());
}

#[test]
fn strided_inputs_are_refused() {
    // A transposed q has the right dims, but the kernels read one dense window.
    let q = zeros(&[2, 128, 8], DType::F16).transpose(1, 2).unwrap();
    let spec = spec("ps16_hd128_f16_g4_hnd_full_none");
    let (k, v) = pool(&spec, DType::F16);
    let err = check_step(&spec, &q, &k, &v, &table()).unwrap_err();
    assert!(matches!(err, Error::RequiresContiguous { .. }), "{err}");
    // One layer of a `[layers, pages, ...]` pool is contiguous and accepted.
    let all = zeros(&[3, PAGES, 2, 16, 128], DType::F16);
    let layer = all.get(1).unwrap();
    check_step(&spec, &self::q(DType::F16), &layer, &layer, &table()).unwrap();
}
