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

/// [`selection_bytes`] as a step reads them: none where every request fits B0, since such a
/// step chooses every token without launching its selector (`StepPlan::selects_everything`).
pub fn selection_read_bytes(shape: &BenchShape, selector: Selector) -> (f64, f64) {
    let (cands, read) = selection_bytes(shape, selector);
    let ps = shape.page_size as usize;
    let skipped = twilight::plan::selects_everything(selector, ps, shape.budget, shape.len);
    (cands, if skipped { 0.0 } else { read })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::shape::test_shape as shape;

    #[test]
    fn a_step_whose_requests_fit_the_budget_reads_no_selector_bytes() {
        let ds = Selector::DoubleSparse { channels: 32 };
        for selector in [Selector::Quest, ds] {
            // The headline (B0 8192 of 32768 tokens) reads its metadata; 8192 tokens fit B0.
            let headline = shape(8, 8, 32768);
            assert!(selection_read_bytes(&headline, selector).1 > 0.0);
            assert_eq!(
                selection_read_bytes(&headline, selector),
                selection_bytes(&headline, selector)
            );
            let short = shape(8, 8, 8192);
            assert_eq!(selection_read_bytes(&short, selector).1, 0.0);
            assert_eq!(
                selection_read_bytes(&short, selector).0,
                selection_bytes(&short, selector).0
            );
        }
    }
}
