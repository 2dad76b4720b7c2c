//! `twilight demo` end to end on the CPU reference: the report, every file of `--dump` (NumPy
//! headers parsed here, independently of the writer), and clean failures on bad flags.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn twilight(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_twilight"))
        .args(args)
        .env("TWILIGHT_LOG", "warn")
        .output()
        .expect("the twilight binary runs")
}

const SMALL: [&str; 17] = [
    "demo",
    "--cpu",
    "--batch",
    "2",
    "--max-len",
    "700",
    "--kv-heads",
    "2",
    "--group-size",
    "2",
    "--head-dim",
    "64",
    "--page-size",
    "16",
    "--budget",
    "256",
    "--p",
];

const FILES: [&str; 11] = [
    "q.npy",
    "k_cache.npy",
    "v_cache.npy",
    "kv_indptr.npy",
    "kv_indices.npy",
    "kv_last_page_len.npy",
    "o.npy",
    "lse.npy",
    "kept_ids.npy",
    "kept_counts.npy",
    "params.json",
];

/// A parsed `.npy` file: descr, shape and the raw data bytes.
struct Npy {
    descr: String,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Npy {
    fn read(path: &Path) -> Npy {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let what = path.display();
        assert_eq!(&bytes[..6], b"\x93NUMPY", "{what}: magic");
        assert_eq!(&bytes[6..8], &[1, 0], "{what}: version 1.0");
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        let start = 10 + header_len;
        assert_eq!(
            start % 64,
            0,
            "{what}: data starts at {start}, not a multiple of 64"
        );
        let header = std::str::from_utf8(&bytes[10..start]).unwrap();
        assert!(header.ends_with('\n'), "{what}: header ends with a newline");
        assert!(header.starts_with('{'), "{what}: {header}");
        assert!(
            header.contains("'fortran_order': False"),
            "{what}: {header}"
        );
        let descr = between(header, "'descr': '", "'");
        let shape: Vec<usize> = between(header, "'shape': (", ")")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        Npy {
            descr: descr.to_string(),
            shape,
            data: bytes[start..].to_vec(),
        }
    }

    fn itemsize(&self) -> usize {
        match self.descr.as_str() {
            "<f2" => 2,
            "<f4" | "<i4" => 4,
            other => panic!("unexpected descr {other}"),
        }
    }

    fn i32s(&self) -> Vec<i32> {
        assert_eq!(self.descr, "<i4");
        self.data
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    fn f32s(&self) -> Vec<f32> {
        assert_eq!(self.descr, "<f4");
        self.data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
}

fn between<'a>(text: &'a str, open: &str, close: &str) -> &'a str {
    let from = text
        .find(open)
        .unwrap_or_else(|| panic!("{open} in {text}"))
        + open.len();
    let len = text[from..].find(close).unwrap();
    &text[from..from + len]
}

fn usize_of(params: &Value, key: &str) -> usize {
    params[key]
        .as_u64()
        .unwrap_or_else(|| panic!("params.json: {key} is not a number: {params}")) as usize
}

/// What a checked dump leaves for further checks.
struct Dumped {
    stdout: String,
    params: Value,
    /// `kept_counts.npy`, `[batch, num_kv_heads]`.
    counts: Vec<i32>,
}

/// Runs the demo with `--dump` and checks every file against params.json.
fn run_and_check_dump(extra: &[&str], dense: bool) -> Dumped {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump");
    let mut args: Vec<&str> = SMALL.to_vec();
    args.push("0.9");
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--dump", dump.to_str().unwrap()]);
    let out = twilight(&args);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("kept budget"), "{stdout}");
    assert!(stdout.contains("error vs dense attention"), "{stdout}");
    assert!(stdout.contains("relative L2"), "{stdout}");
    assert!(stdout.contains("generator: attention="), "{stdout}");
    for f in FILES {
        assert!(dump.join(f).is_file(), "{f} missing from the dump");
    }

