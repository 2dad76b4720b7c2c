//! The disk tier of the kernel cache, without a GPU: round trips, every kind of damaged entry,
//! read-only and impossible directories, the seed, permissions, and many threads and processes
//! writing one cache at once.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use twilight_jit::disk_cache::{
    BinaryKind, DiskCache, DiskConfig, DiskStatus, EntryMeta, StoreError,
};
use twilight_jit::env::DiskOff;
use twilight_jit::key::{CacheKey, KeyInputs, CACHE_FORMAT};

const VARIANT: &str = "ps16_hd128_f16_g4_hnd_full_none";
const OTHER_VARIANT: &str = "ps32_hd64_bf16_g1_nhd_quest_topp";

/// Environment variable that turns `multiprocess_child` into a worker: the cache directory.
const CHILD_ENV: &str = "TWILIGHT_DISK_CACHE_CHILD";
/// Where the worker writes a marker file once it has done all of its work.
const CHILD_DONE_ENV: &str = "TWILIGHT_DISK_CACHE_CHILD_DONE";

fn key(n: u32) -> CacheKey {
    let options = vec!["--std=c++17".to_string(), "-arch=sm_90".to_string()];
    let source = format!("// kernel {n}\nextern \"C\" __global__ void k{n}() {{}}\n");
    CacheKey::compute(&KeyInputs {
        source: &source,
        options: &options,
        target: "sm_90",
        nvrtc_version: (13, 0),
        crate_version: env!("CARGO_PKG_VERSION"),
    })
}

/// A distinct, deterministic binary per key; some are large enough to take several writes.
fn binary(n: u32) -> Vec<u8> {
    let len = 1 + (n as usize * 7919) % 40_000;
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).wrapping_add(n) as u8 ^ (i >> 8) as u8)
        .collect()
}

fn meta(variant: &str) -> EntryMeta {
    EntryMeta {
        variant: variant.to_string(),
        target: "sm_90".to_string(),
        kind: BinaryKind::Cubin,
        nvrtc_version: (13, 0),
        options: vec!["--std=c++17".to_string(), "-arch=sm_90".to_string()],
    }
}

fn entry_paths(dir: &Path, key: &CacheKey, variant: &str) -> (PathBuf, PathBuf) {
    let folder = dir.join(format!("v{CACHE_FORMAT}")).join(variant);
    (
        folder.join(format!("{}.bin", key.hex())),
        folder.join(format!("{}.json", key.hex())),
    )
}

/// Every file under `dir`, relative, with its contents.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(base, &path, out);
            } else {
                let rel = path.strip_prefix(base).unwrap().to_path_buf();
                out.push((rel, fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

// ---- capturing warnings --------------------------------------------------------------------

/// A minimal subscriber that records the message of every WARN event.
#[derive(Clone, Default)]
struct WarnRecorder {
    warnings: Arc<Mutex<Vec<String>>>,
}

struct MessageVisitor<'a>(&'a mut String);

impl tracing::field::Visit for MessageVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        let _ = write!(self.0, "{}={:?} ", field.name(), value);
    }
}

impl tracing::Subscriber for WarnRecorder {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if *event.metadata().level() == tracing::Level::WARN {
            let mut text = String::new();
            event.record(&mut MessageVisitor(&mut text));
            self.warnings.lock().unwrap().push(text);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Runs `f` with a subscriber on this thread and returns its result and the warnings it logged.
fn capture_warnings<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    let recorder = WarnRecorder::default();
    let warnings = recorder.warnings.clone();
    let value = tracing::subscriber::with_default(recorder, f);
    let warnings = warnings.lock().unwrap().clone();
    (value, warnings)
}

// ---- tests -------------------------------------------------------------------------------------

#[test]
fn disk_cache_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<DiskCache>();
}

#[test]
fn put_then_get_round_trips_and_persists() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let ((), warnings) = capture_warnings(|| {
        let cache = DiskCache::open(Some(dir.clone()), None);
        assert!(cache.is_writable());
        assert_eq!(cache.dir(), Some(dir.as_path()));
        assert_eq!(cache.seed_dir(), None);
        assert_eq!(cache.get(&key(1), VARIANT), None);
        cache.put(&key(1), &meta(VARIANT), &binary(1)).unwrap();
        assert_eq!(cache.get(&key(1), VARIANT), Some(binary(1)));
        // Another key, and the same key under another variant, are still misses.
        assert_eq!(cache.get(&key(2), VARIANT), None);
        assert_eq!(cache.get(&key(1), OTHER_VARIANT), None);

        let reopened = DiskCache::open(Some(dir.clone()), None);
        assert_eq!(reopened.get(&key(1), VARIANT), Some(binary(1)));
    });
    assert!(warnings.is_empty(), "unexpected warnings: {warnings:?}");

    let (bin, json) = entry_paths(&dir, &key(1), VARIANT);
    assert_eq!(fs::read(&bin).unwrap(), binary(1));
    let meta_json: serde_json::Value = serde_json::from_slice(&fs::read(&json).unwrap()).unwrap();
    assert_eq!(meta_json["key"], key(1).hex());
    assert_eq!(meta_json["format"], CACHE_FORMAT);
    assert_eq!(meta_json["len"], binary(1).len());
    assert_eq!(meta_json["variant"], VARIANT);
    assert_eq!(meta_json["kind"], "cubin");
    assert_eq!(meta_json["target"], "sm_90");
}

#[test]
fn empty_binary_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = DiskCache::open(Some(tmp.path().to_path_buf()), None);
    cache.put(&key(7), &meta(VARIANT), &[]).unwrap();
    assert_eq!(cache.get(&key(7), VARIANT), Some(Vec::new()));
}

/// Damages the entry of `key(1)` with `damage`, checks that it is a miss with a "recompiling"
/// warning, then that a fresh put makes it a hit again.
fn damaged_entry_is_a_miss(what: &str, damage: impl FnOnce(&Path, &Path)) {
    let tmp = tempfile::tempdir().unwrap();
    let cache = DiskCache::open(Some(tmp.path().to_path_buf()), None);
    cache.put(&key(1), &meta(VARIANT), &binary(1)).unwrap();
    assert_eq!(cache.get(&key(1), VARIANT), Some(binary(1)), "{what}");
    let (bin, json) = entry_paths(tmp.path(), &key(1), VARIANT);
    damage(&bin, &json);

    let (got, warnings) = capture_warnings(|| cache.get(&key(1), VARIANT));
    assert_eq!(got, None, "{what}: a damaged entry must be a miss");
    assert_eq!(warnings.len(), 1, "{what}: {warnings:?}");
    assert!(warnings[0].contains("recompiling"), "{what}: {warnings:?}");
    // A fresh cache on the same directory agrees.
    let reopened = DiskCache::open(Some(tmp.path().to_path_buf()), None);
    assert_eq!(reopened.get(&key(1), VARIANT), None, "{what}");

    cache.put(&key(1), &meta(VARIANT), &binary(1)).unwrap();
    assert_eq!(
        cache.get(&key(1), VARIANT),
        Some(binary(1)),
        "{what}: after a new put"
    );
}

