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

use std::borrow::Cow;

use twilight::calibration::{channel_scores, rank_channels, CalibrationMode, DecodeSample};
use twilight_synth::synthetic::SyntheticStep;

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

/// Calibrates `r` channels per KV head with [`CalibrationMode::Qk`] on the step's activations.
pub(super) fn calibrate(step: &SyntheticStep, r: usize) -> Result<Calibration, Box<dyn Error>> {
    let kv = step.kv();
    let (qo, kvh, d) = (
        step.num_qo_heads,
        step.shape.num_kv_heads,
        step.shape.head_dim,
    );
    let batch = step.table.batch();
    let mut sample = DecodeSample::new(qo, kvh, d, TOKENS_PER_REQUEST);
    let mut spans = Vec::with_capacity(batch);
    kv.check(&step.table)?;
    for b in 0..batch {
        let q_req = &step.q[b * qo * d..][..qo * d];
        let slots: Vec<usize> = step.table.slots_of(b).collect();
        spans.push(sample.add_request(q_req, slots.len(), |t| {
            // Checked above, so every row exists; were one missing, its empty key would be
            // refused by add_request as a key of the wrong length.
            Cow::Owned(
                (0..kvh)
                    .flat_map(|g| kv.try_k_row(slots[t], g).unwrap_or(&[]).to_vec())
                    .collect(),
            )
        })?);
    }
    let tokens = sample.tokens();

    let start = Instant::now();
    let channels = rank_channels(&sample.all(), CalibrationMode::Qk, r)?;
    let ms = start.elapsed().as_secs_f64() * 1e3;

    let mut captured = Vec::with_capacity(batch * kvh);
    for span in spans {
        let scores = channel_scores(&sample.view(span)?, CalibrationMode::Qk)?;
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
