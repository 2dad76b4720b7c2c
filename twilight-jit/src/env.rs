//! Every environment knob of the JIT, read in one place, once per process.

use std::path::PathBuf;
use std::sync::OnceLock;

/// The environment as the JIT sees it.
#[derive(Clone, Debug, Default)]
pub struct JitEnv {
    /// `TWILIGHT_CACHE_DIR`, else `$XDG_CACHE_HOME/twilight`, else `~/.cache/twilight`;
    /// `None` when `TWILIGHT_NO_DISK_CACHE=1` or no home directory is known.
    pub cache_dir: Option<PathBuf>,
    /// `TWILIGHT_SEED_CACHE_DIR`: a read-only cache consulted before `cache_dir`.
    pub seed_cache_dir: Option<PathBuf>,
    /// `TWILIGHT_JIT_DISABLE=1`: a kernel missing from every cache is an error, not a compile.
    pub jit_disabled: bool,
    /// `TWILIGHT_TEMPLATE_DIR`: templates read from here instead of the embedded ones.
    pub template_dir: Option<PathBuf>,
    /// `TWILIGHT_NVRTC_DIR`: the directory holding `libnvrtc.so.13`.
    pub nvrtc_dir: Option<PathBuf>,
    /// `CUDA_HOME`, then `CUDA_PATH`: a toolkit root.
    pub cuda_home: Option<PathBuf>,
}

fn var_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn flag(name: &str) -> bool {
    matches!(
        std::env::var(name).as_deref().map(str::trim),
        Ok("1" | "true" | "yes" | "on")
    )
}

impl JitEnv {
    /// Reads the process environment now (tests use this; the library uses [`JitEnv::get`]).
    pub fn from_process() -> JitEnv {
        let cache_dir = if flag("TWILIGHT_NO_DISK_CACHE") {
            None
        } else {
            var_path("TWILIGHT_CACHE_DIR")
                .or_else(|| var_path("XDG_CACHE_HOME").map(|d| d.join("twilight")))
                .or_else(|| var_path("HOME").map(|h| h.join(".cache").join("twilight")))
        };
        JitEnv {
            cache_dir,
            seed_cache_dir: var_path("TWILIGHT_SEED_CACHE_DIR"),
            jit_disabled: flag("TWILIGHT_JIT_DISABLE"),
            template_dir: var_path("TWILIGHT_TEMPLATE_DIR"),
            nvrtc_dir: var_path("TWILIGHT_NVRTC_DIR"),
            cuda_home: var_path("CUDA_HOME").or_else(|| var_path("CUDA_PATH")),
        }
    }

    /// The environment read at first use, the same for the life of the process.
    pub fn get() -> &'static JitEnv {
        static ENV: OnceLock<JitEnv> = OnceLock::new();
        ENV.get_or_init(JitEnv::from_process)
    }
}
