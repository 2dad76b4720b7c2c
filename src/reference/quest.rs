//! Quest selection on the CPU: per-page channel bounds of K, page scores, and the page choice.
//!
//! Metadata shape is `[num_pages, num_kv_heads, head_dim]` for both K layouts. A page's bounds
//! are the element-wise max and min of K over the page's valid tokens; they are K values, so
//! they are exact in the storage dtype.

use crate::host::{zeroed, HostError as Error, HostPageTable, HostResult};
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
/// A table that references a page outside `0..num_pages`; a `num_pages` that cannot be
/// allocated.
pub fn valid_tokens_per_page(table: &HostPageTable, num_pages: usize) -> HostResult<Vec<usize>> {
    table.validate(num_pages)?;
    let mut valid: Vec<usize> = zeroed("valid tokens per page", num_pages)?;
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
    ///
    /// # Errors
    /// [`Error::Parameter`] when `num_pages * num_kv_heads * head_dim` overflows or cannot be
    /// allocated.
    pub fn zeros(num_pages: usize, num_kv_heads: usize, head_dim: usize) -> HostResult<QuestMeta> {
        let n = num_pages
            .checked_mul(num_kv_heads)
            .and_then(|n| n.checked_mul(head_dim))
            .ok_or_else(|| {
                Error::Parameter(format!(
                    "Quest metadata of {num_pages} pages x {num_kv_heads} KV heads x {head_dim} \
                     channels has more elements than fit in memory"
                ))
            })?;
        Ok(QuestMeta {
            num_pages,
            num_kv_heads,
            head_dim,
            page_max: zeroed("Quest page_max", n)?,
            page_min: zeroed("Quest page_min", n)?,
        })
    }

    /// The bounds of every page the table references, over its valid tokens.
    ///
    /// # Errors
    /// As [`HostKv::check`]: K and V that do not fill the shape, a table for another pool.
    pub fn build(kv: &HostKv, table: &HostPageTable) -> HostResult<QuestMeta> {
        kv.check(table)?;
        let s = kv.shape;
        let mut meta = QuestMeta::zeros(s.num_pages, s.num_kv_heads, s.head_dim)?;
        for (page, &n) in valid_tokens_per_page(table, s.num_pages)?
            .iter()
            .enumerate()
        {
            if n > 0 {
                meta.append(kv, page, 0, n)?;
            }
        }
        Ok(meta)
    }

    /// Checks that the fields agree: no zero dimension, and `page_max` and `page_min` each of
    /// `num_pages * num_kv_heads * head_dim` elements. (The fields are public, so a value
    /// built by hand is checked before anything indexes it.)
    ///
    /// # Errors
    /// [`Error::Parameter`] or [`Error::Shape`] naming the first problem.
    pub fn check(&self) -> HostResult<()> {
        let (p, h, d) = (self.num_pages, self.num_kv_heads, self.head_dim);
        if p == 0 || h == 0 || d == 0 {
            return Err(Error::Parameter(format!(
                "Quest metadata has a zero dimension: {p} pages, {h} KV heads, head_dim {d}"
            )));
        }
        let n = p.checked_mul(h).and_then(|n| n.checked_mul(d));
        for (what, len) in [
            ("Quest page_max elements", self.page_max.len()),
            ("Quest page_min elements", self.page_min.len()),
        ] {
            if n != Some(len) {
                return Err(Error::shape(what, format!("{p} x {h} x {d}"), len));
            }
        }
        Ok(())
    }

    /// Element offset of (page, kv_head, channel 0).
    ///
    /// # Errors
    /// As [`QuestMeta::check`]; a page or KV head outside the metadata.
    pub fn try_offset(&self, page: usize, kv_head: usize) -> HostResult<usize> {
        self.check()?;
        if page >= self.num_pages || kv_head >= self.num_kv_heads {
            return Err(Error::Parameter(format!(
                "Quest metadata row (page {page}, KV head {kv_head}) is outside its {} pages x \
                 {} KV heads",
                self.num_pages, self.num_kv_heads
            )));
        }
        Ok(self.offset(page, kv_head))
    }

    /// The upper bounds of (page, kv_head), `head_dim` values.
    ///
    /// # Errors
    /// As [`QuestMeta::try_offset`].
    pub fn try_max_row(&self, page: usize, kv_head: usize) -> HostResult<&[f32]> {
        self.try_offset(page, kv_head)?;
        Ok(self.max_row(page, kv_head))
    }

    /// The lower bounds of (page, kv_head), `head_dim` values.
    ///
    /// # Errors
    /// As [`QuestMeta::try_offset`].
    pub fn try_min_row(&self, page: usize, kv_head: usize) -> HostResult<&[f32]> {
        self.try_offset(page, kv_head)?;
        Ok(self.min_row(page, kv_head))
    }

    // Unchecked forms for rows the caller has checked (the fields are public, so only the
    // checked forms above leave the crate).
    pub(crate) fn offset(&self, page: usize, kv_head: usize) -> usize {
        (page * self.num_kv_heads + kv_head) * self.head_dim
    }

    pub(crate) fn max_row(&self, page: usize, kv_head: usize) -> &[f32] {
        &self.page_max[self.offset(page, kv_head)..][..self.head_dim]
    }

    pub(crate) fn min_row(&self, page: usize, kv_head: usize) -> &[f32] {
        &self.page_min[self.offset(page, kv_head)..][..self.head_dim]
    }

    /// Folds tokens `first_new_offset .. first_new_offset + new_count` of `page` (already in
    /// `kv`) into the page's bounds, for every KV head. When `first_new_offset == 0` the page
    /// starts afresh (a page being filled from its first slot), so appending a page's tokens in
    /// order, in any number of pieces, gives exactly what [`QuestMeta::build`] gives.
    ///
    /// # Errors
    /// As [`HostKv::check_shape`] and [`QuestMeta::check`]; metadata of another geometry than
    /// `kv`; a page outside the pool; tokens that do not fit the page.
    pub fn append(
        &mut self,
        kv: &HostKv,
        page: usize,
        first_new_offset: usize,
        new_count: usize,
    ) -> HostResult<()> {
        kv.check_shape()?;
        self.check()?;
        let s = kv.shape;
        if (self.num_pages, self.num_kv_heads, self.head_dim)
            != (s.num_pages, s.num_kv_heads, s.head_dim)
        {
            return Err(Error::shape(
                "Quest metadata [num_pages, num_kv_heads, head_dim] (vs the cache)",
                format!("{} x {} x {}", s.num_pages, s.num_kv_heads, s.head_dim),
                format!(
                    "{} x {} x {}",
                    self.num_pages, self.num_kv_heads, self.head_dim
                ),
            ));
        }
        let ps = s.page_size;
        let end = first_new_offset.checked_add(new_count);
        if page >= s.num_pages || end.is_none_or(|end| end > ps) {
            return Err(Error::Parameter(format!(
                "tokens {first_new_offset} (+{new_count}) of page {page} do not fit a pool of \
                 {} pages of {ps}",
                s.num_pages
            )));
        }
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
        Ok(())
    }
}

