//! 4-bit quantized K on the CPU, bit-exact with the GPU's rule.
//!
//! Per token and KV head, in f32 arithmetic, exactly:
//! `kmin = min_d k[d]`, `kmax = max_d k[d]`, `scale = max(kmax - kmin, 1e-6) / 15`,
//! `code = clamp(round((k[d] - kmin) / scale), 0, 15)` (round half away from zero, as CUDA's
//! `roundf`; IEEE division), stored as `scale_h = f16(scale)`, `min_h = f16(kmin)` (round to
//! nearest). Dequantized: `code * f32(scale_h) + f32(min_h)`, one f32 rounding per operation
//! (multiply, then add; never a fused multiply-add).
//!
//! Buffers: `codes` has the row addressing of K with `head_dim / 2` bytes per row (low nibble
//! = even channel), i.e. `[num_pages, num_kv_heads, page_size, head_dim/2]` for hnd and
//! `[num_pages, page_size, num_kv_heads, head_dim/2]` for nhd; `scale_min` has the same rows
//! with two f16 values each, (scale, min). The f16 scales assume |K| well inside f16's range.

use half::f16;

use crate::host::CacheShape;
use crate::host::HostPageTable;
use crate::host::{zeroed, HostError as Error, HostResult as Result};
use crate::reference::HostKv;

/// The number of steps of the 4-bit grid (codes 0..=15).
pub const Q4_STEPS: f32 = 15.0;
/// The smallest range a row is quantized over (a constant row gets this range).
pub const Q4_MIN_RANGE: f32 = 1e-6;

/// The f32 parameters of a row before they are stored as f16: `(kmin, scale)`.
pub fn row_params(k: &[f32]) -> (f32, f32) {
    let kmin = k.iter().fold(f32::INFINITY, |a, &x| a.min(x));
    let kmax = k.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    let scale = (kmax - kmin).max(Q4_MIN_RANGE) / Q4_STEPS;
    (kmin, scale)
}

/// The code of one value, given the row's f32 `kmin` and `scale`.
pub fn code_of(x: f32, kmin: f32, scale: f32) -> u8 {
    ((x - kmin) / scale).round().clamp(0.0, Q4_STEPS) as u8
}

/// Quantizes one row of `head_dim` (even) values into `head_dim / 2` packed bytes (low nibble
/// = even channel); returns the stored `[scale_h, min_h]`.
///
/// # Errors
/// [`Error::Shape`] for an odd row length or `packed` not half its length.
pub fn quantize_row(k: &[f32], packed: &mut [u8]) -> Result<[f16; 2]> {
    if !k.len().is_multiple_of(2) || packed.len() != k.len() / 2 {
        return Err(Error::shape(
            format!("packed bytes of a row of {} values", k.len()),
            format!("{} (an even row length, two codes a byte)", k.len() / 2),
            packed.len(),
        ));
    }
    let (kmin, scale) = row_params(k);
    for (byte, pair) in packed.iter_mut().zip(k.chunks_exact(2)) {
        *byte = code_of(pair[0], kmin, scale) | (code_of(pair[1], kmin, scale) << 4);
    }
    Ok([f16::from_f32(scale), f16::from_f32(kmin)])
}

/// The code of channel `c` of a packed row.
///
/// # Errors
/// [`Error::Parameter`] for a channel past the row's `2 * packed.len()`.
pub fn packed_code(packed: &[u8], c: usize) -> Result<u8> {
    let byte = packed.get(c / 2).ok_or_else(|| {
        Error::Parameter(format!(
            "channel {c} of a packed row of {} channels",
            2 * packed.len()
        ))
    })?;
    Ok(nibble(*byte, c))
}

/// The code of channel `c` within its byte (low nibble = even channel).
fn nibble(byte: u8, c: usize) -> u8 {
    (byte >> (4 * (c % 2))) & 0xF
}

/// The dequantized value of one code: `code * f32(scale_h) + f32(min_h)` in f32, multiply
/// then add, each rounded.
pub fn dequantize_code(code: u8, scale_min: [f16; 2]) -> f32 {
    let prod = code as f32 * scale_min[0].to_f32();
    prod + scale_min[1].to_f32()
}

