//! twilight: adaptive (Select-then-Prune) sparse attention for long-context LLM decoding.
//!
//! Declare the variants an engine needs with [`twilight_kernel`]; their CUDA is rendered from
//! the templates for exactly that variant and compiled at run time by NVRTC, cached in memory
//! and on disk ([`twilight_jit`]). [`reference`](mod@reference) holds the CPU oracle of every stage.

// Lets `#[twilight_kernel]` expand to `::twilight::...` paths inside this crate too.
extern crate self as twilight;

pub mod append;
pub mod buffer;
pub mod calibration;
pub mod decoder;
pub mod element;
pub mod error;
pub mod host;
pub mod kv_cache;
mod launch;
pub mod page_table;
pub mod plan;
pub mod pool;
pub mod reference;
pub mod sidecar;
pub mod sparse;
mod spread;
mod stages;
pub mod variant;
pub mod workspace;

#[doc(hidden)]
pub use inventory;
pub use twilight_jit;
pub use twilight_jit::{Dtype, KvLayout, Pruning, Selector, SpecError, VariantSpec};
pub use twilight_macros::twilight_kernel;

pub use buffer::{DeviceMut, DeviceRef};
pub use decoder::{
    AttentionKernel, DecodeOutput, Decoder, DenseDecoder, LaunchOverlap, PruneBlocks, PruneLaunch,
    SelectionKernel, StepParams, DEFAULT_SPARSE_CHUNK_TILES,
};
pub use element::KvElement;
pub use error::{Error, Result};
pub use host::{CacheShape, HostError, HostPageTable};
pub use kv_cache::{Derived, DerivedKinds, PagedKvCache, RequestId};
pub use page_table::{PageTable, PageTableView};
pub use plan::{AttentionGrid, SparsePlan, SplitPlan, StepPlan};
pub use pool::{KvPool, KvPoolMut, SidecarView, SidecarViewMut};
pub use sidecar::Sidecar;
pub use sparse::{SparseDecoder, SparseOutput, SparseParams};
pub use stages::StepOutputs;
pub use variant::{declared_variants, DeclaredVariant, Variant};
pub use workspace::{SparseWorkspace, Workspace, WorkspaceSizes};
