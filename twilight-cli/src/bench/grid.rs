//! `twilight bench grid`: every shape of `bench/shapes.json` (the list `bench/peers.py` reads
//! too) through [`measure`], with progress on stderr; the results are written after every shape
//! by [`write_results`].

use std::path::PathBuf;
use std::time::Instant;

use serde::Deserialize;
use twilight::Selector;
use twilight_synth::generator::Preset;

use super::caches::caches_gib;
use super::kernels::BenchKernels;
use super::report::{self, SparseReport};
use super::shape::BenchShape;
use super::sparse::{graph_ready_stream, l2_bytes, measure, Method};
use super::table::{read_peers, write_results};
use crate::{parse, CliResult};

#[derive(clap::Args, Debug)]
pub struct GridArgs {
    /// The shape list shared with bench/peers.py.
    #[arg(long, default_value = "bench/shapes.json")]
    shapes: PathBuf,
    /// Only these shapes (names, comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Attention preset of the synthetic generator.
    #[arg(long, default_value = "default", value_parser = parse::preset)]
    preset: Preset,
    /// Caches rotated between steps so the L2 does not hold them (1 where the selector's
    /// metadata alone, read first in every step, exceeds four times the L2).
    #[arg(long, default_value_t = 2)]
    rotation: usize,
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    #[arg(long, default_value_t = 50)]
    iters: usize,
    #[arg(long, default_value_t = 4.0)]
    probe_gib: f64,
    /// Skip shapes whose rotated caches would take more device memory than this (GiB).
    #[arg(long, default_value_t = 100.0)]
    max_gib: f64,
    /// Where bench-results.json and bench-results.md are written.
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Results of bench/peers.py (its --json file) to join into the table.
    #[arg(long)]
    peers: Option<PathBuf>,
    /// Base selectors measured on every shape (comma-separated), each with top_p and with none.
    #[arg(long, value_delimiter = ',', default_value = "quest,double_sparse(32)", value_parser = parse::selector)]
    selectors: Vec<Selector>,
}

#[derive(Deserialize)]
struct ShapeList {
    shapes: Vec<BenchShape>,
}

/// Why the grid skips `shape` on this machine: its caches (`gib` of device memory) over
/// --max-gib, or its host copy over `host_limit` bytes; `None` when it runs.
fn skip_reason(shape: &BenchShape, gib: f64, max_gib: f64, host_limit: f64) -> Option<String> {
    if gib > max_gib {
        return Some(format!(
            "needs {gib:.0} GiB of caches, over --max-gib {max_gib}"
        ));
    }
    shape.host_shortfall(host_limit)
}

pub fn run(args: GridArgs) -> CliResult {
    let text = std::fs::read_to_string(&args.shapes)
        .map_err(|e| format!("cannot read {}: {e}", args.shapes.display()))?;
    let list: ShapeList = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a shape list: {e}", args.shapes.display()))?;
    let shapes: Vec<BenchShape> = list
        .shapes
        .into_iter()
        .filter(|s| args.only.is_empty() || args.only.contains(&s.name))
        .collect();
    if shapes.is_empty() {
        return Err("no shape selected".into());
    }
    // A shape no kernel can address is a broken list; one this host cannot hold is skipped
    // below, like one over --max-gib, so the rest of the grid still runs.
    for shape in &shapes {
        shape.check_addressable()?;
    }
    let host_limit = super::shape::host_limit();
    let peers = read_peers(args.peers.as_deref())?;
    let stream = graph_ready_stream()?;
    let tools = BenchKernels::new(&stream)?;
    let bandwidth = tools.read_bandwidth((args.probe_gib * (1u64 << 30) as f64) as usize)?;
    eprintln!("read bandwidth {:.0} GB/s", bandwidth * 1e-9);
    let method = Method {
        preset: args.preset,
        rotation: args.rotation,
        warmup: args.warmup,
        iters: args.iters,
        chunk_tiles: Vec::new(),
        selection_kernels: Vec::new(),
        prune_blocks: Vec::new(),
        select_clusters: Vec::new(),
    };
    let mut reports: Vec<SparseReport> = Vec::new();
    let mut skipped: Vec<(String, String)> = Vec::new();
    let start = Instant::now();
    let l2 = l2_bytes(&stream);
    for (i, shape) in shapes.iter().enumerate() {
        let gib = caches_gib(l2, shape, &args.selectors, args.rotation);
        if let Some(why) = skip_reason(shape, gib, args.max_gib, host_limit) {
            eprintln!(
                "[{}/{}] {}: skipped, {why}",
                i + 1,
                shapes.len(),
                shape.name
            );
            skipped.push((shape.name.clone(), why));
            continue;
        }
        eprintln!(
            "[{}/{}] {} ({:.0} s so far)",
            i + 1,
            shapes.len(),
            shape.name,
            start.elapsed().as_secs_f64()
        );
        match measure(&stream, &tools, bandwidth, shape, &method, &args.selectors) {
            Ok(measured) => {
                for report in measured {
                    report::print(&report);
                    reports.push(report);
                }
            }
            Err(e) => {
                eprintln!("[{}/{}] {}: failed: {e}", i + 1, shapes.len(), shape.name);
                for selector in &args.selectors {
                    let what = format!("{} with {}", shape.name, selector.declared());
                    skipped.push((what, format!("failed: {e}")));
                }
            }
        }
        // Written after every shape, so a run cut short keeps what it measured.
        write_results(&args.out, &reports, &skipped, &peers)?;
    }
    let table = write_results(&args.out, &reports, &skipped, &peers)?;
    println!("{table}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::bench::shape::test_shape as shape;

    #[test]
    fn shapes_beyond_this_host_or_the_device_budget_are_skipped_with_the_reason() {
        let gib = (1u64 << 30) as f64;
        // 64 x 32k x 32 heads x 128: a 128 GiB host copy.
        let big = shape(64, 32, 32768);
        let host = skip_reason(&big, 10.0, 100.0, 100.0 * gib).expect("over the host limit");
        assert!(
            host.contains("128.00 GiB") && host.contains("100.00 GiB"),
            "{host}"
        );
        assert_eq!(skip_reason(&big, 10.0, 100.0, 200.0 * gib), None);
        let device = skip_reason(&big, 120.0, 100.0, 200.0 * gib).expect("over --max-gib");
        assert!(device.contains("--max-gib 100"), "{device}");
        // The headline fits any host with a few GiB free.
        assert_eq!(
            skip_reason(&shape(8, 8, 32768), 4.0, 100.0, 8.0 * gib),
            None
        );
    }
}