/// Dequantizes one packed row into `out` (`2 * packed.len()` values).
///
/// # Errors
/// [`Error::Shape`] when `out` is not `2 * packed.len()` long.
pub fn dequantize_row(packed: &[u8], scale_min: [f16; 2], out: &mut [f32]) -> Result<()> {
    if out.len() != packed.len() * 2 {
        return Err(Error::shape(
            "dequantized row (two values a packed byte)",
            packed.len() * 2,
            out.len(),
        ));
    }
    for (c, o) in out.iter_mut().enumerate() {
        *o = dequantize_code(nibble(packed[c / 2], c), scale_min);
    }
    Ok(())
}

/// The 4-bit copy of K of a whole pool: `codes` and `scale_min` as described in the module
/// documentation. Rows of slots no request holds are left at 0.
#[derive(Clone, Debug, PartialEq)]
pub struct Quant4Cache {
    pub shape: CacheShape,
    pub codes: Vec<u8>,
    pub scale_min: Vec<f16>,
}

impl Quant4Cache {
    /// An all-zero cache for a pool of this geometry.
    ///
    /// # Errors
    /// [`Error::Parameter`] for an odd `head_dim` (two codes share a byte), or a shape whose
    /// size overflows or cannot be allocated.
    pub fn zeros(shape: CacheShape) -> Result<Quant4Cache> {
        if !shape.head_dim.is_multiple_of(2) {
            return Err(Error::Parameter(format!(
                "4-bit K needs an even head_dim, got {}",
                shape.head_dim
            )));
        }
        let rows = shape.checked_elements().ok_or_else(|| {
            Error::Parameter(format!("cache shape {shape:?} does not fit in memory"))
        })? / shape.head_dim.max(1);
        Ok(Quant4Cache {
            shape,
            codes: zeroed("4-bit K codes", rows * shape.head_dim / 2)?,
            scale_min: zeroed("4-bit K scales", rows * 2)?,
        })
    }

    /// Quantizes every valid token of every request of the table, for every KV head.
    ///
    /// # Errors
    /// As [`Quant4Cache::zeros`] and [`HostKv::check`].
    pub fn build(kv: &HostKv, table: &HostPageTable) -> Result<Quant4Cache> {
        kv.check(table)?;
        let mut cache = Quant4Cache::zeros(kv.shape)?;
        for slot in table.valid_slots() {
            for g in 0..kv.shape.num_kv_heads {
                cache.update(kv, slot, g)?;
            }
        }
        Ok(cache)
    }

    /// Checks that the fields agree: a shape with no zero dimension and an even `head_dim`
    /// whose size fits in memory, `head_dim / 2` code bytes and two f16 values per row. (The
    /// fields are public, so a value built by hand is checked before anything indexes it.)
    ///
    /// # Errors
    /// [`Error::Parameter`] or [`Error::Shape`] naming the first problem.
    pub fn check(&self) -> Result<()> {
        let s = self.shape;
        if s.num_pages == 0 || s.num_kv_heads == 0 || s.page_size == 0 || s.head_dim == 0 {
            return Err(Error::Parameter(format!(
                "4-bit K shape has a zero dimension: {s:?}"
            )));
        }
        if !s.head_dim.is_multiple_of(2) {
            return Err(Error::Parameter(format!(
                "4-bit K needs an even head_dim, got {}",
                s.head_dim
            )));
        }
        let elements = s
            .checked_elements()
            .ok_or_else(|| Error::Parameter(format!("cache shape {s:?} does not fit in memory")))?;
        let rows = elements / s.head_dim;
        if self.codes.len() != elements / 2 {
            return Err(Error::shape(
                "4-bit K code bytes",
                elements / 2,
                self.codes.len(),
            ));
        }
        // rows * 2 <= elements, so it fits.
        if self.scale_min.len() != rows * 2 {
            return Err(Error::shape(
                "4-bit K scale/min values",
                rows * 2,
                self.scale_min.len(),
            ));
        }
        Ok(())
    }

    /// Row index of (slot, kv_head): K's row addressing.
    ///
    /// # Errors
    /// As [`Quant4Cache::check`] and [`CacheShape::check_row`].
    pub fn try_row(&self, slot: usize, kv_head: usize) -> Result<usize> {
        self.check()?;
        self.shape.try_row(slot, kv_head)
    }

    /// The packed codes of (slot, kv_head).
    ///
    /// # Errors
    /// As [`Quant4Cache::try_row`].
    pub fn try_codes_row(&self, slot: usize, kv_head: usize) -> Result<&[u8]> {
        self.try_row(slot, kv_head)?;
        Ok(self.codes_row(slot, kv_head))
    }