#[test]
fn garbage_metadata_is_a_miss() {
    damaged_entry_is_a_miss("garbage json", |_, json| {
        fs::write(json, b"{ this is not json").unwrap();
    });
}

#[test]
fn truncated_binary_is_a_miss() {
    damaged_entry_is_a_miss("truncated binary", |bin, _| {
        let bytes = fs::read(bin).unwrap();
        fs::write(bin, &bytes[..bytes.len() / 2]).unwrap();
    });
}

#[test]
fn longer_binary_is_a_miss() {
    damaged_entry_is_a_miss("binary with a byte appended", |bin, _| {
        let mut bytes = fs::read(bin).unwrap();
        bytes.push(0);
        fs::write(bin, &bytes).unwrap();
    });
}

#[test]
fn flipped_byte_is_a_miss() {
    damaged_entry_is_a_miss("flipped byte", |bin, _| {
        let mut bytes = fs::read(bin).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        fs::write(bin, &bytes).unwrap();
    });
}

#[test]
fn metadata_of_another_key_is_a_miss() {
    damaged_entry_is_a_miss("metadata of another key", |bin, json| {
        // A complete, valid entry of key 2 (same bytes), whose metadata is copied over key 1's.
        let tmp = tempfile::tempdir().unwrap();
        let other = DiskCache::open(Some(tmp.path().to_path_buf()), None);
        let bytes = fs::read(bin).unwrap();
        other.put(&key(2), &meta(VARIANT), &bytes).unwrap();
        let (_, other_json) = entry_paths(tmp.path(), &key(2), VARIANT);
        fs::copy(other_json, json).unwrap();
    });
}

#[test]
fn metadata_of_another_format_is_a_miss() {
    damaged_entry_is_a_miss("metadata of another format", |_, json| {
        let mut value: serde_json::Value =
            serde_json::from_slice(&fs::read(json).unwrap()).unwrap();
        value["format"] = serde_json::json!(CACHE_FORMAT + 1);
        fs::write(json, serde_json::to_vec(&value).unwrap()).unwrap();
    });
}

#[test]
fn metadata_without_binary_is_a_miss() {
    damaged_entry_is_a_miss("metadata without binary", |bin, _| {
        fs::remove_file(bin).unwrap();
    });
}

#[test]
fn binary_without_metadata_is_a_quiet_miss() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = DiskCache::open(Some(tmp.path().to_path_buf()), None);
    let (bin, json) = entry_paths(tmp.path(), &key(3), VARIANT);
    // What a writer killed between its two renames leaves behind.
    fs::create_dir_all(bin.parent().unwrap()).unwrap();
    fs::write(&bin, binary(3)).unwrap();
    let (got, warnings) = capture_warnings(|| cache.get(&key(3), VARIANT));
    assert_eq!(got, None);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert!(cache.list().is_empty(), "{:?}", cache.list());

    cache.put(&key(3), &meta(VARIANT), &binary(3)).unwrap();
    assert!(json.exists());
    assert_eq!(cache.get(&key(3), VARIANT), Some(binary(3)));
}

#[test]
fn bad_variant_names_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let cache = DiskCache::open(Some(dir.clone()), None);
    let before = snapshot(tmp.path());
    for bad in [
        "../escape",
        "a/b",
        "",
        "UPPER",
        "with-dash",
        "dot.dot",
        "sp ace",
    ] {
        let ((), warnings) = capture_warnings(|| {
            assert!(
                matches!(
                    cache.put(&key(4), &meta(bad), &binary(4)),
                    Err(StoreError::BadVariant(_))
                ),
                "{bad:?}"
            );
            assert_eq!(cache.get(&key(4), bad), None, "{bad:?}");
        });
        assert_eq!(warnings.len(), 2, "{bad:?}: {warnings:?}");
    }
    let long = "a".repeat(500);
    assert!(cache.put(&key(4), &meta(&long), &binary(4)).is_err());
    assert_eq!(cache.get(&key(4), &long), None);
    assert_eq!(
        snapshot(tmp.path()),
        before,
        "a refused name wrote something"
    );
    assert!(!tmp.path().join("escape").exists());
    // A good name still works after all that.
    assert!(cache.is_writable());
    cache.put(&key(4), &meta(VARIANT), &binary(4)).unwrap();
    assert_eq!(cache.get(&key(4), VARIANT), Some(binary(4)));
}

/// Whether this process can create files in a `0o500` directory (root can).
fn permission_bits_bind(tmp: &Path) -> bool {
    let probe_dir = tmp.join("probe");
    fs::create_dir(&probe_dir).unwrap();
    fs::set_permissions(&probe_dir, fs::Permissions::from_mode(0o500)).unwrap();
    let bound = fs::write(probe_dir.join("x"), b"x").is_err();
    fs::set_permissions(&probe_dir, fs::Permissions::from_mode(0o700)).unwrap();
    bound
}

/// Opens a cache on `dir`, which cannot be used, and checks it degrades with one warning.
fn assert_degrades(dir: PathBuf, what: &str) {
    let (cache, warnings) = capture_warnings(|| {
        let cache = DiskCache::open(Some(dir.clone()), None);
        assert!(!cache.is_writable(), "{what}");
        for n in 0..5 {
            let stored = cache.put(&key(n), &meta(VARIANT), &binary(n));
            assert!(stored.is_err(), "{what}: a put reported success");
            assert_eq!(cache.get(&key(n), VARIANT), None, "{what}");
        }
        assert!(cache.list().is_empty(), "{what}");
        assert_eq!(cache.clear().unwrap_or(0), 0, "{what}");
        cache
    });
    assert_eq!(
        warnings.len(),
        1,
        "{what}: exactly one warning: {warnings:?}"
    );
    assert!(warnings[0].contains("memory only"), "{what}: {warnings:?}");
    assert_eq!(cache.dir(), Some(dir.as_path()), "{what}");
}

#[test]
fn unwritable_directory_degrades_to_memory_with_one_warning() {
    let tmp = tempfile::tempdir().unwrap();

    // A path under a regular file can never be created, not even by root.
    let file = tmp.path().join("file");
    fs::write(&file, b"not a directory").unwrap();
    assert_degrades(file.join("cache"), "path under a file");

    if permission_bits_bind(tmp.path()) {
        let ro = tmp.path().join("readonly");
        fs::create_dir(&ro).unwrap();
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o500)).unwrap();
        assert_degrades(ro.clone(), "0o500 directory");
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o700)).unwrap();
    } else {
        eprintln!("running as root: a 0o500 directory is writable, tested the path under a file");
    }
}

