//! What the demo prints about any run: the kept budget, and errors against dense attention.

use super::baselines::{Baseline, Oracle};
use super::{Inputs, Outcome};

/// Mean, min and max (NaN, inf, -inf for an empty list).
pub(super) fn stats(values: impl IntoIterator<Item = f64>) -> (f64, f64, f64) {
    let (mut sum, mut n, mut min, mut max) = (0.0, 0usize, f64::INFINITY, f64::NEG_INFINITY);
    for v in values {
        sum += v;
        n += 1;
        min = min.min(v);
        max = max.max(v);
    }
    (sum / n as f64, min, max)
}

/// How far an output is from a reference.
#[derive(Clone, Copy, Debug)]
pub(super) struct Diff {
    /// ||o - ref|| / ||ref|| over every element.
    pub rel_l2: f64,
    pub max_abs: f64,
    pub max_lse: f64,
    /// Elements of o and lse that are NaN or infinite.
    pub non_finite: usize,
}

impl Diff {
    pub fn between(o: &[f32], lse: &[f32], want_o: &[f32], want_lse: &[f32]) -> Diff {
        let (mut diff2, mut ref2, mut max_abs) = (0f64, 0f64, 0f64);
        for (&a, &b) in o.iter().zip(want_o) {
            let d = a as f64 - b as f64;
            diff2 += d * d;
            ref2 += b as f64 * b as f64;
            max_abs = max_abs.max(d.abs());
        }
        let max_lse = lse
            .iter()
            .zip(want_lse)
            .map(|(&a, &b)| (a as f64 - b as f64).abs())
            .fold(0f64, f64::max);
        let non_finite = o.iter().chain(lse).filter(|x| !x.is_finite()).count();
        Diff {
            rel_l2: if non_finite > 0 {
                f64::NAN
            } else {
                (diff2 / ref2.max(f64::MIN_POSITIVE)).sqrt()
            },
            max_abs,
            max_lse,
            non_finite,
        }
    }

    pub fn line(&self) -> String {
        let mut s = format!(
            "o relative L2 {:.2e}, max |o - ref| {:.2e}, max |lse - ref| {:.2e}",
            self.rel_l2, self.max_abs, self.max_lse
        );
        if self.non_finite > 0 {
            s += &format!(", {} NaN or infinite outputs", self.non_finite);
        }
        s
    }
}

/// Elements outside `atol + rtol * |ref|` (NaN counts as outside).
pub(super) fn outside(got: &[f32], want: &[f32], atol: f32, rtol: f32) -> usize {
    got.iter()
        .zip(want)
        .filter(|(&g, &w)| {
            let within = (g - w).abs() <= atol + rtol * w.abs();
            !within
        })
        .count()
}

/// The kept budget per (request, KV head), per KV head, and the generator's oracle.
pub(super) fn budget(x: &Inputs, out: &Outcome, oracle: &Oracle) {
    let kvh = x.num_kv_heads();
    let rows = || (0..x.batch()).flat_map(move |b| (0..kvh).map(move |g| (b, g)));
    let count = |b: usize, g: usize| out.kept[b * kvh + g].len() as f64;
    let share = |b: usize, g: usize| count(b, g) / x.lens[b] as f64;
    let (mean, min, max) = stats(rows().map(|(b, g)| count(b, g)));
    let (smean, smin, smax) = stats(rows().map(|(b, g)| share(b, g)));
    let limit = if x.spec.selector != twilight::Selector::Full {
        format!("B0 = {} tokens", x.budget)
    } else {
        "every token a candidate".to_string()
    };
    println!(
        "  kept budget per (request, KV head) ({limit}, p = {}): mean {mean:.1} tokens, min {min:.0}, max {max:.0}; of the request: mean {:.2}%, min {:.2}%, max {:.2}%",
        x.p,
        smean * 100.0,
        smin * 100.0,
        smax * 100.0
    );
    let per_head: Vec<String> = (0..kvh)
        .map(|g| {
            let (c, _, _) = stats((0..x.batch()).map(|b| count(b, g)));
            let (s, _, _) = stats((0..x.batch()).map(|b| share(b, g)));
            format!("{g}: {c:.0} ({:.1}%)", s * 100.0)
        })
        .collect();
    println!(
        "    per KV head, mean over requests: {}",
        per_head.join(" | ")
    );
    let qo = x.num_qo_heads();
    let tokens = oracle
        .budget
        .iter()
        .enumerate()
        .map(|(i, f)| f * x.lens[i / qo] as f64);
    let (tmean, _, _) = stats(tokens);
    let (omean, omin, omax) = stats(oracle.budget.iter().copied());
    println!(
        "    oracle top-p at p = {} on the exact weights, per query head over every token ({:.0} ms): mean {tmean:.1} tokens; of the request: mean {:.2}%, min {:.2}%, max {:.2}%",
        x.p,
        oracle.ms,
        omean * 100.0,
        omin * 100.0,
        omax * 100.0
    );
    if x.group() > 1 && x.spec.pruning == twilight::Pruning::TopP {
        println!(
            "    (a kept list serves the {} query heads of its group: it is the union of their top-p sets)",
            x.group()
        );
    }
}

/// The error of the step (and of any other output of the run) against dense attention, then
/// the errors the algorithm accepts by design ([`super::baselines`]), with the same metric.
pub(super) fn errors(x: &Inputs, out: &Outcome, baselines: &[Baseline]) {
    println!(
        "  error vs dense attention (CPU reference in f64 on the same cache, {:.0} ms):",
        out.dense_ms
    );
    let this = if x.is_dense() {
        "this step (dense)"
    } else {
        "this step"
    };
    let rows: Vec<(&str, &[f32], &[f32])> = std::iter::once((this, &out.o[..], &out.lse[..]))
        .chain(
            out.others
                .iter()
                .map(|(l, o, lse)| (l.as_str(), &o[..], &lse[..])),
        )
        .chain(
            baselines
                .iter()
                .map(|b| (b.label.as_str(), &b.o[..], &b.lse[..])),
        )
        .collect();
    let width = rows
        .iter()
        .map(|(label, _, _)| label.len())
        .max()
        .unwrap_or(0);
    for (label, o, lse) in rows {
        let diff = Diff::between(o, lse, &out.dense.o, &out.dense.lse);
        println!("    {label:<width$} {}", diff.line());
    }
    if !baselines.is_empty() {
        println!(
            "    (accepted by design: the oracle keeps per query head the fewest tokens whose exact weights reach p, united over the group; the selector alone attends to all its candidates. The step's error beyond theirs comes from pruning on the 4-bit estimate.)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_and_stats() {
        let d = Diff::between(&[1.0, 2.0], &[0.5], &[1.0, 1.0], &[0.0]);
        assert!((d.rel_l2 - 1.0 / 2f64.sqrt()).abs() < 1e-12);
        assert_eq!((d.max_abs, d.max_lse, d.non_finite), (1.0, 0.5, 0));
        let n = Diff::between(&[f32::NAN], &[0.0], &[1.0], &[0.0]);
        assert_eq!(n.non_finite, 1);
        assert!(n.rel_l2.is_nan());
        assert_eq!(stats([1.0, 3.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(
            outside(&[1.0, f32::NAN, 1.1], &[1.0, 1.0, 1.0], 0.01, 0.0),
            2
        );
    }
}
