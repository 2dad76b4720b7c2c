//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use cudarc::driver::CudaStream;

/// The default stream of GPU 0, or `None` (with the reason printed) where there is none.
/// `TWILIGHT_REQUIRE_GPU=1` turns a missing GPU into a failure.
pub fn gpu_stream() -> Option<Arc<CudaStream>> {
    match twilight::twilight_jit::open_device(0) {
        Ok(ctx) => Some(ctx.default_stream()),
        Err(e) if std::env::var("TWILIGHT_REQUIRE_GPU").as_deref() != Ok("1") => {
            eprintln!("SKIPPED: no CUDA GPU ({e})");
            None
        }
        Err(e) => panic!("TWILIGHT_REQUIRE_GPU=1 but no GPU: {e}"),
    }
}

/// A new random seed for each run (inputs are fresh every time), printed so that a failure
/// can be replayed.
pub fn fresh_seed() -> u64 {
    let seed = rand::Rng::random(&mut rand::rng());
    eprintln!("seed {seed}");
    seed
}

/// Element-wise comparison with an absolute plus relative tolerance; on failure reports the
/// worst element with its index, both values and the tolerance. NaN never passes.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst: Option<(usize, f32)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let excess = (g - w).abs() - (atol + rtol * w.abs());
        // NaN compares false everywhere, so it is caught by this `within` being false.
        let within = excess <= 0.0;
        if !within && worst.is_none_or(|(_, e)| excess.is_nan() || excess > e) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: element {i}: got {}, expected {}, tolerance {} + {} * |expected|",
            got[i], want[i], atol, rtol
        );
    }
}