#[test]
fn failed_write_warns_once_reports_every_put_and_keeps_reading() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = DiskCache::open(Some(tmp.path().to_path_buf()), None);
    cache.put(&key(1), &meta(VARIANT), &binary(1)).unwrap();
    // A regular file where the version folder belongs: every write fails, even for root.
    let version = tmp.path().join(format!("v{CACHE_FORMAT}"));
    let aside = tmp.path().join("aside");
    fs::rename(&version, &aside).unwrap();
    fs::write(&version, b"in the way").unwrap();

    let ((), warnings) = capture_warnings(|| {
        assert!(cache.is_writable());
        let first = cache.put(&key(2), &meta(OTHER_VARIANT), &binary(2));
        assert!(
            matches!(&first, Err(StoreError::Write { path, .. }) if path.starts_with(&version)),
            "{first:?}"
        );
        assert!(!cache.is_writable(), "a failed write turns writing off");
        assert!(matches!(cache.status(), DiskStatus::NotWritable(_)));
        // Every later put says it did not store, without a warning each.
        for n in 3..6 {
            let later = cache.put(&key(n), &meta(VARIANT), &binary(n));
            assert!(
                matches!(&later, Err(StoreError::NotWritable(why)) if why.contains("in the way") || why.contains("Not a directory")),
                "{later:?}"
            );
        }
    });
    assert_eq!(warnings.len(), 1, "exactly one warning: {warnings:?}");
    assert!(warnings[0].contains("memory only"), "{warnings:?}");
    assert_eq!(fs::read(&version).unwrap(), b"in the way");
    // What is on disk is still served once the directory is back.
    fs::remove_file(&version).unwrap();
    fs::rename(&aside, &version).unwrap();
    assert_eq!(cache.get(&key(1), VARIANT), Some(binary(1)));
}

#[test]
fn a_file_of_ours_where_a_variant_folder_belongs_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = DiskCache::open(Some(tmp.path().to_path_buf()), None);
    cache.put(&key(1), &meta(VARIANT), &binary(1)).unwrap();
    let blocker = tmp
        .path()
        .join(format!("v{CACHE_FORMAT}"))
        .join(OTHER_VARIANT);
    fs::write(&blocker, b"in the way").unwrap();
    let ((), warnings) = capture_warnings(|| {
        assert_eq!(cache.get(&key(2), OTHER_VARIANT), None);
        cache
            .put(&key(2), &meta(OTHER_VARIANT), &binary(2))
            .unwrap();
        assert_eq!(cache.get(&key(2), OTHER_VARIANT), Some(binary(2)));
    });
    assert_eq!(warnings.len(), 1, "the lookup warns once: {warnings:?}");
    assert!(blocker.is_dir());
    assert!(cache.is_writable());
}

#[test]
fn no_directory_means_no_disk_and_no_warning() {
    let (cache, warnings) = capture_warnings(|| {
        let cache = DiskCache::open(None, None);
        assert!(matches!(
            cache.put(&key(1), &meta(VARIANT), &binary(1)),
            Err(StoreError::Off(DiskOff::NotConfigured))
        ));
        assert_eq!(cache.get(&key(1), VARIANT), None);
        cache
    });
    assert!(warnings.is_empty(), "{warnings:?}");
    assert!(!cache.is_writable());
    assert_eq!(cache.dir(), None);
    assert_eq!(cache.clear().unwrap(), 0);
    assert!(cache.list().is_empty());
}

#[test]
fn seed_is_read_first_and_never_written() {
    let tmp = tempfile::tempdir().unwrap();
    let seed = tmp.path().join("seed");
    let dir = tmp.path().join("cache");
    {
        let filler = DiskCache::open(Some(seed.clone()), None);
        filler.put(&key(10), &meta(VARIANT), &binary(10)).unwrap();
        filler.put(&key(11), &meta(VARIANT), &binary(11)).unwrap();
    }
    let seed_before = snapshot(&seed);

    let ((), warnings) = capture_warnings(|| {
        let cache = DiskCache::open(Some(dir.clone()), Some(seed.clone()));
        assert_eq!(cache.seed_dir(), Some(seed.as_path()));
        assert!(cache.is_writable());
        // Present only in the seed: a hit.
        assert_eq!(cache.get(&key(10), VARIANT), Some(binary(10)));
        // Written entries go to the writable directory.
        cache.put(&key(12), &meta(VARIANT), &binary(12)).unwrap();
        assert_eq!(cache.get(&key(12), VARIANT), Some(binary(12)));
        cache.put(&key(11), &meta(VARIANT), &binary(11)).unwrap();
        assert_eq!(cache.clear().unwrap(), 2);
        // The seed is still there after a clear.
        assert_eq!(cache.get(&key(10), VARIANT), Some(binary(10)));
        assert_eq!(cache.get(&key(11), VARIANT), Some(binary(11)));
        assert_eq!(cache.get(&key(12), VARIANT), None);
        cache.put(&key(12), &meta(VARIANT), &binary(12)).unwrap();
        assert_eq!(
            cache.list().len(),
            1,
            "list shows the writable directory only"
        );
    });
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(snapshot(&seed), seed_before, "the seed was written");
    let (bin, json) = entry_paths(&dir, &key(12), VARIANT);
    assert!(bin.exists() && json.exists());
    let (bin, _) = entry_paths(&dir, &key(10), VARIANT);
    assert!(
        !bin.exists(),
        "a seed hit was copied into the writable directory"
    );
}

#[test]
fn seed_is_consulted_before_the_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let seed = tmp.path().join("seed");
    let dir = tmp.path().join("cache");
    // Same key, different bytes: only the order of the lookups tells which one is returned.
    DiskCache::open(Some(seed.clone()), None)
        .put(&key(1), &meta(VARIANT), b"from the seed")
        .unwrap();
    DiskCache::open(Some(dir.clone()), None)
        .put(&key(1), &meta(VARIANT), b"from the dir")
        .unwrap();
    let cache = DiskCache::open(Some(dir), Some(seed.clone()));
    assert_eq!(cache.get(&key(1), VARIANT).unwrap(), b"from the seed");

    // A damaged seed entry warns and falls through to the directory.
    let (bin, _) = entry_paths(&seed, &key(1), VARIANT);
    fs::write(bin, b"from the seeD").unwrap();
    let (got, warnings) = capture_warnings(|| cache.get(&key(1), VARIANT));
    assert_eq!(got.unwrap(), b"from the dir");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
}

#[test]
fn invalidate_removes_the_entry_and_skips_the_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let seed = tmp.path().join("seed");
    let dir = tmp.path().join("cache");
    DiskCache::open(Some(seed.clone()), None)
        .put(&key(5), &meta(VARIANT), &binary(5))
        .unwrap();
    let seed_before = snapshot(&seed);
    let cache = DiskCache::open(Some(dir.clone()), Some(seed.clone()));

    cache.put(&key(6), &meta(VARIANT), &binary(6)).unwrap();
    assert_eq!(cache.get(&key(6), VARIANT), Some(binary(6)));
    let ((), warnings) = capture_warnings(|| cache.invalidate(&key(6), VARIANT));
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(cache.get(&key(6), VARIANT), None);
    let (bin, json) = entry_paths(&dir, &key(6), VARIANT);
    assert!(!bin.exists() && !json.exists());

    assert_eq!(cache.get(&key(5), VARIANT), Some(binary(5)));
    cache.invalidate(&key(5), VARIANT);
    assert_eq!(
        cache.get(&key(5), VARIANT),
        None,
        "a refused seed entry is skipped"
    );
    assert_eq!(snapshot(&seed), seed_before, "invalidate touched the seed");
    // The recompiled kernel goes to the directory and is found there.
    cache.put(&key(5), &meta(VARIANT), b"recompiled").unwrap();
    assert_eq!(cache.get(&key(5), VARIANT).unwrap(), b"recompiled");
    // Invalidating something absent is harmless.
    cache.invalidate(&key(99), VARIANT);
}

