//! `twilight doctor`: what this machine offers twilight (the driver, every device, NVRTC, the
//! cache), each line with a hint when missing; it fails when the kernel cache directory has a
//! problem (owner, mode, space, entries).

use twilight::twilight_jit::env::JitEnv;
use twilight::twilight_jit::{device_count, nvrtc, open_device};

use crate::CliResult;

pub fn run() -> CliResult {
    let env = JitEnv::get();
    devices();
    match nvrtc::nvrtc() {
        Ok(info) => {
            println!(
                "nvrtc:   {}.{} from {}",
                info.version.0,
                info.version.1,
                info.lib_dir
                    .as_ref()
                    .map_or("the loader's search path".to_string(), |d| d
                        .display()
                        .to_string())
            );
            match &info.include_dir {
                Some(d) => println!("headers: {}", d.display()),
                None => println!(
                    "headers: cuda_fp16.h/cuda_bf16.h not found (set CUDA_HOME, or use scripts/install-nvrtc.sh)"
                ),
            }
        }
        Err(e) => println!("nvrtc:   none ({e})"),
    }
    let report = twilight::twilight_jit::check_cache(env);
    print!("{report}");
    if env.jit_disabled {
        println!("jit:     disabled (TWILIGHT_JIT_DISABLE=1): kernels must come from a cache");
    }
    if let Some(t) = &env.template_dir {
        println!("templates: overridden from {}", t.display());
    }
    if !report.is_healthy() {
        return Err("the kernel cache has a problem (see above)".into());
    }
    Ok(())
}

/// The driver and one line per device, each with its own context: a device that cannot be
/// opened is reported and the others still are.
fn devices() {
    let count = match device_count() {
        Ok(0) => {
            println!("device:  none (no CUDA driver or no GPU)");
            return;
        }
        Ok(count) => count,
        Err(e) => {
            println!("device:  none ({e})");
            return;
        }
    };
    let mut driver = 0i32;
    // SAFETY: libcuda is loaded and initialized (devices were counted); the out-pointer is valid.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) };
    println!("driver:  CUDA {}.{}", driver / 1000, driver % 1000 / 10);
    println!("devices: {count}");
    for ordinal in 0..count {
        match open_device(ordinal) {
            Ok(ctx) => {
                let name = ctx
                    .name()
                    .unwrap_or_else(|e| format!("<name unavailable: {e}>"));
                let (major, minor) = ctx.compute_capability().unwrap_or((0, 0));
                let mem = ctx.total_mem().unwrap_or(0) as f64 / (1u64 << 30) as f64;
                println!("device {ordinal}: {name}, sm_{major}{minor}, {mem:.0} GiB");
            }
            Err(e) => println!("device {ordinal}: cannot be opened ({e})"),
        }
    }
}
