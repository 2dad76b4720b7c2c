//! Synthetic decode inputs: a paged cache with shuffled page ids, ragged request lengths, and
//! q, all seeded. Used by tests, the demo and benchmarks.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use twilight::element::round_to;
use twilight::reference::HostKv;
use twilight::{CacheShape, HostPageTable, KvElement, KvLayout};

use crate::error::{Error, Result};

/// One decode step's inputs on the host. Values are rounded to the storage dtype, so the
/// f32 copies are exactly what the GPU reads.
#[derive(Clone, Debug)]
pub struct SyntheticStep {
    pub shape: CacheShape,
    pub num_qo_heads: usize,
    pub table: HostPageTable,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl SyntheticStep {
    /// Normally distributed q, K and V (K scaled by `key_scale`, which sets how peaked the
    /// attention is) for requests of the given lengths. Pages are handed out in a random
    /// order, and `spare_pages` unused pages (filled with noise) are added to the pool so that
    /// wrong indexing reads wrong data.
    ///
    /// # Errors
    /// [`Error::Parameter`] for a zero page size, KV head count, group size or head_dim; a page
    /// table error for a zero-length request.
    #[allow(clippy::too_many_arguments)]
    pub fn random<T: KvElement>(
        seed: u64,
        lens: &[usize],
        num_kv_heads: usize,
        group_size: usize,
        page_size: usize,
        head_dim: usize,
        layout: KvLayout,
        key_scale: f32,
    ) -> Result<SyntheticStep> {
        if num_kv_heads == 0 || group_size == 0 || head_dim == 0 {
            return Err(Error::Parameter(format!(
                "synthetic step: num_kv_heads {num_kv_heads}, group_size {group_size} and \
                 head_dim {head_dim} must all be positive"
            )));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let (table, num_pages) = shuffled_page_table(&mut rng, lens, page_size)?;
        let shape = CacheShape {
            num_pages,
            num_kv_heads,
            page_size,
            head_dim,
            layout,
        };
        let (num_qo_heads, q_len) = step_sizes(&shape, lens.len(), group_size)?;
        let mut normal = |n: usize, scale: f32| -> Vec<f32> {
            (0..n)
                .map(|_| round_to::<T>(scale * standard_normal(&mut rng)))
                .collect()
        };
        let q = normal(q_len, 1.0);
        let k = normal(shape.elements(), key_scale);
        let v = normal(shape.elements(), 1.0);
        Ok(SyntheticStep {
            shape,
            num_qo_heads,
            table,
            q,
            k,
            v,
        })
    }

    pub fn kv(&self) -> HostKv<'_> {
        HostKv {
            shape: self.shape,
            k: &self.k,
            v: &self.v,
        }
    }

    /// The K and V rows of request `b`, `[tokens, num_kv_heads, head_dim]` in token order: what
    /// an engine would hand to `append` to build the same cache.
    ///
    /// # Errors
    /// [`Error::Parameter`] when the step has no request `b`; a host error when the (public)
    /// fields no longer agree: K or V that do not fill the shape, a table for another pool.
    pub fn request_rows<T: KvElement>(&self, b: usize) -> Result<(Vec<T>, Vec<T>)> {
        check_request(b, self.table.batch())?;
        let kv = self.kv();
        kv.check(&self.table)?;
        // Only a capacity hint: a table may name a page more than once, so the product is not
        // bounded by the pool's size.
        let values = (self.table.len_of(b))
            .checked_mul(self.shape.num_kv_heads * self.shape.head_dim)
            .unwrap_or(0);
        let (mut k, mut v) = (Vec::with_capacity(values), Vec::with_capacity(values));
        for slot in self.table.slots_of(b) {
            for h in 0..self.shape.num_kv_heads {
                k.extend(kv.try_k_row(slot, h)?.iter().map(|&x| T::from_f32(x)));
                v.extend(kv.try_v_row(slot, h)?.iter().map(|&x| T::from_f32(x)));
            }
        }
        Ok((k, v))
    }

    /// Converts f32 values to the storage type (exact: they were rounded at creation).
    pub fn to_elements<T: KvElement>(values: &[f32]) -> Vec<T> {
        values.iter().map(|&x| T::from_f32(x)).collect()
    }
}

/// Unused pages of noise added to every synthetic pool, so that wrong indexing reads wrong data.
pub const SPARE_PAGES: usize = 3;

/// A page table for requests of the given lengths over a pool of exactly enough pages plus
/// [`SPARE_PAGES`], handed out in a random order (drawn from `rng`); returns the table and the
/// pool's page count.
///
/// # Errors
/// [`Error::Parameter`] for a zero page size or a pool of more than 2^31 token slots; a page
/// table error for a zero-length request.
pub fn shuffled_page_table(
    rng: &mut StdRng,
    lens: &[usize],
    page_size: usize,
) -> Result<(HostPageTable, usize)> {
    if page_size == 0 {
        return Err(Error::Parameter("page_size must be positive".into()));
    }
    let num_pages = lens
        .iter()
        .try_fold(SPARE_PAGES, |n, l| n.checked_add(l.div_ceil(page_size)))
        .filter(|&n| {
            n.checked_mul(page_size)
                .is_some_and(|s| s <= i32::MAX as usize)
        })
        .ok_or_else(|| {
            Error::Parameter(format!(
                "{} requests of up to {} tokens in pages of {page_size} need more than 2^31 \
                 token slots, beyond the kernels' 32-bit slot ids",
                lens.len(),
                lens.iter().max().copied().unwrap_or(0)
            ))
        })?;
    // Bounded above, so the cast is exact.
    let mut page_ids: Vec<i32> = (0..num_pages as i32).collect();
    page_ids.shuffle(rng);
    let mut rows = Vec::new();
    let mut next = 0;
    for &len in lens {
        let n = len.div_ceil(page_size);
        rows.push((&page_ids[next..next + n], len));
        next += n;
    }
    Ok((
        HostPageTable::from_requests(&rows, page_size, num_pages)?,
        num_pages,
    ))
}

/// A standard normal sample (Box-Muller), so no extra distribution crate is needed.
pub fn standard_normal(rng: &mut impl Rng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Random request lengths in `1..=max_len`, one of them exactly `max_len`.
///
/// # Errors
/// [`Error::Parameter`] for a `max_len` of 0 (there is no length to draw).
pub fn ragged_lengths(rng: &mut impl Rng, batch: usize, max_len: usize) -> Result<Vec<usize>> {
    if max_len == 0 {
        return Err(Error::Parameter(
            "requests of at most 0 tokens: max_len must be at least 1".into(),
        ));
    }
    let mut lens: Vec<usize> = (0..batch).map(|_| rng.random_range(1..=max_len)).collect();
    if let Some(first) = lens.first_mut() {
        *first = max_len;
    }
    lens.shuffle(rng);
    Ok(lens)
}

/// The query heads and q's element count of a step of `batch` requests over `shape`, and a
/// check that the pool's element count fits in memory: every size a step allocates from its
/// caller's numbers, computed before anything is allocated.
pub(crate) fn step_sizes(
    shape: &CacheShape,
    batch: usize,
    group_size: usize,
) -> Result<(usize, usize)> {
    let num_qo_heads = shape.num_kv_heads.checked_mul(group_size);
    let q_len = num_qo_heads
        .and_then(|n| n.checked_mul(batch))
        .and_then(|n| n.checked_mul(shape.head_dim));
    match (num_qo_heads, q_len, shape.checked_elements()) {
        (Some(heads), Some(q_len), Some(_)) => Ok((heads, q_len)),
        _ => Err(Error::Parameter(format!(
            "a step of {batch} requests, {} KV heads of group {group_size}, head_dim {} over \
             {} pages of {} has more values than fit in memory",
            shape.num_kv_heads, shape.head_dim, shape.num_pages, shape.page_size
        ))),
    }
}

/// Checks that a step of `batch` requests has request `b`.
pub(crate) fn check_request(b: usize, batch: usize) -> Result<()> {
    if b < batch {
        Ok(())
    } else {
        Err(Error::Parameter(format!(
            "request {b} of a step of {batch} requests"
        )))
    }
}