    let params: Value =
        serde_json::from_str(&std::fs::read_to_string(dump.join("params.json")).unwrap()).unwrap();
    for key in [
        "variant",
        "dtype",
        "layout",
        "page_size",
        "head_dim",
        "B0",
        "p",
        "sm_scale",
        "num_qo_heads",
        "num_kv_heads",
        "group_size",
        "batch",
        "num_pages",
        "request_lengths",
        "max_kept",
        "generator",
        "ran_on",
        "stored_as",
        "files",
    ] {
        assert!(
            params.get(key).is_some(),
            "params.json has no {key}: {params}"
        );
    }
    assert_eq!(params["ran_on"], "cpu reference");
    assert_eq!(params["B0"], 256);
    assert_eq!(params["p"].as_f64(), Some(0.9));
    assert_eq!(params["sm_scale"].as_f64(), Some(0.125));
    assert!(params["generator"]
        .as_str()
        .unwrap()
        .starts_with("attention=default"));
    for f in FILES {
        assert!(params["files"].get(f).is_some(), "no description of {f}");
    }
    let batch = usize_of(&params, "batch");
    let qo = usize_of(&params, "num_qo_heads");
    let kvh = usize_of(&params, "num_kv_heads");
    let d = usize_of(&params, "head_dim");
    let ps = usize_of(&params, "page_size");
    let pages = usize_of(&params, "num_pages");
    let max_kept = usize_of(&params, "max_kept");
    assert_eq!((batch, qo, kvh, d, ps), (2, 4, 2, 64, 16));
    assert_eq!(usize_of(&params, "group_size") * kvh, qo);
    let lens: Vec<usize> = params["request_lengths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(lens.len(), batch);
    let value_descr = params["stored_as"]["descr"].as_str().unwrap().to_string();
    let want_value_descr = match params["dtype"].as_str().unwrap() {
        "f16" => "<f2",
        "bf16" => "<f4",
        other => panic!("dtype {other}"),
    };
    assert_eq!(value_descr, want_value_descr);
    let pool = match params["layout"].as_str().unwrap() {
        "hnd" => vec![pages, kvh, ps, d],
        "nhd" => vec![pages, ps, kvh, d],
        other => panic!("layout {other}"),
    };

    let read = |name: &str, descr: &str, shape: &[usize]| {
        let npy = Npy::read(&dump.join(name));
        assert_eq!(npy.descr, descr, "{name}: descr");
        assert_eq!(npy.shape, shape, "{name}: shape");
        let count: usize = shape.iter().product();
        assert_eq!(
            npy.data.len(),
            count * npy.itemsize(),
            "{name}: data length"
        );
        npy
    };
    read("q.npy", &value_descr, &[batch, qo, d]);
    read("k_cache.npy", &value_descr, &pool);
    read("v_cache.npy", &value_descr, &pool);
    read("o.npy", &value_descr, &[batch, qo, d]);
    let lse = read("lse.npy", "<f4", &[batch, qo]).f32s();
    assert!(lse.iter().all(|x| x.is_finite()));
    let indptr = read("kv_indptr.npy", "<i4", &[batch + 1]).i32s();
    let nnz = *indptr.last().unwrap() as usize;
    let indices = read("kv_indices.npy", "<i4", &[nnz]).i32s();
    let last = read("kv_last_page_len.npy", "<i4", &[batch]).i32s();
    let counts = read("kept_counts.npy", "<i4", &[batch, kvh]).i32s();
    let ids = read("kept_ids.npy", "<i4", &[batch, kvh, max_kept]).i32s();
    assert_eq!(
        counts.iter().map(|&c| c as usize).max(),
        Some(max_kept),
        "max_kept is the longest kept list"
    );

    for b in 0..batch {
        let pages_b = &indices[indptr[b] as usize..indptr[b + 1] as usize];
        let len = (pages_b.len() - 1) * ps + last[b] as usize;
        assert_eq!(len, lens[b], "request {b}: length from the page table");
        let slots: std::collections::HashSet<i32> = (0..len)
            .map(|t| pages_b[t / ps] * ps as i32 + (t % ps) as i32)
            .collect();
        for g in 0..kvh {
            let count = counts[b * kvh + g] as usize;
            assert!(count >= 1 && count <= len, "row ({b}, {g}): count {count}");
            if dense {
                assert_eq!(count, len, "dense keeps every token");
            }
            let row = &ids[(b * kvh + g) * max_kept..][..max_kept];
            assert!(
                row[..count].iter().all(|&s| s >= 0 && slots.contains(&s)),
                "row ({b}, {g}): {:?} are not all tokens of the request",
                &row[..count]
            );
            assert!(
                row[..count].windows(2).all(|w| w[0] < w[1]),
                "row ({b}, {g}) is ascending"
            );
            assert!(
                row[count..].iter().all(|&s| s == -1),
                "row ({b}, {g}) is padded with -1"
            );
        }
    }
    Dumped {
        stdout,
        params,
        counts,
    }
}

#[test]
fn sparse_demo_on_the_cpu_dumps_every_file() {
    let stdout = run_and_check_dump(&[], false).stdout;
    assert!(stdout.contains("B0 = 256 tokens"), "{stdout}");
    assert!(stdout.contains("quest selector, top_p pruning"), "{stdout}");
    assert!(stdout.contains("oracle top-p"), "{stdout}");
}

/// The three numbers of an error line: o relative L2, max |o - ref|, max |lse - ref|.
fn error_figures(line: &str) -> [f64; 3] {
    let number = |after: &str| -> f64 {
        let text = between(line, after, ",");
        text.trim()
            .parse()
            .unwrap_or_else(|e| panic!("`{text}` after `{after}` in `{line}`: {e}"))
    };
    let lse = line
        .split("max |lse - ref| ")
        .nth(1)
        .and_then(|rest| rest.split([',', ' ']).next())
        .unwrap_or_else(|| panic!("no lse error in `{line}`"));
    [
        number("o relative L2 "),
        number("max |o - ref| "),
        lse.parse()
            .unwrap_or_else(|e| panic!("`{lse}` in `{line}`: {e}")),
    ]
}

/// Beside the step's error, the demo prints what the algorithm accepts by design: the oracle
/// top-p on exact weights and the selector alone at the same B0, with the same metric.
#[test]
fn sparse_demo_prints_the_errors_accepted_by_design() {
    let mut args: Vec<&str> = SMALL.to_vec();
    args.push("0.9");
    let out = twilight(&args);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}");
    let block: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.contains("error vs dense attention"))
        .collect();
    let line = |start: &str| -> &str {
        block
            .iter()
            .find(|l| l.trim_start().starts_with(start))
            .unwrap_or_else(|| panic!("no `{start}` line under the error header:\n{stdout}"))
    };
    let this = error_figures(line("this step"));
    let oracle = error_figures(line("oracle top-p, exact weights (p = 0.9,"));
    let alone = error_figures(line("selector alone (quest, B0 = 256,"));
    for (what, figures) in [("step", this), ("oracle", oracle), ("selector", alone)] {
        assert!(
            figures.iter().all(|x| x.is_finite() && *x >= 0.0),
            "{what}: {figures:?}\n{stdout}"
        );
    }
    // Exact weights over every token at p = 0.9 leave a small error; a positive one, since the
    // synthetic heads are not that peaked.
    assert!(oracle[0] > 0.0 && oracle[0] < 0.5, "{oracle:?}");
    assert!(stdout.contains("accepted by design"), "{stdout}");
}

