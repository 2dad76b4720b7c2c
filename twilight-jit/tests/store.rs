//! The process's binaries shared by every CUDA context: a variant asked for by several
//! contexts at once (one thread per device) is compiled once per architecture, whether or not
//! a disk cache is there. Needs NVRTC (no GPU); skipped without it like the others.

mod common;

use std::sync::{Arc, Barrier};

use twilight_jit::disk_cache::DiskCache;
use twilight_jit::{Dtype, KernelStore, KvLayout, Origin, StoreStats, Target, VariantSpec};

fn spec() -> VariantSpec {
    VariantSpec::dense(1, 64, Dtype::F16, 1, KvLayout::Nhd)
}

/// `threads` requests at once for each target, as threads of as many devices would make them.
fn prepare_at_once(
    store: &Arc<KernelStore>,
    targets: &[Target],
    threads: usize,
) -> Vec<twilight_jit::cache::PreparedBinary> {
    let barrier = Arc::new(Barrier::new(threads * targets.len()));
    let handles: Vec<_> = targets
        .iter()
        .flat_map(|&target| std::iter::repeat_n(target, threads))
        .map(|target| {
            let (store, barrier) = (store.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                store.prepare(&spec(), &target).unwrap()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn contexts_asking_at_once_share_one_compile_per_architecture() {
    if common::nvrtc_or_skip("store").is_none() {
        return;
    }
    let sm90 = Target::parse("sm_90").unwrap();
    let sm80 = Target::parse("sm_80").unwrap();
    // No disk cache at all: only the store can keep a second device from compiling.
    let store = Arc::new(KernelStore::new(DiskCache::open(None, None), false));
    let got = prepare_at_once(&store, &[sm90, sm80], 4);
    assert_eq!(
        store.stats(),
        StoreStats {
            compiles: 2,
            disk_reads: 0,
            shared: 6
        }
    );
    for target in [sm90, sm80] {
        let of_target: Vec<_> = got.iter().filter(|p| p.target == target).collect();
        let compiled = of_target
            .iter()
            .filter(|p| matches!(p.origin, Origin::Compiled(_)))
            .count();
        assert_eq!(compiled, 1, "{}: one compile", target.arch());
        for p in &of_target {
            assert_eq!(p.key, of_target[0].key);
            assert_eq!(p.binary, of_target[0].binary);
            // With no disk cache, no request could store its binary; a shared one says so too.
            assert!(p.persisted.is_err(), "{:?}", p.origin);
        }
    }
    assert_ne!(
        got.iter().find(|p| p.target == sm90).unwrap().key,
        got.iter().find(|p| p.target == sm80).unwrap().key,
        "architectures have keys of their own"
    );
    // Later requests are answered from the store.
    assert_eq!(
        store.prepare(&spec(), &sm90).unwrap().origin,
        Origin::Shared
    );
    assert_eq!(store.stats().compiles, 2);
}

#[test]
fn a_store_over_a_filled_disk_cache_reads_it_once() {
    if common::nvrtc_or_skip("store").is_none() {
        return;
    }
    let sm90 = Target::parse("sm_90").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let first = Arc::new(KernelStore::new(
        DiskCache::open(Some(dir.clone()), None),
        false,
    ));
    let compiled = first.prepare(&spec(), &sm90).unwrap();
    assert!(matches!(compiled.origin, Origin::Compiled(_)));
    compiled.persisted.unwrap();

    // A later process: one disk read serves every context.
    let later = Arc::new(KernelStore::new(DiskCache::open(Some(dir), None), false));
    let got = prepare_at_once(&later, &[sm90], 3);
    assert_eq!(
        later.stats(),
        StoreStats {
            compiles: 0,
            disk_reads: 1,
            shared: 2
        }
    );
    for p in &got {
        assert_eq!(p.binary, compiled.binary);
        p.persisted.as_ref().unwrap();
    }
    // A binary read from disk may be replaced when a driver refuses it; one compiled here may
    // not (compiling again would not help).
    let from_disk = got.iter().find(|p| p.origin == Origin::Disk).unwrap();
    let shared = got.iter().find(|p| p.origin == Origin::Shared).unwrap();
    assert!(later.came_from_disk(from_disk));
    assert!(later.came_from_disk(shared));
    assert!(!first.came_from_disk(&first.prepare(&spec(), &sm90).unwrap()));
    // Replacing it compiles once, for every context: a second context's replacement of the
    // same refused bytes gets the fresh binary without compiling.
    let fresh = later.replace_unloadable(from_disk.clone()).unwrap();
    assert!(matches!(fresh.origin, Origin::Compiled(_)));
    let again = later.replace_unloadable(shared.clone()).unwrap();
    assert_eq!(again.origin, Origin::Shared);
    assert_eq!(later.stats().compiles, 1);
}

#[test]
fn a_refused_request_leaves_the_key_empty() {
    if common::nvrtc_or_skip("store").is_none() {
        return;
    }
    let sm90 = Target::parse("sm_90").unwrap();
    let store = KernelStore::new(DiskCache::open(None, None), true);
    let error = store.prepare(&spec(), &sm90).unwrap_err();
    assert!(
        matches!(error, twilight_jit::JitError::JitDisabled { .. }),
        "{error}"
    );
    // The failed request left nothing behind: the next one is refused the same way.
    assert!(store.prepare(&spec(), &sm90).is_err());
    assert_eq!(store.stats(), StoreStats::default());
}
