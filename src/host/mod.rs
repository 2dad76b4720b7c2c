//! What the host knows about a pool and a batch, with no CUDA in it: the pool's shape and
//! addressing, page tables, and the errors of checking them. The CPU reference and the device
//! code both build on this module, so the reference runs (and is tested) with no driver.

mod page_table;
mod shape;

pub use page_table::{HostPageTable, MAX_REQUEST_TOKENS};
pub use shape::CacheShape;

use twilight_jit::KvLayout;

/// A bad input found on the host, before anything reaches a device.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{what}: expected {expected}, got {got}")]
    Shape {
        what: String,
        expected: String,
        got: String,
    },
    #[error(
        "layout mismatch: variant {variant} reads {expected:?} pages but the cache is {got:?}"
    )]
    Layout {
        variant: String,
        expected: KvLayout,
        got: KvLayout,
    },
    #[error("bad page table: {0}")]
    PageTable(String),
    #[error("bad parameter: {0}")]
    Parameter(String),
}

impl HostError {
    pub(crate) fn shape(
        what: impl Into<String>,
        expected: impl std::fmt::Display,
        got: impl std::fmt::Display,
    ) -> HostError {
        HostError::Shape {
            what: what.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }
}

/// The reference's and the host checks' result.
pub type HostResult<T> = std::result::Result<T, HostError>;

/// `n` copies of `T::default()`, or an error naming `what` when the allocator refuses them
/// (a count whose bytes overflow included): `vec![x; n]` panics or aborts instead, and `n`
/// here comes from a caller's sizes.
pub(crate) fn zeroed<T: Clone + Default>(what: &str, n: usize) -> HostResult<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|e| HostError::Parameter(format!("{what}: cannot allocate {n} elements ({e})")))?;
    v.resize(n, T::default());
    Ok(v)
}
