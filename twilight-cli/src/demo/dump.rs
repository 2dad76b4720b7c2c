//! `--dump DIR`: every input and output of the step as NumPy files, with `params.json`, so that
//! any independent implementation can run the same step and compare.

use std::error::Error;
use std::path::Path;

use serde_json::json;
use twilight::{Dtype, KvLayout};
use twilight_synth::npy;

use super::{Inputs, Outcome};

/// What each file holds, as params.json describes it.
const FILES: [(&str, &str); 11] = [
    ("q.npy", "queries [batch, num_qo_heads, head_dim], post-RoPE, one token per request"),
    ("k_cache.npy", "paged K pool: [num_pages, num_kv_heads, page_size, head_dim] for hnd, [num_pages, page_size, num_kv_heads, head_dim] for nhd; pages no request owns are noise or zero"),
    ("v_cache.npy", "paged V pool, same shape as k_cache"),
    ("kv_indptr.npy", "int32 [batch + 1]: request b owns kv_indices[kv_indptr[b] .. kv_indptr[b + 1]]"),
    ("kv_indices.npy", "int32 [nnz_pages]: page ids of every request, in token order"),
    ("kv_last_page_len.npy", "int32 [batch]: valid tokens of each request's last page (1..=page_size)"),
    ("o.npy", "attention output [batch, num_qo_heads, head_dim] in the dtype: the GPU's output, or the CPU reference's f32 output rounded to the dtype"),
    ("lse.npy", "float32 [batch, num_qo_heads]: natural log of the softmax denominator of sm_scale * q.k over the kept tokens"),
    ("kept_ids.npy", "int32 [batch, num_kv_heads, max_kept]: the kept token slots (page * page_size + offset) of each (request, KV head), ascending, padded with -1; the query heads h of KV head h / group_size attend exactly these"),
    ("kept_counts.npy", "int32 [batch, num_kv_heads]: the adaptive budget, the number of valid entries of each kept_ids row"),
    ("params.json", "this file"),
];

/// Writes the dump. The outcome's cache is the one the step read (the GPU's own after append).
pub(super) fn write(dir: &Path, x: &Inputs, out: &Outcome) -> Result<(), Box<dyn Error>> {
    let kv = out.kv(x);
    let table = out.table(x);
    let s = kv.shape;
    let (batch, qo, kvh, d) = (x.batch(), x.num_qo_heads(), x.num_kv_heads(), x.head_dim());
    let dtype = x.spec.dtype;
    let path = |name: &str| dir.join(name);

    write_values(&path("q.npy"), &[batch, qo, d], &x.step.q, dtype)?;
    let pool = match s.layout {
        KvLayout::Hnd => [s.num_pages, s.num_kv_heads, s.page_size, s.head_dim],
        KvLayout::Nhd => [s.num_pages, s.page_size, s.num_kv_heads, s.head_dim],
    };
    write_values(&path("k_cache.npy"), &pool, kv.k, dtype)?;
    write_values(&path("v_cache.npy"), &pool, kv.v, dtype)?;
    for (name, data) in [
        ("kv_indptr.npy", table.kv_indptr()),
        ("kv_indices.npy", table.kv_indices()),
        ("kv_last_page_len.npy", table.kv_last_page_len()),
    ] {
        npy::write_i32(&path(name), &[data.len()], data)?;
    }
    write_values(&path("o.npy"), &[batch, qo, d], &out.o, dtype)?;
    npy::write_f32(&path("lse.npy"), &[batch, qo], &out.lse)?;

    let max_kept = out.kept.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = vec![-1i32; batch * kvh * max_kept];
    for (row, kept) in ids.chunks_mut(max_kept.max(1)).zip(&out.kept) {
        for (dst, &slot) in row.iter_mut().zip(kept) {
            *dst = slot as i32;
        }
    }
    npy::write_i32(&path("kept_ids.npy"), &[batch, kvh, max_kept], &ids)?;
    let counts: Vec<i32> = out.kept.iter().map(|k| k.len() as i32).collect();
    npy::write_i32(&path("kept_counts.npy"), &[batch, kvh], &counts)?;

    let stored_as = match dtype {
        Dtype::F16 => json!({
            "descr": "<f2",
            "applies_to": ["q", "k_cache", "v_cache", "o"],
            "note": "f16 values as they are",
        }),
        Dtype::Bf16 => json!({
            "descr": "<f4",
            "applies_to": ["q", "k_cache", "v_cache", "o"],
            "note": "bf16 values widened to float32, exactly (NumPy has no bfloat16)",
        }),
    };
    let files: serde_json::Map<String, serde_json::Value> = FILES
        .iter()
        .map(|(name, what)| (name.to_string(), json!(what)))
        .collect();
    let mut params = json!({
        "variant": x.spec.name(),
        "selector": x.spec.selector.declared(),
        "pruning": x.spec.pruning.declared(),
        "dtype": dtype.short(),
        "layout": s.layout.short(),
        "page_size": s.page_size,
        "head_dim": s.head_dim,
        "B0": x.budget,
        "p": shortest(x.p),
        "sm_scale": shortest(x.sm_scale),
        "num_qo_heads": qo,
        "num_kv_heads": kvh,
        "group_size": x.group(),
        "batch": batch,
        "num_pages": s.num_pages,
        "request_lengths": x.lens,
        "max_kept": max_kept,
        "max_kept_is": "the longest kept list of the step (the last axis of kept_ids)",
        "generator": x.generator.to_string(),
        "ran_on": out.ran_on,
        "stored_as": stored_as,
        "notes": [
            "B0 and p are float32/int parameters of the step; sm_scale multiplies q.k before the softmax",
            "select, prune and attend as in DESIGN.md: the query heads of a KV head share its kept list",
            "with selector full and pruning none the step is dense attention and B0, p are unused",
        ],
        "files": files,
    });
    if let Some(channels) = &x.ds_channels {
        params["ds_channels"] = json!(channels);
        let source = match &x.ds_channels_file {
            Some(file) => format!("read from the channel config {}", file.display()),
            None => format!(
                "ranked by mean |q*k| over {} evenly spread positions of each request (the request's query at each)",
                super::calibrate::TOKENS_PER_REQUEST
            ),
        };
        params["ds_channels_are"] = json!(format!(
            "the r calibrated channels of each KV head ([num_kv_heads][r], ascending), {source}; double_sparse(r) scores token t of KV head g as sum over the group's query heads h and i < r of q[h, c_i] * k[t, g, c_i] with c = ds_channels[g], in f64, and selects the newest token and the B0 - 1 highest-scoring others (a tie to the lower position)"
        ));
    }
    npy::write_file(
        &path("params.json"),
        (serde_json::to_string_pretty(&params)? + "\n").as_bytes(),
    )?;
    Ok(())
}

