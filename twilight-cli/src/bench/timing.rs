//! Measurement helpers for `twilight bench`: CUDA-event timing with medians, the card's read
//! bandwidth (the denominator of every floor), and DESIGN.md's byte model.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use twilight::twilight_jit;
use twilight::twilight_jit::nvrtc::{compile_source, Target};
use twilight::{Error, KvElement, Result};

/// Timing of repeated runs of one thing, in microseconds.
#[derive(Clone, Debug, PartialEq)]
pub struct Timing {
    pub samples_us: Vec<f64>,
}

impl Timing {
    pub fn median_us(&self) -> f64 {
        let mut s = self.samples_us.clone();
        s.sort_by(f64::total_cmp);
        match s.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => s[n / 2],
            n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
        }
    }
    pub fn min_us(&self) -> f64 {
        self.samples_us
            .iter()
            .cloned()
            .fold(f64::INFINITY, f64::min)
    }
    pub fn max_us(&self) -> f64 {
        self.samples_us
            .iter()
            .cloned()
            .fold(f64::NEG_INFINITY, f64::max)
    }
}

/// Times `iterations` calls of `run(i)` after `warmup` untimed ones, each bracketed by its own
/// pair of CUDA events on `stream`.
///
/// # Errors
/// Whatever `run` returns, or a driver error on events.
pub fn time_with_events(
    stream: &Arc<CudaStream>,
    warmup: usize,
    iterations: usize,
    mut run: impl FnMut(usize) -> Result<()>,
) -> Result<Timing> {
    for i in 0..warmup {
        run(i)?;
    }
    let ctx = stream.context();
    let event = || {
        ctx.new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| driver_error("creating an event", e))
    };
    let mut pairs = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let (start, end) = (event()?, event()?);
        start
            .record(stream)
            .map_err(|e| driver_error("recording an event", e))?;
        run(warmup + i)?;
        end.record(stream)
            .map_err(|e| driver_error("recording an event", e))?;
        pairs.push((start, end));
    }
    stream
        .synchronize()
        .map_err(|e| driver_error("synchronizing", e))?;
    let samples_us = pairs
        .iter()
        .map(|(s, e)| s.elapsed_ms(e).map(|ms| ms as f64 * 1e3))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| driver_error("reading event times", e))?;
    Ok(Timing { samples_us })
}

const READ_PROBE: &str = r#"
#include <cuda_fp16.h>
#include <cuda_bf16.h>
// Read-only bandwidth probe: every thread streams 16-byte words; the xor keeps the loads
// alive and is stored only under a flag the host never sets.
extern "C" __global__ void twilight_read_probe(const uint4* __restrict__ data, unsigned long long words,
                                                unsigned int* sink, int never) {
  uint4 acc = make_uint4(0u, 0u, 0u, 0u);
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < words; i += stride) {
    uint4 w = __ldg(data + i);
    acc.x ^= w.x; acc.y ^= w.y; acc.z ^= w.z; acc.w ^= w.w;
  }
  if (never) sink[threadIdx.x] = acc.x ^ acc.y ^ acc.z ^ acc.w;
}

// Fills 2-byte values with uniform noise in [-scale, scale] from a hash of the index, so large
// benchmark caches need no host-side generation or upload.
__device__ __forceinline__ float twilight_hash_uniform(unsigned long long i, unsigned int seed) {
  unsigned int x = (unsigned int)(i ^ (i >> 32)) * 0x9E3779B1u ^ seed;
  x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
  return (x >> 8) * (2.0f / 16777216.0f) - 1.0f;
}
extern "C" __global__ void twilight_fill_f16(__half* out, unsigned long long n, unsigned int seed, float scale) {
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x)
    out[i] = __float2half_rn(scale * twilight_hash_uniform(i, seed));
}
extern "C" __global__ void twilight_fill_bf16(__nv_bfloat16* out, unsigned long long n, unsigned int seed, float scale) {
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x)
    out[i] = __float2bfloat16_rn(scale * twilight_hash_uniform(i, seed));
}
"#;

/// The benchmark's own kernels (bandwidth probe, random fill), compiled once.
pub struct BenchKernels {
    stream: Arc<CudaStream>,
    read_probe: CudaFunction,
    fill_f16: CudaFunction,
    fill_bf16: CudaFunction,
    sms: u32,
}

