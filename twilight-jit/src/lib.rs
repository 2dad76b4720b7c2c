//! The compiler side of twilight: a [`VariantSpec`] names one kernel variant, [`render`](fn@render) turns it
//! into one self-contained CUDA translation unit, and (with the `cuda` feature) NVRTC compiles it
//! and a cache keeps the result: per CUDA context in memory, per process for every context
//! ([`KernelStore`]: one compile per architecture however many devices), and on disk.
//!
//! Without the `cuda` feature the crate holds only what needs no CUDA at all: the spec, its
//! validation and rendering. The proc macro depends on that part alone.

pub mod env;
pub mod params;
pub mod render;
pub mod spec;

#[cfg(feature = "cuda")]
pub mod cache;
#[cfg(feature = "cuda")]
pub mod disk_cache;
#[cfg(feature = "cuda")]
pub mod error;
#[cfg(feature = "cuda")]
pub mod key;
#[cfg(feature = "cuda")]
pub mod nvrtc;
#[cfg(feature = "cuda")]
pub mod store;

pub use render::{
    pipeline_of, render, stages_of, RegisterSelection, RenderError, RenderedProgram, Stage, Tiling,
    MAX_SELECT_CLUSTER,
};

#[cfg(feature = "cuda")]
pub use cache::{device_count, open_device, Jit, LoadedProgram, Origin};
#[cfg(feature = "cuda")]
pub use disk_cache::{
    check_cache, CacheLocation, CacheReport, ClearReport, DiskCache, DiskStatus, StoreError,
};
pub use env::{DiskOff, JitEnv};
#[cfg(feature = "cuda")]
pub use error::JitError;
#[cfg(feature = "cuda")]
pub use nvrtc::Target;
pub use spec::{
    DerivedKinds, Dtype, KvLayout, Pruning, Selector, SpecBuilder, SpecError, SpecField,
    VariantSpec,
};
#[cfg(feature = "cuda")]
pub use store::{KernelStore, StoreStats};
