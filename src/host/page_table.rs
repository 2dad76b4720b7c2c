//! The FlashInfer-style page table of a batch: `kv_indptr [batch + 1]`, `kv_indices [nnz]`,
//! `kv_last_page_len [batch]`. Request `b` owns pages `kv_indices[kv_indptr[b]..kv_indptr[b+1]]`
//! and holds `(pages - 1) * page_size + kv_last_page_len[b]` tokens.

use crate::host::HostError as Error;

type Result<T> = std::result::Result<T, Error>;

/// A page table on the host, checked against the cache it indexes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPageTable {
    pub kv_indptr: Vec<i32>,
    pub kv_indices: Vec<i32>,
    pub kv_last_page_len: Vec<i32>,
    pub page_size: usize,
}

impl HostPageTable {
    /// Builds and validates a table.
    ///
    /// # Errors
    /// [`Error::PageTable`] naming the first problem: indptr not starting at 0, decreasing or
    /// not ending at `kv_indices.len()`; a request with no page; a page id outside
    /// `0..num_pages`; `kv_last_page_len` outside `1..=page_size`; lengths that disagree.
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
    /// As [`HostPageTable::new`]; also a request whose page list cannot hold its tokens.
    pub fn from_requests(
        requests: &[(&[i32], usize)],
        page_size: usize,
        num_pages: usize,
    ) -> Result<HostPageTable> {
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
            indptr.push(indices.len() as i32);
            last.push((len - (needed - 1) * page_size) as i32);
        }
        HostPageTable::new(indptr, indices, last, page_size, num_pages)
    }

    pub fn batch(&self) -> usize {
        self.kv_last_page_len.len()
    }

    /// Token count of request `b`.
    pub fn len_of(&self, b: usize) -> usize {
        let pages = (self.kv_indptr[b + 1] - self.kv_indptr[b]) as usize;
        (pages - 1) * self.page_size + self.kv_last_page_len[b] as usize
    }

    /// Every valid token slot of every request, in request then token order.
    pub fn valid_slots(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.batch()).flat_map(move |b| (0..self.len_of(b)).map(move |t| self.slot(b, t)))
    }

    pub fn max_len(&self) -> usize {
        (0..self.batch()).map(|b| self.len_of(b)).max().unwrap_or(0)
    }

    /// Slot (`page * page_size + offset`) of token `t` of request `b`.
    pub fn slot(&self, b: usize, t: usize) -> usize {
        let page = self.kv_indices[self.kv_indptr[b] as usize + t / self.page_size] as usize;
        page * self.page_size + t % self.page_size
    }

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
        }
        let nnz = *self.kv_indptr.last().unwrap_or(&0) as usize;
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
        if self.max_len() > i32::MAX as usize / 2 {
            return bad("a request is longer than the kernels' 32-bit token index".into());
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
