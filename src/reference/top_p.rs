//! Twilight's top-p pruner on the CPU.
//!
//! For one query head over a candidate list: estimated logits `sm_scale * sum_d q8[d] *
//! dequant(k)[d]` (f64 accumulation, in channel order), where `q8` is the query rounded to 8
//! bits ([`estimate_query`], as the GPU's integer estimate rounds it); weights = softmax over
//! the candidates only (f64). The kept set: sort the weights in descending order, take
//! the shortest prefix whose running sum (in that order, f64) is at least `p`; its last weight
//! is the threshold `w*`; keep every candidate whose weight is `>= w*` (so every weight tied
//! with the threshold is kept, and nothing else). `p >= 1` keeps every candidate (the
//! threshold is then the smallest weight), as does a `p` the running sum never reaches.

use crate::host::{HostError as Error, HostResult as Result};
use crate::reference::quant::Quant4Cache;

/// The outcome of top-p for one query head: the kept candidate indices (ascending), every
/// candidate's estimated weight, and the threshold weight.
#[derive(Clone, Debug, PartialEq)]
pub struct TopP {
    pub kept: Vec<usize>,
    pub weights: Vec<f64>,
    pub threshold: f64,
}

/// Checks that `p` is in (0, 1].
///
/// # Errors
/// [`Error::Parameter`] otherwise (NaN included).
pub fn check_p(p: f64) -> Result<()> {
    if p > 0.0 && p <= 1.0 {
        Ok(())
    } else {
        Err(Error::Parameter(format!(
            "top-p threshold p = {p} is outside (0, 1]"
        )))
    }
}

/// Softmax in f64: `exp(x - max) / sum`, the sum taken in list order. Empty in, empty out.
pub fn softmax(logits: &[f64]) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|&x| (x - max).exp()).collect();
    let denom: f64 = e.iter().sum();
    e.into_iter().map(|x| x / denom).collect()
}

/// The threshold weight `w*` of top-p over `weights` (see the module documentation). An empty
/// list has threshold `+inf` (nothing kept).
///
/// # Errors
/// `p` outside (0, 1].
pub fn top_p_threshold(weights: &[f64], p: f64) -> Result<f64> {
    check_p(p)?;
    let mut sorted = weights.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let Some(&smallest) = sorted.last() else {
        return Ok(f64::INFINITY);
    };
    if p >= 1.0 {
        return Ok(smallest);
    }
    let mut acc = 0f64;
    for &w in &sorted {
        acc += w;
        if acc >= p {
            return Ok(w);
        }
    }
    Ok(smallest)
}

/// Top-p over given weights: the kept indices (ascending) and the threshold.
///
/// # Errors
/// `p` outside (0, 1].
pub fn top_p_keep(weights: &[f64], p: f64) -> Result<(Vec<usize>, f64)> {
    let threshold = top_p_threshold(weights, p)?;
    let kept = (0..weights.len())
        .filter(|&i| weights[i] >= threshold)
        .collect();
    Ok((kept, threshold))
}

/// The query as the pruner's estimate sees it: `step * qi[d]` with `qi[d] = round(q[d] * (127
/// / max|q|))` (ties to even, so `|qi| <= 127`) and `step = max|q| / 127`, each step in f32 as
/// the GPU takes it, the products exact in f64. A zero row stays zero.
pub fn estimate_query(q: &[f32]) -> Vec<f64> {
    let max_abs = q.iter().fold(0f32, |m, &x| m.max(x.abs()));
    if max_abs <= 0.0 {
        return vec![0.0; q.len()];
    }
    let inv = 127.0f32 / max_abs;
    let step = f64::from(max_abs / 127.0f32);
    q.iter()
        .map(|&x| f64::from((x * inv).round_ties_even()) * step)
        .collect()
}

/// `sm_scale * sum_d q8[d] * row[d]` in f64, in channel order, for `q8` from [`estimate_query`].
pub(crate) fn estimate_dot(q8: &[f64], row: &[f32]) -> f64 {
    q8.iter().zip(row).map(|(&x, &y)| x * f64::from(y)).sum()
}

/// The estimated logit of each candidate slot for query row `q` through KV head `kv_head`:
/// `sm_scale * sum_d q8[d] * dequant[d]` with `q8` = [`estimate_query`]`(q)`, accumulated in
/// f64 in channel order.
///
/// # Errors
/// A query row that is not `head_dim` long, and as [`Quant4Cache::dequantize`] (a candidate
/// or KV head outside the pool).
pub fn estimated_logits(
    q: &[f32],
    quant: &Quant4Cache,
    kv_head: usize,
    candidates: &[usize],
    sm_scale: f64,
) -> Result<Vec<f64>> {
    if q.len() != quant.shape.head_dim {
        return Err(Error::shape(
            "query row (head_dim)",
            quant.shape.head_dim,
            q.len(),
        ));
    }
    let q8 = estimate_query(q);
    let mut row = vec![0f32; quant.shape.head_dim];
    candidates
        .iter()
        .map(|&slot| {
            quant.dequantize(slot, kv_head, &mut row)?;
            Ok(sm_scale * estimate_dot(&q8, &row))
        })
        .collect()
}

