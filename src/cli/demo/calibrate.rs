//! `double_sparse(r)`: the channels are calibrated on the synthetic generator's own activations,
//! as an engine would calibrate them on a prefill of some text, then the labels are built from
//! the cache.
//!
//! The calibration sample is made from the generated step. The step is one decode step: each
//! request has one query (`[num_qo_heads, head_dim]`) and the keys of all its tokens. The query
//! of request b stands for the query at every position of the request, and of each request
//! [`TOKENS_PER_REQUEST`] positions evenly spread over the request (every position of a shorter
//! one) are the tokens of the sample: `q` of a sample token is the request's query, `k` its
//! keys at that position. The same number of positions per request weighs the requests
//! equally (a long request would otherwise choose the channels alone), and evenly spread
//! positions cover sinks, hits, the window and the background in proportion. Mode `qk` then
//! ranks channel c of KV head g by the mean over requests and sampled positions of `|q[h, c] *
//! k[t, g, c]|` over the group's query heads h, which for one request is `|q[h, c]|` times the
//! mean `|k[., g, c]|`.
//!
//! The generator draws the channels that carry attention per (request, KV head), while a real
//! model's are fixed per head; one list per KV head therefore has to serve requests whose
//! structure lives in different channels. [`Calibration::captured`] measures how much of each
//! request's own `|q * k|` mass the calibrated channels hold, so the report shows that cost.

use std::error::Error;
use std::time::Instant;

use twilight::calibration::{channel_scores, rank_channels, CalibrationMode, LayerSample};
use twilight::synthetic::SyntheticStep;

/// Sampled positions of each request.
pub(super) const TOKENS_PER_REQUEST: usize = 256;

/// The calibrated channels and what the demo reports about them.
pub(super) struct Calibration {
    /// `[num_kv_heads][r]`, each list ascending.
    pub channels: Vec<Vec<usize>>,
    /// Tokens of the sample (positions over every request).
    pub tokens: usize,
    /// Milliseconds taken by [`rank_channels`].
    pub ms: f64,
    /// Per (request, KV head), `b * num_kv_heads + g`: the share of the request's own mean
    /// `|q * k|` (summed over channels) that the calibrated channels of KV head g hold.
    pub captured: Vec<f64>,
}

/// Positions `0..len` to sample: every one up to `TOKENS_PER_REQUEST`, else evenly spread
/// (the first is 0; all distinct because `len > TOKENS_PER_REQUEST`).
fn positions(len: usize) -> Vec<usize> {
    let n = len.min(TOKENS_PER_REQUEST);
    (0..n).map(|i| i * len / n).collect()
}

/// Calibrates `r` channels per KV head with [`CalibrationMode::Qk`] on the step's activations.
pub(super) fn calibrate(step: &SyntheticStep, r: usize) -> Result<Calibration, Box<dyn Error>> {
    let kv = step.kv();
    let (qo, kvh, d) = (
        step.num_qo_heads,
        step.shape.num_kv_heads,
        step.shape.head_dim,
    );
    let batch = step.table.batch();
    // The sample, request after request: `spans[b]` is request b's range of sample tokens.
    let (mut q, mut k, mut spans) = (Vec::new(), Vec::new(), Vec::with_capacity(batch));
    let mut tokens = 0;
    for b in 0..batch {
        let q_req = &step.q[b * qo * d..][..qo * d];
        let picks = positions(step.table.len_of(b));
        for &t in &picks {
            q.extend_from_slice(q_req);
            let slot = step.table.slot(b, t);
            for g in 0..kvh {
                k.extend_from_slice(kv.k_row(slot, g));
            }
        }
        spans.push(tokens..tokens + picks.len());
        tokens += picks.len();
    }
    let sample = |range: std::ops::Range<usize>| LayerSample {
        q: &q[range.start * qo * d..range.end * qo * d],
        k: &k[range.start * kvh * d..range.end * kvh * d],
        tokens: range.len(),
        num_qo_heads: qo,
        num_kv_heads: kvh,
        head_dim: d,
    };

    let start = Instant::now();
    let channels = rank_channels(&sample(0..tokens), CalibrationMode::Qk, r)?;
    let ms = start.elapsed().as_secs_f64() * 1e3;

    let mut captured = Vec::with_capacity(batch * kvh);
    for span in spans {
        let scores = channel_scores(&sample(span), CalibrationMode::Qk)?;
        for (list, s) in channels.iter().zip(&scores) {
            let total: f64 = s.iter().sum();
            let held: f64 = list.iter().map(|&c| s[c]).sum();
            captured.push(if total > 0.0 { held / total } else { 0.0 });
        }
    }
    Ok(Calibration {
        channels,
        tokens,
        ms,
        captured,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_distinct_ascending_and_in_range() {
        assert_eq!(positions(3), vec![0, 1, 2]);
        for len in [1, 255, 256, 257, 700, 8192] {
            let p = positions(len);
            assert_eq!(p.len(), len.min(TOKENS_PER_REQUEST));
            assert!(p.windows(2).all(|w| w[0] < w[1]), "{len}");
            assert!(*p.last().unwrap() < len);
        }
    }
}
