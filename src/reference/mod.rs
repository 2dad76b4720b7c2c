//! The CPU reference: every stage in f64 on the same layouts as the GPU, written for clarity.
//! It is the oracle of every GPU test and the CPU path of the CLI, and it never touches CUDA.

pub mod double_sparse;
pub mod quant;
pub mod quest;
pub mod step;
pub mod top_p;

pub use double_sparse::DsLabels;
pub use quant::Quant4Cache;
pub use quest::QuestMeta;
pub use step::{decode_step, HeadDetail, StepInputs, StepParams, StepResult};
pub use top_p::TopP;

pub use crate::host::CacheShape;
use crate::host::{HostError, HostPageTable, HostResult};

/// K and V of a paged cache on the host, as f32 (already rounded to the storage dtype).
#[derive(Clone, Copy, Debug)]
pub struct HostKv<'a> {
    pub shape: CacheShape,
    pub k: &'a [f32],
    pub v: &'a [f32],
}

impl HostKv<'_> {
    /// Checks that K and V fill the shape: a shape with no zero dimension whose size fits in
    /// memory, K and V of exactly that many elements.
    ///
    /// # Errors
    /// [`HostError::Parameter`] or [`HostError::Shape`] naming the first problem.
    pub fn check_shape(&self) -> HostResult<()> {
        let s = self.shape;
        if s.num_pages == 0 || s.num_kv_heads == 0 || s.page_size == 0 || s.head_dim == 0 {
            return Err(HostError::Parameter(format!(
                "cache shape has a zero dimension: {s:?}"
            )));
        }
        let elements = s.checked_elements().ok_or_else(|| {
            HostError::Parameter(format!(
                "cache shape {s:?} has more elements than fit in memory"
            ))
        })?;
        for (what, data) in [("K elements", self.k), ("V elements", self.v)] {
            if data.len() != elements {
                return Err(HostError::shape(what, elements, data.len()));
            }
        }
        Ok(())
    }

    /// Checks that K and V fill the shape ([`HostKv::check_shape`]) and that `table` indexes
    /// this pool: the table's page size and page ids. Every reference entry point that takes a
    /// whole cache calls this first, so no bad input reaches an index.
    ///
    /// # Errors
    /// [`HostError::Parameter`], [`HostError::Shape`] or [`HostError::PageTable`] naming the
    /// first problem.
    pub fn check(&self, table: &HostPageTable) -> HostResult<()> {
        self.check_shape()?;
        let s = self.shape;
        if table.page_size() != s.page_size {
            return Err(HostError::shape(
                "page_size (cache vs page table)",
                s.page_size,
                table.page_size(),
            ));
        }
        table.validate(s.num_pages)
    }

    /// The `head_dim` values of K at (slot, kv_head).
    ///
    /// # Errors
    /// As [`HostKv::check_shape`] and [`CacheShape::check_row`].
    pub fn try_k_row(&self, slot: usize, kv_head: usize) -> HostResult<&[f32]> {
        self.check_shape()?;
        self.shape.check_row(slot, kv_head)?;
        Ok(self.k_row(slot, kv_head))
    }

    /// The `head_dim` values of V at (slot, kv_head).
    ///
    /// # Errors
    /// As [`HostKv::try_k_row`].
    pub fn try_v_row(&self, slot: usize, kv_head: usize) -> HostResult<&[f32]> {
        self.check_shape()?;
        self.shape.check_row(slot, kv_head)?;
        Ok(self.v_row(slot, kv_head))
    }

    // The unchecked rows the reference reads once its entry point has checked the inputs; the
    // fields are public, so outside the crate only the checked forms above are offered.
    pub(crate) fn k_row(&self, slot: usize, kv_head: usize) -> &[f32] {
        let at = self.shape.offset(slot, kv_head);
        &self.k[at..at + self.shape.head_dim]
    }
    pub(crate) fn v_row(&self, slot: usize, kv_head: usize) -> &[f32] {
        let at = self.shape.offset(slot, kv_head);
        &self.v[at..at + self.shape.head_dim]
    }

    /// Checks one query row, KV head and slot list against this cache: what [`attend`] reads.
    fn check_attend(&self, q: &[f32], kv_head: usize, slots: &[usize]) -> HostResult<()> {
        self.check_shape()?;
        let s = self.shape;
        if q.len() != s.head_dim {
            return Err(HostError::shape(
                "query row (head_dim)",
                s.head_dim,
                q.len(),
            ));
        }
        // check_shape proved num_pages * page_size fits.
        let capacity = s.num_pages * s.page_size;
        if let Some(&slot) = slots.iter().find(|&&slot| slot >= capacity) {
            return Err(HostError::Parameter(format!(
                "slot {slot} is outside the pool's {capacity} token slots"
            )));
        }
        if kv_head >= s.num_kv_heads {
            return Err(HostError::Parameter(format!(
                "KV head {kv_head} is outside the pool's {} KV heads",
                s.num_kv_heads
            )));
        }
        Ok(())
    }
}

