//! Finding NVRTC 13 and compiling a rendered program with it.
//!
//! cudarc dlopens NVRTC by bare name and panics when it is missing, so this module finds the
//! library itself, loads it by full path (builtins first, with `RTLD_GLOBAL`) before cudarc's
//! first call, and reports a missing or wrong library as an error with a hint. cudarc's later
//! dlopen of the bare name then returns the library already loaded.

use std::ffi::{c_char, c_int, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cudarc::nvrtc::sys as nvrtc_sys;

use crate::env::JitEnv;
use crate::error::JitError;
use crate::render::RenderedProgram;

const LIB_NAME: &str = "libnvrtc.so.13";
const BUILTINS_NAME: &str = "libnvrtc-builtins.so.13.0";
const REQUIRED_MAJOR: i32 = 13;

/// What was found and loaded.
#[derive(Clone, Debug)]
pub struct NvrtcInfo {
    /// Directory of `libnvrtc.so.13`; `None` when the loader's search path provided it.
    pub lib_dir: Option<PathBuf>,
    /// Where `cuda_fp16.h` and `cuda_bf16.h` were found; `None` if nowhere.
    pub include_dir: Option<PathBuf>,
    pub version: (i32, i32),
    /// SM numbers NVRTC can emit CUBIN for (e.g. 90 for `sm_90`).
    pub supported_sms: Vec<i32>,
}

/// The compile target: CUBIN for a real `sm_XY`, PTX for a virtual `compute_XY`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub major: i32,
    pub minor: i32,
    pub kind: BinaryKind,
}

pub use crate::disk_cache::BinaryKind;

impl Target {
    /// The NVRTC architecture name: `sm_90` or `compute_90`.
    pub fn arch(&self) -> String {
        let prefix = match self.kind {
            BinaryKind::Cubin => "sm",
            BinaryKind::Ptx => "compute",
        };
        format!("{prefix}_{}{}", self.major, self.minor)
    }

    /// CUBIN where this NVRTC can build it for the device's own sm, PTX otherwise.
    pub fn for_device(info: &NvrtcInfo, major: i32, minor: i32) -> Target {
        let sm = major * 10 + minor;
        let kind = if info.supported_sms.contains(&sm) {
            BinaryKind::Cubin
        } else {
            BinaryKind::Ptx
        };
        Target { major, minor, kind }
    }

    /// Parses `sm_90` (CUBIN) or `compute_90` (PTX).
    pub fn parse(text: &str) -> Option<Target> {
        let (kind, digits) = if let Some(d) = text.strip_prefix("sm_") {
            (BinaryKind::Cubin, d)
        } else {
            (BinaryKind::Ptx, text.strip_prefix("compute_")?)
        };
        // Arch-specific targets (sm_90a) are not offered: nothing here uses their instructions,
        // and refusing them beats silently building for sm_90.
        if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let (major, minor) = digits.split_at(digits.len() - 1);
        Some(Target {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
            kind,
        })
    }
}

/// Finds and loads NVRTC once per process.
///
/// # Errors
/// [`JitError::NvrtcMissing`] with every place searched, or [`JitError::NvrtcVersion`] for a
/// library of another major version.
pub fn nvrtc() -> Result<&'static NvrtcInfo, JitError> {
    static FOUND: OnceLock<Result<NvrtcInfo, JitError>> = OnceLock::new();
    FOUND
        .get_or_init(|| discover(JitEnv::get()))
        .as_ref()
        .map_err(Clone::clone)
}

fn candidate_dirs(env: &JitEnv) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = &env.nvrtc_dir {
        dirs.push(d.clone());
    }
    for root in env
        .cuda_home
        .iter()
        .cloned()
        .chain([PathBuf::from("/usr/local/cuda")])
    {
        dirs.push(root.join("lib64"));
        dirs.push(root.join("lib"));
        dirs.push(root.join("targets/x86_64-linux/lib"));
    }
    // The `nvidia-cuda-nvrtc` wheel: where scripts/install-nvrtc.sh puts it, then Python's
    // usual site directories.
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let xdg = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from);
    for cache in xdg
        .iter()
        .cloned()
        .chain(home.iter().map(|h| h.join(".cache")))
    {
        dirs.push(cache.join("twilight-nvrtc-13.0.88/nvidia/cu13/lib"));
    }
    let mut site_roots = vec![PathBuf::from("/usr/local/lib"), PathBuf::from("/usr/lib")];
    if let Some(h) = &home {
        site_roots.push(h.join(".local/lib"));
    }
    for root in site_roots {
        let Ok(entries) = std::fs::read_dir(&root) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with("python3") {
                for site in ["site-packages", "dist-packages"] {
                    dirs.push(entry.path().join(site).join("nvidia/cu13/lib"));
                }
            }
        }
    }
    dirs
}

