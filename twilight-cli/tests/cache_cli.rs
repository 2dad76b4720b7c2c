//! The cache commands as a user meets them: reads change nothing, a cache others can write to
//! is refused and `doctor` says so, and `precompile` fails naming each variant it could not
//! store. The precompile case needs NVRTC (skipped without it unless `TWILIGHT_REQUIRE_NVRTC=1`).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

fn twilight(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_twilight"))
        .args(args)
        .env("TWILIGHT_CACHE_DIR", cache)
        .env_remove("TWILIGHT_NO_DISK_CACHE")
        .env_remove("TWILIGHT_SEED_CACHE_DIR")
        .output()
        .expect("the CLI runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn listing_a_shared_directory_changes_nothing_and_doctor_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let out = twilight(&shared, &["cache", "list"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("refused"), "{}", text(&out));
    let mode = std::fs::metadata(&shared).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o1777, "a listing changed the directory's mode");
    let out = twilight(&shared, &["doctor"]);
    assert!(
        !out.status.success(),
        "doctor passed a 1777 cache: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("group or others can write"),
        "{}",
        text(&out)
    );
    // Its log lines carry no colour codes when stderr is not a terminal.
    assert!(!text(&out).contains('\u{1b}'), "{}", text(&out));
}

#[test]
fn cache_path_names_a_disabled_cache() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_twilight"))
        .args(["cache", "path"])
        .env("TWILIGHT_CACHE_DIR", dir.path())
        .env("TWILIGHT_NO_DISK_CACHE", "TRUE")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("disabled by TWILIGHT_NO_DISK_CACHE"),
        "{}",
        text(&out)
    );
}

/// A variant directory another user owns cannot take the kernel: precompile must fail and
/// name the variant instead of printing "ready". Needs root (to chown) and NVRTC.
#[test]
fn precompile_fails_naming_each_variant_it_could_not_store() {
    let nvrtc = twilight::twilight_jit::nvrtc::nvrtc();
    if let Err(e) = nvrtc {
        assert!(
            std::env::var("TWILIGHT_REQUIRE_NVRTC").as_deref() != Ok("1"),
            "TWILIGHT_REQUIRE_NVRTC=1 but NVRTC is unusable: {e}"
        );
        eprintln!("SKIPPED: NVRTC not available ({e})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let variant = "ps16_hd128_f16_g4_hnd_full_none";
    let foreign = cache.join("v1").join(variant);
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(cache.join("v1"), std::fs::Permissions::from_mode(0o700)).unwrap();
    if std::os::unix::fs::chown(&foreign, Some(12345), Some(12345)).is_err() {
        eprintln!("SKIPPED: not root, cannot give a directory to another user");
        return;
    }
    let out = twilight(&cache, &["precompile", "--arch", "sm_90", variant]);
    let all = text(&out);
    assert!(!out.status.success(), "precompile succeeded: {all}");
    assert!(all.contains("could not be stored"), "{all}");
    assert!(all.contains(variant), "{all}");
    assert!(!all.contains("ready in"), "{all}");
}