#[test]
fn directory_is_created_owner_only_by_the_first_write() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a").join("b").join("cache");
    let cache = DiskCache::open(Some(dir.clone()), None);
    assert!(cache.is_writable());
    assert!(matches!(cache.status(), DiskStatus::NotCreated));
    // Opening, a lookup and a listing create nothing.
    assert_eq!(cache.get(&key(1), VARIANT), None);
    assert!(cache.list().is_empty());
    assert!(!tmp.path().join("a").exists(), "a read created directories");

    cache.put(&key(1), &meta(VARIANT), &binary(1)).unwrap();
    assert!(matches!(cache.status(), DiskStatus::Ready));
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(format!("v{CACHE_FORMAT}"))), 0o700);
    let (bin, json) = entry_paths(&dir, &key(1), VARIANT);
    assert_eq!(mode(bin.parent().unwrap()), 0o700);
    assert_eq!(mode(&bin) & 0o077, 0, "binary readable by others");
    assert_eq!(mode(&json) & 0o077, 0, "metadata readable by others");

    // An existing directory that others can read (not write) is used as it is.
    let open_dir = tmp.path().join("open");
    fs::create_dir(&open_dir).unwrap();
    fs::set_permissions(&open_dir, fs::Permissions::from_mode(0o755)).unwrap();
    let cache = DiskCache::open(Some(open_dir.clone()), None);
    cache.put(&key(1), &meta(VARIANT), &binary(1)).unwrap();
    assert_eq!(cache.get(&key(1), VARIANT), Some(binary(1)));
    assert_eq!(
        mode(&open_dir),
        0o755,
        "twilight changed the mode of a directory"
    );
}

#[test]
fn stale_temporary_files_are_removed_by_the_first_write() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = DiskCache::open(Some(tmp.path().to_path_buf()), None);
    cache.put(&key(1), &meta(VARIANT), &binary(1)).unwrap();
    let folder = entry_paths(tmp.path(), &key(1), VARIANT)
        .0
        .parent()
        .unwrap()
        .to_path_buf();
    let stale = folder.join(".tmp-1-1-w");
    let fresh = folder.join(".tmp-1-2-w");
    fs::write(&stale, b"half").unwrap();
    fs::write(&fresh, b"half").unwrap();
    let two_hours_ago = SystemTime::now() - Duration::from_secs(2 * 60 * 60);
    fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(two_hours_ago)
        .unwrap();

    let reopened = DiskCache::open(Some(tmp.path().to_path_buf()), None);
    assert_eq!(reopened.get(&key(1), VARIANT), Some(binary(1)));
    assert!(stale.exists(), "opening and reading removed a file");
    reopened.put(&key(2), &meta(VARIANT), &binary(2)).unwrap();
    assert!(!stale.exists(), "a stale temporary file survived a write");
    assert!(fresh.exists(), "a live writer's temporary file was removed");
}

#[test]
fn list_and_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = DiskCache::open(Some(tmp.path().to_path_buf()), None);
    assert!(cache.list().is_empty());
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    cache.put(&key(1), &meta(VARIANT), &binary(1)).unwrap();
    cache.put(&key(2), &meta(VARIANT), &binary(2)).unwrap();
    let mut ptx = meta(OTHER_VARIANT);
    ptx.kind = BinaryKind::Ptx;
    ptx.target = "compute_90".to_string();
    ptx.nvrtc_version = (13, 1);
    cache.put(&key(3), &ptx, &binary(3)).unwrap();
    // A binary without metadata is not an entry.
    let (orphan, _) = entry_paths(tmp.path(), &key(4), VARIANT);
    fs::write(&orphan, binary(4)).unwrap();
    // Neither is an entry whose binary was truncated.
    cache.put(&key(5), &meta(VARIANT), &binary(5)).unwrap();
    let (truncated, _) = entry_paths(tmp.path(), &key(5), VARIANT);
    fs::write(&truncated, b"x").unwrap();
    let after = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();

    let list = cache.list();
    let mut expected: Vec<(String, CacheKey)> = vec![
        (VARIANT.to_string(), key(1)),
        (VARIANT.to_string(), key(2)),
        (OTHER_VARIANT.to_string(), key(3)),
    ];
    expected.sort();
    let got: Vec<(String, CacheKey)> = list.iter().map(|e| (e.variant.clone(), e.key)).collect();
    assert_eq!(got, expected, "list is sorted by variant, then key");
    for entry in &list {
        let n = [1, 2, 3]
            .into_iter()
            .find(|&n| key(n) == entry.key)
            .unwrap();
        assert_eq!(entry.size, binary(n).len() as u64);
        assert_eq!(
            entry.path,
            entry_paths(tmp.path(), &key(n), &entry.variant).0
        );
        assert_eq!(fs::read(&entry.path).unwrap(), binary(n));
        assert!(
            (before..=after).contains(&entry.created),
            "{}",
            entry.created
        );
        if n == 3 {
            assert_eq!(entry.kind, BinaryKind::Ptx);
            assert_eq!(entry.target, "compute_90");
            assert_eq!(entry.nvrtc_version, (13, 1));
        } else {
            assert_eq!(entry.kind, BinaryKind::Cubin);
            assert_eq!(entry.target, "sm_90");
            assert_eq!(entry.nvrtc_version, (13, 0));
        }
    }

    // Three entries, the orphan binary and the damaged entry: five keys.
    assert_eq!(cache.clear().unwrap(), 5);
    assert!(cache.list().is_empty());
    for n in 1..=5 {
        assert_eq!(cache.get(&key(n), VARIANT), None);
    }
    assert_eq!(cache.get(&key(3), OTHER_VARIANT), None);
    assert_eq!(cache.clear().unwrap(), 0);
    // Still usable after a clear.
    cache.put(&key(1), &meta(VARIANT), &binary(1)).unwrap();
    assert_eq!(cache.get(&key(1), VARIANT), Some(binary(1)));
}

/// Every file of a cache directory, minus the folders: `.tmp-` leftovers show up here.
fn leftover_tmp_files(dir: &Path) -> Vec<PathBuf> {
    snapshot(dir)
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".tmp-"))
        })
        .collect()
}

/// The keys and variants that the concurrency tests fill the cache with.
const SHARED_KEYS: u32 = 12;

fn shared_variant(n: u32) -> &'static str {
    if n.is_multiple_of(3) {
        OTHER_VARIANT
    } else {
        VARIANT
    }
}

/// One worker's share of the concurrency tests: for every key, in an order that depends on
/// `worker`, a get (a miss or exactly the bytes), a put, and a get that must hit.
fn hammer(cache: &DiskCache, worker: u32, rounds: u32) {
    for round in 0..rounds {
        for i in 0..SHARED_KEYS {
            let n = (i * 5 + worker * 7 + round) % SHARED_KEYS;
            let variant = shared_variant(n);
            if let Some(got) = cache.get(&key(n), variant) {
                assert!(got == binary(n), "worker {worker}: wrong bytes for key {n}");
            }
            cache.put(&key(n), &meta(variant), &binary(n)).unwrap();
            let got = cache.get(&key(n), variant);
            assert!(
                got.as_deref() == Some(&binary(n)[..]),
                "worker {worker}: key {n} missing or wrong right after its put"
            );
            // A key of this worker's own, too.
            let own = 1000 + worker * 100 + round * SHARED_KEYS + i;
            cache.put(&key(own), &meta(VARIANT), &binary(own)).unwrap();
        }
    }
}