/// Checks that `q_group` is a group's query rows for this metadata: a positive multiple of
/// `head_dim` values.
fn check_q_group(q_group: &[f32], head_dim: usize) -> HostResult<()> {
    if q_group.is_empty() || head_dim == 0 || !q_group.len().is_multiple_of(head_dim) {
        return Err(Error::shape(
            "query group [group_size, head_dim]",
            format!("a positive multiple of head_dim {head_dim}"),
            q_group.len(),
        ));
    }
    Ok(())
}

/// Quest's score of one page for one KV head: `sum_h sum_d max(q[h,d] * max[d], q[h,d] *
/// min[d])` over the group's query heads, in f64 (every product is exact in f64).
/// `q_group` holds the group's query rows back to back, `[group_size, head_dim]`.
///
/// # Errors
/// As [`QuestMeta::try_offset`]; a `q_group` that is not a positive multiple of `head_dim`.
pub fn quest_page_score(
    q_group: &[f32],
    meta: &QuestMeta,
    page: usize,
    kv_head: usize,
) -> HostResult<f64> {
    meta.try_offset(page, kv_head)?;
    check_q_group(q_group, meta.head_dim)?;
    let (mx, mn) = (meta.max_row(page, kv_head), meta.min_row(page, kv_head));
    let mut score = 0f64;
    for qh in q_group.chunks_exact(meta.head_dim) {
        for c in 0..meta.head_dim {
            let q = qh[c] as f64;
            score += (q * mx[c] as f64).max(q * mn[c] as f64);
        }
    }
    Ok(score)
}

