//! Double Sparsity selection on the CPU: the label cache, token scores and the token choice.
//!
//! A `double_sparse(r)` variant keeps, beside K, a *label* of every token: the values of its
//! post-RoPE key at `r` calibrated channels of its KV head (see [`crate::calibration`] for how
//! the channels are chosen). Labels are K values, so they are exact in the storage dtype.
//!
//! Buffers, as on the device: `labels` has the row addressing of K with `r` values per row,
//! `[num_pages, num_kv_heads, page_size, r]` for hnd and `[num_pages, page_size, num_kv_heads,
//! r]` for nhd ([`CacheShape::try_offset`] with `head_dim` replaced by `r`); `channels` is
//! `[num_kv_heads, r]`, each row sorted ascending and free of duplicates.
//!
//! Per (request b, KV head g), the score of token t is `sum_h sum_i q[h, c_i] * label[t, i]`
//! over the group's query heads h and the head's channels `c`, in f64 (heads outer, channels
//! inner; every product is exact in f64). With no more tokens than B0 every token is selected;
//! otherwise the newest token (position `len - 1`) and the `B0 - 1` highest-scoring others, a
//! tie going to the lower position.

use crate::host::CacheShape;
use crate::host::HostPageTable;
use crate::host::{zeroed, HostError as Error, HostResult as Result};
use crate::reference::quest::quest_select;
use crate::reference::HostKv;

/// The label cache of a double-sparse variant: `r` calibrated channels per KV head and the
/// labels of every token (layouts in the module documentation). Rows of slots no request
/// holds are left at 0.
#[derive(Clone, Debug, PartialEq)]
pub struct DsLabels {
    /// The geometry of the K pool the labels are taken from (`head_dim` is K's).
    pub shape: CacheShape,
    /// Label channels per token and KV head.
    pub r: usize,
    /// `[num_kv_heads][r]`: the channels of each KV head, ascending, distinct, `< head_dim`.
    pub channels: Vec<Vec<usize>>,
    /// `labels[row * r + i] = k[row][channels[g][i]]`, rows in K's addressing.
    pub labels: Vec<f32>,
}

/// Checks a channel list against a cache: one list per KV head, each of exactly `r` (at
/// least 1) channel ids below `head_dim`, strictly ascending (sorted, no duplicates).
///
/// # Errors
/// [`Error::Parameter`] naming the KV head and the offending id.
pub fn check_channels(
    channels: &[Vec<usize>],
    num_kv_heads: usize,
    head_dim: usize,
    r: usize,
) -> Result<()> {
    let bad = |msg: String| Err(Error::Parameter(format!("double-sparse channels: {msg}")));
    if r == 0 || r > head_dim {
        return bad(format!("r = {r} is outside 1..={head_dim} (head_dim)"));
    }
    if channels.len() != num_kv_heads {
        return bad(format!(
            "{} channel lists for {num_kv_heads} KV heads; expected one list per KV head",
            channels.len()
        ));
    }
    for (g, list) in channels.iter().enumerate() {
        if list.len() != r {
            return bad(format!(
                "KV head {g} has {} channels, expected r = {r}",
                list.len()
            ));
        }
        if let Some(&c) = list.iter().find(|&&c| c >= head_dim) {
            return bad(format!(
                "KV head {g}: channel {c} is outside 0..{head_dim} (head_dim)"
            ));
        }
        for pair in list.windows(2) {
            if pair[0] == pair[1] {
                return bad(format!("KV head {g}: channel {} appears twice", pair[0]));
            }
            if pair[0] > pair[1] {
                return bad(format!(
                    "KV head {g}: channels are not sorted ascending ({} before {})",
                    pair[0], pair[1]
                ));
            }
        }
    }
    Ok(())
}

