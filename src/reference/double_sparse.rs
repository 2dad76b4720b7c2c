//! Double Sparsity selection on the CPU: the label cache, token scores and the token choice.
//!
//! A `double_sparse(r)` variant keeps, beside K, a *label* of every token: the values of its
//! post-RoPE key at `r` calibrated channels of its KV head (see [`crate::calibration`] for how
//! the channels are chosen). Labels are K values, so they are exact in the storage dtype.
//!
//! Buffers, as on the device: `labels` has the row addressing of K with `r` values per row,
//! `[num_pages, num_kv_heads, page_size, r]` for hnd and `[num_pages, page_size, num_kv_heads,
//! r]` for nhd ([`CacheShape::offset`] with `head_dim` replaced by `r`); `channels` is
//! `[num_kv_heads, r]`, each row sorted ascending and free of duplicates.
//!
//! Per (request b, KV head g), the score of token t is `sum_h sum_i q[h, c_i] * label[t, i]`
//! over the group's query heads h and the head's channels `c`, in f64 (heads outer, channels
//! inner; every product is exact in f64). With no more tokens than B0 every token is selected;
//! otherwise the newest token (position `len - 1`) and the `B0 - 1` highest-scoring others, a
//! tie going to the lower position.

use crate::host::CacheShape;
use crate::host::HostPageTable;
use crate::host::{HostError as Error, HostResult as Result};
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
    /// included).
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
            labels: vec![0.0; labels],
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
                labels.update(kv, slot, g);
            }
        }
        Ok(labels)
    }

    /// Row index of (slot, kv_head): K's row addressing.
    pub fn row(&self, slot: usize, kv_head: usize) -> usize {
        self.shape.row(slot, kv_head)
    }

    /// The `r` label values of (slot, kv_head).
    pub fn label_row(&self, slot: usize, kv_head: usize) -> &[f32] {
        &self.labels[self.row(slot, kv_head) * self.r..][..self.r]
    }

    /// (Re)writes the label of (slot, kv_head) from `kv`.
    ///
    /// # Panics
    /// When `kv` has another geometry than the labels.
    pub fn update(&mut self, kv: &HostKv, slot: usize, kv_head: usize) {
        assert_eq!(kv.shape, self.shape, "DsLabels::update: K geometry");
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
    /// # Panics
    /// When the tokens do not fit the page, or `kv` has another geometry than the labels.
    pub fn append(&mut self, kv: &HostKv, page: usize, first_new_offset: usize, new_count: usize) {
        let ps = self.shape.page_size;
        assert!(
            first_new_offset + new_count <= ps,
            "tokens {first_new_offset}..{} do not fit a page of {ps}",
            first_new_offset + new_count
        );
        for off in first_new_offset..first_new_offset + new_count {
            for g in 0..self.shape.num_kv_heads {
                self.update(kv, page * ps + off, g);
            }
        }
    }
}

/// The double-sparse score of one token slot for one KV head: `sum_h sum_i q[h, c_i] *
/// label[i]` in f64, heads outer, channels inner. `q_group` holds the group's query rows back
/// to back, `[group_size, head_dim]`.
pub fn ds_token_score(q_group: &[f32], labels: &DsLabels, slot: usize, kv_head: usize) -> f64 {
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
pub fn ds_scores(
    q_group: &[f32],
    labels: &DsLabels,
    table: &HostPageTable,
    b: usize,
    kv_head: usize,
) -> Vec<f64> {
    (0..table.len_of(b))
        .map(|t| ds_token_score(q_group, labels, table.slot(b, t), kv_head))
        .collect()
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
                assert_eq!(labels.label_row(slot, 0), &[k0[0], k0[3]]);
                assert_eq!(labels.label_row(slot, 1), &[k1[1], k1[2]]);
            }
            assert_eq!(labels.label_row(1, 0), &[0.0, 0.0]);
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
        let scores = ds_scores(&q, &labels, &table, 0, 0);
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
