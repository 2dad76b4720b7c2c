//! What the step's error means. Beside the step, two errors against dense attention that the
//! algorithm accepts by design, on the same cache and the host:
//! - the **oracle top-p**: per query head, the fewest tokens whose EXACT softmax weights over
//!   the whole request reach p, the union over the group (as the pruner serves a group with one
//!   list), then exact attention over that set. The error of keeping p of the mass.
//! - the **selector alone**: the same variant with pruning `none` at the same B0, i.e. exact
//!   attention over every candidate of the selector. The error of the tokens it does not
//!   select.
//!
//! The step's error beyond both comes from pruning on the 4-bit estimate within the candidates.

use std::error::Error;
use std::time::Instant;

use twilight::{Pruning, Selector, VariantSpec};
use twilight_synth::oracle::{oracle_top_p_heads, OracleInputs};

use super::check::attend_kept;
use super::reference::Derived;
use super::{Inputs, Outcome};

/// An output to compare with dense attention, with its label.
pub(super) struct Baseline {
    pub label: String,
    pub o: Vec<f32>,
    pub lse: Vec<f32>,
}

/// The oracle top-p on the step's cache.
pub(super) struct Oracle {
    /// Per (request, query head), `b * num_qo_heads + h`: the share of the request it keeps.
    pub budget: Vec<f64>,
    /// Per (request, KV head): the union of its query heads' sets, ascending slots.
    pub kept: Vec<Vec<usize>>,
    pub ms: f64,
}

impl Oracle {
    /// # Errors
    /// A p outside (0, 1], or a query that does not fit the cache.
    pub fn compute(x: &Inputs, out: &Outcome) -> Result<Oracle, Box<dyn Error>> {
        let start = Instant::now();
        let inputs = OracleInputs {
            q: &x.step.q,
            num_qo_heads: x.num_qo_heads(),
            kv: out.kv(x),
            table: out.table(x),
            sm_scale: x.sm_scale,
        };
        let heads = oracle_top_p_heads(&inputs, x.p as f64)?;
        let budget = heads
            .iter()
            .enumerate()
            .map(|(i, set)| set.len() as f64 / x.lens[i / x.num_qo_heads()] as f64)
            .collect();
        let kept = heads
            .chunks(x.group())
            .map(|sets| {
                let mut union: Vec<usize> = sets.iter().flatten().copied().collect();
                union.sort_unstable();
                union.dedup();
                union
            })
            .collect();
        Ok(Oracle {
            budget,
            kept,
            ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Mean kept tokens per (request, KV head).
    fn kept_mean(&self) -> f64 {
        self.kept.iter().map(|k| k.len() as f64).sum::<f64>() / self.kept.len().max(1) as f64
    }
}

/// The baselines of a pruning variant: the oracle top-p, and the selector alone where the
/// selector is not `full` (a variant without pruning is its selector alone, and a dense
/// variant has no error to explain).
///
/// # Errors
/// A reference step that refuses its inputs.
pub(super) fn compute(
    x: &Inputs,
    out: &Outcome,
    oracle: &Oracle,
) -> Result<Vec<Baseline>, Box<dyn Error>> {
    if x.spec.pruning != Pruning::TopP {
        return Ok(Vec::new());
    }
    let kv = out.kv(x);
    let (o, lse) = attend_kept(x, &kv, &oracle.kept)?;
    let mut rows = vec![Baseline {
        label: format!(
            "oracle top-p, exact weights (p = {}, {:.1} tokens)",
            x.p,
            oracle.kept_mean()
        ),
        o,
        lse,
    }];
    if x.spec.selector != Selector::Full {
        let alone = VariantSpec {
            pruning: Pruning::None,
            ..x.spec
        };
        let table = out.table(x);
        let step = Derived::build(&alone, x, &kv, table)?.step(&alone, x, kv, table)?;
        let mean = step.kept_counts.iter().sum::<usize>() as f64 / step.kept_counts.len() as f64;
        rows.push(Baseline {
            label: format!(
                "selector alone ({}, B0 = {}, {mean:.1} tokens)",
                x.spec.selector.declared(),
                x.budget
            ),
            o: step.o,
            lse: step.lse,
        });
    }
    Ok(rows)
}
