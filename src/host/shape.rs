//! The geometry of a paged K or V pool and the addressing every per-token buffer shares.

use twilight_jit::KvLayout;

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

    /// Elements in one of K or V (for a shape that has been checked: see
    /// [`CacheShape::checked_elements`]).
    pub fn elements(&self) -> usize {
        self.num_pages * self.num_kv_heads * self.page_size * self.head_dim
    }

    /// Row index of (slot, kv_head): the addressing every per-token buffer shares with K.
    pub fn row(&self, slot: usize, kv_head: usize) -> usize {
        self.offset(slot, kv_head) / self.head_dim
    }

    /// Element offset of (slot, kv_head, channel 0), slot = page * page_size + offset.
    pub fn offset(&self, slot: usize, kv_head: usize) -> usize {
        let (page, off) = (slot / self.page_size, slot % self.page_size);
        let row = match self.layout {
            KvLayout::Hnd => (page * self.num_kv_heads + kv_head) * self.page_size + off,
            KvLayout::Nhd => (page * self.page_size + off) * self.num_kv_heads + kv_head,
        };
        row * self.head_dim
    }
}
