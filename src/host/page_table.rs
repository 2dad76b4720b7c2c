//! The FlashInfer-style page table of a batch: `kv_indptr [batch + 1]`, `kv_indices [nnz]`,
//! `kv_last_page_len [batch]`. Request `b` owns pages `kv_indices[kv_indptr[b]..kv_indptr[b+1]]`
//! and holds `(pages - 1) * page_size + kv_last_page_len[b]` tokens.
//!
//! A table is validated when it is built ([`HostPageTable::new`], [`HostPageTable::from_requests`])
//! and its fields are private, so every table that exists is consistent: the accessors below
//! never index out of range for a request and token the table has.

use crate::host::HostError as Error;

type Result<T> = std::result::Result<T, Error>;

/// The longest request a table may describe: the kernels index a request's tokens with 32-bit
/// signed integers and add a page's worth of slack to them.
pub const MAX_REQUEST_TOKENS: usize = i32::MAX as usize / 2;

/// A page table on the host, checked against the cache it indexes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPageTable {
    kv_indptr: Vec<i32>,
    kv_indices: Vec<i32>,
    kv_last_page_len: Vec<i32>,
    page_size: usize,
}

impl HostPageTable {
    /// Builds and validates a table.
    ///
    /// # Errors
    /// [`Error::PageTable`] naming the first problem: a page size of 0; indptr not starting at
    /// 0, not increasing or not ending at `kv_indices.len()`; a request with no page; a page id
    /// outside `0..num_pages`; `kv_last_page_len` outside `1..=page_size`; lengths that
    /// disagree; a request longer than [`MAX_REQUEST_TOKENS`].
    pub fn new(
        kv_indptr: Vec<i32>,
        kv_indices: Vec<i32>,
        kv_last_page_len: Vec<i32>,
        page_size: usize,
        num_pages: usize,
    ) -> Result<HostPageTable> {
        let table = HostPageTable {
            kv_indptr,
            kv_indices,
            kv_last_page_len,
            page_size,
        };
        table.validate(num_pages)?;
        Ok(table)
    }

    /// A table for requests whose pages are listed in order, with their token counts.
    ///
    /// # Errors
    /// As [`HostPageTable::new`]; also a request whose page list cannot hold its tokens, and a
    /// table with more pages than 32-bit indices can count.
    pub fn from_requests(
        requests: &[(&[i32], usize)],
        page_size: usize,
        num_pages: usize,
    ) -> Result<HostPageTable> {
        if page_size == 0 {
            return Err(Error::PageTable("page_size is 0".into()));
        }
        let mut indptr = vec![0i32];
        let mut indices = Vec::new();
        let mut last = Vec::new();
        for (b, (pages, len)) in requests.iter().enumerate() {
            let needed = len.div_ceil(page_size);
            if *len == 0 || pages.len() < needed {
                return Err(Error::PageTable(format!(
                    "request {b} has {len} tokens and {} pages of {page_size}",
                    pages.len()
                )));
            }
            indices.extend_from_slice(&pages[..needed]);
            let end = i32::try_from(indices.len()).map_err(|_| {
                Error::PageTable(format!(
                    "the requests up to {b} hold {} pages, more than 32-bit kv_indptr counts",
                    indices.len()
                ))
            })?;
            indptr.push(end);
            // needed >= 1 and (needed - 1) * page_size < len, so this fits in 1..=page_size.
            let last_len = len - (needed - 1) * page_size;
            last.push(i32::try_from(last_len).map_err(|_| {
                Error::PageTable(format!("page_size {page_size} exceeds 32-bit lengths"))
            })?);
        }
        HostPageTable::new(indptr, indices, last, page_size, num_pages)
    }

    pub fn batch(&self) -> usize {
        self.kv_last_page_len.len()
    }

    /// `kv_indptr [batch + 1]`.
    pub fn kv_indptr(&self) -> &[i32] {
        &self.kv_indptr
    }

    /// `kv_indices [nnz_pages]`.
    pub fn kv_indices(&self) -> &[i32] {
        &self.kv_indices
    }

    /// `kv_last_page_len [batch]`.
    pub fn kv_last_page_len(&self) -> &[i32] {
        &self.kv_last_page_len
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// The pages of request `b` in token order (empty for a request the table does not have).
    pub fn pages_of(&self, b: usize) -> &[i32] {
        if b >= self.batch() {
            return &[];
        }
        &self.kv_indices[self.kv_indptr[b] as usize..self.kv_indptr[b + 1] as usize]
    }

    /// Token count of request `b` (0 for a request the table does not have).
    pub fn len_of(&self, b: usize) -> usize {
        match self.pages_of(b).len() {
            0 => 0,
            // Validated: at most MAX_REQUEST_TOKENS, so nothing here overflows.
            pages => (pages - 1) * self.page_size + self.kv_last_page_len[b] as usize,
        }
    }

    /// Every valid token slot of every request, in request then token order.
    pub fn valid_slots(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.batch()).flat_map(move |b| self.slots_of(b))
    }

    pub fn max_len(&self) -> usize {
        (0..self.batch()).map(|b| self.len_of(b)).max().unwrap_or(0)
    }

