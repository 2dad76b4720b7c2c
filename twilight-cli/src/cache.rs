//! `twilight cache {path,list,clear}`. Listing and the path change nothing on disk.

use twilight::twilight_jit::disk_cache::DiskCache;
use twilight::twilight_jit::env::JitEnv;

use crate::CliResult;

#[derive(clap::Subcommand, Debug)]
pub enum Action {
    /// Print the cache directory with its status (and the seed directory, if any).
    Path,
    /// List the cached kernels.
    List,
    /// Remove every cached kernel (the seed directory is never touched); names what it cannot
    /// remove and then fails.
    Clear,
}

pub fn run(action: Action) -> CliResult {
    let disk = DiskCache::from_env(JitEnv::get());
    let location = disk.location();
    match action {
        Action::Path => {
            println!("{location}");
            if let Some(seed) = &location.seed {
                println!("seed: {seed}");
            }
        }
        Action::List => {
            println!("cache: {location}");
            let entries = disk.list();
            for e in &entries {
                println!(
                    "{:<40} {} {:>6} {:>9} bytes  nvrtc {}.{}  {}",
                    e.variant,
                    &e.key.hex()[..16],
                    e.target,
                    e.size,
                    e.nvrtc_version.0,
                    e.nvrtc_version.1,
                    e.path.display()
                );
            }
            println!("{} kernel(s)", entries.len());
        }
        Action::Clear => {
            let report = disk.clear_report();
            println!("removed {} kernel(s) from {location}", report.removed);
            for failure in &report.failures {
                println!(
                    "  not removed: {}: {}",
                    failure.path.display(),
                    failure.reason
                );
            }
            if !report.failures.is_empty() {
                return Err(format!(
                    "{} path(s) in the kernel cache could not be removed",
                    report.failures.len()
                )
                .into());
            }
        }
    }
    Ok(())
}
