//! The one way a kernel is launched: its parameter struct by value, on a grid built here.
//!
//! A [`Launcher`] turns buffers into the typed device pointers of a parameter struct
//! ([`twilight_jit::params`]) and keeps cudarc's stream-ordering guards alive until the launch
//! is queued, so buffers shared between streams stay ordered exactly as with cudarc's own
//! argument builder. Each launch passes one argument: the struct.
//!
//! Launches go through `cuLaunchKernelEx`, so a launch can carry attributes: with launch
//! overlap on, each kernel may be scheduled while the stream's previous kernel finishes
//! (programmatic dependent launch; every kernel waits for its predecessor's writes first, see
//! `tw_after_previous_kernel` in the `common.cuh` header).

use std::sync::Arc;

use cudarc::driver::sys;
use cudarc::driver::{CudaFunction, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, SyncOnDrop};
use twilight_jit::params::{ConstPtr, Elem, KernelParams, MutPtr};

use crate::buffer::{DeviceMut, DeviceRef};
use crate::element::KvElement;
use crate::error::{Error, Result};

/// The grid of a kernel that works per row: `(parts, heads, requests)` blocks, the order every
/// kernel reads its position in (`tw_grid_*` in the `common.cuh` header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Grid {
    /// Blocks per row (a row's chunks, page blocks or candidate blocks).
    pub parts: u32,
    /// KV heads, or query heads for kernels that work per query head.
    pub heads: u32,
    pub requests: u32,
    pub threads: u32,
    /// Dynamic shared memory per block, in bytes.
    pub shared_bytes: u32,
    /// Asks for the largest shared-memory carveout, so that an occupancy set by padding the
    /// dynamic shared memory ([`crate::spread`]) is the one the launch gets.
    pub max_shared_carveout: bool,
    /// Blocks per thread-block cluster along `parts` (1: no clusters), for kernels compiled
    /// without a cluster size of their own; `parts` is a multiple of it.
    pub cluster: u32,
}

impl Grid {
    /// The same grid with `bytes` of dynamic shared memory per block.
    pub fn with_shared_bytes(self, bytes: u32) -> Grid {
        Grid {
            shared_bytes: bytes,
            ..self
        }
    }

    /// The same grid with `padding` bytes of dynamic shared memory the kernel does not use,
    /// which caps the blocks one SM holds ([`crate::spread::RowSpread`]).
    pub fn with_padding(self, padding: Option<u32>) -> Grid {
        match padding {
            Some(bytes) => Grid {
                shared_bytes: bytes,
                max_shared_carveout: true,
                ..self
            },
            None => self,
        }
    }

    /// The same grid launched in clusters of `blocks` along `parts`.
    pub fn with_cluster(self, blocks: u32) -> Grid {
        debug_assert!(blocks >= 1 && self.parts.is_multiple_of(blocks));
        Grid {
            cluster: blocks,
            ..self
        }
    }

    /// One block per row.
    pub fn rows(heads: usize, requests: usize, threads: u32) -> Grid {
        Grid::parts(1, heads, requests, threads)
    }

    /// `parts` blocks per row.
    pub fn parts(parts: usize, heads: usize, requests: usize, threads: u32) -> Grid {
        Grid {
            parts: parts.max(1) as u32,
            heads: heads as u32,
            requests: requests as u32,
            threads,
            shared_bytes: 0,
            max_shared_carveout: false,
            cluster: 1,
        }
    }

    /// A one-dimensional grid of `blocks` (the append's page jobs).
    pub fn jobs(blocks: usize, threads: u32) -> Grid {
        Grid {
            parts: blocks as u32,
            heads: 1,
            requests: 1,
            threads,
            shared_bytes: 0,
            max_shared_carveout: false,
            cluster: 1,
        }
    }
}

/// Collects the device pointers of one launch.
pub(crate) struct Launcher<'a> {
    stream: &'a Arc<CudaStream>,
    overlap: bool,
    guards: Vec<SyncOnDrop<'a>>,
}

