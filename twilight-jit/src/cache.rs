//! The kernel cache: a memory tier per CUDA context, over the process's binaries
//! ([`KernelStore`], shared by every context) and the disk tier.
//!
//! Nothing here couples devices: each context has its own [`Jit`] (its loaded modules and
//! functions, behind its own locks), found by the context's handle; the store they share is
//! keyed by the binary's key, which names the target architecture, so a variant is compiled
//! once per architecture and loaded once per context.
//!
//! Failure policy (also in [`crate::disk_cache`]): a disk entry that fails its checks, or that
//! the driver refuses to load, is a warning and a recompile; a failed disk write is a warning
//! and the kernel stays in memory (its `persisted` field says so, for tools such as
//! `precompile` that must fail then); a render, compile or load failure of a fresh kernel is an
//! error. `TWILIGHT_JIT_DISABLE=1` turns a miss of every tier into [`JitError::JitDisabled`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use crate::disk_cache::{DiskCache, EntryMeta, StoreError};
use crate::error::JitError;
use crate::key::{CacheKey, KeyInputs};
use crate::nvrtc::{self, Target};
use crate::render::{render, RenderedProgram, Stage, Tiling};
use crate::spec::VariantSpec;
use crate::store::KernelStore;

/// Where a program's binary came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Compiled by NVRTC in this process, taking this long.
    Compiled(Duration),
    /// Read from the disk cache (or the seed cache).
    Disk,
    /// Already in this process: compiled or read from disk for another CUDA context (or
    /// another JIT) sharing the [`KernelStore`].
    Shared,
}

/// A variant's binary, ready to write or load, with everything that identifies it.
#[derive(Clone, Debug)]
pub struct PreparedBinary {
    pub program: RenderedProgram,
    pub key: CacheKey,
    pub target: Target,
    pub binary: Vec<u8>,
    pub origin: Origin,
    /// Whether a later process finds this binary on disk: `Ok` for a disk hit and for a
    /// compile that was stored; why not otherwise.
    pub persisted: Result<(), StoreError>,
}

/// The cache key of a rendered program for `target` with the NVRTC found on this machine.
///
/// # Errors
/// A missing NVRTC: its version is part of the key.
pub fn key_of(program: &RenderedProgram, target: &Target) -> Result<CacheKey, JitError> {
    let info = nvrtc::nvrtc()?;
    let options = nvrtc::identity_options(target);
    Ok(CacheKey::compute(&KeyInputs {
        source: &program.source,
        options: &options,
        target: &target.arch(),
        nvrtc_version: info.version,
        crate_version: env!("CARGO_PKG_VERSION"),
    }))
}

/// Renders a variant and finds its binary in `disk`, or compiles it and stores it there. What
/// [`KernelStore`] does on a miss, and, with no GPU at all, `twilight precompile --arch`.
///
/// # Errors
/// Render, NVRTC or compile errors, or [`JitError::JitDisabled`] on a miss when compiling is
/// forbidden.
pub fn prepare(
    spec: &VariantSpec,
    target: &Target,
    disk: &DiskCache,
    jit_disabled: bool,
) -> Result<PreparedBinary, JitError> {
    spec.validate()?;
    let program = render(spec)?;
    let key = key_of(&program, target)?;
    disk_or_compile(program, key, target, disk, jit_disabled)
}

/// The binary of a rendered program: from `disk`, else compiled and stored there.
pub(crate) fn disk_or_compile(
    program: RenderedProgram,
    key: CacheKey,
    target: &Target,
    disk: &DiskCache,
    jit_disabled: bool,
) -> Result<PreparedBinary, JitError> {
    let name = program.spec.name();
    if let Some(binary) = disk.get(&key, &name) {
        tracing::debug!(variant = %name, key = %key, "kernel disk-cache hit");
        return Ok(PreparedBinary {
            program,
            key,
            target: *target,
            binary,
            origin: Origin::Disk,
            persisted: Ok(()),
        });
    }
    compile_and_store(program, key, target, disk, jit_disabled)
}

