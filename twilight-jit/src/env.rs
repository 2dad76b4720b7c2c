//! Every environment knob of the JIT, read in one place, once per process.
//!
//! | Variable | Meaning |
//! |---|---|
//! | `TWILIGHT_CACHE_DIR` | the disk cache directory (else `$XDG_CACHE_HOME/twilight`, else `~/.cache/twilight`) |
//! | `TWILIGHT_NO_DISK_CACHE` | boolean: turn the disk cache off |
//! | `TWILIGHT_SEED_CACHE_DIR` | a read-only cache consulted first |
//! | `TWILIGHT_CACHE_MAX_BYTES` | size cap of the disk cache: plain bytes (`1073741824`) or a number with a binary suffix `K`, `M`, `G`, `T` (powers of 1024, optionally followed by `B` or `iB`, any case: `512M`, `2GiB`); default 2 GiB |
//! | `TWILIGHT_JIT_DISABLE` | boolean: a kernel missing from every cache is an error, not a compile |
//! | `TWILIGHT_TEMPLATE_DIR` | templates read from here instead of the embedded ones |
//! | `TWILIGHT_NVRTC_DIR` | the directory holding `libnvrtc.so.13` |
//! | `CUDA_HOME`, `CUDA_PATH` | a toolkit root |
//!
//! A boolean knob is on for `1`, `true`, `yes`, `on` and off for `0`, `false`, `no`, `off`, in
//! any case, surrounding blanks ignored; unset or empty is off. Any other value is off and a
//! warning ([`JitEnv::problems`]), as is a size that does not parse (the default is kept).

use std::fmt;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The disk cache's size cap when `TWILIGHT_CACHE_MAX_BYTES` is unset: 2 GiB.
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 2 << 30;

/// Why there is no disk cache directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskOff {
    /// `TWILIGHT_NO_DISK_CACHE` is on.
    NoDiskCacheKnob,
    /// None of `TWILIGHT_CACHE_DIR`, `XDG_CACHE_HOME` and `HOME` is set.
    NoHomeDirectory,
    /// The caller opened the cache without a directory.
    NotConfigured,
}

impl fmt::Display for DiskOff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskOff::NoDiskCacheKnob => "disabled by TWILIGHT_NO_DISK_CACHE",
            DiskOff::NoHomeDirectory => {
                "disabled: none of TWILIGHT_CACHE_DIR, XDG_CACHE_HOME and HOME is set"
            }
            DiskOff::NotConfigured => "disabled: no cache directory given",
        })
    }
}

/// A knob whose value was not understood; the knob keeps its default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvProblem {
    pub variable: &'static str,
    pub value: String,
    /// What was expected, and what is used instead.
    pub why: &'static str,
}

impl fmt::Display for EnvProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={:?}: {}", self.variable, self.value, self.why)
    }
}

/// The environment as the JIT sees it.
#[derive(Clone, Debug, Default)]
pub struct JitEnv {
    /// `TWILIGHT_CACHE_DIR`, else `$XDG_CACHE_HOME/twilight`, else `~/.cache/twilight`;
    /// `None` when the disk cache is off, [`JitEnv::disk_off`] says why.
    pub cache_dir: Option<PathBuf>,
    /// Why `cache_dir` is `None`.
    pub disk_off: Option<DiskOff>,
    /// `TWILIGHT_SEED_CACHE_DIR`: a read-only cache consulted before `cache_dir`.
    pub seed_cache_dir: Option<PathBuf>,
    /// `TWILIGHT_CACHE_MAX_BYTES`, else [`DEFAULT_CACHE_MAX_BYTES`].
    pub cache_max_bytes: u64,
    /// `TWILIGHT_JIT_DISABLE=1`: a kernel missing from every cache is an error, not a compile.
    pub jit_disabled: bool,
    /// `TWILIGHT_TEMPLATE_DIR`: templates read from here instead of the embedded ones.
    pub template_dir: Option<PathBuf>,
    /// `TWILIGHT_NVRTC_DIR`: the directory holding `libnvrtc.so.13`.
    pub nvrtc_dir: Option<PathBuf>,
    /// `CUDA_HOME`, then `CUDA_PATH`: a toolkit root.
    pub cuda_home: Option<PathBuf>,
    /// Knobs set to values that were not understood (each also logged once as a warning).
    pub problems: Vec<EnvProblem>,
}

/// Parses a boolean knob: `Some(true)` for 1/true/yes/on, `Some(false)` for 0/false/no/off or
/// empty, in any case; `None` for anything else.
pub fn parse_bool(value: &str) -> Option<bool> {
    let value = value.trim().to_ascii_lowercase();
    match value.as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "" | "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Parses a byte count: plain digits, or digits followed by `K`, `M`, `G` or `T` (powers of
/// 1024), optionally followed by `B` or `iB`, in any case. `None` for anything else, for zero
/// and on overflow.
pub fn parse_bytes(value: &str) -> Option<u64> {
    let value = value.trim().to_ascii_lowercase();
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, suffix) = value.split_at(digits_end);
    let number: u64 = digits.parse().ok()?;
    let shift = match suffix.trim_start() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    let bytes = number.checked_mul(1u64 << shift)?;
    (bytes > 0).then_some(bytes)
}

