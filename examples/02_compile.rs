//! Compile a declared variant with NVRTC to an sm_90 CUBIN, with no GPU involved (what
//! `twilight precompile --arch sm_90` does for every declared variant). Prints why it cannot
//! when NVRTC is missing (scripts/install-nvrtc.sh installs it).
//!
//!     cargo run --example 02_compile

use twilight::twilight_jit::nvrtc::{compile, nvrtc, Target};
use twilight::{twilight_kernel, Variant};

#[twilight_kernel(page_size = 16, head_dim = 128, dtype = bf16, group_size = 4,
                  kv_layout = nhd, selector = full, pruning = none)]
pub struct DenseBf16;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let info = match nvrtc() {
        Ok(info) => info,
        Err(e) => {
            println!("no NVRTC here: {e}");
            return Ok(());
        }
    };
    let program = twilight::twilight_jit::render(&DenseBf16::SPEC)?;
    let target = Target::parse("sm_90").expect("a valid target");
    let compiled = compile(&program, &target)?;
    println!(
        "{} compiled by NVRTC {}.{} to a {}-byte {} in {:.0} ms",
        DenseBf16::NAME,
        info.version.0,
        info.version.1,
        compiled.binary.len(),
        target.arch(),
        compiled.duration.as_secs_f64() * 1e3
    );
    Ok(())
}
