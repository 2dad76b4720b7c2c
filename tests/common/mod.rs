//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use twilight::VariantSpec;

/// The GPUs `TWILIGHT_REQUIRE_GPU` asks for: `1` (or more) makes a missing GPU a failure, `2`
/// also makes a missing second GPU one; unset, `0` or anything else requires none.
pub fn required_gpus() -> usize {
    std::env::var("TWILIGHT_REQUIRE_GPU")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Compiles (and loads) every variant of `specs` on all cores at once before a test runs its
/// cases one by one: a fresh GPU host has no kernel cache, and a variant matrix compiled one
/// variant at a time spent most of its test's minutes in NVRTC.
pub fn warm_jit(stream: &Arc<CudaStream>, specs: impl IntoIterator<Item = VariantSpec>) {
    let jit = twilight::twilight_jit::Jit::for_context(stream.context()).unwrap();
    let mut specs: Vec<VariantSpec> = specs.into_iter().collect();
    specs.sort();
    specs.dedup();
    let threads = std::thread::available_parallelism()
        .map_or(4, |n| n.get())
        .min(specs.len().max(1));
    std::thread::scope(|s| {
        for chunk in specs.chunks(specs.len().div_ceil(threads).max(1)) {
            let jit = jit.clone();
            s.spawn(move || {
                for spec in chunk {
                    jit.load(spec).unwrap_or_else(|e| panic!("{e}"));
                }
            });
        }
    });
}

/// The default stream of GPU 0, or `None` (with the reason printed) where there is none.
/// `TWILIGHT_REQUIRE_GPU=1` turns a missing GPU into a failure.
pub fn gpu_stream() -> Option<Arc<CudaStream>> {
    match twilight::twilight_jit::open_device(0) {
        Ok(ctx) => Some(ctx.default_stream()),
        Err(e) if required_gpus() == 0 => {
            eprintln!("SKIPPED: no CUDA GPU ({e})");
            None
        }
        Err(e) => panic!("TWILIGHT_REQUIRE_GPU is set but there is no GPU: {e}"),
    }
}

/// Contexts of GPUs 0..n, or `None` (with the reason printed) where the host has fewer. A
/// missing GPU fails under `TWILIGHT_REQUIRE_GPU=1`; fewer than `n` fail under
/// `TWILIGHT_REQUIRE_GPU=n` (or more), and are a skip otherwise, so a one-GPU host runs the
/// rest of the GPU suite with `TWILIGHT_REQUIRE_GPU=1`.
pub fn gpu_contexts(n: usize) -> Option<Vec<Arc<CudaContext>>> {
    let required = required_gpus();
    let (count, why) = match twilight::twilight_jit::device_count() {
        Ok(count) => (count, String::new()),
        Err(e) => (0, format!(" ({e})")),
    };
    if count >= n {
        return Some(
            (0..n)
                .map(|i| {
                    twilight::twilight_jit::open_device(i)
                        .unwrap_or_else(|e| panic!("GPU {i} of {count} does not open: {e}"))
                })
                .collect(),
        );
    }
    if required >= n || (required >= 1 && count == 0) {
        panic!("TWILIGHT_REQUIRE_GPU={required} but this host has {count} CUDA GPU(s){why}");
    }
    eprintln!(
        "SKIPPED: needs {n} CUDA GPUs, this host has {count}{why}; \
         TWILIGHT_REQUIRE_GPU={n} makes this a failure"
    );
    None
}

/// A new random seed for each run (inputs are fresh every time), printed so that a failure
/// can be replayed.
pub fn fresh_seed() -> u64 {
    // A failure prints its seed; TWILIGHT_TEST_SEED replays it.
    let seed = match std::env::var("TWILIGHT_TEST_SEED") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("TWILIGHT_TEST_SEED={text:?} is not a u64")),
        Err(_) => rand::Rng::random(&mut rand::rng()),
    };
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
