//! The benchmark's own kernels (`kernels.cu`): a read-only bandwidth probe, whose figure is the
//! denominator of every floor, and a random fill, so that large caches need no host upload.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use twilight::twilight_jit::nvrtc::{compile_source, nvrtc, Target};
use twilight::{Dtype, KvElement, Result};

use super::timing::{driver_error, time_with_events};

/// The CUDA source, compiled by NVRTC when a benchmark starts.
const SOURCE: &str = include_str!("kernels.cu");

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
        let info = nvrtc()?;
        let compiled = compile_source(
            "twilight_bench_tools",
            SOURCE,
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
            Dtype::F16 => &self.fill_f16,
            Dtype::Bf16 => &self.fill_bf16,
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