/// Reads the process environment, recording every value it does not understand.
struct Reader {
    problems: Vec<EnvProblem>,
}

impl Reader {
    fn path(&self, name: &str) -> Option<PathBuf> {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    }

    fn flag(&mut self, name: &'static str) -> bool {
        let Some(value) = std::env::var_os(name) else {
            return false;
        };
        let text = value.to_string_lossy();
        parse_bool(&text).unwrap_or_else(|| {
            self.problems.push(EnvProblem {
                variable: name,
                value: text.into_owned(),
                why: "not a boolean (1/true/yes/on or 0/false/no/off); treated as off",
            });
            false
        })
    }

    fn bytes(&mut self, name: &'static str, default: u64) -> u64 {
        let Some(value) = std::env::var_os(name).filter(|v| !v.is_empty()) else {
            return default;
        };
        let text = value.to_string_lossy();
        parse_bytes(&text).unwrap_or_else(|| {
            self.problems.push(EnvProblem {
                variable: name,
                value: text.into_owned(),
                why:
                    "not a positive size (bytes, or a number with K/M/G/T); the default 2G is used",
            });
            default
        })
    }

    /// The cache directory, or why there is none.
    fn cache_dir(&mut self) -> Result<PathBuf, DiskOff> {
        if self.flag("TWILIGHT_NO_DISK_CACHE") {
            return Err(DiskOff::NoDiskCacheKnob);
        }
        self.path("TWILIGHT_CACHE_DIR")
            .or_else(|| self.path("XDG_CACHE_HOME").map(|d| d.join("twilight")))
            .or_else(|| self.path("HOME").map(|h| h.join(".cache").join("twilight")))
            .ok_or(DiskOff::NoHomeDirectory)
    }
}

impl JitEnv {
    /// Reads the process environment now (tests use this; the library uses [`JitEnv::get`]).
    /// Logs a warning for every knob it does not understand.
    pub fn from_process() -> JitEnv {
        let mut reader = Reader {
            problems: Vec::new(),
        };
        let cache_dir = reader.cache_dir();
        let env = JitEnv {
            disk_off: cache_dir.as_ref().err().copied(),
            cache_dir: cache_dir.ok(),
            seed_cache_dir: reader.path("TWILIGHT_SEED_CACHE_DIR"),
            cache_max_bytes: reader.bytes("TWILIGHT_CACHE_MAX_BYTES", DEFAULT_CACHE_MAX_BYTES),
            jit_disabled: reader.flag("TWILIGHT_JIT_DISABLE"),
            template_dir: reader.path("TWILIGHT_TEMPLATE_DIR"),
            nvrtc_dir: reader.path("TWILIGHT_NVRTC_DIR"),
            cuda_home: reader
                .path("CUDA_HOME")
                .or_else(|| reader.path("CUDA_PATH")),
            problems: reader.problems,
        };
        env.log_problems();
        env
    }

    /// The environment read at first use, the same for the life of the process.
    pub fn get() -> &'static JitEnv {
        static ENV: OnceLock<JitEnv> = OnceLock::new();
        ENV.get_or_init(JitEnv::from_process)
    }

    #[cfg(feature = "cuda")]
    fn log_problems(&self) {
        for problem in &self.problems {
            tracing::warn!(
                variable = problem.variable,
                value = %problem.value,
                "environment knob not understood: {problem}"
            );
        }
    }

    // Without `cuda` there is no logger; the problems stay readable in `problems`.
    #[cfg(not(feature = "cuda"))]
    fn log_problems(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans_in_any_case() {
        for on in ["1", "true", "TRUE", "Yes", "on", " ON "] {
            assert_eq!(parse_bool(on), Some(true), "{on:?}");
        }
        for off in ["", "0", "false", "False", "no", "NO", "off", "Off"] {
            assert_eq!(parse_bool(off), Some(false), "{off:?}");
        }
        for bad in ["2", "y", "enable", "truee", "-1"] {
            assert_eq!(parse_bool(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn sizes_with_binary_suffixes() {
        assert_eq!(parse_bytes("1048576"), Some(1 << 20));
        assert_eq!(parse_bytes("512M"), Some(512 << 20));
        assert_eq!(parse_bytes("512mib"), Some(512 << 20));
        assert_eq!(parse_bytes("2G"), Some(2 << 30));
        assert_eq!(parse_bytes("2 GB"), Some(2 << 30));
        assert_eq!(parse_bytes("64k"), Some(64 << 10));
        assert_eq!(parse_bytes("1T"), Some(1 << 40));
        assert_eq!(parse_bytes("100b"), Some(100));
        for bad in ["", "0", "G", "-1", "1.5G", "12X", "99999999999T"] {
            assert_eq!(parse_bytes(bad), None, "{bad:?}");
        }
    }
}
