//! `cache::prepare`, the GPU-free half of the kernel cache that `twilight precompile --arch`
//! uses: render, key, disk lookup, NVRTC compile and store; the seed cache; `jit_disabled`;
//! damaged entries; and what a compile error reports. Needs NVRTC but no GPU: skipped with a
//! printed reason where NVRTC is absent, unless `TWILIGHT_REQUIRE_NVRTC=1`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use twilight_jit::cache::{key_of, prepare, PreparedBinary};
use twilight_jit::disk_cache::DiskCache;
use twilight_jit::error::CompileFailure;
use twilight_jit::nvrtc::{compile, identity_options};
use twilight_jit::render::{render_with, TemplateSource};
use twilight_jit::{Dtype, JitError, KvLayout, Origin, Target, VariantSpec};

/// The cheapest dense variant to compile.
fn spec() -> VariantSpec {
    VariantSpec::dense(1, 64, Dtype::F16, 1, KvLayout::Nhd)
}

fn sm90() -> Target {
    Target::parse("sm_90").unwrap()
}

/// Every file under `dir`, recursively, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out.sort();
    out
}

/// The one `<key>.bin` under `dir`, and its metadata next to it.
fn the_entry(dir: &Path, prepared: &PreparedBinary) -> (PathBuf, PathBuf) {
    let files = files_under(dir);
    let hex = prepared.key.hex();
    let bins: Vec<&PathBuf> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    assert_eq!(bins.len(), 1, "expected one binary in the cache: {files:?}");
    let bin = bins[0].clone();
    assert_eq!(bin.file_stem().unwrap().to_str(), Some(hex.as_str()));
    assert_eq!(
        bin.parent().unwrap().file_name().unwrap().to_str(),
        Some(spec().name().as_str()),
        "the entry is not filed under its variant"
    );
    let json = bin.with_extension("json");
    assert!(files.contains(&json), "no metadata next to {bin:?}");
    assert_eq!(files.len(), 2, "stray files in the cache: {files:?}");
    (bin, json)
}