#[test]
fn dense_demo_on_the_cpu_keeps_every_token() {
    let stdout = run_and_check_dump(&["--selector", "full", "--pruning", "none"], true).stdout;
    assert!(stdout.contains("dense paged decode"), "{stdout}");
    // The reference step of full/none is dense attention itself.
    assert!(stdout.contains("o relative L2 0.00e0"), "{stdout}");
    // Nothing to explain: no oracle or selector-alone error.
    assert!(
        !stdout.contains("exact weights (p =") && !stdout.contains("selector alone"),
        "{stdout}"
    );
}

#[test]
fn nhd_bf16_demo_stores_values_as_f32() {
    run_and_check_dump(&["--layout", "nhd", "--dtype", "bf16"], false);
}

#[test]
fn bad_flags_fail_with_a_message() {
    for (flag, value, needle) in [
        ("--p", "1.5", "p must be in (0, 1]"),
        ("--p", "0", "p must be in (0, 1]"),
        ("--budget", "0", "B0"),
        ("--preset", "peaky", "peaky"),
        (
            "--selector",
            "lsh",
            "`double_sparse(r)` with r in 16, 32, 64",
        ),
        ("--selector", "double_sparse(8)", "r in 16, 32, 64"),
        ("--selector", "double_sparse(x)", "r in 16, 32, 64"),
        ("--pruning", "top_k", "`top_p` or `none`"),
        ("--dtype", "fp8", "`f16` or `bf16`"),
        ("--layout", "HND", "`nhd` or `hnd`"),
        ("--max-len", "0", "--max-len"),
        ("--head-dim", "96", "head_dim"),
        ("--batch", "0", "--batch"),
    ] {
        let out = twilight(&["demo", "--cpu", "--max-len", "64", flag, value]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value} succeeded");
        assert!(stderr.contains("error:"), "{flag} {value}: {stderr}");
        assert!(stderr.contains(needle), "{flag} {value}: {stderr}");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
            "{flag} {value} panicked: {stderr}"
        );
    }
}

