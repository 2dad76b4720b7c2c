//! The rendered CUDA of every snapshot variant, pinned with insta (each variant's own part and
//! the digests of the headers it pulls in; each header once), plus the invariants of a
//! rendered program that a snapshot cannot state: determinism, one entry per stage, headers
//! behind `#line` markers, no Tera syntax left, the banner, template overrides, and that every
//! selector with every pruning mode is snapshotted.
//!
//! Rendering always uses [`TemplateSource::Embedded`] (or an explicit directory), so
//! `TWILIGHT_TEMPLATE_DIR` cannot change what these tests see. Accept changed snapshots with
//! `INSTA_UPDATE=always cargo test -p twilight-jit --test render_snapshots` and review the diff.

mod variants;

use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use twilight_jit::render::{embedded_template_names, render_with, TemplateSource};
use twilight_jit::{Dtype, KvLayout, Pruning, RenderError, RenderedProgram, Selector, VariantSpec};

fn render(spec: &VariantSpec) -> RenderedProgram {
    render_with(spec, &TemplateSource::Embedded)
        .unwrap_or_else(|e| panic!("{spec} does not render: {e}"))
}

fn templates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../templates")
}

/// The headers prepended to every program (`common.cuh`, ...), from the embedded file list.
fn header_names() -> Vec<String> {
    let headers: Vec<String> = embedded_template_names()
        .filter_map(|p| p.strip_prefix("include/twilight").ok())
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    assert!(
        headers.len() >= 3 && headers.iter().all(|h| h.ends_with(".cuh")),
        "unexpected embedded headers: {headers:?}"
    );
    headers
}

/// The stage templates (`append.cu.tera`, ...), from the embedded file list.
fn stage_template_names() -> Vec<String> {
    embedded_template_names()
        .filter(|p| p.extension().is_some_and(|e| e == "tera"))
        .map(|p| p.to_string_lossy().into_owned())
        .collect()
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Byte offsets at which `word` occurs as a whole C identifier.
fn identifier_positions(source: &str, word: &str) -> Vec<usize> {
    let bytes = source.as_bytes();
    source
        .match_indices(word)
        .map(|(at, _)| at)
        .filter(|&at| {
            let before = at.checked_sub(1).map(|i| bytes[i]);
            let after = bytes.get(at + word.len()).copied();
            !before.is_some_and(is_ident_byte) && !after.is_some_and(is_ident_byte)
        })
        .collect()
}

/// The part of `source` that a `#line 1 "<file>"` marker line opens, up to the next marker:
/// `(before, section, after)`, the section starting with the marker itself.
fn split_section<'a>(source: &'a str, file: &str) -> (&'a str, &'a str, &'a str) {
    let marker = format!("\n#line 1 \"{file}\"\n");
    let start = source
        .find(&marker)
        .unwrap_or_else(|| panic!("no `#line 1 \"{file}\"` marker line"))
        + 1;
    let end = source[start + 1..]
        .find("\n#line 1 \"")
        .map_or(source.len(), |at| start + 1 + at + 1);
    (&source[..start], &source[start..end], &source[end..])
}