impl<'a> Launcher<'a> {
    /// A launch on `stream`; with `overlap`, it may be scheduled while the stream's previous
    /// kernel finishes.
    pub fn new(stream: &'a Arc<CudaStream>, overlap: bool) -> Launcher<'a> {
        Launcher {
            stream,
            overlap,
            guards: Vec::with_capacity(16),
        }
    }

    /// A buffer the kernel reads.
    pub fn read<T>(&mut self, buffer: &'a impl DevicePtr<T>) -> ConstPtr<T> {
        let (address, guard) = buffer.device_ptr(self.stream);
        self.guards.push(guard);
        // SAFETY: the address is a live allocation of this stream's context, borrowed for as
        // long as the launcher (and so until the launch is queued).
        unsafe { ConstPtr::from_raw(address) }
    }

    /// A buffer the kernel writes.
    pub fn write<T>(&mut self, buffer: &'a mut impl DevicePtrMut<T>) -> MutPtr<T> {
        let (address, guard) = buffer.device_ptr_mut(self.stream);
        self.guards.push(guard);
        // SAFETY: as in `read`, and borrowed mutably, so nothing else touches it meanwhile.
        unsafe { MutPtr::from_raw(address) }
    }

    /// A buffer of the variant's element type the kernel reads (the caller has checked that
    /// `T` is the variant's dtype).
    pub fn read_elem<T: KvElement>(&mut self, buffer: &'a impl DevicePtr<T>) -> ConstPtr<Elem> {
        // SAFETY: the same address, typed as the program's element, which is `T`.
        unsafe { ConstPtr::from_raw(self.read(buffer).address()) }
    }

    /// A buffer of the variant's element type the kernel writes.
    pub fn write_elem<T: KvElement>(
        &mut self,
        buffer: &'a mut impl DevicePtrMut<T>,
    ) -> MutPtr<Elem> {
        // SAFETY: as in `read_elem`.
        unsafe { MutPtr::from_raw(self.write(buffer).address()) }
    }

    /// A borrowed buffer the kernel reads: a cudarc view (its guard is kept) or a raw address.
    pub fn read_ref<T>(&mut self, buffer: &'a DeviceRef<'_, T>) -> ConstPtr<T> {
        let address = match buffer.view() {
            Some((view, start)) => {
                self.guarded(view.device_ptr(self.stream), start, size_of::<T>())
            }
            None => buffer.address(),
        };
        // SAFETY: a live buffer borrowed for as long as the launcher: a cudarc view, or a raw
        // address whose contract `DeviceRef::from_raw`'s caller accepted.
        unsafe { ConstPtr::from_raw(address) }
    }

    /// A borrowed buffer the kernel writes.
    pub fn write_mut<T>(&mut self, buffer: &'a mut DeviceMut<'_, T>) -> MutPtr<T> {
        let raw = buffer.address();
        let address = match buffer.view_mut() {
            Some((view, start)) => {
                let (address, guard) = view.device_ptr_mut(self.stream);
                self.guards.push(guard);
                address + (start * size_of::<T>()) as u64
            }
            None => raw,
        };
        // SAFETY: as in `read_ref`, and borrowed mutably.
        unsafe { MutPtr::from_raw(address) }
    }

    /// A borrowed buffer the kernel writes, read by this launch (kept lists written earlier).
    pub fn read_mut<T>(&mut self, buffer: &'a DeviceMut<'_, T>) -> ConstPtr<T> {
        let address = match buffer.view() {
            Some((view, start)) => {
                self.guarded(view.device_ptr(self.stream), start, size_of::<T>())
            }
            None => buffer.address(),
        };
        // SAFETY: as in `read_ref`.
        unsafe { ConstPtr::from_raw(address) }
    }

    /// A borrowed buffer of the variant's element type the kernel reads.
    pub fn read_ref_elem<T: KvElement>(&mut self, buffer: &'a DeviceRef<'_, T>) -> ConstPtr<Elem> {
        // SAFETY: the same address, typed as the program's element, which is `T`.
        unsafe { ConstPtr::from_raw(self.read_ref(buffer).address()) }
    }

    /// A borrowed buffer of the variant's element type the kernel writes.
    pub fn write_mut_elem<T: KvElement>(
        &mut self,
        buffer: &'a mut DeviceMut<'_, T>,
    ) -> MutPtr<Elem> {
        // SAFETY: as in `read_ref_elem`.
        unsafe { MutPtr::from_raw(self.write_mut(buffer).address()) }
    }

    fn guarded(
        &mut self,
        (address, guard): (u64, SyncOnDrop<'a>),
        start: usize,
        size: usize,
    ) -> u64 {
        self.guards.push(guard);
        address + (start * size) as u64
    }

    /// Queues `function` with `params` on `grid`.
    ///
    /// # Safety
    /// `function` is the entry whose parameter struct is `P` (its C++ twin, rendered from the
    /// same field list, is what the entry takes), and every pointer in `params` addresses as
    /// many elements as the kernel indexes on this grid.
    pub unsafe fn launch<P: KernelParams + DeviceRepr>(
        self,
        function: &CudaFunction,
        grid: Grid,
        params: P,
        what: &str,
    ) -> Result<()> {
        let failed = |e: cudarc::driver::DriverError| Error::driver(format!("launching {what}"), e);
        self.stream.context().bind_to_thread().map_err(failed)?;
        // SAFETY: an all-zero attribute is a valid "ignore" entry; its id and value are set
        // before use.
        let mut attributes: [sys::CUlaunchAttribute; 3] = unsafe { std::mem::zeroed() };
        let mut used = 0;
        if self.overlap {
            let overlap = &mut attributes[used];
            overlap.id =
                sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            overlap.value.programmaticStreamSerializationAllowed = 1;
            used += 1;
        }
        if grid.max_shared_carveout {
            let carveout = &mut attributes[used];
            carveout.id =
                sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT;
            carveout.value.sharedMemCarveout =
                sys::CUshared_carveout::CU_SHAREDMEM_CARVEOUT_MAX_SHARED as u32;
            used += 1;
        }
        if grid.cluster > 1 {
            let cluster = &mut attributes[used];
            cluster.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
            cluster.value.clusterDim.x = grid.cluster;
            cluster.value.clusterDim.y = 1;
            cluster.value.clusterDim.z = 1;
            used += 1;
        }
        let config = sys::CUlaunchConfig {
            gridDimX: grid.parts,
            gridDimY: grid.heads,
            gridDimZ: grid.requests,
            blockDimX: grid.threads,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: grid.shared_bytes,
            hStream: self.stream.cu_stream(),
            attrs: attributes.as_mut_ptr(),
            numAttrs: used as u32,
        };
        // The kernel's one argument: the address of the struct, which the driver copies.
        let mut args = [&params as *const P as *mut std::ffi::c_void];
        // SAFETY: the caller's contract; `config`, `attributes`, `params` and `args` outlive the
        // call, which copies the arguments before it returns.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                function.cu_function(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(failed)?;
        // The guards record this launch's use of each buffer now that it is queued.
        drop(self.guards);
        Ok(())
    }
}

/// How many thread-block clusters of `cluster_size` CTAs of `threads` threads running
/// `function` (compiled with that cluster size) the device holds at once; 0 when the driver
/// cannot say (a device without clusters).
pub(crate) fn resident_clusters(
    stream: &Arc<CudaStream>,
    function: &CudaFunction,
    cluster_size: u32,
    threads: u32,
) -> usize {
    if stream.context().bind_to_thread().is_err() {
        return 0;
    }
    let config = sys::CUlaunchConfig {
        gridDimX: cluster_size,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: threads,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: 0,
        hStream: stream.cu_stream(),
        attrs: std::ptr::null_mut(),
        numAttrs: 0,
    };
    let mut clusters: std::ffi::c_int = 0;
    // SAFETY: `config` and `clusters` outlive the call, which only reads the function's
    // attributes (its cluster size is compiled in, so the config names none).
    let status = unsafe {
        sys::cuOccupancyMaxActiveClusters(&mut clusters, function.cu_function(), &config)
    };
    if status.result().is_err() {
        return 0;
    }
    clusters.max(0) as usize
}

/// How many blocks of `threads` threads running `function` with `shared_bytes` of dynamic
/// shared memory one multiprocessor holds at once; 0 when the driver cannot say.
pub(crate) fn resident_blocks_per_sm(
    stream: &Arc<CudaStream>,
    function: &CudaFunction,
    threads: u32,
    shared_bytes: u32,
) -> usize {
    if stream.context().bind_to_thread().is_err() {
        return 0;
    }
    let mut blocks: std::ffi::c_int = 0;
    // SAFETY: `blocks` outlives the call, which only reads the function's attributes.
    let status = unsafe {
        sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(
            &mut blocks,
            function.cu_function(),
            threads as std::ffi::c_int,
            shared_bytes as usize,
        )
    };
    if status.result().is_err() {
        return 0;
    }
    blocks.max(0) as usize
}

/// Lets `function` take `bytes` of dynamic shared memory per block (above 48 KB a kernel must
/// opt in).
///
/// # Errors
/// A driver error: the device offers less shared memory per block.
pub(crate) fn allow_dynamic_shared(
    stream: &Arc<CudaStream>,
    function: &CudaFunction,
    bytes: u32,
) -> Result<()> {
    let failed = |e| {
        Error::driver(
            format!("allowing {bytes} bytes of shared memory per block"),
            e,
        )
    };
    stream.context().bind_to_thread().map_err(failed)?;
    // SAFETY: a plain attribute write on a loaded function.
    unsafe {
        sys::cuFuncSetAttribute(
            function.cu_function(),
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as std::ffi::c_int,
        )
    }
    .result()
    .map_err(failed)
}
