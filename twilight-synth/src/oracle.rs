//! The oracle top-p: top-p on the EXACT attention weights (dense attention in f64) over every
//! token of a request. Twilight's pruner approximates it with a 4-bit estimate over the
//! selector's candidates only, so the oracle is its yardstick twice over: the number of tokens a
//! head really needs at `p` (its budget), and the error that attending to just those tokens makes
//! by design.

use twilight::reference::top_p::{check_p, softmax, top_p_keep};
use twilight::reference::HostKv;
use twilight::HostPageTable;

use crate::error::{Error, Result};
use crate::synthetic::SyntheticStep;

/// A decode step's query and cache, as the oracle reads them.
#[derive(Clone, Copy, Debug)]
pub struct OracleInputs<'a> {
    /// `[batch, num_qo_heads, head_dim]`.
    pub q: &'a [f32],
    pub num_qo_heads: usize,
    pub kv: HostKv<'a>,
    pub table: &'a HostPageTable,
    pub sm_scale: f32,
}

impl<'a> OracleInputs<'a> {
    /// The inputs of a synthetic step, on its own cache.
    pub fn of_step(step: &'a SyntheticStep, sm_scale: f32) -> OracleInputs<'a> {
        OracleInputs {
            q: &step.q,
            num_qo_heads: step.num_qo_heads,
            kv: step.kv(),
            table: &step.table,
            sm_scale,
        }
    }

    fn check(&self) -> Result<()> {
        let (qo, kvh, d) = (
            self.num_qo_heads,
            self.kv.shape.num_kv_heads,
            self.kv.shape.head_dim,
        );
        if kvh == 0 || qo == 0 || qo % kvh != 0 {
            return Err(Error::Parameter(format!(
                "oracle: {qo} query heads are not a positive multiple of {kvh} KV heads"
            )));
        }
        self.kv.check(self.table)?;
        let want = self
            .table
            .batch()
            .checked_mul(qo)
            .and_then(|n| n.checked_mul(d));
        if want != Some(self.q.len()) {
            return Err(Error::Parameter(format!(
                "oracle: q holds {} values, expected [batch {}, {qo} heads, head_dim {d}]",
                self.q.len(),
                self.table.batch()
            )));
        }
        Ok(())
    }
}

/// Per (request, query head), indexed `b * num_qo_heads + h`: the token slots that top-p at `p`
/// keeps on the exact weights over every token of the request (the tie rule of
/// [`top_p_keep`]), ascending.
///
/// # Errors
/// `p` outside (0, 1], a query that does not fit the cache, K or V that do not fill the shape,
/// a table for another pool.
pub fn oracle_top_p_heads(x: &OracleInputs, p: f64) -> Result<Vec<Vec<usize>>> {
    check_p(p)?;
    x.check()?;
    let (qo, d) = (x.num_qo_heads, x.kv.shape.head_dim);
    let group = qo / x.kv.shape.num_kv_heads;
    let table = x.table;
    let items: Vec<(usize, usize)> = (0..table.batch())
        .flat_map(|b| (0..qo).map(move |h| (b, h)))
        .collect();
    let kept = |&(b, h): &(usize, usize)| -> Result<Vec<usize>> {
        let qh = &x.q[(b * qo + h) * d..][..d];
        let all: Vec<usize> = table.slots_of(b).collect();
        let logits = all
            .iter()
            .map(|&slot| Ok(x.sm_scale as f64 * dot(qh, x.kv.try_k_row(slot, h / group)?)))
            .collect::<Result<Vec<f64>>>()?;
        let (tokens, _) = top_p_keep(&softmax(&logits), p)?;
        // top_p_keep returns indices into `all`.
        let mut slots: Vec<usize> = tokens.into_iter().map(|t| all[t]).collect();
        slots.sort_unstable();
        Ok(slots)
    };
    parallel_map(&items, kept).into_iter().collect()
}

/// Per (request, KV head), indexed `b * num_kv_heads + g`: the union of the oracle sets of the
/// group's query heads (as the pruner serves a group with one kept list), ascending.
///
/// # Errors
/// As [`oracle_top_p_heads`].
pub fn oracle_top_p_kept(x: &OracleInputs, p: f64) -> Result<Vec<Vec<usize>>> {
    let heads = oracle_top_p_heads(x, p)?;
    let group = x.num_qo_heads / x.kv.shape.num_kv_heads;
    Ok(heads
        .chunks(group)
        .map(|sets| {
            let mut union: Vec<usize> = sets.iter().flatten().copied().collect();
            union.sort_unstable();
            union.dedup();
            union
        })
        .collect())
}

/// The oracle top-p budget: per (request, query head), indexed `b * num_qo_heads + h`, the
/// fraction of the request's tokens that [`oracle_top_p_heads`] keeps.
///
/// # Errors
/// `p` outside (0, 1].
pub fn oracle_top_p_budget(step: &SyntheticStep, sm_scale: f32, p: f64) -> Result<Vec<f64>> {
    let heads = oracle_top_p_heads(&OracleInputs::of_step(step, sm_scale), p)?;
    Ok(heads
        .iter()
        .enumerate()
        .map(|(i, kept)| kept.len() as f64 / step.table.len_of(i / step.num_qo_heads) as f64)
        .collect())
}

/// `sum_d a[d] * b[d]` in f64, in order (as the reference accumulates).
fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// `f` over `items` on up to 16 cores, in order.
fn parallel_map<I: Sync, O: Send>(items: &[I], f: impl Fn(&I) -> O + Sync) -> Vec<O> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 16);
    let per = items.len().div_ceil(threads).max(1);
    std::thread::scope(|sc| {
        let f = &f;
        let handles: Vec<_> = items
            .chunks(per)
            .map(|chunk| sc.spawn(move || chunk.iter().map(f).collect::<Vec<O>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(out) => out,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;
    use twilight::KvLayout;

    fn step() -> SyntheticStep {
        SyntheticStep::random::<f16>(5, &[70, 33], 2, 2, 16, 64, KvLayout::Nhd, 2.0).unwrap()
    }

    #[test]
    fn p_one_keeps_every_token_and_unions_are_supersets() {
        let step = step();
        let x = OracleInputs::of_step(&step, 0.125);
        let all = oracle_top_p_kept(&x, 1.0).unwrap();
        for (i, kept) in all.iter().enumerate() {
            let b = i / 2;
            let mut want: Vec<usize> = step.table.slots_of(b).collect();
            want.sort_unstable();
            assert_eq!(kept, &want, "row {i}");
        }
        let heads = oracle_top_p_heads(&x, 0.5).unwrap();
        let kept = oracle_top_p_kept(&x, 0.5).unwrap();
        assert_eq!((heads.len(), kept.len()), (2 * 4, 2 * 2));
        for (h, set) in heads.iter().enumerate() {
            let row = &kept[h / 2];
            assert!(!set.is_empty() && set.iter().all(|s| row.contains(s)));
        }
        let budget = oracle_top_p_budget(&step, 0.125, 0.5).unwrap();
        assert_eq!(
            budget[5],
            heads[5].len() as f64 / step.table.len_of(1) as f64
        );
    }

    #[test]
    fn bad_inputs_are_errors() {
        let step = step();
        let x = OracleInputs::of_step(&step, 0.125);
        assert!(oracle_top_p_heads(&x, 0.0).is_err());
        assert!(oracle_top_p_heads(&x, f64::NAN).is_err());
        let short = OracleInputs {
            q: &step.q[1..],
            ..x
        };
        assert!(oracle_top_p_heads(&short, 0.9).is_err());
        let odd = OracleInputs {
            num_qo_heads: 3,
            ..x
        };
        assert!(oracle_top_p_kept(&odd, 0.9).is_err());
    }
}
