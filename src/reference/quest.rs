//! Quest selection on the CPU: per-page channel bounds of K, page scores, and the page choice.
//!
//! Metadata shape is `[num_pages, num_kv_heads, head_dim]` for both K layouts. A page's bounds
//! are the element-wise max and min of K over the page's valid tokens; they are K values, so
//! they are exact in the storage dtype.

use crate::host::{HostPageTable, HostResult};
use crate::reference::HostKv;

/// Quest's per-page bounds of K: `page_max`, `page_min`, each `[num_pages, num_kv_heads,
/// head_dim]`. Pages no request references are left at 0.
#[derive(Clone, Debug, PartialEq)]
pub struct QuestMeta {
    pub num_pages: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub page_max: Vec<f32>,
    pub page_min: Vec<f32>,
}

/// The number of valid tokens of every page of the pool as the table references it: a page
/// that is not a request's last holds `page_size` tokens, a last page `kv_last_page_len`; a page
/// referenced more than once counts its largest use; an unreferenced page counts 0.
///
/// # Errors
/// A table that references a page outside `0..num_pages`.
pub fn valid_tokens_per_page(table: &HostPageTable, num_pages: usize) -> HostResult<Vec<usize>> {
    table.validate(num_pages)?;
    let mut valid = vec![0usize; num_pages];
    for b in 0..table.batch() {
        let pages = table.pages_of(b);
        for (pos, &page) in pages.iter().enumerate() {
            let n = if pos + 1 == pages.len() {
                table.kv_last_page_len()[b] as usize
            } else {
                table.page_size()
            };
            let slot = &mut valid[page as usize];
            *slot = (*slot).max(n);
        }
    }
    Ok(valid)
}

impl QuestMeta {
    /// All-zero metadata for a pool of this geometry.
    pub fn zeros(num_pages: usize, num_kv_heads: usize, head_dim: usize) -> QuestMeta {
        let n = num_pages * num_kv_heads * head_dim;
        QuestMeta {
            num_pages,
            num_kv_heads,
            head_dim,
            page_max: vec![0.0; n],
            page_min: vec![0.0; n],
        }
    }

    /// The bounds of every page the table references, over its valid tokens.
    ///
    /// # Errors
    /// As [`HostKv::check`]: K and V that do not fill the shape, a table for another pool.
    pub fn build(kv: &HostKv, table: &HostPageTable) -> HostResult<QuestMeta> {
        kv.check(table)?;
        let s = kv.shape;
        let mut meta = QuestMeta::zeros(s.num_pages, s.num_kv_heads, s.head_dim);
        for (page, &n) in valid_tokens_per_page(table, s.num_pages)?
            .iter()
            .enumerate()
        {
            if n > 0 {
                meta.append(kv, page, 0, n);
            }
        }
        Ok(meta)
    }

    /// Element offset of (page, kv_head, channel 0).
    pub fn offset(&self, page: usize, kv_head: usize) -> usize {
        (page * self.num_kv_heads + kv_head) * self.head_dim
    }

    pub fn max_row(&self, page: usize, kv_head: usize) -> &[f32] {
        &self.page_max[self.offset(page, kv_head)..][..self.head_dim]
    }

    pub fn min_row(&self, page: usize, kv_head: usize) -> &[f32] {
        &self.page_min[self.offset(page, kv_head)..][..self.head_dim]
    }

    /// Folds tokens `first_new_offset .. first_new_offset + new_count` of `page` (already in
    /// `kv`) into the page's bounds, for every KV head. When `first_new_offset == 0` the page
    /// starts afresh (a page being filled from its first slot), so appending a page's tokens in
    /// order, in any number of pieces, gives exactly what [`QuestMeta::build`] gives.
    pub fn append(&mut self, kv: &HostKv, page: usize, first_new_offset: usize, new_count: usize) {
        let ps = kv.shape.page_size;
        assert!(
            first_new_offset + new_count <= ps,
            "tokens {first_new_offset}..{} do not fit a page of {ps}",
            first_new_offset + new_count
        );
        for g in 0..self.num_kv_heads {
            let at = self.offset(page, g);
            let d = self.head_dim;
            let (mx, mn) = (
                &mut self.page_max[at..at + d],
                &mut self.page_min[at..at + d],
            );
            if first_new_offset == 0 {
                mx.fill(f32::NEG_INFINITY);
                mn.fill(f32::INFINITY);
            }
            for off in first_new_offset..first_new_offset + new_count {
                let k = kv.k_row(page * ps + off, g);
                for c in 0..d {
                    mx[c] = mx[c].max(k[c]);
                    mn[c] = mn[c].min(k[c]);
                }
            }
        }
    }
}

