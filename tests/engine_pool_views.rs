//! Every check of an engine's pool, table and slots, on the CPU: views over raw addresses are
//! built (never launched), so each mistake is a clear error without a GPU.

use twilight::append::check_slots;
use twilight::page_table::check_table_lengths;
use twilight::pool::{check_layer, check_sidecar_shape};
use twilight::{
    CacheShape, DeviceMut, DeviceRef, Error, HostPageTable, KvLayout, KvPool, KvPoolMut,
    PageTableView, Pruning, Selector, VariantSpec,
};

type E = half::f16;

/// A plausible device address (allocations are 256-byte aligned).
const BASE: u64 = 0x7f00_0000_0000;

fn shape() -> CacheShape {
    CacheShape {
        num_pages: 10,
        num_kv_heads: 2,
        page_size: 16,
        head_dim: 128,
        layout: KvLayout::Hnd,
    }
}

fn raw(address: u64, len: usize) -> DeviceRef<'static, E> {
    // SAFETY: these views are only checked, never passed to a launch.
    unsafe { DeviceRef::from_raw(address, len) }
}

fn layer_pool(k: DeviceRef<'static, E>, offset: usize) -> twilight::Result<KvPool<'static, E>> {
    let v = raw(BASE + (1 << 30), k.len());
    KvPool::from_layer(shape(), k, v, offset)
}

fn expect(result: twilight::Result<impl std::fmt::Debug>, needle: &str) -> Error {
    let err = result.expect_err(needle);
    assert!(
        err.to_string().contains(needle),
        "expected {needle:?} in: {err}"
    );
    err
}

#[test]
fn layers_of_a_shared_allocation() {
    let layer = shape().elements();
    // Four layers in one allocation: each is a window at layer * elements.
    for l in 0..4 {
        let pool = layer_pool(raw(BASE, 4 * layer), l * layer).unwrap();
        assert_eq!(pool.shape(), shape());
    }
    // The last layer ends exactly at the end; one past it does not fit.
    let err = expect(
        layer_pool(raw(BASE, 4 * layer), 4 * layer),
        "at element offset",
    );
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    expect(layer_pool(raw(BASE, 4 * layer), 3 * layer + 8), "elements");
    // An offset so large that offset + layer overflows is refused, not wrapped.
    expect(
        layer_pool(raw(BASE, 4 * layer), usize::MAX - 3),
        "at element offset",
    );
}

#[test]
fn short_buffers_are_refused() {
    let layer = shape().elements();
    let err = expect(layer_pool(raw(BASE, layer - 1), 0), "at least");
    assert!(matches!(err, Error::Shape { .. }));
    // A V shorter than K.
    let err = KvPool::from_layer(shape(), raw(BASE, layer), raw(BASE, layer - 8), 0).unwrap_err();
    assert!(err.to_string().starts_with("V pool buffer"), "{err}");
    // KvPool::new wants exactly one layer.
    expect(
        KvPool::new(shape(), raw(BASE, 2 * layer), raw(BASE, 2 * layer)),
        "K pool of",
    );
    // Writable views are checked the same way.
    // SAFETY: never launched.
    let (k, v) = unsafe {
        (
            DeviceMut::<E>::from_raw(BASE, layer),
            DeviceMut::<E>::from_raw(BASE, layer),
        )
    };
    expect(KvPoolMut::from_layer(shape(), k, v, 8), "at least");
}

#[test]
fn misaligned_pointers_are_refused() {
    let layer = shape().elements();
    // A base off a 16-byte boundary, and an offset that moves the layer off one.
    let err = expect(layer_pool(raw(BASE + 2, layer), 0), "not a multiple of 16");
    assert!(matches!(err, Error::Parameter(_)));
    expect(layer_pool(raw(BASE, 2 * layer), 4), "not a multiple of 16");
    assert!(layer_pool(raw(BASE, 2 * layer), 8).is_ok());
    // The pure check, as a caller with its own buffers would run it.
    assert!(check_layer("K", &shape(), layer, 0, BASE + 8, 2).is_err());
    assert!(check_layer("K", &shape(), layer, 0, BASE + 16, 2).is_ok());
    // Page table buffers are read as i32.
    // SAFETY: never launched.
    let table = unsafe {
        PageTableView::from_device(
            DeviceRef::<i32>::from_raw(BASE + 2, 3),
            DeviceRef::<i32>::from_raw(BASE, 4),
            DeviceRef::<i32>::from_raw(BASE, 2),
            2,
            40,
            &shape(),
        )
    };
    expect(table, "kv_indptr starts at");
}

#[test]
fn shapes_the_kernels_cannot_address_are_refused() {
    let zero = CacheShape {
        num_pages: 0,
        ..shape()
    };
    let err = KvPool::from_layer(zero, raw(BASE, 10), raw(BASE, 10), 0).unwrap_err();
    assert!(err.to_string().contains("zero dimension"), "{err}");
    let odd = CacheShape {
        head_dim: 100,
        ..shape()
    };
    expect(
        KvPool::from_layer(odd, raw(BASE, 1 << 20), raw(BASE, 1 << 20), 0),
        "multiple of 8",
    );
}

fn table(
    indptr: usize,
    indices: usize,
    last: usize,
    batch: usize,
    max_len: usize,
) -> twilight::Result<PageTableView<'static>> {
    // SAFETY: never launched.
    unsafe {
        PageTableView::from_device(
            DeviceRef::<i32>::from_raw(BASE, indptr),
            DeviceRef::<i32>::from_raw(BASE + 4096, indices),
            DeviceRef::<i32>::from_raw(BASE + 8192, last),
            batch,
            max_len,
            &shape(),
        )
    }
}