/// Top-p for one query head over candidate slots, with the 4-bit estimate of K.
///
/// # Errors
/// `p` outside (0, 1], and as [`estimated_logits`].
pub fn top_p_head(
    q: &[f32],
    quant: &Quant4Cache,
    kv_head: usize,
    candidates: &[usize],
    sm_scale: f64,
    p: f64,
) -> Result<TopP> {
    let weights = softmax(&estimated_logits(q, quant, kv_head, candidates, sm_scale)?);
    let (kept, threshold) = top_p_keep(&weights, p)?;
    Ok(TopP {
        kept,
        weights,
        threshold,
    })
}

/// The group's kept set: a candidate index is kept when any head keeps it. Ascending.
///
/// # Errors
/// [`Error::Parameter`] for an index at or past `candidates`.
pub fn group_union<'a>(
    heads: impl IntoIterator<Item = &'a [usize]>,
    candidates: usize,
) -> Result<Vec<usize>> {
    // Nothing is sized from `candidates`: it only bounds the indices.
    let mut union = Vec::new();
    for &i in heads.into_iter().flatten() {
        if i >= candidates {
            return Err(Error::Parameter(format!(
                "kept index {i} is outside the {candidates} candidates"
            )));
        }
        union.push(i);
    }
    union.sort_unstable();
    union.dedup();
    Ok(union)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_at_the_threshold_are_all_kept() {
        let w = [0.3, 0.4, 0.3];
        // 0.4 < 0.5, 0.4 + 0.3 >= 0.5: w* = 0.3, and both 0.3s are kept.
        assert_eq!(top_p_keep(&w, 0.5).unwrap(), (vec![0, 1, 2], 0.3));
        // 0.4 >= 0.4: one is enough.
        assert_eq!(top_p_keep(&w, 0.4).unwrap(), (vec![1], 0.4));
        assert_eq!(top_p_keep(&w, 1.0).unwrap(), (vec![0, 1, 2], 0.3));
        // Below the largest weight: still the largest.
        assert_eq!(top_p_keep(&w, 1e-9).unwrap(), (vec![1], 0.4));
    }

    #[test]
    fn nothing_beyond_the_minimal_set() {
        let w = [0.1, 0.5, 0.25, 0.15];
        // 0.5 + 0.25 = 0.75 >= 0.7: keep {1, 2}; 0.15 and 0.1 are below w* = 0.25.
        assert_eq!(top_p_keep(&w, 0.7).unwrap(), (vec![1, 2], 0.25));
        assert_eq!(top_p_keep(&w, 0.75).unwrap(), (vec![1, 2], 0.25));
        assert_eq!(top_p_keep(&w, 0.76).unwrap(), (vec![1, 2, 3], 0.15));
    }

    #[test]
    fn p_one_keeps_all_even_if_the_sum_falls_short() {
        // Weights that sum to less than 1 in f64.
        let w = [0.1; 9];
        assert!(w.iter().sum::<f64>() < 1.0);
        assert_eq!(top_p_keep(&w, 1.0).unwrap().0.len(), 9);
        assert_eq!(top_p_keep(&w, 0.95).unwrap().0.len(), 9);
    }

    #[test]
    fn the_estimate_query_rounds_to_127_steps_of_the_largest_magnitude() {
        // max|q| = 2, so q is scaled by 63.5: 1.0 -> 63.5, a tie, rounds to even (64); -2 -> -127;
        // 0.5 -> 31.75 -> 32.
        let q = [1.0f32, -2.0, 0.5, 0.0];
        let step = f64::from(2.0f32 / 127.0);
        let want = [64.0 * step, -127.0 * step, 32.0 * step, 0.0];
        assert_eq!(estimate_query(&q), want);
        // A zero row stays zero; the largest magnitude maps to 127 steps.
        assert_eq!(estimate_query(&[0.0f32; 3]), vec![0.0; 3]);
        let q8 = estimate_query(&[3.0f32, -1.0]);
        assert_eq!(q8[0], 127.0 * f64::from(3.0f32 / 127.0));
        // Within half a step of q everywhere.
        let q: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.173)
            .collect();
        let max_abs = q.iter().fold(0f32, |m, x| m.max(x.abs()));
        let half_step = f64::from(max_abs) / 127.0 / 2.0 * (1.0 + 1e-6);
        for (x, y) in q.iter().zip(estimate_query(&q)) {
            assert!((f64::from(*x) - y).abs() <= half_step, "{x} -> {y}");
        }
    }

    #[test]
    fn bad_p_is_an_error() {
        for p in [0.0, -0.1, 1.0001, f64::NAN] {
            assert!(top_p_keep(&[1.0], p).is_err(), "{p}");
        }
        assert_eq!(top_p_keep(&[], 0.5).unwrap().0, Vec::<usize>::new());
    }

    #[test]
    fn softmax_and_union() {
        let w = softmax(&[0.0, 2f64.ln()]);
        assert!((w[0] - 1.0 / 3.0).abs() < 1e-15 && (w[1] - 2.0 / 3.0).abs() < 1e-15);
        let (a, b) = ([0usize, 3], [3usize, 1]);
        assert_eq!(group_union([&a[..], &b[..]], 5).unwrap(), vec![0, 1, 3]);
        assert!(group_union([&a[..], &b[..]], 3).is_err());
    }
}