/// Output of a decode step: `o [batch, num_qo_heads, head_dim]`, `lse [batch, num_qo_heads]`
/// (natural log of the softmax denominator of the scaled scores).
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeResult {
    pub o: Vec<f32>,
    pub lse: Vec<f32>,
}

/// Exact softmax attention of one query row (`head_dim` values) over the given token slots,
/// through KV head `kv_head`: the output row and the log of the softmax denominator. An empty
/// slot list attends to nothing (NaN output, `-inf` lse).
///
/// # Errors
/// K or V that do not fill the shape, a query row that is not `head_dim` long, a slot or KV
/// head outside the pool.
pub fn attend(
    q: &[f32],
    kv: &HostKv,
    kv_head: usize,
    slots: &[usize],
    sm_scale: f64,
) -> HostResult<(Vec<f32>, f32)> {
    kv.check_attend(q, kv_head, slots)?;
    let d = kv.shape.head_dim;
    let scores: Vec<f64> = slots
        .iter()
        .map(|&s| {
            let k = kv.k_row(s, kv_head);
            sm_scale
                * q.iter()
                    .zip(k)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
        })
        .collect();
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let denom: f64 = weights.iter().sum();
    let mut o = vec![0f64; d];
    for (&s, w) in slots.iter().zip(&weights) {
        for (acc, &v) in o.iter_mut().zip(kv.v_row(s, kv_head)) {
            *acc += w * v as f64;
        }
    }
    let o = o.iter().map(|x| (x / denom) as f32).collect();
    Ok((o, (max + denom.ln()) as f32))
}

/// Dense paged decode: every query head attends to every token of its request, through its
/// KV head `h / group_size`. `q` is `[batch, num_qo_heads, head_dim]`.
///
/// # Errors
/// As [`HostKv::check`]; also a `num_qo_heads` that is not a positive multiple of the KV head
/// count, or a `q` of the wrong length.
pub fn dense_decode(
    q: &[f32],
    num_qo_heads: usize,
    kv: &HostKv,
    table: &HostPageTable,
    sm_scale: f32,
) -> HostResult<DecodeResult> {
    kv.check(table)?;
    let d = kv.shape.head_dim;
    if num_qo_heads == 0 || !num_qo_heads.is_multiple_of(kv.shape.num_kv_heads) {
        return Err(HostError::shape(
            "num_qo_heads",
            format!("a positive multiple of {}", kv.shape.num_kv_heads),
            num_qo_heads,
        ));
    }
    let want = table
        .batch()
        .checked_mul(num_qo_heads)
        .and_then(|n| n.checked_mul(d));
    if want != Some(q.len()) {
        return Err(HostError::shape(
            "q [batch, num_qo_heads, head_dim]",
            format!("{} x {num_qo_heads} x {d}", table.batch()),
            q.len(),
        ));
    }
    let group = num_qo_heads / kv.shape.num_kv_heads;
    let batch = table.batch();
    let mut o = Vec::with_capacity(batch * num_qo_heads * d);
    let mut lse = Vec::with_capacity(batch * num_qo_heads);
    for b in 0..batch {
        let slots: Vec<usize> = table.slots_of(b).collect();
        for h in 0..num_qo_heads {
            let qh = &q[(b * num_qo_heads + h) * d..][..d];
            let (oh, l) = attend(qh, kv, h / group, &slots, sm_scale as f64)?;
            o.extend(oh);
            lse.push(l);
        }
    }
    Ok(DecodeResult { o, lse })
}

