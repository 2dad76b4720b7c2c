//! Walking the cache: the variant folders of a version folder and the entries in each, never
//! following a link out of the cache.

use std::fs;
use std::path::{Path, PathBuf};

use super::entry::{inspect_entry, Listed};
use super::trust::{check_dir_meta, Owners, Refusal};
use super::valid_variant;
use crate::key::CacheKey;

/// A child of the version folder named like a variant: its folder, or why it is not used.
pub(crate) struct VariantDir {
    pub name: String,
    pub path: PathBuf,
    pub trusted: Result<(), Refusal>,
}

/// Every child of `root` with a canonical variant name, checked without following links.
pub(crate) fn variant_dirs(root: &Path, owners: Owners) -> Vec<VariantDir> {
    let Ok(children) = fs::read_dir(root) else {
        return Vec::new();
    };
    children
        .flatten()
        .filter_map(|child| {
            let name = child.file_name().to_str()?.to_owned();
            if !valid_variant(&name) {
                return None;
            }
            let path = child.path();
            // DirEntry::metadata does not follow a link: a link is "not a directory" here.
            let trusted = match child.metadata() {
                Ok(meta) => check_dir_meta(&path, &meta, owners),
                Err(e) => Err(Refusal::Inaccessible {
                    path: path.clone(),
                    error: e.into(),
                }),
            };
            Some(VariantDir {
                name,
                path,
                trusted,
            })
        })
        .collect()
}

/// The key named by a `<hex>.json` file name.
pub(crate) fn key_of_meta_name(name: &str) -> Option<CacheKey> {
    CacheKey::from_hex(name.strip_suffix(".json")?)
}

/// Every entry of one trusted variant folder that looks valid (see [`inspect_entry`]).
pub(crate) fn entries_of(dir: &Path, variant: &str, owners: Owners) -> Vec<(CacheKey, Listed)> {
    let Ok(files) = fs::read_dir(dir) else {
        return Vec::new();
    };
    files
        .flatten()
        .filter_map(|file| {
            let key = key_of_meta_name(file.file_name().to_str()?)?;
            inspect_entry(dir, &key, variant, owners).map(|listed| (key, listed))
        })
        .collect()
}

/// Every valid entry under `root`, in trusted variant folders only.
pub(crate) fn all_entries(root: &Path, owners: Owners) -> Vec<(String, CacheKey, Listed)> {
    let mut out = Vec::new();
    for dir in variant_dirs(root, owners) {
        if dir.trusted.is_err() {
            continue;
        }
        for (key, listed) in entries_of(&dir.path, &dir.name, owners) {
            out.push((dir.name.clone(), key, listed));
        }
    }
    out
}
