//! The geometry of a paged K or V pool and the addressing every per-token buffer shares.

use twilight_jit::KvLayout;

use crate::host::{HostError, HostResult};

/// The geometry of a paged K or V pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheShape {
    pub num_pages: usize,
    pub num_kv_heads: usize,
    pub page_size: usize,
    pub head_dim: usize,
    pub layout: KvLayout,
}

impl CacheShape {
    /// Elements in one of K or V, or `None` when the count overflows `usize`.
    pub fn checked_elements(&self) -> Option<usize> {
        self.num_pages
            .checked_mul(self.num_kv_heads)?
            .checked_mul(self.page_size)?
            .checked_mul(self.head_dim)
    }

    /// Elements in one of K or V. A shape whose count overflows `usize` gives `usize::MAX`,
    /// which no buffer holds, so comparing it with a buffer's length fails instead of wrapping
    /// to a small count that might match (see [`CacheShape::checked_elements`]).
    pub fn elements(&self) -> usize {
        self.checked_elements().unwrap_or(usize::MAX)
    }

    /// Token slots of the pool (`num_pages * page_size`), or `None` when it overflows.
    pub fn checked_slots(&self) -> Option<usize> {
        self.num_pages.checked_mul(self.page_size)
    }

    /// Checks that (slot, kv_head) is a row of this pool: no zero dimension, a size that fits
    /// in memory, `slot < num_pages * page_size` and `kv_head < num_kv_heads`. Every address
    /// computed for such a row is below [`CacheShape::elements`], so nothing overflows.
    ///
    /// # Errors
    /// [`HostError::Parameter`] naming the first problem.
    pub fn check_row(&self, slot: usize, kv_head: usize) -> HostResult<()> {
        if self.num_pages == 0
            || self.num_kv_heads == 0
            || self.page_size == 0
            || self.head_dim == 0
        {
            return Err(HostError::Parameter(format!(
                "cache shape has a zero dimension: {self:?}"
            )));
        }
        let slots = match (self.checked_elements(), self.checked_slots()) {
            (Some(_), Some(slots)) => slots,
            _ => {
                return Err(HostError::Parameter(format!(
                    "cache shape {self:?} has more elements than fit in memory"
                )))
            }
        };
        if slot >= slots {
            return Err(HostError::Parameter(format!(
                "slot {slot} is outside the pool's {slots} token slots"
            )));
        }
        if kv_head >= self.num_kv_heads {
            return Err(HostError::Parameter(format!(
                "KV head {kv_head} is outside the pool's {} KV heads",
                self.num_kv_heads
            )));
        }
        Ok(())
    }

    /// Row index of (slot, kv_head): the addressing every per-token buffer shares with K.
    ///
    /// # Errors
    /// As [`CacheShape::check_row`].
    pub fn try_row(&self, slot: usize, kv_head: usize) -> HostResult<usize> {
        self.check_row(slot, kv_head)?;
        Ok(self.row(slot, kv_head))
    }

    /// Element offset of (slot, kv_head, channel 0), slot = page * page_size + offset.
    ///
    /// # Errors
    /// As [`CacheShape::check_row`].
    pub fn try_offset(&self, slot: usize, kv_head: usize) -> HostResult<usize> {
        self.check_row(slot, kv_head)?;
        Ok(self.offset(slot, kv_head))
    }

    /// [`CacheShape::try_row`] for a row already checked: crate-private, since a zero page
    /// size divides by zero and a row outside the pool overflows.
    pub(crate) fn row(&self, slot: usize, kv_head: usize) -> usize {
        self.offset(slot, kv_head) / self.head_dim
    }

    /// [`CacheShape::try_offset`] for a row already checked (see [`CacheShape::row`]).
    pub(crate) fn offset(&self, slot: usize, kv_head: usize) -> usize {
        let (page, off) = (slot / self.page_size, slot % self.page_size);
        let row = match self.layout {
            KvLayout::Hnd => (page * self.num_kv_heads + kv_head) * self.page_size + off,
            KvLayout::Nhd => (page * self.page_size + off) * self.num_kv_heads + kv_head,
        };
        row * self.head_dim
    }
}