pub(crate) fn compile_and_store(
    program: RenderedProgram,
    key: CacheKey,
    target: &Target,
    disk: &DiskCache,
    jit_disabled: bool,
) -> Result<PreparedBinary, JitError> {
    let name = program.spec.name();
    if jit_disabled {
        return Err(JitError::JitDisabled {
            variant: name,
            key: key.hex(),
        });
    }
    let compiled = nvrtc::compile(&program, target)?;
    tracing::info!(
        variant = %name,
        key = %key,
        target = %target.arch(),
        ms = compiled.duration.as_secs_f64() * 1e3,
        bytes = compiled.binary.len(),
        "compiled kernel"
    );
    if !compiled.log.trim().is_empty() {
        tracing::debug!(variant = %name, log = %compiled.log, "NVRTC log");
    }
    let meta = EntryMeta {
        variant: name,
        target: target.arch(),
        kind: compiled.kind,
        nvrtc_version: nvrtc::nvrtc()?.version,
        options: nvrtc::identity_options(target),
    };
    // The disk tier has warned already when it matters; the caller decides what else to do.
    let persisted = disk.put(&key, &meta, &compiled.binary);
    Ok(PreparedBinary {
        program,
        key,
        target: *target,
        binary: compiled.binary,
        origin: Origin::Compiled(compiled.duration),
        persisted,
    })
}

/// A variant's program loaded into a CUDA context, with a function per stage.
#[derive(Debug)]
pub struct LoadedProgram {
    pub spec: VariantSpec,
    pub key: CacheKey,
    pub tiling: Tiling,
    pub origin: Origin,
    /// Whether a later process finds this binary on disk (see [`PreparedBinary::persisted`]).
    pub persisted: Result<(), StoreError>,
    /// Time from the request to a loaded module (render, key, disk or compile, load).
    pub load_time: Duration,
    functions: HashMap<Stage, CudaFunction>,
    _module: Arc<CudaModule>,
}

impl LoadedProgram {
    /// The function of a stage, if the variant has that stage.
    pub fn function(&self, stage: Stage) -> Option<&CudaFunction> {
        self.functions.get(&stage)
    }
}

type Slot = Arc<Mutex<Option<Arc<LoadedProgram>>>>;

/// The memory tier for one CUDA context. A hit is a map lookup; two threads asking for one
/// variant compile it once (the second waits on the variant's slot, then finds it filled).
pub struct Jit {
    ctx: Arc<CudaContext>,
    target: Target,
    store: Arc<KernelStore>,
    slots: Mutex<HashMap<VariantSpec, Slot>>,
}

impl std::fmt::Debug for Jit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jit")
            .field("device", &self.ctx.ordinal())
            .field("target", &self.target.arch())
            .field("disk", &self.store.disk().dir())
            .finish()
    }
}

impl Jit {
    /// The JIT of a context, created on first use over the process's [`KernelStore`] (the
    /// disk cache of the environment, [`crate::env::JitEnv`]). Contexts are told apart by
    /// their driver handle, so two `CudaContext` values of one device's primary context share
    /// a JIT and every other context, on this device or another, has its own.
    ///
    /// # Errors
    /// A missing NVRTC, or a driver error reading the device's compute capability.
    pub fn for_context(ctx: &Arc<CudaContext>) -> Result<Arc<Jit>, JitError> {
        static REGISTRY: OnceLock<Mutex<HashMap<usize, Weak<Jit>>>> = OnceLock::new();
        let registry = REGISTRY.get_or_init(Default::default);
        let id = ctx.cu_ctx() as usize;
        if let Some(jit) = lock(registry).get(&id).and_then(Weak::upgrade) {
            return Ok(jit);
        }
        // Built outside the registry's lock: reading the device and finding NVRTC must not hold
        // up a thread of another device that only wants its own context's JIT.
        let jit = Arc::new(Jit::with_store(ctx.clone(), KernelStore::global().clone())?);
        let mut map = lock(registry);
        if let Some(winner) = map.get(&id).and_then(Weak::upgrade) {
            // Another thread of this context got there first; one JIT per context.
            return Ok(winner);
        }
        map.retain(|_, weak| weak.strong_count() > 0);
        map.insert(id, Arc::downgrade(&jit));
        Ok(jit)
    }

    /// A JIT with its own disk cache and its own [`KernelStore`] (tests, tools), sharing
    /// nothing with any other JIT.
    ///
    /// # Errors
    /// As [`Jit::for_context`].
    pub fn new(
        ctx: Arc<CudaContext>,
        disk: DiskCache,
        jit_disabled: bool,
    ) -> Result<Jit, JitError> {
        Jit::with_store(ctx, Arc::new(KernelStore::new(disk, jit_disabled)))
    }