/// The include directory matching a library directory.
fn include_dir_for(lib_dir: Option<&Path>, env: &JitEnv) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = lib_dir {
        if let Some(parent) = dir.parent() {
            candidates.push(parent.join("include"));
        }
    }
    for root in env
        .cuda_home
        .iter()
        .cloned()
        .chain([PathBuf::from("/usr/local/cuda")])
    {
        candidates.push(root.join("include"));
        candidates.push(root.join("targets/x86_64-linux/include"));
    }
    candidates
        .into_iter()
        .find(|d| d.join("cuda_fp16.h").is_file() && d.join("cuda_bf16.h").is_file())
}

fn open_global(path: &Path) -> Result<(), String> {
    // SAFETY: loading NVRTC runs only its library constructors, which have no preconditions.
    let lib = unsafe {
        libloading::os::unix::Library::open(
            Some(path),
            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
        )
    }
    .map_err(|e| e.to_string())?;
    // Kept loaded for the life of the process: cudarc holds symbols from it.
    std::mem::forget(lib);
    Ok(())
}

fn discover(env: &JitEnv) -> Result<NvrtcInfo, JitError> {
    let mut searched = Vec::new();
    let mut lib_dir = None;
    for dir in candidate_dirs(env) {
        let lib = dir.join(LIB_NAME);
        if !lib.is_file() {
            searched.push(dir.display().to_string());
            continue;
        }
        let builtins = dir.join(BUILTINS_NAME);
        if builtins.is_file() {
            if let Err(e) = open_global(&builtins) {
                searched.push(format!("{} (cannot load: {e})", builtins.display()));
                continue;
            }
        }
        match open_global(&lib) {
            Ok(()) => {
                lib_dir = Some(dir);
                break;
            }
            Err(e) => searched.push(format!("{} (cannot load: {e})", lib.display())),
        }
    }
    if lib_dir.is_none() {
        searched.push("the dynamic loader's search path".to_string());
    }
    if !nvrtc_present() {
        return Err(JitError::NvrtcMissing { searched });
    }
    let mut major: c_int = 0;
    let mut minor: c_int = 0;
    // SAFETY: the library is present (checked above); both out-pointers are valid.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| JitError::Nvrtc {
            what: "nvrtcVersion".into(),
            message: e.to_string(),
        })?;
    if major != REQUIRED_MAJOR {
        return Err(JitError::NvrtcVersion {
            found: (major, minor),
            lib_dir: lib_dir.clone(),
        });
    }
    Ok(NvrtcInfo {
        include_dir: include_dir_for(lib_dir.as_deref(), env),
        lib_dir,
        version: (major, minor),
        supported_sms: supported_sms()?,
    })
}

fn supported_sms() -> Result<Vec<i32>, JitError> {
    let fail = |what: &str, e: cudarc::nvrtc::result::NvrtcError| JitError::Nvrtc {
        what: what.into(),
        message: e.to_string(),
    };
    let mut count: c_int = 0;
    // SAFETY: NVRTC is loaded; the out-pointer is valid.
    unsafe { nvrtc_sys::nvrtcGetNumSupportedArchs(&mut count) }
        .result()
        .map_err(|e| fail("nvrtcGetNumSupportedArchs", e))?;
    let mut archs = vec![0 as c_int; count.max(0) as usize];
    // SAFETY: `archs` holds exactly the number of entries NVRTC reported.
    unsafe { nvrtc_sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
        .result()
        .map_err(|e| fail("nvrtcGetSupportedArchs", e))?;
    Ok(archs)
}

/// NVRTC options that decide the binary. They are part of the cache key; the include path is
/// not (it differs between machines without changing the binary, and the headers' NVRTC
/// version is in the key).
pub fn identity_options(target: &Target) -> Vec<String> {
    vec![
        format!("--gpu-architecture={}", target.arch()),
        "--std=c++17".to_string(),
    ]
}

/// A compiled program.
#[derive(Clone, Debug)]
pub struct CompiledBinary {
    pub binary: Vec<u8>,
    pub kind: BinaryKind,
    /// NVRTC's log (warnings), usually empty.
    pub log: String,
    pub duration: Duration,
}

struct Program(nvrtc_sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the handle came from nvrtcCreateProgram and is destroyed once, here.
        let _ = unsafe { cudarc::nvrtc::result::destroy_program(self.0) };
    }
}