    /// The stored `[scale_h, min_h]` of (slot, kv_head).
    ///
    /// # Errors
    /// As [`Quant4Cache::try_row`].
    pub fn try_scale_min_row(&self, slot: usize, kv_head: usize) -> Result<[f16; 2]> {
        self.try_row(slot, kv_head)?;
        Ok(self.scale_min_row(slot, kv_head))
    }

    // Unchecked forms for rows the caller has checked (the fields are public, so only the
    // checked forms above leave the crate).
    pub(crate) fn row(&self, slot: usize, kv_head: usize) -> usize {
        self.shape.row(slot, kv_head)
    }

    pub(crate) fn codes_row(&self, slot: usize, kv_head: usize) -> &[u8] {
        let half = self.shape.head_dim / 2;
        &self.codes[self.row(slot, kv_head) * half..][..half]
    }

    pub(crate) fn scale_min_row(&self, slot: usize, kv_head: usize) -> [f16; 2] {
        let r = self.row(slot, kv_head);
        [self.scale_min[2 * r], self.scale_min[2 * r + 1]]
    }

    /// (Re)quantizes the row of (slot, kv_head) from `kv`.
    ///
    /// # Errors
    /// As [`Quant4Cache::try_row`] and [`HostKv::check_shape`]; a `kv` of another geometry.
    pub fn update(&mut self, kv: &HostKv, slot: usize, kv_head: usize) -> Result<()> {
        kv.check_shape()?;
        if kv.shape != self.shape {
            return Err(Error::shape(
                "4-bit K geometry (vs the cache)",
                format!("{:?}", kv.shape),
                format!("{:?}", self.shape),
            ));
        }
        let r = self.try_row(slot, kv_head)?;
        let half = self.shape.head_dim / 2;
        let sm = quantize_row(kv.k_row(slot, kv_head), &mut self.codes[r * half..][..half])?;
        self.scale_min[2 * r..2 * r + 2].copy_from_slice(&sm);
        Ok(())
    }

    /// Quantizes tokens `first_new_offset .. first_new_offset + new_count` of `page`, every
    /// KV head (the incremental form of [`Quant4Cache::build`]).
    ///
    /// # Errors
    /// Tokens that do not fit the page, and as [`Quant4Cache::update`].
    pub fn append(
        &mut self,
        kv: &HostKv,
        page: usize,
        first_new_offset: usize,
        new_count: usize,
    ) -> Result<()> {
        let ps = self.shape.page_size;
        let end = first_new_offset.checked_add(new_count);
        if end.is_none_or(|end| end > ps) {
            return Err(Error::Parameter(format!(
                "tokens {first_new_offset} (+{new_count}) do not fit a page of {ps}"
            )));
        }
        if page >= self.shape.num_pages {
            return Err(Error::Parameter(format!(
                "page {page} is outside the pool of {} pages",
                self.shape.num_pages
            )));
        }
        // Without KV heads there is no row to update: return before walking the offsets,
        // which a huge page size would make an unbounded loop of nothing.
        if self.shape.num_kv_heads == 0 {
            return Ok(());
        }
        for off in first_new_offset..first_new_offset + new_count {
            // The row check in `update` refuses a page outside the pool; the product only
            // needs to not wrap into one.
            let slot = page
                .checked_mul(ps)
                .and_then(|s| s.checked_add(off))
                .ok_or_else(|| Error::Parameter(format!("page {page} is outside the pool")))?;
            for g in 0..self.shape.num_kv_heads {
                self.update(kv, slot, g)?;
            }
        }
        Ok(())
    }

