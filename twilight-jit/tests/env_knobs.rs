//! The environment knobs as a process sees them. One test only: it sets process variables,
//! which no other test of this binary may read at the same time.

use twilight_jit::disk_cache::{DiskCache, DiskStatus};
use twilight_jit::env::{DiskOff, JitEnv, DEFAULT_CACHE_MAX_BYTES};

fn set(name: &str, value: &str) {
    // Edition 2021: set_var is safe; this binary runs this one test, so nothing reads at once.
    std::env::set_var(name, value);
}

#[test]
fn knobs_parse_in_any_case_and_say_why_the_disk_cache_is_off() {
    let tmp = tempfile::tempdir().unwrap();
    set("TWILIGHT_CACHE_DIR", tmp.path().to_str().unwrap());
    std::env::remove_var("TWILIGHT_CACHE_MAX_BYTES");

    for on in ["TRUE", "yes", "On", "1"] {
        set("TWILIGHT_NO_DISK_CACHE", on);
        let env = JitEnv::from_process();
        assert_eq!(env.cache_dir, None, "{on}");
        assert_eq!(env.disk_off, Some(DiskOff::NoDiskCacheKnob), "{on}");
        assert!(env.problems.is_empty(), "{on}: {:?}", env.problems);
        let status = DiskCache::from_env(&env).status();
        assert!(
            matches!(status, DiskStatus::Off(DiskOff::NoDiskCacheKnob)),
            "{status:?}"
        );
        assert_eq!(status.to_string(), "disabled by TWILIGHT_NO_DISK_CACHE");
    }
    for off in ["0", "off", "FALSE", "No", ""] {
        set("TWILIGHT_NO_DISK_CACHE", off);
        let env = JitEnv::from_process();
        assert_eq!(env.cache_dir.as_deref(), Some(tmp.path()), "{off:?}");
        assert_eq!(env.disk_off, None, "{off:?}");
        assert!(env.problems.is_empty(), "{off:?}: {:?}", env.problems);
    }
    set("TWILIGHT_NO_DISK_CACHE", "maybe");
    let env = JitEnv::from_process();
    assert_eq!(
        env.cache_dir.as_deref(),
        Some(tmp.path()),
        "an unknown value is off"
    );
    assert_eq!(env.problems.len(), 1);
    assert_eq!(env.problems[0].variable, "TWILIGHT_NO_DISK_CACHE");

    set("TWILIGHT_JIT_DISABLE", "Yes");
    assert!(JitEnv::from_process().jit_disabled);
    set("TWILIGHT_JIT_DISABLE", "OFF");
    assert!(!JitEnv::from_process().jit_disabled);

    std::env::remove_var("TWILIGHT_NO_DISK_CACHE");
    assert_eq!(
        JitEnv::from_process().cache_max_bytes,
        DEFAULT_CACHE_MAX_BYTES
    );
    set("TWILIGHT_CACHE_MAX_BYTES", "512M");
    let env = JitEnv::from_process();
    assert_eq!(env.cache_max_bytes, 512 << 20);
    assert_eq!(DiskCache::from_env(&env).max_bytes(), 512 << 20);
    set("TWILIGHT_CACHE_MAX_BYTES", "lots");
    let env = JitEnv::from_process();
    assert_eq!(env.cache_max_bytes, DEFAULT_CACHE_MAX_BYTES);
    assert_eq!(env.problems.len(), 1, "{:?}", env.problems);
}
