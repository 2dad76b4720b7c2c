//! Whether a compiled kernel was stored reaches the caller, so that `precompile` can fail
//! naming what it could not keep. Needs NVRTC (no GPU); skipped without it like the others.

mod common;

use std::fs;

use twilight_jit::cache::prepare;
use twilight_jit::disk_cache::{DiskCache, StoreError};
use twilight_jit::{Dtype, KvLayout, Origin, Target, VariantSpec};

#[test]
fn prepare_says_whether_the_binary_was_stored() {
    if common::nvrtc_or_skip("persisted").is_none() {
        return;
    }
    let spec = VariantSpec::dense(1, 64, Dtype::F16, 1, KvLayout::Nhd);
    let target = Target::parse("sm_90").unwrap();
    let tmp = tempfile::tempdir().unwrap();

    let good = DiskCache::open(Some(tmp.path().join("cache")), None);
    let stored = prepare(&spec, &target, &good, false).unwrap();
    assert!(matches!(stored.origin, Origin::Compiled(_)));
    stored.persisted.unwrap();
    let hit = prepare(&spec, &target, &good, false).unwrap();
    assert_eq!(hit.origin, Origin::Disk);
    hit.persisted.unwrap();

    // A cache directory under a regular file can never be written.
    let file = tmp.path().join("file");
    fs::write(&file, b"x").unwrap();
    let bad = DiskCache::open(Some(file.join("cache")), None);
    let lost = prepare(&spec, &target, &bad, false).unwrap();
    assert!(matches!(lost.origin, Origin::Compiled(_)));
    let error = lost.persisted.unwrap_err();
    assert!(matches!(error, StoreError::NotWritable(_)), "{error:?}");
    assert!(error.to_string().contains("not writable"), "{error}");
}