impl DsLabels {
    /// All-zero labels for a pool of this geometry; `r` is the length of the lists.
    ///
    /// # Errors
    /// [`Error::Parameter`] when the lists break [`check_channels`] (an empty list of lists
    /// included), or when the labels' size overflows or cannot be allocated.
    pub fn zeros(shape: CacheShape, channels: Vec<Vec<usize>>) -> Result<DsLabels> {
        let r = channels.first().map_or(0, Vec::len);
        check_channels(&channels, shape.num_kv_heads, shape.head_dim, r)?;
        let labels = shape
            .num_pages
            .checked_mul(shape.num_kv_heads)
            .and_then(|n| n.checked_mul(shape.page_size))
            .and_then(|n| n.checked_mul(r))
            .ok_or_else(|| {
                Error::Parameter(format!("cache shape {shape:?} does not fit in memory"))
            })?;
        Ok(DsLabels {
            shape,
            r,
            channels,
            labels: zeroed("double-sparse labels", labels)?,
        })
    }

    /// The labels of every valid token of every request of the table, for every KV head.
    ///
    /// # Errors
    /// As [`DsLabels::zeros`] and [`HostKv::check`].
    pub fn build(
        kv: &HostKv,
        table: &HostPageTable,
        channels: Vec<Vec<usize>>,
    ) -> Result<DsLabels> {
        kv.check(table)?;
        let mut labels = DsLabels::zeros(kv.shape, channels)?;
        for slot in table.valid_slots() {
            for g in 0..kv.shape.num_kv_heads {
                labels.write_label(kv, slot, g);
            }
        }
        Ok(labels)
    }

    /// Checks that the fields agree: a shape with no zero dimension whose size fits in
    /// memory, channel lists that pass [`check_channels`] for `r`, and `r` labels per row of
    /// K. (The fields are public, so a value built by hand is checked before anything indexes
    /// it.)
    ///
    /// # Errors
    /// [`Error::Parameter`] or [`Error::Shape`] naming the first problem.
    pub fn check(&self) -> Result<()> {
        let s = self.shape;
        if s.num_pages == 0 || s.num_kv_heads == 0 || s.page_size == 0 || s.head_dim == 0 {
            return Err(Error::Parameter(format!(
                "label cache shape has a zero dimension: {s:?}"
            )));
        }
        check_channels(&self.channels, s.num_kv_heads, s.head_dim, self.r)?;
        // r <= head_dim, so rows * r fits when the shape's element count does.
        let rows = s
            .checked_elements()
            .ok_or_else(|| Error::Parameter(format!("cache shape {s:?} does not fit in memory")))?
            / s.head_dim;
        if self.labels.len() != rows * self.r {
            return Err(Error::shape(
                "double-sparse labels [rows of K, r]",
                rows * self.r,
                self.labels.len(),
            ));
        }
        Ok(())
    }

    /// Checks `kv` against the labels: K filling a shape equal to the labels'.
    fn check_kv(&self, kv: &HostKv) -> Result<()> {
        kv.check_shape()?;
        if kv.shape != self.shape {
            return Err(Error::shape(
                "double-sparse label geometry (vs the cache)",
                format!("{:?}", kv.shape),
                format!("{:?}", self.shape),
            ));
        }
        Ok(())
    }

    /// Row index of (slot, kv_head): K's row addressing.
    ///
    /// # Errors
    /// As [`DsLabels::check`] and [`CacheShape::check_row`].
    pub fn try_row(&self, slot: usize, kv_head: usize) -> Result<usize> {
        self.check()?;
        self.shape.try_row(slot, kv_head)
    }

    /// The `r` label values of (slot, kv_head).
    ///
    /// # Errors
    /// As [`DsLabels::try_row`].
    pub fn try_label_row(&self, slot: usize, kv_head: usize) -> Result<&[f32]> {
        self.try_row(slot, kv_head)?;
        Ok(self.label_row(slot, kv_head))
    }

