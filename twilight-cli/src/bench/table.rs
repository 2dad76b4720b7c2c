//! `twilight bench table`, and the files every grid run writes: results as JSON and a markdown
//! table of every shape and selector, joined with the PyTorch peers' numbers when given.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use twilight::Selector;

use super::report::SparseReport;
use crate::CliResult;

#[derive(clap::Args, Debug)]
pub struct TableArgs {
    /// bench-results.json files of `bench grid` runs; a (shape, selector) measured in several
    /// takes the last file's figures.
    #[arg(long, value_delimiter = ',', required = true)]
    results: Vec<PathBuf>,
    /// Results of bench/peers.py to join into the table.
    #[arg(long)]
    peers: Option<PathBuf>,
    /// Where the merged bench-results.json and bench-results.md are written.
    #[arg(long, default_value = ".")]
    out: PathBuf,
}

#[derive(Deserialize)]
struct GridResults {
    reports: Vec<SparseReport>,
    skipped: Vec<(String, String)>,
}

/// Merges grid results and writes their table (see [`TableArgs`]).
pub fn run(args: TableArgs) -> CliResult {
    let mut reports: Vec<SparseReport> = Vec::new();
    let mut skipped: Vec<(String, String)> = Vec::new();
    for path in &args.results {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let run: GridResults = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a bench grid result: {e}", path.display()))?;
        for r in run.reports {
            reports.retain(|x| !(x.shape.name == r.shape.name && x.selector == r.selector));
            reports.push(r);
        }
        skipped.extend(run.skipped);
    }
    // A shape skipped in one run but measured in another is not listed as skipped.
    skipped.retain(|(what, _)| {
        !reports.iter().any(|r| {
            *what == r.shape.name || *what == format!("{} with {}", r.shape.name, r.selector)
        })
    });
    let peers = read_peers(args.peers.as_deref())?;
    let table = write_results(&args.out, &reports, &skipped, &peers)?;
    println!("{table}");
    Ok(())
}

pub fn read_peers(path: Option<&Path>) -> Result<Vec<PeerRecord>, Box<dyn std::error::Error>> {
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(serde_json::from_str::<Vec<PeerRecord>>(&text)
        .map_err(|e| format!("{} is not a peers.py result list: {e}", path.display()))?)
}

/// One figure of `bench/peers.py`.
#[derive(Deserialize)]
pub struct PeerRecord {
    name: String,
    peer: String,
    median_us: f64,
}