/// Scores of every page of request `b` for KV head `kv_head`, in the request's page order.
///
/// # Errors
/// A request the table does not have, and as [`quest_page_score`] (a page of the table outside
/// the metadata included).
pub fn quest_scores(
    q_group: &[f32],
    meta: &QuestMeta,
    table: &HostPageTable,
    b: usize,
    kv_head: usize,
) -> HostResult<Vec<f64>> {
    if b >= table.batch() {
        return Err(Error::Parameter(format!(
            "request {b} of a table of {} requests",
            table.batch()
        )));
    }
    table
        .pages_of(b)
        .iter()
        .map(|&page| quest_page_score(q_group, meta, page as usize, kv_head))
        .collect()
}

/// Quest's page budget for a token budget: `ceil(b0 / page_size)`, at least 1.
///
/// # Errors
/// [`Error::Parameter`] for a page size of 0.
pub fn quest_budget_pages(b0: usize, page_size: usize) -> HostResult<usize> {
    if page_size == 0 {
        return Err(Error::Parameter("page_size is 0".into()));
    }
    Ok(b0.div_ceil(page_size).max(1))
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
        assert_eq!(quest_budget_pages(17, 16).unwrap(), 2);
        assert_eq!(quest_budget_pages(16, 16).unwrap(), 1);
        assert!(quest_budget_pages(16, 0).is_err());
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
        assert_eq!(meta.try_max_row(1, 0).unwrap(), &[3.0, 0.0]);
        assert_eq!(meta.try_min_row(1, 0).unwrap(), &[1.0, -2.0]);
        // The invalid token (100, 100) of page 0 is not counted.
        assert_eq!(meta.try_max_row(0, 0).unwrap(), &[5.0, 5.0]);
        // Group of two query heads: (1, -1) and (-2, 0.5).
        let q = [1.0, -1.0, -2.0, 0.5];
        // page 1: max(3, 1) + max(0, 2) + max(-6, -2) + max(0, -1) = 3 + 2 - 2 + 0 = 3
        assert_eq!(quest_page_score(&q, &meta, 1, 0).unwrap(), 3.0);
        // page 0: 5 - 5 - 10 + 2.5 = -7.5
        assert_eq!(quest_page_score(&q, &meta, 0, 0).unwrap(), -7.5);
        assert_eq!(
            quest_scores(&q, &meta, &table, 0, 0).unwrap(),
            vec![3.0, -7.5]
        );
        // Rows, requests and query groups the metadata does not have are errors.
        assert!(quest_page_score(&q, &meta, 2, 0).is_err());
        assert!(quest_page_score(&q, &meta, 0, 1).is_err());
        assert!(quest_page_score(&q[..3], &meta, 0, 0).is_err());
        assert!(quest_page_score(&[], &meta, 0, 0).is_err());
        assert!(quest_scores(&q, &meta, &table, 1, 0).is_err());
        assert!(meta.try_max_row(0, 1).is_err());
        let mut short = meta.clone();
        short.page_min.pop();
        assert!(short.try_min_row(0, 0).is_err());
        let mut appended = meta.clone();
        assert!(appended.append(&kv, 1, 1, 2).is_err());
        assert!(appended.append(&kv, 2, 0, 1).is_err());
        assert!(appended.append(&kv, 0, usize::MAX, 2).is_err());
        assert!(QuestMeta::zeros(usize::MAX, 2, 2).is_err());
    }
}