    /// Slot (`page * page_size + offset`) of token `t` of request `b`, or `None` when the
    /// table has no such token.
    pub fn try_slot(&self, b: usize, t: usize) -> Option<usize> {
        if t >= self.len_of(b) {
            return None;
        }
        let page = self.pages_of(b)[t / self.page_size] as usize;
        Some(page * self.page_size + t % self.page_size)
    }

    /// The slots of request `b`'s tokens in token order (none for a request the table does not
    /// have): the checked way to walk a request, token by token.
    pub fn slots_of(&self, b: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.len_of(b)).map(move |t| self.slot(b, t))
    }

    /// [`HostPageTable::try_slot`] for a token known to exist. Crate-private: a caller outside
    /// the crate gets an `Option` from `try_slot` or walks a request with
    /// [`HostPageTable::slots_of`], so no index it passes can panic.
    pub(crate) fn slot(&self, b: usize, t: usize) -> usize {
        match self.try_slot(b, t) {
            Some(slot) => slot,
            None => panic!(
                "token {t} of request {b}: the table has {} requests, that one {} tokens",
                self.batch(),
                self.len_of(b)
            ),
        }
    }

    /// Checks the table against a cache of `num_pages` pages (construction already checked
    /// it against the cache it was built for; this checks it against another).
    ///
    /// # Errors
    /// See [`HostPageTable::new`].
    pub fn validate(&self, num_pages: usize) -> Result<()> {
        let bad = |msg: String| Err(Error::PageTable(msg));
        let batch = self.kv_last_page_len.len();
        if self.page_size == 0 {
            return bad("page_size is 0".into());
        }
        if self.kv_indptr.len() != batch + 1 {
            return bad(format!(
                "kv_indptr has {} entries for a batch of {batch} (kv_last_page_len); expected {}",
                self.kv_indptr.len(),
                batch + 1
            ));
        }
        if self.kv_indptr[0] != 0 {
            return bad(format!("kv_indptr[0] is {}, expected 0", self.kv_indptr[0]));
        }
        for b in 0..batch {
            let (lo, hi) = (self.kv_indptr[b], self.kv_indptr[b + 1]);
            if hi <= lo {
                return bad(format!(
                    "request {b} has no page (kv_indptr[{b}] = {lo}, kv_indptr[{}] = {hi})",
                    b + 1
                ));
            }
            let last = self.kv_last_page_len[b];
            if last < 1 || last as usize > self.page_size {
                return bad(format!(
                    "kv_last_page_len[{b}] = {last} is outside 1..={}",
                    self.page_size
                ));
            }
            // kv_indptr starts at 0 and increases, so hi - lo is positive and fits.
            let tokens = ((hi - lo) as usize - 1)
                .checked_mul(self.page_size)
                .and_then(|n| n.checked_add(last as usize));
            if tokens.is_none_or(|n| n > MAX_REQUEST_TOKENS) {
                return bad(format!(
                    "request {b} ({} pages of {}) is longer than the kernels' 32-bit token index allows ({MAX_REQUEST_TOKENS})",
                    hi - lo,
                    self.page_size
                ));
            }
        }
        // Increasing from 0: the last entry is the largest and not negative.
        let nnz = self.kv_indptr[batch] as usize;
        if nnz != self.kv_indices.len() {
            return bad(format!(
                "kv_indptr ends at {nnz} but kv_indices has {} entries",
                self.kv_indices.len()
            ));
        }
        if let Some((i, &p)) = self
            .kv_indices
            .iter()
            .enumerate()
            .find(|(_, &p)| p < 0 || p as usize >= num_pages)
        {
            return bad(format!(
                "kv_indices[{i}] = {p} is outside the cache's pages 0..{num_pages}"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_table_and_lengths() {
        let t = HostPageTable::new(vec![0, 2, 3], vec![4, 1, 0], vec![3, 16], 16, 5).unwrap();
        assert_eq!(t.len_of(0), 19);
        assert_eq!(t.len_of(1), 16);
        assert_eq!(t.slot(0, 17), 16 + 1);
        assert_eq!(t.max_len(), 19);
    }

    #[test]
    fn every_kind_of_bad_table_is_refused() {
        type Case = (Vec<i32>, Vec<i32>, Vec<i32>, &'static str);
        let cases: Vec<Case> = vec![
            (vec![0, 2], vec![0, 1], vec![17], "outside 1..=16"),
            (vec![0, 2], vec![0, 1], vec![0], "outside 1..=16"),
            (vec![0, 2], vec![0, 9], vec![1], "outside the cache's pages"),
            (
                vec![0, 2],
                vec![0, -1],
                vec![1],
                "outside the cache's pages",
            ),
            (vec![0, 0, 1], vec![0], vec![1, 1], "has no page"),
            (vec![1, 2], vec![0, 1], vec![1], "kv_indptr[0]"),
            (vec![0, 3], vec![0, 1], vec![1], "kv_indices has 2"),
            (
                vec![0, 1, 2],
                vec![0, 1],
                vec![1],
                "kv_indptr has 3 entries",
            ),
        ];
        for (indptr, indices, last, needle) in cases {
            let err = HostPageTable::new(indptr.clone(), indices, last, 16, 4).unwrap_err();
            assert!(err.to_string().contains(needle), "{indptr:?}: {err}");
        }
    }
}
