//! twilight's decode attention as candle operations.
//!
//! A candle engine keeps its paged K/V pool as candle tensors (one layer: `[num_pages,
//! num_kv_heads, page_size, head_dim]` for HND variants, `[num_pages, page_size, num_kv_heads,
//! head_dim]` for NHD) and a FlashInfer page table; [`TwilightAttention`] runs one variant's
//! step over them (dense decode, or Select-then-Prune) and returns `o` and `lse` as candle
//! tensors on the same device, and appends new K/V rows in place. Underneath it is twilight's
//! engine-owned pool API: the pool is borrowed, never copied, and twilight keeps only the
//! sidecar of what a sparse variant derives from K ([`LayerSidecar`], one per layer).
//!
//! Bad ranks, shapes, dtypes and devices are candle errors, checked before anything is
//! launched ([`check_step`] and [`check_append`] make the checks that need no device).
//!
//! This crate builds candle's CUDA backend, which links CUDA (cudarc's `dynamic-linking`), so
//! it depends on twilight with that mode instead of twilight's default run-time loading.

mod attention;
mod tensors;

pub use attention::{
    candle_dtype, check_append, check_step, pool_shape, AttentionOutput, Element, LayerSidecar,
    PageTable, StepShape, TwilightAttention,
};
pub use tensors::check_devices;
pub use twilight;
pub use twilight::{StepParams, VariantSpec};