fn prepare_ok(disk: &DiskCache, jit_disabled: bool, what: &str) -> PreparedBinary {
    prepare(&spec(), &sm90(), disk, jit_disabled).unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn assert_compiled(p: &PreparedBinary, what: &str) {
    assert!(
        matches!(p.origin, Origin::Compiled(d) if !d.is_zero()),
        "{what}: expected a compile, got {:?}",
        p.origin
    );
}

fn assert_disk_hit(p: &PreparedBinary, want: &PreparedBinary, what: &str) {
    assert_eq!(p.origin, Origin::Disk, "{what}: expected a disk hit");
    assert_eq!(p.key, want.key, "{what}: key");
    assert!(p.binary == want.binary, "{what}: different bytes");
}

#[test]
fn prepare_compiles_stores_and_reads_back() {
    if common::nvrtc_or_skip("precompile").is_none() {
        return;
    }
    let spec = spec();
    let target = sm90();
    let dir_a = tempfile::tempdir().unwrap();
    let disk = DiskCache::open(Some(dir_a.path().to_path_buf()), None);
    assert!(disk.is_writable());

    // An empty cache: NVRTC compiles, and the entry is written.
    let first = prepare_ok(&disk, false, "first prepare");
    assert_compiled(&first, "empty cache");
    assert_eq!(first.program.spec, spec);
    assert_eq!(first.target, target);
    assert_eq!(&first.binary[..4], b"\x7fELF", "not a CUBIN");
    let program = render_with(&spec, &TemplateSource::Embedded).unwrap();
    assert_eq!(first.key, key_of(&program, &target).unwrap());
    let (bin, json) = the_entry(dir_a.path(), &first);
    assert!(
        fs::read(&bin).unwrap() == first.binary,
        "stored bytes differ"
    );
    let meta = fs::read_to_string(&json).unwrap();
    for word in [spec.name(), first.key.hex(), target.arch()] {
        assert!(meta.contains(&word), "metadata lacks {word}: {meta}");
    }

    // The same cache again: a disk hit with the same bytes.
    let second = prepare_ok(&disk, false, "second prepare");
    assert_disk_hit(&second, &first, "second prepare");
    // A fresh handle on the same directory, as a later process would open it.
    let reopened = DiskCache::open(Some(dir_a.path().to_path_buf()), None);
    assert_disk_hit(
        &prepare_ok(&reopened, false, "reopened"),
        &first,
        "reopened",
    );
    // Compiling forbidden, but the kernel is cached: fine.
    assert_disk_hit(
        &prepare_ok(&disk, true, "jit disabled, filled cache"),
        &first,
        "jit disabled, filled cache",
    );

    // A as the read-only seed of an empty B: a hit, and B stays empty.
    let dir_b = tempfile::tempdir().unwrap();
    let seeded = DiskCache::open(
        Some(dir_b.path().to_path_buf()),
        Some(dir_a.path().to_path_buf()),
    );
    assert_disk_hit(&prepare_ok(&seeded, false, "seeded"), &first, "seeded");
    assert_disk_hit(
        &prepare_ok(&seeded, true, "seeded, jit disabled"),
        &first,
        "seeded, jit disabled",
    );
    assert_eq!(files_under(dir_b.path()), Vec::<PathBuf>::new());
    let seed_only = DiskCache::open(None, Some(dir_a.path().to_path_buf()));
    assert_disk_hit(
        &prepare_ok(&seed_only, true, "seed only"),
        &first,
        "seed only",
    );

    // A damaged binary: recompiled, rewritten, then a hit again.
    let mut damaged = first.binary.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x5a;
    fs::write(&bin, &damaged).unwrap();
    let fresh_disk = DiskCache::open(Some(dir_a.path().to_path_buf()), None);
    let recompiled = prepare_ok(&fresh_disk, false, "after damage");
    assert_compiled(&recompiled, "damaged entry");
    assert_eq!(recompiled.key, first.key);
    assert!(recompiled.binary != damaged, "the damaged bytes were used");
    assert!(
        recompiled.binary == first.binary,
        "NVRTC gave other bytes for the same key"
    );
    let (bin_again, _) = the_entry(dir_a.path(), &recompiled);
    assert!(
        fs::read(bin_again).unwrap() == first.binary,
        "not rewritten"
    );
    assert_disk_hit(
        &prepare_ok(&fresh_disk, false, "after repair"),
        &first,
        "after repair",
    );
    // With compiling forbidden a damaged entry is a miss, hence an error.
    fs::write(&bin, &damaged).unwrap();
    assert!(matches!(
        prepare(&spec, &target, &fresh_disk, true),
        Err(JitError::JitDisabled { .. })
    ));
}

#[test]
fn jit_disabled_on_an_empty_cache_is_an_error_naming_the_variant() {
    if common::nvrtc_or_skip("jit disabled").is_none() {
        return;
    }
    let spec = spec();
    let dir = tempfile::tempdir().unwrap();
    let disk = DiskCache::open(Some(dir.path().to_path_buf()), None);
    let err = prepare(&spec, &sm90(), &disk, true).unwrap_err();
    let program = render_with(&spec, &TemplateSource::Embedded).unwrap();
    let want_key = key_of(&program, &sm90()).unwrap().hex();
    match &err {
        JitError::JitDisabled { variant, key } => {
            assert_eq!(*variant, spec.name());
            assert_eq!(*key, want_key);
        }
        other => panic!("expected JitDisabled, got {other}"),
    }
    let shown = err.to_string();
    assert!(shown.contains(&spec.name()), "{shown}");
    assert!(shown.contains("TWILIGHT_JIT_DISABLE"), "{shown}");
    assert_eq!(files_under(dir.path()), Vec::<PathBuf>::new());
}

/// Refused before NVRTC is needed, so this runs everywhere.
#[test]
fn prepare_refuses_invalid_and_unsupported_specs() {
    let dir = tempfile::tempdir().unwrap();
    let disk = DiskCache::open(Some(dir.path().to_path_buf()), None);
    let invalid = VariantSpec {
        page_size: 12,
        ..spec()
    };
    match prepare(&invalid, &sm90(), &disk, false) {
        Err(JitError::Spec(e)) => {
            assert_eq!(e.field(), Some(twilight_jit::SpecField::PageSize))
        }
        other => panic!("expected a spec error, got {other:?}"),
    }
    assert_eq!(files_under(dir.path()), Vec::<PathBuf>::new());
}

#[test]
fn compile_error_names_variant_options_log_and_source() {
    if common::nvrtc_or_skip("compile error").is_none() {
        return;
    }
    let spec = spec();
    let target = sm90();
    let mut program = render_with(&spec, &TemplateSource::Embedded).unwrap();
    program.source.push_str("\nint broken = ;\n");
    // The last `#line` marker names the file the broken line is reported in.
    let last_file = program
        .source
        .lines()
        .filter_map(|l| l.strip_prefix("#line 1 \""))
        .filter_map(|l| l.strip_suffix('"'))
        .next_back()
        .unwrap()
        .to_string();

    let err = compile(&program, &target).unwrap_err();
    let shown = err.to_string();
    let JitError::Compile(failure) = &err else {
        panic!("expected a compile error, got {err}");
    };
    let CompileFailure {
        variant,
        options,
        log,
        excerpts,
    } = &**failure;
    assert_eq!(*variant, spec.name());
    let identity = identity_options(&target);
    assert!(
        options.starts_with(&identity),
        "{options:?} lacks {identity:?}"
    );
    assert!(log.contains("error"), "log: {log}");
    assert!(
        log.contains(&format!("{last_file}(")),
        "log names no line of {last_file}: {log}"
    );
    let (file, line, text) = excerpts
        .iter()
        .find(|(_, _, text)| text.contains("broken"))
        .unwrap_or_else(|| panic!("no excerpt shows the broken line: {excerpts:?}"));
    assert_eq!(*file, last_file);
    let pointed = text
        .lines()
        .find(|l| l.trim_start().starts_with('>'))
        .unwrap_or_else(|| panic!("no line is pointed at: {text}"));
    assert!(
        pointed.contains("int broken = ;") && pointed.contains(&line.to_string()),
        "{pointed}"
    );

    // What a user sees carries all of it.
    for part in [
        spec.name(),
        identity.join(" "),
        "int broken = ;".to_string(),
        format!("{last_file}:{line}"),
    ] {
        assert!(
            shown.contains(&part),
            "the message lacks `{part}`:\n{shown}"
        );
    }
    for log_line in log.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            shown.contains(log_line),
            "the message lacks the log line `{log_line}`"
        );
    }
}