#[test]
fn page_table_lengths_are_checked() {
    let t = table(4, 7, 3, 3, 100).unwrap();
    assert_eq!(
        (t.batch(), t.max_len(), t.page_size(), t.num_pages()),
        (3, 100, 16, 10)
    );
    for (result, needle) in [
        (
            table(3, 7, 3, 3, 100),
            "kv_indptr has 3 entries for a batch of 3; expected 4",
        ),
        (table(4, 7, 2, 3, 100), "kv_last_page_len has 2 entries"),
        (table(4, 2, 3, 3, 100), "fewer than one page per request"),
        (table(1, 0, 0, 0, 100), "batch = 0"),
        (table(4, 7, 3, 3, 0), "longest request (0 tokens)"),
        (table(4, 7, 3, 3, 161), "more pages than the pool's 10"),
        (table(4, 7, 3, 3, usize::MAX), "32-bit token index"),
    ] {
        let err = expect(result, needle);
        assert!(matches!(err, Error::PageTable(_)), "{err}");
    }
    assert!(check_table_lengths(2, 1, 1, 1, 160, &shape()).is_ok());
    // Page ids are checked where the table is built on the host (PageTable::upload); an
    // engine's device table carries them under PageTableView::from_device's contract.
    let err = HostPageTable::new(vec![0, 2], vec![3, 10], vec![5], 16, 10).unwrap_err();
    assert!(
        err.to_string().contains("outside the cache's pages 0..10"),
        "{err}"
    );
}

#[test]
fn sidecars_must_fit_the_pool_and_the_variant() {
    let pool = layer_pool(raw(BASE, shape().elements()), 0).unwrap();
    let dense = VariantSpec::dense(16, 128, twilight::Dtype::F16, 4, KvLayout::Hnd);
    assert!(pool.check_sidecar_for(&dense).is_ok());
    for (selector, pruning) in [
        (Selector::Quest, Pruning::TopP),
        (Selector::Quest, Pruning::None),
        (Selector::Full, Pruning::TopP),
        (Selector::DoubleSparse { channels: 32 }, Pruning::None),
    ] {
        let spec = VariantSpec {
            selector,
            pruning,
            ..dense
        };
        let err = pool.check_sidecar_for(&spec).unwrap_err();
        assert!(
            matches!(err, Error::Parameter(_)) && err.to_string().contains("Sidecar::for_variant"),
            "{spec}: {err}"
        );
    }
    // A sidecar allocated for another pool (another layer shape, page count or layout).
    for other in [
        CacheShape {
            num_pages: 11,
            ..shape()
        },
        CacheShape {
            layout: KvLayout::Nhd,
            ..shape()
        },
    ] {
        let err = check_sidecar_shape(&shape(), &other).unwrap_err();
        assert!(matches!(err, Error::Shape { .. }), "{err}");
        assert!(err.to_string().contains("sidecar"), "{err}");
    }
    assert!(check_sidecar_shape(&shape(), &shape()).is_ok());
}

#[test]
fn engine_slots_are_checked() {
    let s = shape();
    // Page 3 from offset 5, page 7 from 0 (a new page), page 0 reused from 0.
    assert!(check_slots(&[53, 54, 112, 113, 0], &s).is_ok());
    for (slots, needle) in [
        (vec![160], "outside the pool's slots 0..160"),
        (vec![3, 5], "not one run of consecutive offsets"),
        (vec![48, 112, 49], "not one run"),
        (vec![7, 7], "not one run"),
    ] {
        let err = expect(check_slots(&slots, &s), needle);
        assert!(matches!(err, Error::Parameter(_)));
    }
}