/// Checks that `dir` holds every shared key, valid, and no temporary files.
fn assert_complete(dir: &Path, extra_keys: impl IntoIterator<Item = u32>) {
    let cache = DiskCache::open(Some(dir.to_path_buf()), None);
    let mut expected = BTreeSet::new();
    for n in 0..SHARED_KEYS {
        assert_eq!(
            cache.get(&key(n), shared_variant(n)),
            Some(binary(n)),
            "key {n}"
        );
        expected.insert(key(n));
    }
    for n in extra_keys {
        assert_eq!(cache.get(&key(n), VARIANT), Some(binary(n)), "key {n}");
        expected.insert(key(n));
    }
    let listed: BTreeSet<CacheKey> = cache.list().iter().map(|e| e.key).collect();
    assert_eq!(listed, expected);
    assert_eq!(leftover_tmp_files(dir), Vec::<PathBuf>::new());
}

#[test]
fn many_threads_share_one_cache() {
    const THREADS: u32 = 8;
    const ROUNDS: u32 = 2;
    let tmp = tempfile::tempdir().unwrap();
    let cache = DiskCache::open(Some(tmp.path().to_path_buf()), None);
    let warnings = Arc::new(AtomicUsize::new(0));
    std::thread::scope(|s| {
        for worker in 0..THREADS {
            let cache = &cache;
            let warnings = warnings.clone();
            s.spawn(move || {
                let ((), w) = capture_warnings(|| hammer(cache, worker, ROUNDS));
                warnings.fetch_add(w.len(), Ordering::Relaxed);
            });
        }
    });
    assert_eq!(warnings.load(Ordering::Relaxed), 0);
    assert!(cache.is_writable());
    let own = (0..THREADS).flat_map(|w| (0..ROUNDS * SHARED_KEYS).map(move |j| 1000 + w * 100 + j));
    assert_complete(tmp.path(), own);
}

/// The worker of `many_processes_share_one_cache`; does nothing unless `CHILD_ENV` is set.
#[test]
fn multiprocess_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let worker: u32 = std::env::var("TWILIGHT_DISK_CACHE_WORKER")
        .unwrap()
        .parse()
        .unwrap();
    let (cache, warnings) = capture_warnings(|| {
        let cache = DiskCache::open(Some(PathBuf::from(dir)), None);
        hammer(&cache, worker, 3);
        cache
    });
    assert!(warnings.is_empty(), "worker {worker}: {warnings:?}");
    assert!(cache.is_writable());
    fs::write(std::env::var_os(CHILD_DONE_ENV).unwrap(), b"done").unwrap();
}

#[test]
fn many_processes_share_one_cache() {
    const CHILDREN: u32 = 4;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..CHILDREN)
        .map(|worker| {
            let done = tmp.path().join(format!("done-{worker}"));
            let child = Command::new(&exe)
                .args([
                    "--exact",
                    "multiprocess_child",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, &dir)
                .env(CHILD_DONE_ENV, &done)
                .env("TWILIGHT_DISK_CACHE_WORKER", worker.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (worker, done, child)
        })
        .collect();
    for (worker, done, child) in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "worker {worker} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(done.exists(), "worker {worker} did not run its body");
    }
    let own = (0..CHILDREN).flat_map(|w| (0..3 * SHARED_KEYS).map(move |j| 1000 + w * 100 + j));
    assert_complete(&dir, own);
}

// ---- safety on shared machines -----------------------------------------------------------------

/// A uid that is not this process's: what "another user" is in these tests.
const OTHER_UID: u32 = 12345;

/// Whether this process may give files away (root may); tests of other users' files need it.
fn can_chown(tmp: &Path) -> bool {
    let probe = tmp.join("chown-probe");
    fs::write(&probe, b"x").unwrap();
    let ok = std::os::unix::fs::lchown(&probe, Some(OTHER_UID), None).is_ok();
    fs::remove_file(&probe).unwrap();
    if !ok {
        eprintln!("not root: cannot create files of another user, that part is skipped");
    }
    ok
}

fn mode_bits(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Runs `f` on another thread and fails, rather than hanging, when it takes too long.
fn within_timeout<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = send.send(f());
    });
    receive
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{what}: hung (or panicked)"))
}

fn make_fifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {path:?}");
}

/// A filled cache with one entry of `key(1)`, and the paths of that entry.
fn cache_with_one_entry(dir: &Path) -> (DiskCache, PathBuf, PathBuf) {
    let cache = DiskCache::open(Some(dir.to_path_buf()), None);
    cache.put(&key(1), &meta(VARIANT), &binary(1)).unwrap();
    let (bin, json) = entry_paths(dir, &key(1), VARIANT);
    (cache, bin, json)
}

#[test]
fn reads_leave_a_sticky_world_writable_directory_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
    let (cache, warnings) = capture_warnings(|| {
        let cache = DiskCache::open(Some(shared.clone()), None);
        assert!(cache.list().is_empty());
        assert_eq!(cache.get(&key(1), VARIANT), None);
        assert!(cache.put(&key(1), &meta(VARIANT), &binary(1)).is_err());
        cache
    });
    assert_eq!(mode_bits(&shared), 0o1777, "mode or sticky bit changed");
    assert_eq!(
        fs::read_dir(&shared).unwrap().count(),
        0,
        "something was created"
    );
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains(&shared.display().to_string()),
        "{warnings:?}"
    );
    assert!(
        warnings[0].contains("group or others can write"),
        "{warnings:?}"
    );
    let status = cache.status();
    assert!(matches!(status, DiskStatus::Refused(_)), "{status:?}");
    assert!(status.to_string().contains("mode 1777"), "{status}");
    assert!(
        cache.clear().is_err(),
        "a clear of a refused directory says so"
    );
    assert_eq!(mode_bits(&shared), 0o1777);
}

#[test]
fn a_symlinked_cache_directory_is_not_changed_through_the_link() {
    let tmp = tempfile::tempdir().unwrap();
    for target_mode in [0o755, 0o1777] {
        let target = tmp.path().join(format!("target-{target_mode:o}"));
        fs::create_dir(&target).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(target_mode)).unwrap();
        let link = tmp.path().join(format!("link-{target_mode:o}"));
        std::os::unix::fs::symlink(&target, &link).unwrap();

        let cache = DiskCache::open(Some(link.clone()), None);
        assert!(cache.list().is_empty());
        assert_eq!(cache.get(&key(1), VARIANT), None);
        let stored = cache.put(&key(1), &meta(VARIANT), &binary(1));
        assert_eq!(
            mode_bits(&target),
            target_mode,
            "mode changed through the link"
        );
        if target_mode & 0o022 == 0 {
            // A link of this user to a directory of this user's is followed.
            stored.unwrap();
            assert_eq!(cache.get(&key(1), VARIANT), Some(binary(1)));
        } else {
            assert!(matches!(stored, Err(StoreError::Refused(_))), "{stored:?}");
        }
    }
}

