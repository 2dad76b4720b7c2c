//! `twilight bench jit`: what the JIT costs per variant: a cold compile, a load from a warm
//! disk cache, and a hit in the memory cache.

use std::time::Instant;

use twilight::twilight_jit::disk_cache::DiskCache;
use twilight::twilight_jit::{open_device, Jit, Origin};
use twilight::{Dtype, KvLayout, VariantSpec};

use crate::CliResult;

pub fn run(mut variants: Vec<VariantSpec>) -> CliResult {
    if variants.is_empty() {
        variants = vec![
            VariantSpec::dense(16, 128, Dtype::F16, 4, KvLayout::Hnd),
            VariantSpec::dense(16, 128, Dtype::Bf16, 4, KvLayout::Hnd),
        ];
    }
    let ctx = open_device(0)?;
    let dir = std::env::temp_dir().join(format!("twilight-bench-jit-{}", std::process::id()));
    println!(
        "JIT costs on {}, scratch cache {}",
        ctx.name()?,
        dir.display()
    );
    for spec in variants {
        let _ = std::fs::remove_dir_all(&dir);
        let cold = Jit::new(ctx.clone(), DiskCache::open(Some(dir.clone()), None), false)?;
        let start = Instant::now();
        let program = cold.load(&spec)?;
        let cold_ms = start.elapsed().as_secs_f64() * 1e3;
        let Origin::Compiled(compile) = program.origin else {
            return Err("the scratch cache was not empty".into());
        };
        let warm = Jit::new(ctx.clone(), DiskCache::open(Some(dir.clone()), None), false)?;
        let start = Instant::now();
        let from_disk = warm.load(&spec)?;
        let disk_ms = start.elapsed().as_secs_f64() * 1e3;
        if from_disk.origin != Origin::Disk {
            return Err("the second load did not come from the disk cache".into());
        }
        let hits = 100_000;
        let start = Instant::now();
        for _ in 0..hits {
            std::hint::black_box(warm.load(&spec)?);
        }
        let hit_ns = start.elapsed().as_secs_f64() * 1e9 / hits as f64;
        println!(
            "  {spec}: cold {cold_ms:.0} ms (NVRTC {:.0} ms), warm disk load {disk_ms:.2} ms, memory hit {hit_ns:.0} ns (mean of {hits})",
            compile.as_secs_f64() * 1e3
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