/// Compiles a rendered program for `target`.
///
/// # Errors
/// A missing NVRTC, or [`JitError::Compile`] with the log and the source around each
/// reported line.
pub fn compile(program: &RenderedProgram, target: &Target) -> Result<CompiledBinary, JitError> {
    compile_source(&program.spec.name(), &program.source, target)
}

/// Compiles any self-contained CUDA source (a variant's program, or a tool's kernel such as
/// the bandwidth probe of the benchmarks); `name` labels errors and logs.
///
/// # Errors
/// As [`compile`].
pub fn compile_source(
    name: &str,
    source: &str,
    target: &Target,
) -> Result<CompiledBinary, JitError> {
    let info = nvrtc()?;
    let start = Instant::now();
    let mut options = identity_options(target);
    if let Some(include) = &info.include_dir {
        options.push(format!("--include-path={}", include.display()));
    }
    let variant = name.to_string();
    let source_text = source;
    let source = CString::new(source).map_err(|_| JitError::Nvrtc {
        what: "create program".into(),
        message: "source contains a NUL byte".into(),
    })?;
    let name = CString::new(format!("{variant}.cu")).map_err(|_| JitError::Nvrtc {
        what: "create program".into(),
        message: "program name contains a NUL byte".into(),
    })?;
    let handle = cudarc::nvrtc::result::create_program(&source, Some(&name)).map_err(|e| {
        JitError::Nvrtc {
            what: "nvrtcCreateProgram".into(),
            message: e.to_string(),
        }
    })?;
    let prog = Program(handle);
    // SAFETY: `prog` is a live program; the options are valid C strings built by cudarc.
    let compiled = unsafe { cudarc::nvrtc::result::compile_program(prog.0, &options) };
    // SAFETY: `prog` is live; the log is fetched whether or not the compile succeeded.
    let log = unsafe { cudarc::nvrtc::result::get_program_log(prog.0) }
        .map(|chars| c_chars_to_string(&chars))
        .unwrap_or_default();
    if compiled.is_err() {
        return Err(JitError::Compile(Box::new(
            crate::error::CompileFailure::new(variant, options, log, source_text),
        )));
    }
    let binary = match target.kind {
        BinaryKind::Cubin => {
            let mut size = 0usize;
            // SAFETY: `prog` compiled successfully; the out-pointer is valid.
            unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog.0, &mut size) }
                .result()
                .map_err(|e| JitError::Nvrtc {
                    what: "nvrtcGetCUBINSize".into(),
                    message: e.to_string(),
                })?;
            let mut bytes = vec![0u8; size];
            // SAFETY: `bytes` has the size NVRTC reported for the CUBIN.
            unsafe { nvrtc_sys::nvrtcGetCUBIN(prog.0, bytes.as_mut_ptr() as *mut c_char) }
                .result()
                .map_err(|e| JitError::Nvrtc {
                    what: "nvrtcGetCUBIN".into(),
                    message: e.to_string(),
                })?;
            bytes
        }
        BinaryKind::Ptx => {
            // SAFETY: `prog` compiled successfully.
            let chars =
                unsafe { cudarc::nvrtc::result::get_ptx(prog.0) }.map_err(|e| JitError::Nvrtc {
                    what: "nvrtcGetPTX".into(),
                    message: e.to_string(),
                })?;
            // The driver wants the PTX text with its terminating NUL.
            let mut bytes: Vec<u8> = chars.iter().map(|&c| c as u8).collect();
            if bytes.last() != Some(&0) {
                bytes.push(0);
            }
            bytes
        }
    };
    Ok(CompiledBinary {
        binary,
        kind: target.kind,
        log,
        duration: start.elapsed(),
    })
}

fn c_chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Whether cudarc can use NVRTC: probed when loaded at run time (cudarc panics on a missing
/// library); linked, it is there or the binary would not have started.
fn nvrtc_present() -> bool {
    #[cfg(feature = "dynamic-loading")]
    {
        // SAFETY: only probes whether cudarc can dlopen the library; calls no NVRTC function.
        unsafe { nvrtc_sys::is_culib_present() }
    }
    #[cfg(not(feature = "dynamic-loading"))]
    {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let t = Target::parse("sm_90").unwrap();
        assert_eq!((t.major, t.minor, t.kind), (9, 0, BinaryKind::Cubin));
        assert_eq!(t.arch(), "sm_90");
        let t = Target::parse("compute_120").unwrap();
        assert_eq!((t.major, t.minor, t.kind), (12, 0, BinaryKind::Ptx));
        assert!(Target::parse("sm_x").is_none());
        assert!(Target::parse("sm_90a").is_none());
        assert!(Target::parse("gfx90a").is_none());
    }
}