    // Unchecked forms for rows the caller has checked (the fields are public, so only the
    // checked forms above leave the crate).
    pub(crate) fn row(&self, slot: usize, kv_head: usize) -> usize {
        self.shape.row(slot, kv_head)
    }

    pub(crate) fn label_row(&self, slot: usize, kv_head: usize) -> &[f32] {
        &self.labels[self.row(slot, kv_head) * self.r..][..self.r]
    }

    /// (Re)writes the label of (slot, kv_head) from `kv`.
    ///
    /// # Errors
    /// As [`DsLabels::try_row`] and [`HostKv::check_shape`]; a `kv` of another geometry.
    pub fn update(&mut self, kv: &HostKv, slot: usize, kv_head: usize) -> Result<()> {
        self.check_kv(kv)?;
        self.try_row(slot, kv_head)?;
        self.write_label(kv, slot, kv_head);
        Ok(())
    }

    /// [`DsLabels::update`] once the labels, `kv` and the row are checked.
    fn write_label(&mut self, kv: &HostKv, slot: usize, kv_head: usize) {
        let at = self.row(slot, kv_head) * self.r;
        let k = kv.k_row(slot, kv_head);
        for (label, &c) in self.labels[at..at + self.r]
            .iter_mut()
            .zip(&self.channels[kv_head])
        {
            *label = k[c];
        }
    }

    /// Labels tokens `first_new_offset .. first_new_offset + new_count` of `page` (already in
    /// `kv`), every KV head: the incremental form of [`DsLabels::build`], so appending a
    /// request's tokens in any number of pieces gives exactly what `build` gives.
    ///
    /// # Errors
    /// Tokens that do not fit the page, a page outside the pool, and as [`DsLabels::update`].
    pub fn append(
        &mut self,
        kv: &HostKv,
        page: usize,
        first_new_offset: usize,
        new_count: usize,
    ) -> Result<()> {
        self.check()?;
        self.check_kv(kv)?;
        let (ps, pages) = (self.shape.page_size, self.shape.num_pages);
        let end = first_new_offset.checked_add(new_count);
        if page >= pages || end.is_none_or(|end| end > ps) {
            return Err(Error::Parameter(format!(
                "tokens {first_new_offset} (+{new_count}) of page {page} do not fit a pool of \
                 {pages} pages of {ps}"
            )));
        }
        for off in first_new_offset..first_new_offset + new_count {
            for g in 0..self.shape.num_kv_heads {
                self.write_label(kv, page * ps + off, g);
            }
        }
        Ok(())
    }
}

/// Checks that `q_group` is a group's query rows: a positive multiple of `head_dim` values.
fn check_q_group(q_group: &[f32], head_dim: usize) -> Result<()> {
    if q_group.is_empty() || head_dim == 0 || !q_group.len().is_multiple_of(head_dim) {
        return Err(Error::shape(
            "query group [group_size, head_dim]",
            format!("a positive multiple of head_dim {head_dim}"),
            q_group.len(),
        ));
    }
    Ok(())
}

/// The double-sparse score of one token slot for one KV head: `sum_h sum_i q[h, c_i] *
/// label[i]` in f64, heads outer, channels inner. `q_group` holds the group's query rows back
/// to back, `[group_size, head_dim]`.
///
/// # Errors
/// As [`DsLabels::try_row`]; a `q_group` that is not a positive multiple of `head_dim`.
pub fn ds_token_score(
    q_group: &[f32],
    labels: &DsLabels,
    slot: usize,
    kv_head: usize,
) -> Result<f64> {
    labels.try_row(slot, kv_head)?;
    check_q_group(q_group, labels.shape.head_dim)?;
    Ok(token_score(q_group, labels, slot, kv_head))
}