    /// Dequantizes the row of (slot, kv_head) into `out` (`head_dim` values).
    ///
    /// # Errors
    /// As [`Quant4Cache::try_row`]; an `out` that is not `head_dim` long.
    pub fn dequantize(&self, slot: usize, kv_head: usize, out: &mut [f32]) -> Result<()> {
        self.try_row(slot, kv_head)?;
        dequantize_row(
            self.codes_row(slot, kv_head),
            self.scale_min_row(slot, kv_head),
            out,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twilight_jit::KvLayout;

    #[test]
    fn hand_computed_row() {
        // kmin = -1, kmax = 2, scale = 3 / 15 = 0.2 (f32), codes: 0, 15, (0.5 + 1) / 0.2 = 7.5
        // rounds away from zero to 8, (0 + 1) / 0.2 = 5.
        let k = [-1.0f32, 2.0, 0.5, 0.0];
        let mut packed = [0u8; 2];
        let sm = quantize_row(&k, &mut packed).unwrap();
        assert_eq!(packed_code(&packed, 0).unwrap(), 0);
        assert_eq!(packed_code(&packed, 1).unwrap(), 15);
        assert!(packed_code(&packed, 4).is_err());
        assert_eq!(packed[0], 0xF0);
        assert_eq!(sm[1], f16::from_f32(-1.0));
        assert_eq!(sm[0], f16::from_f32(3.0f32 / 15.0));
        let mut out = [0f32; 4];
        dequantize_row(&packed, sm, &mut out).unwrap();
        assert!(dequantize_row(&packed, sm, &mut out[..3]).is_err());
        let s = f16::from_f32(0.2).to_f32();
        assert_eq!(out[0], -1.0);
        assert_eq!(out[1], 15.0 * s - 1.0);
        let (kmin, scale) = row_params(&k);
        assert_eq!(code_of(0.5, kmin, scale), ((1.5f32) / scale).round() as u8);
        // A constant row: range clamps to 1e-6, every code is 0, value = f16(kmin).
        let sm = quantize_row(&[3.0, 3.0], &mut packed[..1]).unwrap();
        assert!(quantize_row(&[3.0, 3.0, 1.0], &mut packed[..1]).is_err());
        assert!(quantize_row(&[3.0, 3.0], &mut packed).is_err());
        assert_eq!(packed[0], 0);
        assert_eq!(dequantize_code(0, sm), 3.0);
    }

    /// A page of any size in a pool without KV heads: the append has no row to update and
    /// returns at once (it once walked every offset of a huge page doing nothing), and a page
    /// outside the pool is refused before any offset is walked.
    #[test]
    fn appends_without_rows_return_at_once() {
        let shape = CacheShape {
            num_pages: 1,
            num_kv_heads: 0,
            page_size: usize::MAX,
            head_dim: 2,
            layout: KvLayout::Hnd,
        };
        let mut quant = Quant4Cache {
            shape,
            codes: Vec::new(),
            scale_min: Vec::new(),
        };
        let kv = HostKv {
            shape,
            k: &[],
            v: &[],
        };
        assert!(quant.append(&kv, 0, 0, usize::MAX / 2 + 1).is_ok());
        assert!(quant.append(&kv, 1, 0, usize::MAX / 2 + 1).is_err());
    }

    #[test]
    fn cache_rows_follow_k_layout() {
        for layout in [KvLayout::Hnd, KvLayout::Nhd] {
            let shape = CacheShape {
                num_pages: 2,
                num_kv_heads: 2,
                page_size: 2,
                head_dim: 4,
                layout,
            };
            let k: Vec<f32> = (0..shape.elements()).map(|i| (i % 7) as f32).collect();
            let kv = HostKv {
                shape,
                k: &k,
                v: &k,
            };
            let table = HostPageTable::new(vec![0, 2], vec![1, 0], vec![1], 2, 2).unwrap();
            let q = Quant4Cache::build(&kv, &table).unwrap();
            assert_eq!(q.codes.len(), shape.elements() / 2);
            for t in 0..3 {
                let slot = table.slot(0, t);
                for g in 0..2 {
                    let mut packed = [0u8; 2];
                    let sm = quantize_row(kv.k_row(slot, g), &mut packed).unwrap();
                    assert_eq!(q.try_codes_row(slot, g).unwrap(), &packed);
                    assert_eq!(q.try_scale_min_row(slot, g).unwrap(), sm);
                }
            }
            // Slot 1 (page 0, offset 1) is past the end of the request: untouched.
            assert_eq!(q.try_scale_min_row(1, 0).unwrap(), [f16::ZERO; 2]);
            // Rows outside the pool, short buffers and pieces past a page are errors.
            assert!(q.try_codes_row(4, 0).is_err());
            assert!(q.try_scale_min_row(0, 2).is_err());
            let mut out = [0f32; 3];
            assert!(q.dequantize(0, 0, &mut out).is_err());
            let mut q = q;
            assert!(q.append(&kv, 0, 1, 2).is_err());
            assert!(q.append(&kv, 2, 0, 1).is_err());
            assert!(q.append(&kv, usize::MAX, 0, 1).is_err());
            q.codes.pop();
            assert!(q.update(&kv, 0, 0).is_err());
        }
    }
}