    /// A JIT for `ctx` over `store`: JITs of several contexts over one store compile each
    /// variant once per architecture.
    ///
    /// # Errors
    /// As [`Jit::for_context`].
    pub fn with_store(ctx: Arc<CudaContext>, store: Arc<KernelStore>) -> Result<Jit, JitError> {
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| JitError::driver("reading the compute capability", e))?;
        let target = Target::for_device(nvrtc::nvrtc()?, major, minor);
        Ok(Jit {
            ctx,
            target,
            store,
            slots: Mutex::new(HashMap::new()),
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn target(&self) -> Target {
        self.target
    }

    pub fn disk(&self) -> &DiskCache {
        self.store.disk()
    }

    /// The binaries this JIT shares with others.
    pub fn store(&self) -> &Arc<KernelStore> {
        &self.store
    }

    /// The programs loaded into this context so far, in no particular order.
    pub fn loaded(&self) -> Vec<Arc<LoadedProgram>> {
        let slots: Vec<Slot> = lock(&self.slots).values().cloned().collect();
        slots.iter().filter_map(|slot| lock(slot).clone()).collect()
    }

    /// The loaded program of a variant: from memory, else disk, else NVRTC.
    ///
    /// # Errors
    /// Render, compile or load errors of a fresh kernel; [`JitError::JitDisabled`].
    pub fn load(&self, spec: &VariantSpec) -> Result<Arc<LoadedProgram>, JitError> {
        let slot = {
            let mut slots = lock(&self.slots);
            slots.entry(*spec).or_default().clone()
        };
        let mut filled = lock(&slot);
        if let Some(program) = filled.as_ref() {
            tracing::trace!(variant = %spec, "kernel memory-cache hit");
            return Ok(program.clone());
        }
        let start = Instant::now();
        let prepared = self.store.prepare(spec, &self.target)?;
        let loaded = match self.load_module(&prepared, start) {
            Ok(loaded) => loaded,
            Err(e) if self.store.came_from_disk(&prepared) => {
                tracing::warn!(variant = %spec, key = %prepared.key, error = %e,
                    "cached kernel failed to load; recompiling");
                let fresh = self.store.replace_unloadable(prepared)?;
                self.load_module(&fresh, start)?
            }
            Err(e) => return Err(e),
        };
        tracing::info!(
            variant = %spec,
            key = %loaded.key,
            device = self.ctx.ordinal(),
            origin = ?loaded.origin,
            ms = loaded.load_time.as_secs_f64() * 1e3,
            "loaded kernel"
        );
        let loaded = Arc::new(loaded);
        *filled = Some(loaded.clone());
        Ok(loaded)
    }

    fn load_module(
        &self,
        prepared: &PreparedBinary,
        start: Instant,
    ) -> Result<LoadedProgram, JitError> {
        let module = self
            .ctx
            .load_module(Ptx::from_binary(prepared.binary.clone()))
            .map_err(|e| {
                JitError::driver(format!("loading module {}", prepared.program.spec), e)
            })?;
        let mut functions = HashMap::new();
        for &stage in &prepared.program.stages {
            let entry = prepared.program.entry(stage);
            let function = module
                .load_function(&entry)
                .map_err(|e| JitError::driver(format!("finding kernel {entry}"), e))?;
            functions.insert(stage, function);
        }
        Ok(LoadedProgram {
            spec: prepared.program.spec,
            key: prepared.key,
            tiling: prepared.program.tiling,
            origin: prepared.origin,
            persisted: prepared.persisted.clone(),
            load_time: start.elapsed(),
            functions,
            _module: module,
        })
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked: a slot is filled only
/// with a complete program.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The number of CUDA devices, 0 where there is no driver.
///
/// # Errors
/// A driver error (cuInit or the count), as when the driver is present but unusable.
pub fn device_count() -> Result<usize, JitError> {
    if !driver_present() {
        return Ok(0);
    }
    let count =
        CudaContext::device_count().map_err(|e| JitError::driver("counting CUDA devices", e))?;
    Ok(usize::try_from(count).unwrap_or(0))
}

/// Opens a CUDA device, turning a missing driver or GPU into an error instead of a panic.
///
/// # Errors
/// [`JitError::DriverMissing`] without libcuda; a driver error without a usable GPU.
pub fn open_device(ordinal: usize) -> Result<Arc<CudaContext>, JitError> {
    if !driver_present() {
        return Err(JitError::DriverMissing);
    }
    CudaContext::new(ordinal)
        .map_err(|e| JitError::driver(format!("opening CUDA device {ordinal}"), e))
}

/// Whether libcuda can be used. Loaded at run time, it is probed (cudarc panics on a missing
/// library); linked, it is there or the binary would not have started.
fn driver_present() -> bool {
    #[cfg(feature = "dynamic-loading")]
    {
        // SAFETY: only probes whether libcuda can be dlopened; calls no driver function.
        unsafe { cudarc::driver::sys::is_culib_present() }
    }
    #[cfg(not(feature = "dynamic-loading"))]
    {
        true
    }
}