/// [`ds_token_score`] once the labels, the row and the query group are checked.
fn token_score(q_group: &[f32], labels: &DsLabels, slot: usize, kv_head: usize) -> f64 {
    let label = labels.label_row(slot, kv_head);
    let channels = &labels.channels[kv_head];
    let mut score = 0f64;
    for qh in q_group.chunks_exact(labels.shape.head_dim) {
        for (&c, &l) in channels.iter().zip(label) {
            score += qh[c] as f64 * l as f64;
        }
    }
    score
}

/// Scores of every token of request `b` for KV head `kv_head`, in token (position) order.
///
/// # Errors
/// A request the table does not have, a table for another pool, and as [`ds_token_score`].
pub fn ds_scores(
    q_group: &[f32],
    labels: &DsLabels,
    table: &HostPageTable,
    b: usize,
    kv_head: usize,
) -> Result<Vec<f64>> {
    labels.check()?;
    check_q_group(q_group, labels.shape.head_dim)?;
    if b >= table.batch() {
        return Err(Error::Parameter(format!(
            "request {b} of a table of {} requests",
            table.batch()
        )));
    }
    if table.page_size() != labels.shape.page_size {
        return Err(Error::shape(
            "page_size (labels vs page table)",
            labels.shape.page_size,
            table.page_size(),
        ));
    }
    table.validate(labels.shape.num_pages)?;
    if kv_head >= labels.shape.num_kv_heads {
        return Err(Error::Parameter(format!(
            "KV head {kv_head} is outside the labels' {} KV heads",
            labels.shape.num_kv_heads
        )));
    }
    // Every slot of a table validated against the pool is a row of it.
    Ok(table
        .slots_of(b)
        .map(|slot| token_score(q_group, labels, slot, kv_head))
        .collect())
}