/// Checks the dump directory before anything runs, so that a bad one fails in a second and not
/// after the whole step: it must be a real directory (not a symbolic link, whose target an
/// attacker could choose), created here when missing, and writable (a probe file is created
/// exclusively and removed). Each file is then written by [`npy::write_file`]: to a temporary
/// name, renamed into place, never through a link, never left half-written.
///
/// # Errors
/// A message naming the directory and what is wrong with it.
pub(super) fn prepare_dir(dir: &Path) -> Result<(), String> {
    let shown = dir.display();
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_symlink() => {
            return Err(format!(
                "the dump directory {shown} is a symbolic link; name the real directory"
            ))
        }
        Ok(m) if !m.is_dir() => {
            return Err(format!(
                "the dump directory {shown} exists and is not a directory"
            ))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create the dump directory {shown}: {e}"))?,
        Err(e) => return Err(format!("cannot inspect the dump directory {shown}: {e}")),
    }
    let probe = dir.join(format!(".twilight-dump-probe.{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| format!("the dump directory {shown} is not writable: {e}"))?;
    std::fs::remove_file(&probe)
        .map_err(|e| format!("cannot remove the probe file {}: {e}", probe.display()))
}

/// Writes values that are exact in `dtype` (or are rounded to it here): f16 as `<f2`, bf16
/// widened to `<f4`.
fn write_values(
    path: &Path,
    shape: &[usize],
    values: &[f32],
    dtype: Dtype,
) -> twilight_synth::Result<()> {
    match dtype {
        Dtype::F16 => {
            let v: Vec<half::f16> = values.iter().map(|&x| half::f16::from_f32(x)).collect();
            npy::write_f16(path, shape, &v)
        }
        Dtype::Bf16 => {
            let v: Vec<f32> = values
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_f32())
                .collect();
            npy::write_f32(path, shape, &v)
        }
    }
}

/// An f32 as the shortest decimal that reads back as the same f32 (0.85, not 0.8500000238).
fn shortest(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}