#[test]
fn a_symlink_of_another_user_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    if !can_chown(tmp.path()) {
        return;
    }
    let target = tmp.path().join("target");
    fs::create_dir(&target).unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(OTHER_UID), None).unwrap();
    let cache = DiskCache::open(Some(link), None);
    let status = cache.status();
    assert!(
        status
            .to_string()
            .contains("symbolic link owned by uid 12345"),
        "{status}"
    );
    assert!(cache.put(&key(1), &meta(VARIANT), &binary(1)).is_err());
    assert_eq!(fs::read_dir(&target).unwrap().count(), 0);
}

#[test]
fn a_directory_of_another_user_or_writable_by_others_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let chown = can_chown(tmp.path());
    let mut cases: Vec<(&str, PathBuf, &str)> = Vec::new();

    let group_writable = tmp.path().join("group");
    fs::create_dir(&group_writable).unwrap();
    fs::set_permissions(&group_writable, fs::Permissions::from_mode(0o770)).unwrap();
    cases.push(("group-writable", group_writable, "mode 0770"));

    if chown {
        // A cache of another user, with a valid entry planted in it: never read.
        let foreign = tmp.path().join("foreign");
        cache_with_one_entry(&foreign);
        chown_tree(&foreign, OTHER_UID);
        cases.push(("owned by another uid", foreign, "owned by uid 12345"));

        // Our directory, but the version folder inside is another user's.
        let inner = tmp.path().join("inner");
        cache_with_one_entry(&inner);
        chown_tree(&inner.join(format!("v{CACHE_FORMAT}")), OTHER_UID);
        cases.push(("version folder of another uid", inner, "owned by uid 12345"));
    }

    for (what, dir, why) in cases {
        let before = mode_bits(&dir);
        let (cache, warnings) = capture_warnings(|| {
            let cache = DiskCache::open(Some(dir.clone()), None);
            assert_eq!(
                cache.get(&key(1), VARIANT),
                None,
                "{what}: planted entry was read"
            );
            assert!(cache.list().is_empty(), "{what}");
            let stored = cache.put(&key(2), &meta(VARIANT), &binary(2));
            assert!(
                matches!(stored, Err(StoreError::Refused(_))),
                "{what}: {stored:?}"
            );
            cache
        });
        assert_eq!(warnings.len(), 1, "{what}: {warnings:?}");
        assert!(warnings[0].contains(why), "{what}: {warnings:?}");
        assert!(warnings[0].contains("memory only"), "{what}: {warnings:?}");
        let status = cache.status();
        assert!(
            matches!(status, DiskStatus::Refused(_)),
            "{what}: {status:?}"
        );
        assert!(status.to_string().contains(why), "{what}: {status}");
        assert_eq!(mode_bits(&dir), before, "{what}: mode changed");
    }
}

/// A cache under a directory anyone can write to without the sticky bit is refused (anyone
/// could rename it away and put their own in its place); under a sticky one, as /tmp, it is
/// used.
#[test]
fn a_cache_under_a_world_writable_directory_is_refused_unless_sticky() {
    let tmp = tempfile::tempdir().unwrap();
    let open = tmp.path().join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    let dir = open.join("deeper").join("cache");
    let (cache, warnings) = capture_warnings(|| {
        let cache = DiskCache::open(Some(dir.clone()), None);
        let stored = cache.put(&key(1), &meta(VARIANT), &binary(1));
        assert!(matches!(stored, Err(StoreError::Refused(_))), "{stored:?}");
        cache
    });
    let status = cache.status().to_string();
    assert!(status.contains("mode 0777"), "{status}");
    assert!(status.contains(&open.display().to_string()), "{status}");
    assert!(
        warnings.iter().any(|w| w.contains("mode 0777")),
        "{warnings:?}"
    );
    assert!(!dir.exists(), "a refused cache created its directory");

    fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
    let cache = DiskCache::open(Some(dir.clone()), None);
    cache.put(&key(1), &meta(VARIANT), &binary(1)).unwrap();
    assert_eq!(cache.get(&key(1), VARIANT), Some(binary(1)));
}

/// `chown -R` without following links.
fn chown_tree(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), None).unwrap();
    if fs::symlink_metadata(path).unwrap().is_dir() {
        for child in fs::read_dir(path).unwrap() {
            chown_tree(&child.unwrap().path(), uid);
        }
    }
}

#[test]
fn a_variant_folder_of_another_user_is_skipped_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    if !can_chown(tmp.path()) {
        return;
    }
    let (cache, bin, _) = cache_with_one_entry(tmp.path());
    let folder = bin.parent().unwrap().to_path_buf();
    chown_tree(&folder, OTHER_UID);
    let ((), warnings) = capture_warnings(|| {
        assert_eq!(cache.get(&key(1), VARIANT), None);
        let stored = cache.put(&key(2), &meta(VARIANT), &binary(2));
        assert!(
            matches!(stored, Err(StoreError::VariantRefused(_))),
            "{stored:?}"
        );
        // Other variants are still written.
        cache
            .put(&key(3), &meta(OTHER_VARIANT), &binary(3))
            .unwrap();
        assert_eq!(cache.get(&key(3), OTHER_VARIANT), Some(binary(3)));
    });
    assert_eq!(
        warnings.len(),
        1,
        "one warning for the folder: {warnings:?}"
    );
    assert!(warnings[0].contains("owned by uid 12345"), "{warnings:?}");
    assert!(cache.is_writable());
}

/// Damages the entry of `key(1)`, then checks: the lookup is a miss (never a hang) with one
/// "recompiling" warning, a second lookup does not warn again, and a later put for the key
/// succeeds and is a hit.
fn corrupt_entry_is_a_miss_then_replaced(what: &'static str, damage: impl FnOnce(&Path, &Path)) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let (cache, bin, json) = cache_with_one_entry(&dir);
    damage(&bin, &json);
    let cache = Arc::new(cache);
    let reader = cache.clone();
    let (got, warnings) = within_timeout(what, move || {
        capture_warnings(|| (reader.get(&key(1), VARIANT), reader.get(&key(1), VARIANT)))
    });
    assert_eq!(got, (None, None), "{what}: a corrupt entry must be a miss");
    assert_eq!(warnings.len(), 1, "{what}: {warnings:?}");
    assert!(warnings[0].contains("recompiling"), "{what}: {warnings:?}");
    assert!(cache.list().is_empty(), "{what}: listed");

    let writer = cache.clone();
    within_timeout(what, move || {
        writer.put(&key(1), &meta(VARIANT), &binary(1))
    })
    .unwrap_or_else(|e| panic!("{what}: the put after it failed: {e}"));
    assert_eq!(cache.get(&key(1), VARIANT), Some(binary(1)), "{what}");
    assert!(fs::symlink_metadata(&bin).unwrap().is_file(), "{what}");
    assert!(fs::symlink_metadata(&json).unwrap().is_file(), "{what}");
    drop(tmp);
}

/// A copy of a file elsewhere, and a link to it in its place: valid bytes, but a link.
fn replace_with_link(path: &Path) {
    let elsewhere = path.with_extension("elsewhere");
    fs::rename(path, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, path).unwrap();
}

