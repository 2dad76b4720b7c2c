//! The process's kernel binaries, shared by every CUDA context: the tier between the memory
//! cache of each context ([`crate::Jit`]) and the disk.
//!
//! A binary depends on the variant's source, the options and the target (`sm_XY`), never on
//! which device of that architecture loads it. So a process that drives several GPUs (one
//! context and one thread per device, as a tensor-parallel engine does) asks this store for
//! each variant; the first context to ask renders, looks on disk and compiles; another context
//! asking for the same key at the same time waits for that result instead of compiling it
//! again; later ones get the bytes at once. Each context then loads the binary into its own
//! module. Devices of different architectures have different keys and are compiled apart.
//!
//! The store holds the bytes of what it handed out for its whole life (a few hundred KiB per
//! variant): a second device must not depend on the disk cache being on, writable, or not
//! evicted in between to avoid a compile.
//!
//! Failure policy: as the memory tier's ([`crate::cache`]). A failed render, compile or disk
//! read leaves the key's slot empty, so the next request tries again; a binary read from disk
//! that the driver refuses is replaced once, for every context, by
//! [`KernelStore::replace_unloadable`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::cache::{compile_and_store, disk_or_compile, key_of, Origin, PreparedBinary};
use crate::disk_cache::{DiskCache, StoreError};
use crate::env::JitEnv;
use crate::error::JitError;
use crate::key::CacheKey;
use crate::nvrtc::Target;
use crate::render::render;
use crate::spec::VariantSpec;

/// A binary as it entered the store.
#[derive(Debug)]
struct Stored {
    binary: Vec<u8>,
    /// `Compiled` or `Disk`: how this process got the bytes the first time.
    origin: Origin,
    persisted: Result<(), StoreError>,
}

type Slot = Arc<Mutex<Option<Arc<Stored>>>>;

/// How often the store compiled, read the disk and handed a binary it already held to another
/// request (another context, or a context's second JIT).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// NVRTC compiles of variants (one per key, unless a cached binary had to be replaced).
    pub compiles: usize,
    /// Binaries read from the disk or seed cache.
    pub disk_reads: usize,
    /// Requests answered with a binary already in the store.
    pub shared: usize,
}

/// Compiled binaries by cache key, over one [`DiskCache`]: `Send + Sync`, shared by the JITs
/// of every context of a process (see the module documentation).
#[derive(Debug)]
pub struct KernelStore {
    disk: DiskCache,
    jit_disabled: bool,
    slots: Mutex<HashMap<CacheKey, Slot>>,
    compiles: AtomicUsize,
    disk_reads: AtomicUsize,
    shared: AtomicUsize,
}