impl BenchKernels {
    /// # Errors
    /// NVRTC or driver errors.
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context();
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| driver_error("reading the compute capability", e))?;
        let info = twilight_jit::nvrtc::nvrtc()?;
        let compiled = compile_source(
            "twilight_bench_tools",
            READ_PROBE,
            &Target::for_device(info, major, minor),
        )?;
        let module = ctx
            .load_module(Ptx::from_binary(compiled.binary))
            .map_err(|e| driver_error("loading the benchmark kernels", e))?;
        let load = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| driver_error(format!("finding {name}"), e))
        };
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| driver_error("reading the SM count", e))? as u32;
        Ok(BenchKernels {
            stream: stream.clone(),
            read_probe: load("twilight_read_probe")?,
            fill_f16: load("twilight_fill_f16")?,
            fill_bf16: load("twilight_fill_bf16")?,
            sms,
        })
    }

    /// Fills `out` with uniform noise in `[-scale, scale]`.
    ///
    /// # Errors
    /// A driver error.
    pub fn fill<T: KvElement>(&self, out: &mut CudaSlice<T>, seed: u32, scale: f32) -> Result<()> {
        let function = match T::DTYPE {
            twilight_jit::Dtype::F16 => &self.fill_f16,
            twilight_jit::Dtype::Bf16 => &self.fill_bf16,
        };
        let n = out.len() as u64;
        let mut launch = self.stream.launch_builder(function);
        launch.arg(out).arg(&n).arg(&seed).arg(&scale);
        let config = LaunchConfig {
            grid_dim: (self.sms * 8, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the fill kernel of T's dtype, which writes `n` elements.
        unsafe { launch.launch(config) }.map_err(|e| driver_error("launching a fill", e))?;
        Ok(())
    }

    /// The card's read bandwidth in bytes per second: the median of timed reads of a
    /// `bytes`-long buffer (a few GiB, far beyond the L2) by a read-only kernel.
    ///
    /// # Errors
    /// Driver errors, or too little device memory.
    pub fn read_bandwidth(&self, bytes: usize) -> Result<f64> {
        read_bandwidth_with(&self.stream, &self.read_probe, self.sms, bytes)
    }
}

fn read_bandwidth_with(
    stream: &Arc<CudaStream>,
    function: &CudaFunction,
    sms: u32,
    bytes: usize,
) -> Result<f64> {
    let words = bytes / 16;
    let data: CudaSlice<u8> = stream.alloc_zeros(words * 16).map_err(|e| {
        driver_error(
            format!("allocating {bytes} bytes for the bandwidth probe"),
            e,
        )
    })?;
    let mut sink: CudaSlice<u32> = stream
        .alloc_zeros(1024)
        .map_err(|e| driver_error("allocating", e))?;
    let (words_u64, never) = (words as u64, 0i32);
    let timing = time_with_events(stream, 3, 20, |_| {
        let mut launch = stream.launch_builder(function);
        launch.arg(&data).arg(&words_u64).arg(&mut sink).arg(&never);
        let config = LaunchConfig {
            grid_dim: (sms * 8, 1, 1),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `twilight_read_probe`; `data` holds `words` 16-byte words
        // and `sink` 1024 entries (512 threads per block index it).
        unsafe { launch.launch(config) }
            .map(|_| ())
            .map_err(|e| driver_error("launching the bandwidth probe", e))
    })?;
    Ok((words * 16) as f64 / (timing.median_us() * 1e-6))
}

/// DESIGN.md's byte model of dense decode: each (request, KV head) reads K and V of every token
/// once (q, o and the page table are negligible beside it).
pub fn dense_decode_bytes(
    lens: &[usize],
    num_kv_heads: usize,
    head_dim: usize,
    elem_bytes: usize,
) -> u64 {
    let tokens: usize = lens.iter().sum();
    (tokens * num_kv_heads * head_dim * 2 * elem_bytes) as u64
}

/// A driver failure of the benchmark's own work, as the library reports its own.
fn driver_error(what: impl Into<String>, e: impl std::fmt::Display) -> Error {
    Error::Driver {
        what: what.into(),
        message: e.to_string(),
    }
}