#[test]
fn a_symlinked_binary_is_a_corrupt_entry() {
    corrupt_entry_is_a_miss_then_replaced("binary is a link", |bin, _| replace_with_link(bin));
}

#[test]
fn a_symlinked_metadata_file_is_a_corrupt_entry() {
    corrupt_entry_is_a_miss_then_replaced("metadata is a link", |_, json| {
        replace_with_link(json);
    });
}

#[test]
fn a_fifo_binary_is_a_corrupt_entry_and_never_hangs() {
    corrupt_entry_is_a_miss_then_replaced("binary is a FIFO", |bin, _| {
        fs::remove_file(bin).unwrap();
        make_fifo(bin);
    });
}

#[test]
fn a_fifo_metadata_file_is_a_corrupt_entry_and_never_hangs() {
    corrupt_entry_is_a_miss_then_replaced("metadata is a FIFO", |_, json| {
        fs::remove_file(json).unwrap();
        make_fifo(json);
    });
}

#[test]
fn a_directory_binary_is_a_corrupt_entry() {
    corrupt_entry_is_a_miss_then_replaced("binary is a directory", |bin, _| {
        fs::remove_file(bin).unwrap();
        fs::create_dir(bin).unwrap();
        fs::write(bin.join("inside"), b"x").unwrap();
    });
}

#[test]
fn a_directory_metadata_file_is_a_corrupt_entry() {
    corrupt_entry_is_a_miss_then_replaced("metadata is a directory", |_, json| {
        fs::remove_file(json).unwrap();
        fs::create_dir(json).unwrap();
    });
}

#[test]
fn a_much_longer_binary_is_a_corrupt_entry() {
    corrupt_entry_is_a_miss_then_replaced("binary far longer than recorded", |bin, _| {
        let mut file = fs::OpenOptions::new().append(true).open(bin).unwrap();
        std::io::Write::write_all(&mut file, &vec![0u8; 1 << 20]).unwrap();
    });
}

#[test]
fn an_entry_of_another_user_is_a_corrupt_entry() {
    let tmp = tempfile::tempdir().unwrap();
    if !can_chown(tmp.path()) {
        return;
    }
    corrupt_entry_is_a_miss_then_replaced("binary of another uid", |bin, _| {
        std::os::unix::fs::lchown(bin, Some(OTHER_UID), None).unwrap();
    });
    corrupt_entry_is_a_miss_then_replaced("metadata of another uid", |_, json| {
        std::os::unix::fs::lchown(json, Some(OTHER_UID), None).unwrap();
    });
}

#[test]
fn a_symlinked_variant_folder_is_never_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let elsewhere = tmp.path().join("elsewhere");
    let (_, bin, _) = cache_with_one_entry(&elsewhere);
    let dir = tmp.path().join("cache");
    let cache = DiskCache::open(Some(dir.clone()), None);
    cache
        .put(&key(2), &meta(OTHER_VARIANT), &binary(2))
        .unwrap();
    // Our variant folder is a link to another cache's (valid) folder.
    let folder = entry_paths(&dir, &key(1), VARIANT)
        .0
        .parent()
        .unwrap()
        .to_path_buf();
    std::os::unix::fs::symlink(bin.parent().unwrap(), &folder).unwrap();
    let outside_before = snapshot(&elsewhere);

    let ((), warnings) = capture_warnings(|| {
        assert_eq!(cache.get(&key(1), VARIANT), None, "read through a link");
        assert!(cache.list().iter().all(|e| e.variant != VARIANT));
        cache.invalidate(&key(1), VARIANT);
        let report = cache.clear_report();
        assert!(report.failures.is_empty(), "{report:?}");
    });
    assert!(
        warnings.iter().any(|w| w.contains("symbolic link")),
        "{warnings:?}"
    );
    assert_eq!(
        snapshot(&elsewhere),
        outside_before,
        "something outside the cache changed"
    );
    assert!(
        fs::symlink_metadata(&folder).is_err(),
        "clear removes the link itself"
    );
    cache.put(&key(1), &meta(VARIANT), &binary(1)).unwrap();
    assert_eq!(cache.get(&key(1), VARIANT), Some(binary(1)));
    assert!(fs::symlink_metadata(&folder).unwrap().is_dir());
}

#[test]
fn a_directory_of_another_user_in_the_way_fails_that_put_only() {
    let tmp = tempfile::tempdir().unwrap();
    if !can_chown(tmp.path()) {
        return;
    }
    let (cache, bin, _) = cache_with_one_entry(tmp.path());
    let (blocked_bin, _) = entry_paths(tmp.path(), &key(2), VARIANT);
    fs::create_dir(&blocked_bin).unwrap();
    std::os::unix::fs::lchown(&blocked_bin, Some(OTHER_UID), None).unwrap();
    let ((), warnings) = capture_warnings(|| {
        for _ in 0..3 {
            let stored = cache.put(&key(2), &meta(VARIANT), &binary(2));
            assert!(
                matches!(&stored, Err(StoreError::Blocked { path, .. }) if *path == blocked_bin),
                "{stored:?}"
            );
        }
        cache.put(&key(3), &meta(VARIANT), &binary(3)).unwrap();
    });
    assert_eq!(warnings.len(), 1, "said once: {warnings:?}");
    assert!(blocked_bin.is_dir(), "another user's directory was removed");
    assert!(bin.exists());
}

#[test]
fn clear_removes_temporaries_of_any_age_and_names_what_it_leaves() {
    let tmp = tempfile::tempdir().unwrap();
    let (cache, bin, _) = cache_with_one_entry(tmp.path());
    let folder = bin.parent().unwrap().to_path_buf();
    let young = folder.join(".tmp-99-1-w");
    fs::write(&young, b"half").unwrap();
    let young_dir = folder.join(".tmp-99-2-aside");
    fs::create_dir(&young_dir).unwrap();
    let stranger = folder.join("notes.txt");
    fs::write(&stranger, b"not ours to judge").unwrap();
    let dir_entry = entry_paths(tmp.path(), &key(7), VARIANT).1;
    fs::create_dir(&dir_entry).unwrap();
    let mut foreign = None;
    if can_chown(tmp.path()) {
        let path = entry_paths(tmp.path(), &key(8), VARIANT).0;
        fs::write(&path, b"x").unwrap();
        std::os::unix::fs::lchown(&path, Some(OTHER_UID), None).unwrap();
        foreign = Some(path);
    }

    let report = cache.clear_report();
    assert!(
        !young.exists() && !young_dir.exists(),
        "young temporaries survived"
    );
    assert!(!bin.exists() && !dir_entry.exists());
    assert_eq!(report.removed, 2, "{report:?}");
    let mut left: Vec<&Path> = report.failures.iter().map(|f| f.path.as_path()).collect();
    left.sort();
    let mut expected = vec![stranger.as_path()];
    expected.extend(foreign.as_deref());
    expected.sort();
    assert_eq!(left, expected, "{report:?}");
    assert!(stranger.exists());
    if let Some(foreign) = &foreign {
        assert!(foreign.exists());
        let failure = report.failures.iter().find(|f| &f.path == foreign).unwrap();
        assert!(failure.reason.contains("owned by uid 12345"), "{failure}");
    }
    let error = cache.clear().unwrap_err().to_string();
    assert!(error.contains(&stranger.display().to_string()), "{error}");
    // Once the stranger is gone, clear is clean and removes the empty folder.
    fs::remove_file(&stranger).unwrap();
    if let Some(foreign) = &foreign {
        fs::remove_file(foreign).unwrap();
    }
    assert_eq!(cache.clear().unwrap(), 0);
    assert!(!folder.exists());
}