/// `double_sparse(16)` on the CPU: channels calibrated on the generated activations, recorded in
/// params.json, and a step whose kept lists are valid and within B0.
#[test]
fn double_sparse_demo_on_the_cpu_dumps_its_channels() {
    let Dumped {
        stdout,
        params,
        counts,
    } = run_and_check_dump(&["--selector", "double_sparse(16)"], false);
    assert!(
        stdout.contains("double_sparse(16) selector, top_p pruning"),
        "{stdout}"
    );
    assert!(stdout.contains("_ds16_topp"), "{stdout}");
    assert!(
        stdout.contains("calibration: 16 channels per KV head"),
        "{stdout}"
    );
    assert!(stdout.contains("    KV head 0: ["), "{stdout}");
    assert!(stdout.contains("double-sparse labels"), "{stdout}");
    assert!(stdout.contains("B0 = 256 tokens"), "{stdout}");
    assert!(stdout.contains("oracle top-p"), "{stdout}");
    assert_eq!(params["selector"], "double_sparse(16)");
    assert!(params["variant"].as_str().unwrap().contains("_ds16_"));
    assert!(params.get("ds_channels_are").is_some(), "{params}");
    let lists = params["ds_channels"]
        .as_array()
        .unwrap_or_else(|| panic!("no ds_channels list in {params}"));
    assert_eq!(lists.len(), 2, "one list per KV head");
    for (g, list) in lists.iter().enumerate() {
        let ids: Vec<u64> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(ids.len(), 16, "KV head {g}: {ids:?}");
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "KV head {g}: sorted and distinct: {ids:?}"
        );
        assert!(ids.iter().all(|&c| c < 64), "KV head {g}: {ids:?}");
    }
    // The selector keeps at most B0 tokens, top-p prunes among them.
    assert!(counts.iter().all(|&c| (1..=256).contains(&c)), "{counts:?}");
}

#[test]
fn double_sparse_shorthand_is_r_16() {
    let out = twilight(&[
        "demo",
        "--cpu",
        "--batch",
        "1",
        "--max-len",
        "300",
        "--kv-heads",
        "1",
        "--selector",
        "double_sparse",
        "--pruning",
        "none",
        "--budget",
        "64",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("variant ps16_hd128_f16_g4_hnd_ds16_none"),
        "{stdout}"
    );
    // No pruning: exactly B0 tokens of the 300-token request.
    assert!(stdout.contains("mean 64.0 tokens"), "{stdout}");
}

/// r must be below head_dim: a clean error, no panic, no output files.
#[test]
fn double_sparse_with_r_at_head_dim_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump");
    let mut args: Vec<&str> = SMALL.to_vec();
    args.extend_from_slice(&[
        "0.9",
        "--selector",
        "double_sparse(64)",
        "--dump",
        dump.to_str().unwrap(),
    ]);
    let out = twilight(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "double_sparse(64) at head_dim 64 ran"
    );
    assert!(
        stderr.contains("error: unsupported combination: double_sparse(64) needs fewer label channels than head_dim = 64"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "{stderr}"
    );
    assert!(!dump.join("params.json").exists());
}

/// `--channels`: a config in the Double Sparsity tooling's format (one list per query head)
/// is merged per KV head and used instead of calibration; a config that fits no head count of
/// the shape is refused with a message.
#[test]
fn double_sparse_demo_reads_a_channel_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("channels.json");
    let lists = |first: usize| -> Vec<Vec<usize>> {
        (0..4)
            .map(|h| {
                let base = if h < 2 { first } else { first + 20 };
                (base..base + 16).collect()
            })
            .collect()
    };
    let json = serde_json::json!({
        "model.layers.0.self_attn.qk_proj": lists(1),
        "model.layers.1.self_attn.qk_proj": lists(0),
    });
    std::fs::write(&config, json.to_string()).unwrap();
    let flags = [
        "--selector",
        "double_sparse(16)",
        "--channels",
        config.to_str().unwrap(),
        "--num-layers",
        "2",
        "--channel-layer",
        "1",
    ];
    let Dumped { stdout, params, .. } = run_and_check_dump(&flags, false);
    assert!(
        stdout.contains("channels: 16 per KV head from") && !stdout.contains("calibration:"),
        "{stdout}"
    );
    let want: Vec<Vec<usize>> = vec![(0..16).collect(), (20..36).collect()];
    assert_eq!(params["ds_channels"], serde_json::json!(want), "{params}");
    assert!(params["ds_channels_are"]
        .as_str()
        .unwrap()
        .contains("channels.json"));

    let bad = serde_json::json!({ "model.layers.0.self_attn.qk_proj": [[0, 1], [2, 3], [4, 5]] });
    std::fs::write(&config, bad.to_string()).unwrap();
    let mut args: Vec<&str> = SMALL.to_vec();
    args.extend_from_slice(&["0.9", "--num-layers", "1"]);
    args.extend_from_slice(&flags[..4]);
    let out = twilight(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("has 3 channel lists"), "{stderr}");
}