/// Locks a mutex whose data stays consistent even if a holder panicked: a slot is written
/// only once its value is complete.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl KernelStore {
    /// A store over `disk`; with `jit_disabled`, a key found neither here nor on disk is
    /// [`JitError::JitDisabled`] instead of a compile.
    pub fn new(disk: DiskCache, jit_disabled: bool) -> KernelStore {
        KernelStore {
            disk,
            jit_disabled,
            slots: Mutex::new(HashMap::new()),
            compiles: AtomicUsize::new(0),
            disk_reads: AtomicUsize::new(0),
            shared: AtomicUsize::new(0),
        }
    }

    /// The process's store, over the disk cache the environment asks for ([`JitEnv`]): what
    /// [`crate::Jit::for_context`] gives every context, so that one disk cache (and one
    /// warning about it) serves every device.
    pub fn global() -> &'static Arc<KernelStore> {
        static GLOBAL: OnceLock<Arc<KernelStore>> = OnceLock::new();
        GLOBAL.get_or_init(|| {
            let env = JitEnv::get();
            Arc::new(KernelStore::new(DiskCache::from_env(env), env.jit_disabled))
        })
    }

    pub fn disk(&self) -> &DiskCache {
        &self.disk
    }

    pub fn jit_disabled(&self) -> bool {
        self.jit_disabled
    }

    /// The counts so far.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            compiles: self.compiles.load(Ordering::Relaxed),
            disk_reads: self.disk_reads.load(Ordering::Relaxed),
            shared: self.shared.load(Ordering::Relaxed),
        }
    }

    fn slot(&self, key: &CacheKey) -> Slot {
        lock(&self.slots).entry(*key).or_default().clone()
    }

    /// The binary of a variant for `target`: held already ([`Origin::Shared`]), else from the
    /// disk, else compiled (and stored on disk). Two requests for one key at once do the work
    /// once: the second waits on the key's slot, which the first fills.
    ///
    /// # Errors
    /// Render, NVRTC or compile errors, or [`JitError::JitDisabled`] on a miss when compiling
    /// is forbidden.
    pub fn prepare(&self, spec: &VariantSpec, target: &Target) -> Result<PreparedBinary, JitError> {
        spec.validate()?;
        let program = render(spec)?;
        let key = key_of(&program, target)?;
        let slot = self.slot(&key);
        let mut filled = lock(&slot);
        if let Some(stored) = filled.as_ref() {
            self.shared.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(variant = %spec, key = %key, "kernel binary shared in process");
            return Ok(PreparedBinary {
                program,
                key,
                target: *target,
                binary: stored.binary.clone(),
                origin: Origin::Shared,
                persisted: stored.persisted.clone(),
            });
        }
        let prepared = disk_or_compile(program, key, target, &self.disk, self.jit_disabled)?;
        self.count(prepared.origin);
        *filled = Some(Arc::new(Stored {
            binary: prepared.binary.clone(),
            origin: prepared.origin,
            persisted: prepared.persisted.clone(),
        }));
        Ok(prepared)
    }

    fn count(&self, origin: Origin) {
        let counter = match origin {
            Origin::Compiled(_) => &self.compiles,
            Origin::Disk => &self.disk_reads,
            Origin::Shared => &self.shared,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether `bad`, which a driver refused to load, should be compiled afresh: when the
    /// store's binary of its key was read from a cache rather than compiled by this process (a
    /// fresh compile that fails to load is an error, not something a second compile fixes).
    pub fn came_from_disk(&self, bad: &PreparedBinary) -> bool {
        match bad.origin {
            Origin::Disk => true,
            Origin::Compiled(_) => false,
            Origin::Shared => lock(&self.slot(&bad.key))
                .as_ref()
                .is_some_and(|s| s.origin == Origin::Disk),
        }
    }

    /// Replaces a binary read from a cache that a driver refused to load: removes the disk
    /// entry (with a warning), compiles the program and holds the fresh binary for every
    /// context. When the store's binary of the key was compiled by this process already (another
    /// context replaced it first), that one is returned instead: the key is compiled at most
    /// once more.
    ///
    /// # Errors
    /// As [`KernelStore::prepare`].
    pub fn replace_unloadable(&self, bad: PreparedBinary) -> Result<PreparedBinary, JitError> {
        let slot = self.slot(&bad.key);
        let mut filled = lock(&slot);
        if let Some(stored) = filled.as_ref() {
            if stored.origin != Origin::Disk {
                self.shared.fetch_add(1, Ordering::Relaxed);
                return Ok(PreparedBinary {
                    binary: stored.binary.clone(),
                    origin: Origin::Shared,
                    persisted: stored.persisted.clone(),
                    ..bad
                });
            }
        }
        self.disk.invalidate(&bad.key, &bad.program.spec.name());
        let fresh = compile_and_store(
            bad.program,
            bad.key,
            &bad.target,
            &self.disk,
            self.jit_disabled,
        )?;
        self.count(fresh.origin);
        *filled = Some(Arc::new(Stored {
            binary: fresh.binary.clone(),
            origin: fresh.origin,
            persisted: fresh.persisted.clone(),
        }));
        Ok(fresh)
    }
}