// ---- size cap ------------------------------------------------------------------------------

/// The bytes an entry of `n` takes on disk: binary plus metadata.
fn entry_bytes(dir: &Path, n: u32, variant: &str) -> u64 {
    let (bin, json) = entry_paths(dir, &key(n), variant);
    fs::metadata(bin).unwrap().len() + fs::metadata(json).unwrap().len()
}

fn set_last_use(dir: &Path, n: u32, variant: &str, seconds_ago: u64) {
    let (bin, _) = entry_paths(dir, &key(n), variant);
    fs::File::options()
        .write(true)
        .open(bin)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(seconds_ago))
        .unwrap();
}

#[test]
fn eviction_keeps_the_cache_under_its_cap_least_recently_used_first() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    // Entries of keys 1..=4 with the same binary size, so the cap counts entries.
    let one = vec![7u8; 10_000];
    let unlimited = DiskCache::open_with(DiskConfig {
        dir: Ok(dir.clone()),
        seed: None,
        max_bytes: u64::MAX,
    });
    for n in 1..=4 {
        unlimited.put(&key(n), &meta(VARIANT), &one).unwrap();
    }
    let per_entry = entry_bytes(&dir, 1, VARIANT);
    // Room for three entries.
    let cap = per_entry * 3 + per_entry / 2;
    let cache = DiskCache::open_with(DiskConfig {
        dir: Ok(dir.clone()),
        seed: None,
        max_bytes: cap,
    });
    assert_eq!(cache.max_bytes(), cap);
    // Written in order 1..4, long ago; then key 1 is used (a disk hit refreshes it).
    for n in 1..=4 {
        set_last_use(&dir, n, VARIANT, 1000 - u64::from(n));
    }
    assert_eq!(cache.get(&key(1), VARIANT), Some(one.clone()));

    cache.put(&key(5), &meta(VARIANT), &one).unwrap();
    let present: Vec<u32> = (1..=5)
        .filter(|&n| entry_paths(&dir, &key(n), VARIANT).1.exists())
        .collect();
    // Five entries, room for three: the two least recently used (2 and 3) went.
    assert_eq!(present, vec![1, 4, 5]);
    for n in [2, 3] {
        let (bin, json) = entry_paths(&dir, &key(n), VARIANT);
        assert!(!bin.exists() && !json.exists(), "half an entry of {n} left");
    }
    let on_disk: u64 = present.iter().map(|&n| entry_bytes(&dir, n, VARIANT)).sum();
    assert!(on_disk <= cap, "{on_disk} > {cap}");
    assert_eq!(cache.get(&key(1), VARIANT), Some(one.clone()));
}

#[test]
fn the_entry_just_written_is_never_evicted() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = DiskCache::open_with(DiskConfig {
        dir: Ok(tmp.path().to_path_buf()),
        seed: None,
        max_bytes: 1000,
    });
    cache.put(&key(1), &meta(VARIANT), &binary(1)).unwrap();
    // Larger than the cap on its own: it stays, everything older goes.
    cache
        .put(&key(2), &meta(OTHER_VARIANT), &vec![1u8; 5000])
        .unwrap();
    assert_eq!(cache.get(&key(2), OTHER_VARIANT), Some(vec![1u8; 5000]));
    assert_eq!(cache.get(&key(1), VARIANT), None);
    assert_eq!(cache.list().len(), 1);
}

// ---- status and doctor ---------------------------------------------------------------------

#[test]
fn status_and_location_say_why() {
    let off = DiskCache::open_with(DiskConfig {
        dir: Err(DiskOff::NoDiskCacheKnob),
        seed: None,
        max_bytes: 1 << 30,
    });
    assert_eq!(
        off.location().to_string(),
        "disabled by TWILIGHT_NO_DISK_CACHE"
    );
    let error = off.put(&key(1), &meta(VARIANT), &binary(1)).unwrap_err();
    assert!(
        error.to_string().contains("TWILIGHT_NO_DISK_CACHE"),
        "{error}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("file");
    fs::write(&file, b"x").unwrap();
    let under_file = DiskCache::open(Some(file.join("cache")), None);
    let status = under_file.status();
    assert!(matches!(status, DiskStatus::NotWritable(_)), "{status:?}");
    assert!(status.to_string().starts_with("not writable: "), "{status}");

    let fresh = tmp.path().join("fresh");
    let location =
        DiskCache::open(Some(fresh.clone()), Some(tmp.path().join("no-seed"))).location();
    let text = location.to_string();
    assert!(text.starts_with(&fresh.display().to_string()), "{text}");
    assert!(text.contains("not created yet"), "{text}");
    assert!(location
        .seed
        .unwrap()
        .to_string()
        .contains("holds no cache"));
}

#[test]
fn check_reports_a_healthy_cache_and_every_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let seed = tmp.path().join("seed");
    DiskCache::open(Some(seed.clone()), None)
        .put(&key(9), &meta(VARIANT), &binary(9))
        .unwrap();
    let cache = DiskCache::open(Some(dir.clone()), Some(seed.clone()));
    cache.put(&key(1), &meta(VARIANT), &binary(1)).unwrap();
    cache
        .put(&key(2), &meta(OTHER_VARIANT), &binary(2))
        .unwrap();
    let report = cache.check();
    assert!(report.is_healthy(), "{report}");
    assert!(report.exists && report.writable);
    assert_eq!(report.owner_uid, Some(report.our_uid));
    assert_eq!(report.mode, Some(0o700));
    assert_eq!(report.entries, 2);
    assert_eq!(
        report.total_bytes,
        entry_bytes(&dir, 1, VARIANT) + entry_bytes(&dir, 2, OTHER_VARIANT)
    );
    if cfg!(all(target_os = "linux", target_pointer_width = "64")) {
        assert!(report.free_bytes.is_some_and(|b| b > 0), "{report:?}");
    }
    let seed_report = report.seed.as_ref().unwrap();
    assert!(seed_report.readable);
    assert_eq!(seed_report.entries, 1);
    let text = report.to_string();
    assert!(text.contains("2 entries"), "{text}");
    assert!(text.contains("mode 0700"), "{text}");

    // A world-writable directory and a missing seed: two problems, nothing changed.
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    let report = DiskCache::open(Some(dir.clone()), Some(tmp.path().join("nope"))).check();
    assert!(!report.is_healthy());
    assert_eq!(report.problems.len(), 2, "{report}");
    assert!(
        report.problems[0].contains("group or others can write"),
        "{report}"
    );
    assert!(report.problems[1].contains("nope"), "{report}");
    assert!(!report.writable);
    assert_eq!(mode(&dir), 0o777);
}
