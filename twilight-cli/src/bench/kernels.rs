//! The benchmark's own kernels (`kernels.cu`): a read-only bandwidth probe, whose figure is the
//! denominator of every floor; a bare read of a step's bytes with the best grid, the practical
//! floor; and a random fill, so that large caches need no host upload.

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
    bare_read: CudaFunction,
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
            bare_read: load("twilight_bare_read")?,
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

    /// The practical floor of a step that reads `row_bytes` in each of `rows` rows: the best
    /// median time of a kernel that only streams those bytes, over 1 to 16 CTAs per row, and
    /// the CTAs per row that reached it. Copies enough to fill four times the L2 are rotated,
    /// so the reads come from DRAM as a step's do.
    ///
    /// # Errors
    /// Driver errors, or too little device memory.
    pub fn practical_floor(
        &self,
        rows: usize,
        row_bytes: usize,
        l2_bytes: f64,
        iters: usize,
    ) -> Result<(f64, u32)> {
        let row_words = row_bytes.div_ceil(16).max(1);
        let copy_words = rows * row_words;
        let copies = ((4.0 * l2_bytes) / (copy_words * 16) as f64)
            .ceil()
            .max(1.0) as usize;
        let data: CudaSlice<u8> = self
            .stream
            .alloc_zeros(copies * copy_words * 16)
            .map_err(|e| driver_error("allocating the practical floor's buffer", e))?;
        let mut sink: CudaSlice<u32> = self
            .stream
            .alloc_zeros(1024)
            .map_err(|e| driver_error("allocating", e))?;
        let (row_words_u64, never) = (row_words as u64, 0i32);
        let mut best = (f64::INFINITY, 1);
        for ctas in [1u32, 2, 4, 8, 16] {
            let timing = time_with_events(&self.stream, 3, iters, |i| {
                let copy = data.slice((i % copies) * copy_words * 16..);
                let mut launch = self.stream.launch_builder(&self.bare_read);
                launch
                    .arg(&copy)
                    .arg(&row_words_u64)
                    .arg(&mut sink)
                    .arg(&never);
                let config = LaunchConfig {
                    grid_dim: (ctas, rows as u32, 1),
                    block_dim: (1024, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: the arguments match `twilight_bare_read`; the view holds `rows`
                // rows of `row_words` words from its start, and `sink` 1024 entries.
                unsafe { launch.launch(config) }
                    .map(|_| ())
                    .map_err(|e| driver_error("launching the bare read", e))
            })?;
            if timing.median_us() < best.0 {
                best = (timing.median_us(), ctas);
            }
        }
        Ok(best)
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
