//! Checks of a GPU step against the CPU reference: kept lists that are tokens of their request,
//! attention exact over what was kept, and agreement with the reference step.

use std::collections::HashMap;
use std::error::Error;
use std::time::Instant;

use twilight::reference::{attend, HostKv};
use twilight::{Dtype, HostPageTable};

use super::reference::Derived;
use super::report::{outside, Diff};
use super::Inputs;

type Res<T> = Result<T, Box<dyn Error>>;

/// The GPU's kept lists as ascending slots, after checking that every count was written and
/// every slot is a distinct token of its request.
pub(super) fn kept_lists(
    x: &Inputs,
    table: &HostPageTable,
    counts: &[i32],
    rows: &[i32],
    row_len: usize,
) -> Res<Vec<Vec<usize>>> {
    let kvh = x.num_kv_heads();
    let mut kept = Vec::with_capacity(counts.len());
    for b in 0..x.batch() {
        let len = table.len_of(b);
        let tokens: HashMap<usize, usize> =
            table.slots_of(b).enumerate().map(|(t, s)| (s, t)).collect();
        for g in 0..kvh {
            let row = b * kvh + g;
            let n = counts[row];
            if n < 1 || n as usize > len.min(row_len) {
                return Err(format!(
                    "kept count {n} of request {b}, KV head {g} is outside 1..={} (unwritten?)",
                    len.min(row_len)
                )
                .into());
            }
            let mut slots = Vec::with_capacity(n as usize);
            for &s in &rows[row * row_len..row * row_len + n as usize] {
                if s < 0 || !tokens.contains_key(&(s as usize)) {
                    return Err(format!(
                        "kept slot {s} of request {b}, KV head {g} is not a token of the request"
                    )
                    .into());
                }
                slots.push(s as usize);
            }
            slots.sort_unstable();
            if slots.windows(2).any(|w| w[0] == w[1]) {
                return Err(format!("request {b}, KV head {g} keeps a slot twice").into());
            }
            kept.push(slots);
        }
    }
    Ok(kept)
}

/// The reference attention of every query head over its KV head's kept list.
pub(super) fn attend_kept(
    x: &Inputs,
    kv: &HostKv,
    kept: &[Vec<usize>],
) -> Res<(Vec<f32>, Vec<f32>)> {
    let (qo, d, group) = (x.num_qo_heads(), x.head_dim(), x.group());
    let mut o = Vec::with_capacity(x.step.q.len());
    let mut lse = Vec::with_capacity(x.batch() * qo);
    for b in 0..x.batch() {
        for h in 0..qo {
            let g = h / group;
            let head = b * qo + h;
            let (oh, l) = attend(
                &x.step.q[head * d..][..d],
                kv,
                g,
                &kept[b * x.num_kv_heads() + g],
                x.sm_scale as f64,
            )?;
            o.extend(oh);
            lse.push(l);
        }
    }
    Ok((o, lse))
}

/// Prints how far `o`/`lse` are from the reference, and returns a failure when any element is
/// unwritten or outside the dtype's tolerance.
pub(super) fn exactness(
    x: &Inputs,
    what: &str,
    o: &[f32],
    lse: &[f32],
    want_o: &[f32],
    want_lse: &[f32],
) -> Option<String> {
    let (atol, rtol) = match x.spec.dtype {
        Dtype::F16 => (2e-3, 8e-3),
        Dtype::Bf16 => (8e-3, 2e-2),
    };
    let diff = Diff::between(o, lse, want_o, want_lse);
    let bad = outside(o, want_o, atol, rtol) + outside(lse, want_lse, 1e-3, 1e-4);
    println!(
        "  exactness, {what}: {}; {bad} of {} elements outside {atol} + {rtol} |ref| (lse: 1e-3 + 1e-4 |ref|)",
        diff.line(),
        o.len() + lse.len()
    );
    (bad > 0 || diff.non_finite > 0).then(|| {
        format!(
            "{what}: {bad} elements outside the tolerance, {} NaN or infinite",
            diff.non_finite
        )
    })
}

/// The whole step on the CPU reference over the downloaded cache: prints how many kept counts
/// agree with the GPU's (near-ties of f32 and f64 scores may differ), returns its (o, lse).
pub(super) fn reference_step(
    x: &Inputs,
    kv: &HostKv,
    table: &HostPageTable,
    kept: &[Vec<usize>],
) -> Res<(Vec<f32>, Vec<f32>)> {
    let start = Instant::now();
    let want = Derived::build(&x.spec, x, kv, table)?.step(&x.spec, x, *kv, table)?;
    let same = want
        .kept_counts
        .iter()
        .zip(kept)
        .filter(|(&w, k)| w == k.len())
        .count();
    let same_sets = want.kept.iter().zip(kept).filter(|(w, k)| w == k).count();
    println!(
        "  agreement with the CPU reference step ({:.0} ms): kept counts equal in {same} of {} rows, kept sets equal in {same_sets} (near-ties of f32 vs f64 scores may differ)",
        start.elapsed().as_secs_f64() * 1e3,
        kept.len()
    );
    Ok((want.o, want.lse))
}
