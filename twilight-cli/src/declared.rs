//! The variants this binary declares: `twilight precompile --declared` fills a cache with them.
//! An engine's own binary declares its own; these cover the demo's and the benchmark's shapes.

use twilight::twilight_kernel;

/// Llama-3-8B-like dense decode (32 query heads over 8 KV heads), FlashInfer-style pages.
#[twilight_kernel(page_size = 16, head_dim = 128, dtype = f16, group_size = 4, kv_layout = hnd,
                  selector = full, pruning = none)]
pub struct Llama3DenseF16;

/// The same in bf16.
#[twilight_kernel(page_size = 16, head_dim = 128, dtype = bf16, group_size = 4, kv_layout = hnd,
                  selector = full, pruning = none)]
pub struct Llama3DenseBf16;

/// Multi-head attention on a candle-style NHD cache.
#[twilight_kernel(page_size = 16, head_dim = 128, dtype = f16, group_size = 1, kv_layout = nhd,
                  selector = full, pruning = none)]
pub struct MhaDenseNhdF16;