/// The double-sparse choice among a request's tokens, given their scores in position order:
/// with no more than `b0` tokens, every one; otherwise the newest (the last position) and the
/// `b0 - 1` highest-scoring others, a tie going to the lower position. Returns positions,
/// ascending. A budget of 0 counts as 1. (Quest's rule over pages, applied to tokens.)
pub fn ds_select(scores: &[f64], b0: usize) -> Vec<usize> {
    quest_select(scores, b0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use twilight_jit::KvLayout;

    #[test]
    fn labels_copy_the_calibrated_channels_in_k_row_order() {
        for layout in [KvLayout::Hnd, KvLayout::Nhd] {
            let shape = CacheShape {
                num_pages: 2,
                num_kv_heads: 2,
                page_size: 2,
                head_dim: 4,
                layout,
            };
            let k: Vec<f32> = (0..shape.elements()).map(|i| i as f32).collect();
            let kv = HostKv {
                shape,
                k: &k,
                v: &k,
            };
            // Request pages [1, 0], 3 tokens: slot 1 (page 0, offset 1) is past the end.
            let table = HostPageTable::new(vec![0, 2], vec![1, 0], vec![1], 2, 2).unwrap();
            let labels = DsLabels::build(&kv, &table, vec![vec![0, 3], vec![1, 2]]).unwrap();
            assert_eq!(labels.r, 2);
            assert_eq!(labels.labels.len(), shape.elements() / 2);
            for t in 0..3 {
                let slot = table.slot(0, t);
                let (k0, k1) = (kv.k_row(slot, 0), kv.k_row(slot, 1));
                assert_eq!(labels.try_label_row(slot, 0).unwrap(), &[k0[0], k0[3]]);
                assert_eq!(labels.try_label_row(slot, 1).unwrap(), &[k1[1], k1[2]]);
            }
            assert_eq!(labels.try_label_row(1, 0).unwrap(), &[0.0, 0.0]);
            // Rows outside the pool and pieces past a page are errors.
            assert!(labels.try_label_row(4, 0).is_err());
            assert!(labels.try_label_row(0, 2).is_err());
            let mut labels = labels;
            assert!(labels.append(&kv, 0, 1, 2).is_err());
            assert!(labels.append(&kv, 2, 0, 1).is_err());
            assert!(labels.update(&kv, 4, 0).is_err());
            labels.channels[1] = vec![1, 9];
            assert!(labels.update(&kv, 0, 0).is_err());
        }
    }

    #[test]
    fn score_and_selection_by_hand() {
        // One KV head, head_dim 4, channels {1, 3}, pages of 1 token, 4 tokens.
        let shape = CacheShape {
            num_pages: 4,
            num_kv_heads: 1,
            page_size: 1,
            head_dim: 4,
            layout: KvLayout::Nhd,
        };
        #[rustfmt::skip]
        let k = [
            9.0, 1.0, 9.0, 0.0,   // t0: label (1, 0)
            9.0, 0.0, 9.0, 3.0,   // t1: label (0, 3)
            9.0, 2.0, 9.0, 2.0,   // t2: label (2, 2)
            9.0, -1.0, 9.0, 0.0,  // t3: label (-1, 0)
        ];
        let kv = HostKv {
            shape,
            k: &k,
            v: &k,
        };
        let table = HostPageTable::new(vec![0, 4], vec![0, 1, 2, 3], vec![1], 1, 4).unwrap();
        let labels = DsLabels::build(&kv, &table, vec![vec![1, 3]]).unwrap();
        // Two query heads: (_, 1, _, 0) and (_, 1, _, 1); channels 0 and 2 never count.
        let q = [100.0, 1.0, -100.0, 0.0, 5.0, 1.0, 5.0, 1.0];
        // t0: 1 + 1 = 2; t1: 0 + 3 = 3; t2: 2 + 4 = 6; t3: -1 - 1 = -2.
        let scores = ds_scores(&q, &labels, &table, 0, 0).unwrap();
        assert_eq!(ds_token_score(&q, &labels, 2, 0).unwrap(), 6.0);
        assert!(ds_token_score(&q[..3], &labels, 2, 0).is_err());
        assert!(ds_token_score(&q, &labels, 4, 0).is_err());
        assert!(ds_scores(&q, &labels, &table, 1, 0).is_err());
        assert!(ds_scores(&q, &labels, &table, 0, 1).is_err());
        assert_eq!(scores, vec![2.0, 3.0, 6.0, -2.0]);
        assert_eq!(ds_select(&scores, 1), vec![3]);
        assert_eq!(ds_select(&scores, 2), vec![2, 3]);
        assert_eq!(ds_select(&scores, 3), vec![1, 2, 3]);
        assert_eq!(ds_select(&scores, 4), vec![0, 1, 2, 3]);
        assert_eq!(ds_select(&scores, 9), vec![0, 1, 2, 3]);
        assert_eq!(ds_select(&[1.0, 1.0, 1.0, 0.0], 3), vec![0, 1, 3]);
    }

    #[test]
    fn bad_channel_lists_are_refused() {
        let cases: [(Vec<Vec<usize>>, usize, &str); 6] = [
            (vec![vec![0, 1]], 2, "1 channel lists for 2 KV heads"),
            (vec![vec![0, 1], vec![2]], 2, "KV head 1 has 1 channels"),
            (vec![vec![0, 8], vec![1, 2]], 2, "channel 8 is outside 0..8"),
            (vec![vec![0, 1], vec![3, 3]], 2, "channel 3 appears twice"),
            (vec![vec![0, 1], vec![3, 2]], 2, "not sorted"),
            (vec![vec![], vec![]], 2, "r = 0"),
        ];
        for (channels, kv_heads, needle) in cases {
            let r = channels[0].len();
            let err = check_channels(&channels, kv_heads, 8, r)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{channels:?}: {err}");
        }
        let shape = CacheShape {
            num_pages: 1,
            num_kv_heads: 1,
            page_size: 1,
            head_dim: 8,
            layout: KvLayout::Hnd,
        };
        assert!(DsLabels::zeros(shape, vec![]).is_err());
        assert!(DsLabels::zeros(shape, vec![vec![7, 2]]).is_err());
    }
}
