//! The CPU reference and the host module it builds on use nothing of CUDA: no cudarc, none of
//! the library's device modules, only the CUDA-free part of twilight-jit (the spec). A test
//! over their sources, since a module of one crate cannot be kept from an import by the
//! compiler.

use std::path::Path;

/// Paths an import may start with in these modules.
const ALLOWED: [&str; 7] = [
    "crate::host",
    "crate::reference",
    "twilight_jit::Dtype",
    "twilight_jit::KvLayout",
    "twilight_jit::Pruning",
    "twilight_jit::Selector",
    "twilight_jit::VariantSpec",
];

fn sources(dir: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push((
                path.display().to_string(),
                std::fs::read_to_string(&path).unwrap(),
            ));
        }
    }
}

/// Every path a `use` line or an inline path names, as `crate::x` or `twilight_jit::X`.
fn named_paths(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        for root in [
            "crate::",
            "twilight_jit::",
            "cudarc",
            "half::",
            "super::super",
        ] {
            let mut rest = code;
            while let Some(at) = rest.find(root) {
                let tail = &rest[at..];
                let end = tail
                    .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                    .unwrap_or(tail.len());
                let path = tail[..end].trim_end_matches(':');
                if tail[end..].starts_with('{') {
                    // `twilight_jit::{A, B}`: each item, as `twilight_jit::A`.
                    let items = tail[end + 1..].split('}').next().unwrap_or("");
                    for item in items.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                        found.push(format!("{path}::{item}"));
                    }
                } else {
                    found.push(path.to_string());
                }
                rest = &tail[root.len()..];
            }
        }
    }
    found
}

#[test]
fn the_reference_and_host_modules_import_nothing_of_cuda() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root.join("reference"), &mut files);
    sources(&root.join("host"), &mut files);
    assert!(files.len() >= 7, "reference and host sources not found");
    for (path, text) in &files {
        for named in named_paths(text) {
            let ok = ALLOWED.iter().any(|a| named.starts_with(a))
                || named.starts_with("half::f16")
                || named.starts_with("half::bf16");
            assert!(ok, "{path} names `{named}`, which is not CUDA-free");
        }
        assert!(!text.contains("cudarc"), "{path} mentions cudarc");
    }
}

#[test]
fn the_scan_sees_a_forbidden_import() {
    let named = named_paths(
        "use crate::kv_cache::PagedKvCache;\nuse cudarc::driver::CudaSlice;\nuse twilight_jit::{KvLayout, Jit};",
    );
    assert!(named.iter().any(|n| n == "crate::kv_cache::PagedKvCache"));
    assert!(named.iter().any(|n| n == "twilight_jit::Jit"), "{named:?}");
    assert!(named.iter().any(|n| n.starts_with("cudarc")));
}