/// Writes bench-results.json and bench-results.md under `out`; returns the markdown.
pub fn write_results(
    out: &Path,
    reports: &[SparseReport],
    skipped: &[(String, String)],
    peers: &[PeerRecord],
) -> Result<String, Box<dyn std::error::Error>> {
    std::fs::create_dir_all(out)?;
    let json = serde_json::json!({ "reports": reports, "skipped": skipped });
    std::fs::write(
        out.join("bench-results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    let table = markdown(reports, skipped, peers);
    std::fs::write(out.join("bench-results.md"), &table)?;
    Ok(table)
}

/// One row per shape and selector: every time with its ratio to the floor, and the speedups.
/// The PyTorch Quest + top-p peer joins the `quest` rows only.
fn markdown(
    reports: &[SparseReport],
    skipped: &[(String, String)],
    peers: &[PeerRecord],
) -> String {
    let peer: HashMap<(&str, &str), f64> = peers
        .iter()
        .map(|p| ((p.name.as_str(), p.peer.as_str()), p.median_us))
        .collect();
    let cell = |us: Option<f64>| us.map_or("-".to_string(), |u| format!("{u:.1}"));
    let mut t = String::from(
        "| shape | selector | kept per (req, KV head) | dense ours us (x floor) | torch SDPA us | selector+none us (x floor) | twilight us (x floor) | twilight graph us | torch quest+top-p us | twilight vs selector+none | vs dense ours | vs SDPA | twilight x practical floor | prune apart / fused us |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in reports {
        let name = r.shape.name.as_str();
        let sdpa = peer.get(&(name, "torch_sdpa_dense")).copied();
        let torch_twilight = (r.selector == Selector::Quest.declared())
            .then(|| peer.get(&(name, "torch_quest_topp")).copied())
            .flatten();
        t.push_str(&format!(
            "| {name} | {} | {:.0} ({:.2}%) | {:.1} ({:.2}) | {} | {:.1} ({:.2}) | {:.1} ({:.2}) | {:.1} | {} | {:.2}x | {:.2}x | {} | {} | {} |\n",
            r.selector,
            r.kept_mean,
            100.0 * r.kept_mean / r.shape.len as f64,
            r.dense_us,
            r.dense_us / r.dense_floor_us,
            cell(sdpa),
            r.base_none_us,
            r.base_none_us / r.base_none_floor_us,
            r.twilight_us,
            r.twilight_us / r.twilight_floor_us,
            r.twilight_graph_us,
            cell(torch_twilight),
            r.base_none_us / r.twilight_us,
            r.dense_us / r.twilight_us,
            sdpa.map_or("-".to_string(), |s| format!("{:.2}x", s / r.twilight_us)),
            r.practical_floor_us
                .map_or("-".to_string(), |f| format!("{:.2}", r.twilight_us / f)),
            prune_launches(r),
        ));
    }
    for (name, why) in skipped {
        t.push_str(&format!(
            "| {name} | not run: {why} | | | | | | | | | | | | |\n"
        ));
    }
    t
}

/// The step with top-p's threshold and compaction as two launches and as one cluster launch,
/// the default's choice marked: "81.0 / 90.3 (apart)".
fn prune_launches(r: &SparseReport) -> String {
    match (r.twilight_separate_us, r.twilight_fused_us) {
        (Some(apart), Some(fused)) => {
            let chosen = match r.default_fuses_prune {
                Some(true) => " (fused)",
                Some(false) => " (apart)",
                None => "",
            };
            format!("{apart:.1} / {fused:.1}{chosen}")
        }
        _ => "-".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::shape::BenchShape;
    use twilight::{Dtype, KvLayout};

    fn report(name: &str, selector: &str) -> SparseReport {
        SparseReport {
            selector: selector.into(),
            shape: BenchShape {
                name: name.into(),
                batch: 8,
                qo_heads: 32,
                kv_heads: 8,
                head_dim: 128,
                len: 32768,
                page_size: 16,
                dtype: Dtype::F16,
                layout: KvLayout::Hnd,
                budget: 8192,
                p: 0.85,
            },
            variant: "ps16_hd128_f16_g4_hnd_quest_topp".into(),
            generator: "attention=default".into(),
            read_bandwidth_gbps: 4484.0,
            rotation: 2,
            iters: 50,
            kept_mean: 98.0,
            kept_std: 33.0,
            kept_min: 36,
            kept_max: 180,
            stages_us: vec![("Estimate".into(), 37.2, Some(8.0))],
            twilight_us: 124.6,
            twilight_graph_us: 116.0,
            twilight_engine_pool_us: Some(125.8),
            twilight_engine_pool_graph_us: Some(116.5),
            other_attention: None,
            twilight_other_attention_us: None,
            twilight_other_attention_graph_us: None,
            other_attention_stage_us: None,
            dense_other_attention_us: None,
            twilight_captured_apart_us: None,
            twilight_captured_apart_graph_us: None,
            twilight_no_overlap_us: None,
            twilight_packed_us: None,
            twilight_packed_graph_us: None,
            twilight_fused_us: None,
            twilight_fused_graph_us: None,
            fused_stage_us: None,
            twilight_separate_us: None,
            default_fuses_prune: None,
            chunk_tiles: Vec::new(),
            selection_kernels: Vec::new(),
            prune_blocks: Vec::new(),
            twilight_floor_us: 23.6,
            step_bytes_per_row: 1.6e6,
            practical_floor_us: None,
            practical_floor_ctas: None,
            base_none_us: 185.2,
            base_none_floor_us: 74.8,
            dense_us: 380.5,
            dense_floor_us: 239.4,
        }
    }

    #[test]
    fn the_engine_pool_step_is_compared_with_the_owning_path() {
        let r = report("a", "quest");
        let line = crate::bench::report::engine_pool_line(&r).unwrap();
        // 125.8 / 124.6 launched, 116.5 / 116.0 as a graph.
        assert!(
            line.contains("1.010x the step's time (+1.0%)")
                && line.contains("1.004x as a graph replay (+0.4%)"),
            "{line}"
        );
        // Results written before the engine path was measured still read, without it.
        let mut json = serde_json::to_value(&r).unwrap();
        let fields = json.as_object_mut().unwrap();
        fields.remove("twilight_engine_pool_us");
        fields.remove("twilight_engine_pool_graph_us");
        let old: SparseReport = serde_json::from_value(json).unwrap();
        assert_eq!(old.twilight_engine_pool_us, None);
        assert!(crate::bench::report::engine_pool_line(&old).is_none());
    }

    #[test]
    fn the_table_joins_peers_by_shape_and_lists_skipped_shapes() {
        let peers = vec![
            PeerRecord {
                name: "a".into(),
                peer: "torch_sdpa_dense".into(),
                median_us: 247.2,
            },
            PeerRecord {
                name: "a".into(),
                peer: "torch_quest_topp".into(),
                median_us: 1125.8,
            },
            PeerRecord {
                name: "b".into(),
                peer: "torch_sdpa_dense".into(),
                median_us: 1.0,
            },
        ];
        let skipped = vec![("c".to_string(), "needs 900 GiB".to_string())];
        // The double_sparse row also carries its practical floor and both prune launches.
        let mut ds = report("a", "double_sparse(32)");
        ds.practical_floor_us = Some(30.0);
        ds.twilight_separate_us = Some(124.0);
        ds.twilight_fused_us = Some(130.5);
        ds.default_fuses_prune = Some(false);
        let table = markdown(
            &[report("a", "quest"), ds, report("z", "quest")],
            &skipped,
            &peers,
        );
        let rows: Vec<&str> = table.lines().collect();
        assert_eq!(rows.len(), 2 + 4, "{table}");
        // Shape a has both peers, and its speedup over SDPA is 247.2 / 124.6.
        assert!(
            rows[2].starts_with("| a | quest | 98 (0.30%) | 380.5 (1.59) | 247.2 |"),
            "{}",
            rows[2]
        );
        assert!(
            rows[2].contains("| 1125.8 |") && rows[2].ends_with("| 1.98x | - | - |"),
            "{}",
            rows[2]
        );
        // The PyTorch Quest step is not a peer of the double_sparse row; SDPA is.
        assert!(
            rows[3].starts_with("| a | double_sparse(32) |")
                && !rows[3].contains("1125.8")
                && rows[3].ends_with("| 1.98x | 4.15 | 124.0 / 130.5 (apart) |"),
            "{}",
            rows[3]
        );
        // Shape z has no peer numbers; shape b's numbers do not leak into it.
        assert!(
            rows[4].starts_with("| z |") && rows[4].ends_with("| - | - | - |"),
            "{}",
            rows[4]
        );
        assert!(
            rows[5].starts_with("| c | not run: needs 900 GiB"),
            "{}",
            rows[5]
        );
    }
}