#[cfg(test)]
mod tests {
    use super::*;
    use twilight_jit::KvLayout;

    #[test]
    fn one_token_returns_its_value_and_score() {
        let shape = CacheShape {
            num_pages: 1,
            num_kv_heads: 1,
            page_size: 1,
            head_dim: 2,
            layout: KvLayout::Nhd,
        };
        let kv = HostKv {
            shape,
            k: &[1.0, 2.0],
            v: &[3.0, -4.0],
        };
        let table = HostPageTable::new(vec![0, 1], vec![0], vec![1], 1, 1).unwrap();
        let r = dense_decode(&[0.5, 0.25], 1, &kv, &table, 1.0).unwrap();
        assert_eq!(r.o, vec![3.0, -4.0]);
        // score = 0.5 * 1 + 0.25 * 2 = 1, one token: lse = 1.
        assert!((r.lse[0] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn two_equal_scores_average_values_and_add_ln2() {
        let shape = CacheShape {
            num_pages: 2,
            num_kv_heads: 1,
            page_size: 1,
            head_dim: 1,
            layout: KvLayout::Hnd,
        };
        let kv = HostKv {
            shape,
            k: &[2.0, 2.0],
            v: &[1.0, 3.0],
        };
        let table = HostPageTable::new(vec![0, 2], vec![1, 0], vec![1], 1, 2).unwrap();
        let r = dense_decode(&[1.0], 1, &kv, &table, 0.5).unwrap();
        assert!((r.o[0] - 2.0).abs() < 1e-6);
        assert!((r.lse[0] - (1.0 + 2f32.ln())).abs() < 1e-6);
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let shape = CacheShape {
            num_pages: 2,
            num_kv_heads: 1,
            page_size: 1,
            head_dim: 1,
            layout: KvLayout::Hnd,
        };
        let table = HostPageTable::new(vec![0, 2], vec![1, 0], vec![1], 1, 2).unwrap();
        let short = HostKv {
            shape,
            k: &[2.0],
            v: &[1.0, 3.0],
        };
        assert!(dense_decode(&[1.0], 1, &short, &table, 0.5).is_err());
        let kv = HostKv {
            shape,
            k: &[2.0, 2.0],
            v: &[1.0, 3.0],
        };
        // q of the wrong length, heads that are not a multiple, a table for a bigger pool.
        assert!(dense_decode(&[1.0, 2.0], 1, &kv, &table, 0.5).is_err());
        assert!(dense_decode(&[], 0, &kv, &table, 0.5).is_err());
        let wide = HostPageTable::new(vec![0, 1], vec![7], vec![1], 1, 8).unwrap();
        assert!(dense_decode(&[1.0], 1, &kv, &wide, 0.5).is_err());
        assert!(QuestMeta::build(&kv, &wide).is_err());
        assert!(Quant4Cache::build(&kv, &wide).is_err());
        let huge = HostKv {
            shape: CacheShape {
                num_pages: usize::MAX,
                ..shape
            },
            ..kv
        };
        assert!(dense_decode(&[1.0], 1, &huge, &table, 0.5).is_err());
    }

    #[test]
    fn layouts_address_the_same_rows_differently() {
        let hnd = CacheShape {
            num_pages: 3,
            num_kv_heads: 2,
            page_size: 4,
            head_dim: 8,
            layout: KvLayout::Hnd,
        };
        let nhd = CacheShape {
            layout: KvLayout::Nhd,
            ..hnd
        };
        // slot 6 = page 1, offset 2; head 1
        assert_eq!(hnd.offset(6, 1), ((2 + 1) * 4 + 2) * 8);
        assert_eq!(nhd.offset(6, 1), ((4 + 2) * 2 + 1) * 8);
    }
}