/// Quest's score of one page for one KV head: `sum_h sum_d max(q[h,d] * max[d], q[h,d] *
/// min[d])` over the group's query heads, in f64 (every product is exact in f64).
/// `q_group` holds the group's query rows back to back, `[group_size, head_dim]`.
pub fn quest_page_score(q_group: &[f32], meta: &QuestMeta, page: usize, kv_head: usize) -> f64 {
    let (mx, mn) = (meta.max_row(page, kv_head), meta.min_row(page, kv_head));
    let mut score = 0f64;
    for qh in q_group.chunks_exact(meta.head_dim) {
        for c in 0..meta.head_dim {
            let q = qh[c] as f64;
            score += (q * mx[c] as f64).max(q * mn[c] as f64);
        }
    }
    score
}

/// Scores of every page of request `b` for KV head `kv_head`, in the request's page order.
pub fn quest_scores(
    q_group: &[f32],
    meta: &QuestMeta,
    table: &HostPageTable,
    b: usize,
    kv_head: usize,
) -> Vec<f64> {
    table
        .pages_of(b)
        .iter()
        .map(|&page| quest_page_score(q_group, meta, page as usize, kv_head))
        .collect()
}

/// Quest's page budget for a token budget: `ceil(b0 / page_size)`, at least 1.
pub fn quest_budget_pages(b0: usize, page_size: usize) -> usize {
    b0.div_ceil(page_size).max(1)
}

/// Quest's choice among a request's pages, given their scores in page order. With no more
/// pages than the budget, every page; otherwise the last page, and the `budget_pages - 1`
/// highest-scoring of the others, a tie going to the lower position. Returns page positions
/// (indices into the request's page list), ascending. A budget of 0 counts as 1.
pub fn quest_select(scores: &[f64], budget_pages: usize) -> Vec<usize> {
    let n = scores.len();
    let budget = budget_pages.max(1);
    if n <= budget {
        return (0..n).collect();
    }
    let mut others: Vec<usize> = (0..n - 1).collect();
    others.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut chosen: Vec<usize> = others[..budget - 1].to_vec();
    chosen.push(n - 1);
    chosen.sort_unstable();
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::CacheShape;
    use twilight_jit::KvLayout;

    #[test]
    fn selection_keeps_last_page_and_breaks_ties_low() {
        // Scores by position: the last page scores lowest but is always kept.
        let scores = [1.0, 3.0, 2.0, 3.0, 2.0, -5.0];
        assert_eq!(quest_select(&scores, 1), vec![5]);
        assert_eq!(quest_select(&scores, 2), vec![1, 5]);
        // Positions 1 and 3 tie at 3.0: both fit.
        assert_eq!(quest_select(&scores, 3), vec![1, 3, 5]);
        // Positions 2 and 4 tie at 2.0, one slot left: the lower position wins.
        assert_eq!(quest_select(&scores, 4), vec![1, 2, 3, 5]);
        assert_eq!(quest_select(&scores, 6), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(quest_select(&scores, 100), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(quest_budget_pages(17, 16), 2);
        assert_eq!(quest_budget_pages(16, 16), 1);
    }

    #[test]
    fn hand_computed_bounds_and_score() {
        // One KV head, head_dim 2, pages of 2 tokens (nhd). Page 1 holds tokens (1, -2) and
        // (3, 0); page 0 holds (5, 5) and one token past the end of the request.
        let shape = CacheShape {
            num_pages: 2,
            num_kv_heads: 1,
            page_size: 2,
            head_dim: 2,
            layout: KvLayout::Nhd,
        };
        let k = [5.0, 5.0, 100.0, 100.0, 1.0, -2.0, 3.0, 0.0];
        let kv = HostKv {
            shape,
            k: &k,
            v: &k,
        };
        let table = HostPageTable::new(vec![0, 2], vec![1, 0], vec![1], 2, 2).unwrap();
        let meta = QuestMeta::build(&kv, &table).unwrap();
        assert_eq!(meta.max_row(1, 0), &[3.0, 0.0]);
        assert_eq!(meta.min_row(1, 0), &[1.0, -2.0]);
        // The invalid token (100, 100) of page 0 is not counted.
        assert_eq!(meta.max_row(0, 0), &[5.0, 5.0]);
        // Group of two query heads: (1, -1) and (-2, 0.5).
        let q = [1.0, -1.0, -2.0, 0.5];
        // page 1: max(3, 1) + max(0, 2) + max(-6, -2) + max(0, -1) = 3 + 2 - 2 + 0 = 3
        assert_eq!(quest_page_score(&q, &meta, 1, 0), 3.0);
        // page 0: 5 - 5 - 10 + 2.5 = -7.5
        assert_eq!(quest_page_score(&q, &meta, 0, 0), -7.5);
        assert_eq!(quest_scores(&q, &meta, &table, 0, 0), vec![3.0, -7.5]);
    }
}
