//! DESIGN.md's byte model: the bytes a step or a stage must read. Decode attention is
//! memory-bound, so those bytes at the card's read bandwidth are the floor of its time.

use twilight::Selector;

use super::shape::BenchShape;

/// DESIGN.md's byte model of the selection per (request, KV head), 2-byte elements: the
/// candidates it hands on, and the bytes it reads (Quest each page's max and min rows, Double
/// Sparsity each token's label).
pub fn selection_bytes(shape: &BenchShape, selector: Selector) -> (f64, f64) {
    let (len, ps) = (shape.len, shape.page_size as usize);
    match selector {
        Selector::DoubleSparse { channels } => (
            shape.budget.min(len) as f64,
            len as f64 * channels as f64 * 2.0,
        ),
        _ => (
            (shape.budget.div_ceil(ps) * ps).min(len) as f64,
            len.div_ceil(ps) as f64 * 4.0 * shape.head_dim as f64,
        ),
    }
}

/// Bytes the selector reads in one step, over every (request, KV head).
pub fn selection_step_bytes(shape: &BenchShape, selector: Selector) -> f64 {
    selection_bytes(shape, selector).1 * (shape.batch * shape.kv_heads) as f64
}

/// DESIGN.md's byte model of dense decode: each (request, KV head) reads K and V of every token
/// once (q, o and the page table are negligible beside it).
pub fn dense_decode_bytes(
    lens: &[usize],
    num_kv_heads: usize,
    head_dim: usize,
    elem_bytes: usize,
) -> u64 {
    let tokens: usize = lens.iter().sum();
    (tokens * num_kv_heads * head_dim * 2 * elem_bytes) as u64
}
