//! `twilight cache {path,list,clear}`.

use twilight::twilight_jit::disk_cache::DiskCache;
use twilight::twilight_jit::env::JitEnv;

use crate::CliResult;

#[derive(clap::Subcommand, Debug)]
pub enum Action {
    /// Print the cache directory (and the seed directory, if any).
    Path,
    /// List the cached kernels.
    List,
    /// Remove every cached kernel (the seed directory is never touched).
    Clear,
}

pub fn run(action: Action) -> CliResult {
    let env = JitEnv::get();
    let Some(dir) = env.cache_dir.clone() else {
        println!("disk cache disabled (TWILIGHT_NO_DISK_CACHE=1 or no home directory)");
        return Ok(());
    };
    match action {
        Action::Path => {
            println!("{}", dir.display());
            if let Some(seed) = &env.seed_cache_dir {
                println!("seed (read-only): {}", seed.display());
            }
        }
        Action::List => {
            let disk = DiskCache::open(Some(dir.clone()), None);
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
            println!("{} kernel(s) in {}", entries.len(), dir.display());
        }
        Action::Clear => {
            let disk = DiskCache::open(Some(dir.clone()), None);
            let removed = disk.clear()?;
            println!("removed {removed} kernel(s) from {}", dir.display());
        }
    }
    Ok(())
}