/// A short digest of a header's text: a header edit changes the digest in every variant's
/// snapshot (one line each) and the header's own snapshot (the diff to review).
fn digest(text: &str) -> String {
    let hash = Sha256::digest(text.as_bytes());
    hash[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Each variant's own part (banner, parameter structs, glue) and the headers it pulls in, by
/// digest; each header once, whole.
#[test]
fn rendered_glue_and_header_snapshots() {
    let specs = variants::snapshot_variants();
    assert!(!specs.is_empty());
    let mut headers: Vec<(String, String)> = Vec::new();
    for spec in &specs {
        let program = render(spec);
        let mut text = String::from("// headers, in order (sha256 prefix):\n");
        for (path, header) in &program.headers {
            text.push_str(&format!("//   {path} {}\n", digest(header)));
            if !headers.iter().any(|(p, _)| p == path) {
                headers.push((path.clone(), header.clone()));
            }
        }
        text.push_str(&program.glue);
        insta::assert_snapshot!(spec.name(), text);
    }
    for (path, text) in &headers {
        insta::assert_snapshot!(header_snapshot_name(path), text);
    }
}

/// `twilight/prune.cuh` -> `header_prune`.
fn header_snapshot_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    format!("header_{}", file.trim_end_matches(".cuh"))
}

/// Every `.snap` of this file belongs to a listed variant or a header: one removed from the
/// list must take its snapshot with it.
#[test]
fn no_orphan_snapshots() {
    let mut names: Vec<String> = variants::snapshot_variants()
        .iter()
        .map(VariantSpec::name)
        .collect();
    let program = render(&variants::snapshot_variants()[0]);
    names.extend(program.headers.iter().map(|(p, _)| header_snapshot_name(p)));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots");
    let Ok(entries) = fs::read_dir(&dir) else {
        panic!("{} is missing: generate the snapshots", dir.display());
    };
    let mut seen = 0;
    for entry in entries {
        let file = entry.unwrap().file_name().to_string_lossy().into_owned();
        let Some(name) = file
            .strip_prefix("render_snapshots__")
            .and_then(|f| f.strip_suffix(".snap"))
        else {
            continue;
        };
        assert!(
            names.iter().any(|n| n == name),
            "{file} is not the snapshot of any variant in variants/mod.rs or any header; delete it"
        );
        seen += 1;
    }
    assert_eq!(
        seen,
        names.len(),
        "a snapshot variant or header has no .snap file"
    );
}

#[test]
fn snapshot_variants_cover_the_variant_space() {
    let specs = variants::snapshot_variants();
    let mut names: Vec<String> = specs.iter().map(VariantSpec::name).collect();
    names.sort();
    names.dedup();
    assert_eq!(
        names.len(),
        specs.len(),
        "a snapshot variant is listed twice"
    );
    for spec in &specs {
        spec.validate()
            .unwrap_or_else(|e| panic!("{spec} is invalid: {e}"));
    }
    let covers = |what: &str, hit: &dyn Fn(&VariantSpec) -> bool| {
        assert!(specs.iter().any(hit), "no snapshot variant has {what}");
    };
    for page_size in twilight_jit::spec::PAGE_SIZES {
        covers(&format!("page_size {page_size}"), &|s| {
            s.page_size == page_size
        });
    }
    for head_dim in twilight_jit::spec::HEAD_DIMS {
        covers(&format!("head_dim {head_dim}"), &|s| s.head_dim == head_dim);
    }
    for group_size in twilight_jit::spec::GROUP_SIZES {
        covers(&format!("group_size {group_size}"), &|s| {
            s.group_size == group_size
        });
    }
    for dtype in [Dtype::F16, Dtype::Bf16] {
        covers(&format!("dtype {dtype:?}"), &|s| s.dtype == dtype);
    }
    for layout in [KvLayout::Nhd, KvLayout::Hnd] {
        covers(&format!("kv_layout {layout:?}"), &|s| s.kv_layout == layout);
    }
    // Every selector with every pruning mode is snapshotted.
    for selector in [
        Selector::Full,
        Selector::Quest,
        Selector::DoubleSparse { channels: 32 },
    ] {
        for pruning in [Pruning::None, Pruning::TopP] {
            let same_kind =
                |s: Selector| std::mem::discriminant(&s) == std::mem::discriminant(&selector);
            for dtype in [Dtype::F16, Dtype::Bf16] {
                let snapshotted = specs
                    .iter()
                    .any(|s| same_kind(s.selector) && s.pruning == pruning && s.dtype == dtype);
                assert!(
                    snapshotted,
                    "selector {} with pruning {} on {dtype:?} renders but no snapshot variant uses it",
                    selector.declared(),
                    pruning.declared()
                );
            }
        }
    }
}

#[test]
fn rendering_is_deterministic() {
    for spec in variants::snapshot_variants() {
        let a = render(&spec);
        let b = render(&spec);
        assert!(a.source == b.source, "{spec}: two renders differ");
        assert_eq!(a, b, "{spec}: two rendered programs differ");
        // A spec that is equal but built another way renders the same bytes too.
        let parsed: VariantSpec = spec.name().parse().unwrap();
        assert!(render(&parsed).source == a.source, "{spec}: reparsed spec");
    }
}

#[test]
fn banner_names_the_variant() {
    for spec in variants::snapshot_variants() {
        let program = render(&spec);
        let first = program.source.lines().next().unwrap_or_default();
        assert_eq!(first, format!("// twilight variant {}", spec.name()));
        assert_eq!(program.spec, spec);
    }
}

#[test]
fn every_stage_entry_is_defined_exactly_once() {
    for spec in variants::snapshot_variants() {
        let program = render(&spec);
        let source = &program.source;
        assert!(!program.stages.is_empty(), "{spec}: no stages");
        let mut entries = Vec::new();
        for &stage in &program.stages {
            let entry = program.entry(stage);
            assert_eq!(entry, format!("{}_{}", spec.name(), stage.suffix()));
            let at = identifier_positions(source, &entry);
            assert_eq!(
                at.len(),
                1,
                "{spec}: entry `{entry}` occurs {} times as an identifier",
                at.len()
            );
            let at = at[0];
            // It is the name being declared by the nearest `extern "C"` before it ...
            let decl = source[..at]
                .rfind("extern \"C\"")
                .unwrap_or_else(|| panic!("{spec}: no extern \"C\" before `{entry}`"));
            let between = &source[decl..at];
            assert!(
                !between.contains([';', '{', '}']),
                "{spec}: `{entry}` is not the name declared by `extern \"C\"`: {between:?}"
            );
            assert!(between.contains("__global__"), "{spec}: {between:?}");
            // ... and the parameter list follows it.
            assert!(
                source[at + entry.len()..].trim_start().starts_with('('),
                "{spec}: `{entry}` is not followed by its parameters"
            );
            entries.push(entry);
        }
        entries.sort();
        entries.dedup();
        assert_eq!(
            entries.len(),
            program.stages.len(),
            "{spec}: duplicate stage"
        );
        assert_eq!(
            source.matches("extern \"C\"").count(),
            program.stages.len(),
            "{spec}: an `extern \"C\"` that is not a stage entry"
        );
    }
}

#[test]
fn every_header_follows_its_line_marker_verbatim() {
    let headers = header_names();
    let all_stage_templates = stage_template_names();
    for spec in variants::snapshot_variants() {
        let program = render(&spec);
        let source = program.source;
        // The stage templates this variant uses, each once.
        let mut stages: Vec<String> = Vec::new();
        for stage in &program.stages {
            let name = stage.template().to_string();
            assert!(
                all_stage_templates.contains(&name),
                "{spec}: {name} is not embedded"
            );
            if !stages.contains(&name) {
                stages.push(name);
            }
        }
        let lines: Vec<&str> = source.lines().collect();
        let mut last_header_line = 0;
        for header in &headers {
            let marker = format!("#line 1 \"twilight/{header}\"");
            let at: Vec<usize> = lines
                .iter()
                .enumerate()
                .filter(|(_, l)| **l == marker)
                .map(|(i, _)| i)
                .collect();
            assert_eq!(at.len(), 1, "{spec}: `{marker}` on {} lines", at.len());
            last_header_line = last_header_line.max(at[0]);
            // The marker is followed by the header's text, unchanged.
            let text =
                fs::read_to_string(templates_dir().join("include/twilight").join(header)).unwrap();
            let (_, section, _) = split_section(&source, &format!("twilight/{header}"));
            let body = &section[marker.len() + 1..];
            assert!(
                body.trim_end() == text.trim_end(),
                "{spec}: the text after `{marker}` is not {header}"
            );
        }
        // Headers come first, then each stage's glue behind its own marker.
        for stage in &stages {
            let marker = format!("#line 1 \"{stage}\"");
            let at = lines.iter().position(|l| *l == marker);
            let at = at.unwrap_or_else(|| panic!("{spec}: no `{marker}`"));
            assert!(at > last_header_line, "{spec}: {stage} before a header");
        }
        // The parameter structs, after the headers and before the glue that uses them.
        let params = lines
            .iter()
            .position(|l| l.starts_with("#line 1 \"twilight/params"))
            .unwrap_or_else(|| panic!("{spec}: no parameter structs"));
        assert!(
            params > last_header_line,
            "{spec}: parameter structs before a header"
        );
        // No other `#line` directive can shift NVRTC's line numbers.
        let directives = lines
            .iter()
            .filter(|l| l.trim_start().starts_with("#line"))
            .count();
        assert_eq!(directives, headers.len() + stages.len() + 1, "{spec}");
    }
}

#[test]
fn no_template_syntax_survives() {
    for spec in variants::snapshot_variants() {
        let source = render(&spec).source;
        for token in ["{{", "}}", "{%", "%}", "{#", "#}"] {
            if let Some(at) = source.find(token) {
                let line = source[..at].lines().count();
                panic!("{spec}: `{token}` left in the rendered source at line {line}");
            }
        }
    }
}

/// A directory laid out like `templates/` holding only the given files.
fn override_dir(files: &[(&str, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        let path = dir.path().join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }
    dir
}

#[test]
fn template_dir_overrides_a_stage_template() {
    let spec = variants::snapshot_variants()[0];
    let embedded = render(&spec).source;
    let original = fs::read_to_string(templates_dir().join("append.cu.tera")).unwrap();
    // Rendered through Tera with the variant's context, like the original.
    let modified = format!("{original}\n// twilight-test override of {{{{ variant }}}}\n");
    let dir = override_dir(&[("append.cu.tera", modified)]);
    let program = render_with(&spec, &TemplateSource::Dir(dir.path().to_path_buf())).unwrap();
    let added = format!("// twilight-test override of {}", spec.name());
    assert_ne!(program.source, embedded);
    assert_eq!(
        program.source.matches(&added).count(),
        1,
        "{}",
        program.source
    );
    // Only the append section changed.
    let (before, section, after) = split_section(&program.source, "append.cu.tera");
    let (e_before, e_section, e_after) = split_section(&embedded, "append.cu.tera");
    assert!(before == e_before, "text before the append glue changed");
    assert!(after == e_after, "text after the append glue changed");
    assert!(section.contains(&added) && !e_section.contains(&added));
    assert!(section.contains(&format!("{}_append", spec.name())));
}

#[test]
fn template_dir_overrides_a_header() {
    let spec = variants::snapshot_variants()[0];
    let embedded = render(&spec).source;
    let original = fs::read_to_string(templates_dir().join("include/twilight/common.cuh")).unwrap();
    // Headers are not Tera templates: braces pass through as they are.
    let added = "// twilight-test header override {{ not tera }}";
    let dir = override_dir(&[(
        "include/twilight/common.cuh",
        format!("{original}{added}\n"),
    )]);
    let program = render_with(&spec, &TemplateSource::Dir(dir.path().to_path_buf())).unwrap();
    let (before, section, after) = split_section(&program.source, "twilight/common.cuh");
    let (e_before, _, e_after) = split_section(&embedded, "twilight/common.cuh");
    assert!(section.contains(added), "{section}");
    assert!(before == e_before && after == e_after);
}

#[test]
fn template_dir_without_the_file_falls_back_to_embedded() {
    let spec = variants::snapshot_variants()[0];
    let embedded = render(&spec).source;
    let empty = tempfile::tempdir().unwrap();
    let program = render_with(&spec, &TemplateSource::Dir(empty.path().to_path_buf())).unwrap();
    assert!(
        program.source == embedded,
        "empty override dir changed the source"
    );
    // A file for another template leaves this one embedded.
    let dir = override_dir(&[("attend.cu.tera", "// only attend\n".to_string())]);
    let program = render_with(&spec, &TemplateSource::Dir(dir.path().to_path_buf())).unwrap();
    let (_, section, _) = split_section(&program.source, "append.cu.tera");
    let (_, e_section, _) = split_section(&embedded, "append.cu.tera");
    assert_eq!(section, e_section);
    assert!(program.source.contains("// only attend"));
}

#[test]
fn broken_override_is_a_template_error_naming_file_and_variant() {
    let spec = variants::snapshot_variants()[0];
    let dir = override_dir(&[(
        "attend.cu.tera",
        "{{ variant }}_attend {{ no_such_value }}\n".to_string(),
    )]);
    let err = render_with(&spec, &TemplateSource::Dir(dir.path().to_path_buf())).unwrap_err();
    let shown = err.to_string();
    match &err {
        RenderError::Template {
            template, variant, ..
        } => {
            assert_eq!(template, "attend.cu.tera");
            assert_eq!(*variant, spec.name());
            assert!(shown.contains("attend.cu.tera") && shown.contains(&spec.name()));
            assert!(shown.contains("no_such_value"), "{shown}");
        }
        other => panic!("expected a template error, got {other:?}"),
    }
}

#[test]
fn unreadable_override_is_an_error_not_a_fallback() {
    let spec = variants::snapshot_variants()[0];
    let dir = tempfile::tempdir().unwrap();
    // A directory where the template file belongs cannot be read as text.
    fs::create_dir(dir.path().join("attend.cu.tera")).unwrap();
    match render_with(&spec, &TemplateSource::Dir(dir.path().to_path_buf())) {
        Err(RenderError::TemplateFile { path, .. }) => {
            assert_eq!(path, dir.path().join("attend.cu.tera"));
        }
        other => panic!("expected a template file error, got {other:?}"),
    }
}

#[test]
fn missing_template_dir_is_an_error_not_a_silent_fallback() {
    let spec = variants::snapshot_variants()[0];
    let missing = std::env::temp_dir().join("twilight-no-such-template-dir-for-tests");
    match render_with(&spec, &TemplateSource::Dir(missing.clone())) {
        Err(RenderError::TemplateFile { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected TemplateFile error, got {other:?}"),
    }
}
