//! `twilight precompile`: fill the kernel cache ahead of time, on a GPU or, with `--arch`, on
//! any machine with NVRTC (an image build, say) for GPUs of that arch.

use std::time::Instant;

use twilight::twilight_jit::cache::{prepare, Origin};
use twilight::twilight_jit::disk_cache::{DiskCache, StoreError};
use twilight::twilight_jit::env::JitEnv;
use twilight::twilight_jit::{open_device, Jit, Target};
use twilight::VariantSpec;

use crate::CliResult;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Variants to compile (names or key=value lists).
    variants: Vec<VariantSpec>,
    /// Also compile every variant declared with `#[twilight_kernel]` in this binary.
    #[arg(long)]
    declared: bool,
    /// Compile for this target (sm_90 for CUBIN, compute_90 for PTX) without using a GPU.
    #[arg(long)]
    arch: Option<String>,
}

pub fn run(args: Args) -> CliResult {
    let mut specs = args.variants;
    if args.declared {
        specs.extend(twilight::declared_variants().iter().map(|d| d.spec));
    }
    specs.sort();
    specs.dedup();
    if specs.is_empty() {
        return Err("nothing to precompile: name variants or pass --declared".into());
    }
    let env = JitEnv::get();
    let total = specs.len();
    let start = Instant::now();
    let describe = |origin: Origin| match origin {
        Origin::Compiled(d) => format!("compiled in {:.0} ms", d.as_secs_f64() * 1e3),
        Origin::Disk => "already cached".to_string(),
        Origin::Shared => "already loaded in this process".to_string(),
    };
    // A kernel that was compiled but could not be stored is of no use to a later process: the
    // command goes on with the others, then fails naming each.
    let mut not_stored: Vec<String> = Vec::new();
    let mut note = |spec: &VariantSpec, persisted: &Result<(), StoreError>| {
        if let Err(e) = persisted {
            println!("    not stored: {e}");
            not_stored.push(format!("{spec}: {e}"));
        }
    };
    let location = match args.arch {
        Some(arch) => {
            let target = Target::parse(&arch)
                .ok_or_else(|| format!("`{arch}` is not sm_XY or compute_XY"))?;
            let disk = DiskCache::from_env(env);
            if !disk.is_writable() {
                return Err(format!(
                    "the kernel cache cannot be written, so nothing would be kept: {}",
                    disk.location()
                )
                .into());
            }
            for (i, spec) in specs.iter().enumerate() {
                let prepared = prepare(spec, &target, &disk, env.jit_disabled)?;
                println!(
                    "[{}/{total}] {spec} for {}: {} (key {})",
                    i + 1,
                    target.arch(),
                    describe(prepared.origin),
                    &prepared.key.hex()[..16]
                );
                note(spec, &prepared.persisted);
            }
            disk.location().to_string()
        }
        None => {
            let ctx = open_device(0)?;
            let jit = Jit::for_context(&ctx)?;
            for (i, spec) in specs.iter().enumerate() {
                let program = jit.load(spec)?;
                println!(
                    "[{}/{total}] {spec} for {}: {} (key {})",
                    i + 1,
                    jit.target().arch(),
                    describe(program.origin),
                    &program.key.hex()[..16]
                );
                note(spec, &program.persisted);
            }
            DiskCache::from_env(env).location().to_string()
        }
    };
    if !not_stored.is_empty() {
        return Err(format!(
            "{} of {total} variant(s) could not be stored in the kernel cache {location}: {}",
            not_stored.len(),
            not_stored.join("; ")
        )
        .into());
    }
    println!(
        "{total} variant(s) ready in {:.1} s; cache: {location}",
        start.elapsed().as_secs_f64(),
    );
    Ok(())
}
