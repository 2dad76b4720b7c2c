//! The host bookkeeping of a [`PagedKvCache`](super::PagedKvCache): which pages each request
//! owns and how many tokens it holds. No CUDA: the cache owns one of these beside its device
//! buffers, and it is tested on its own.
//!
//! Free pages are a stack. A new pool hands out page 0 first; a removed request's pages go
//! back so that its first page is handed out next, which is how an engine's pool reuses pages
//! and why page tables after a while are never the identity.

use crate::error::{Error, Result};
use crate::host::HostPageTable;

/// A handle to one request (sequence) in a [`PagedKvCache`](super::PagedKvCache).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub usize);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct RequestPages {
    pages: Vec<i32>,
    len: usize,
}

/// Pages of a pool of `num_pages` pages of `page_size` tokens, and the requests that own them.
#[derive(Clone, Debug)]
pub(crate) struct PageAllocator {
    page_size: usize,
    num_pages: usize,
    free_pages: Vec<i32>,
    requests: Vec<Option<RequestPages>>,
}

impl PageAllocator {
    /// # Errors
    /// A zero page size or page count, or page slots (`page * page_size + offset`) beyond
    /// 32-bit ids.
    pub(crate) fn new(num_pages: usize, page_size: usize) -> Result<PageAllocator> {
        let slots = num_pages.checked_mul(page_size);
        if num_pages == 0 || page_size == 0 || slots.is_none_or(|s| s > i32::MAX as usize) {
            return Err(Error::Parameter(format!(
                "{num_pages} pages of {page_size} tokens: need at least one of each, and fewer \
                 than 2^31 slots"
            )));
        }
        Ok(PageAllocator {
            page_size,
            num_pages,
            // Popped from the end: page 0 is handed out first. The bound above makes the cast
            // exact.
            free_pages: (0..num_pages as i32).rev().collect(),
            requests: Vec::new(),
        })
    }

    pub(crate) fn free_pages(&self) -> usize {
        self.free_pages.len()
    }

    pub(crate) fn add_request(&mut self) -> RequestId {
        self.requests.push(Some(RequestPages::default()));
        RequestId(self.requests.len() - 1)
    }

    /// Ends a request; its pages go back so that its first page is the next handed out.
    pub(crate) fn remove_request(&mut self, id: RequestId) -> Result<()> {
        let request = self
            .requests
            .get_mut(id.0)
            .and_then(Option::take)
            .ok_or(Error::UnknownRequest(id.0))?;
        self.free_pages.extend(request.pages.iter().rev());
        Ok(())
    }

    fn request(&self, id: RequestId) -> Result<&RequestPages> {
        self.requests
            .get(id.0)
            .and_then(Option::as_ref)
            .ok_or(Error::UnknownRequest(id.0))
    }

    pub(crate) fn len(&self, id: RequestId) -> Result<usize> {
        Ok(self.request(id)?.len)
    }

    /// The pages a request owns, in token order.
    pub(crate) fn pages(&self, id: RequestId) -> Result<&[i32]> {
        Ok(&self.request(id)?.pages)
    }

    /// Reserves the slots of `count` new tokens for each listed request, in order, allocating
    /// pages as needed. All or nothing: on any error nothing changes.
    ///
    /// # Errors
    /// [`Error::UnknownRequest`]; [`Error::Parameter`] for a request listed twice or a request
    /// that would grow past the longest a page table may describe; [`Error::OutOfPages`].
    pub(crate) fn reserve(&mut self, appends: &[(RequestId, usize)]) -> Result<Vec<i32>> {
        let page_size = self.page_size;
        let mut seen = std::collections::HashSet::new();
        if let Some(&(id, _)) = appends.iter().find(|(id, _)| !seen.insert(*id)) {
            return Err(Error::Parameter(format!(
                "request {} appears twice in one append; give its tokens as one entry",
                id.0
            )));
        }
        let mut needed = 0usize;
        let mut tokens = 0usize;
        for &(id, count) in appends {
            let r = self.request(id)?;
            let len = r
                .len
                .checked_add(count)
                .filter(|&n| n <= crate::host::MAX_REQUEST_TOKENS)
                .ok_or_else(|| {
                    Error::Parameter(format!(
                        "request {} holds {} tokens; {count} more exceed the {} a request may hold",
                        id.0,
                        r.len,
                        crate::host::MAX_REQUEST_TOKENS
                    ))
                })?;
            // Both lengths are bounded above, so neither sum below can overflow.
            needed += len.div_ceil(page_size) - r.len.div_ceil(page_size);
            tokens += count;
        }
        if needed > self.free_pages.len() {
            return Err(Error::OutOfPages {
                needed,
                free: self.free_pages.len(),
                total: self.num_pages,
            });
        }
        let mut slots = Vec::with_capacity(tokens);
        for &(id, count) in appends {
            let Some(Some(r)) = self.requests.get_mut(id.0) else {
                unreachable!("every request was looked up above");
            };
            for _ in 0..count {
                if r.len.is_multiple_of(page_size) {
                    match self.free_pages.pop() {
                        Some(page) => r.pages.push(page),
                        None => unreachable!("the pages were counted above"),
                    }
                }
                let page = r.pages[r.len / page_size] as usize;
                // A slot is below num_pages * page_size, which new() bounded by i32::MAX.
                slots.push((page * page_size + r.len % page_size) as i32);
                r.len += 1;
            }
        }
        Ok(slots)
    }

    /// The host page table of the listed requests, in order.
    ///
    /// # Errors
    /// [`Error::UnknownRequest`], or an empty request (a table row needs a token).
    pub(crate) fn host_page_table(&self, ids: &[RequestId]) -> Result<HostPageTable> {
        let rows = ids
            .iter()
            .map(|&id| self.request(id).map(|r| (r.pages.as_slice(), r.len)))
            .collect::<Result<Vec<_>>>()?;
        Ok(HostPageTable::from_requests(
            &rows,
            self.page_size,
            self.num_pages,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(pages: usize, page_size: usize) -> PageAllocator {
        PageAllocator::new(pages, page_size).unwrap()
    }

    #[test]
    fn bad_pools_are_refused() {
        assert!(PageAllocator::new(0, 16).is_err());
        assert!(PageAllocator::new(16, 0).is_err());
        assert!(PageAllocator::new(usize::MAX, 2).is_err());
        assert!(PageAllocator::new(1 << 27, 16).is_err());
        assert!(PageAllocator::new((1 << 27) - 1, 16).is_ok());
    }

    #[test]
    fn slots_fill_pages_in_order_and_pages_come_from_the_front() {
        let mut a = pool(4, 4);
        let (x, y) = (a.add_request(), a.add_request());
        let slots = a.reserve(&[(x, 5), (y, 2)]).unwrap();
        // x: page 0 then page 1; y: page 2.
        assert_eq!(slots, vec![0, 1, 2, 3, 4, 8, 9]);
        assert_eq!(a.pages(x).unwrap(), &[0, 1]);
        assert_eq!(a.pages(y).unwrap(), &[2]);
        assert_eq!((a.len(x).unwrap(), a.len(y).unwrap()), (5, 2));
        // A partly filled page is filled before a new one is taken.
        assert_eq!(a.reserve(&[(x, 3), (y, 1)]).unwrap(), vec![5, 6, 7, 10]);
        assert_eq!(a.free_pages(), 1);
    }

    #[test]
    fn out_of_pages_is_all_or_nothing() {
        let mut a = pool(3, 2);
        let (x, y) = (a.add_request(), a.add_request());
        a.reserve(&[(x, 3)]).unwrap();
        let before = (
            a.pages(x).unwrap().to_vec(),
            a.len(x).unwrap(),
            a.free_pages(),
        );
        // x fits in its half-full page and one more; y needs two more pages: 3 > 1 free.
        let err = a.reserve(&[(x, 3), (y, 3)]).unwrap_err();
        assert!(
            matches!(
                err,
                Error::OutOfPages {
                    needed: 3,
                    free: 1,
                    total: 3
                }
            ),
            "{err}"
        );
        let after = (
            a.pages(x).unwrap().to_vec(),
            a.len(x).unwrap(),
            a.free_pages(),
        );
        assert_eq!(before, after);
        assert_eq!(a.len(y).unwrap(), 0);
        // What does fit still fits afterwards.
        assert_eq!(a.reserve(&[(x, 3)]).unwrap(), vec![3, 4, 5]);
    }

    #[test]
    fn a_request_twice_in_one_append_is_refused_and_changes_nothing() {
        let mut a = pool(8, 4);
        let (x, y) = (a.add_request(), a.add_request());
        let err = a.reserve(&[(x, 1), (y, 1), (x, 1)]).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        assert_eq!(
            (a.len(x).unwrap(), a.len(y).unwrap(), a.free_pages()),
            (0, 0, 8)
        );
    }

    #[test]
    fn unknown_and_removed_requests_are_errors() {
        let mut a = pool(2, 4);
        let x = a.add_request();
        assert!(matches!(
            a.reserve(&[(x, 1), (RequestId(7), 1)]),
            Err(Error::UnknownRequest(7))
        ));
        assert_eq!(a.free_pages(), 2);
        a.remove_request(x).unwrap();
        assert!(matches!(a.remove_request(x), Err(Error::UnknownRequest(0))));
        assert!(matches!(
            a.reserve(&[(x, 1)]),
            Err(Error::UnknownRequest(0))
        ));
        assert!(a.host_page_table(&[x]).is_err());
    }

    #[test]
    fn token_counts_that_overflow_are_refused() {
        let mut a = pool(4, 4);
        let x = a.add_request();
        a.reserve(&[(x, 1)]).unwrap();
        for count in [usize::MAX, usize::MAX - 1, crate::host::MAX_REQUEST_TOKENS] {
            assert!(a.reserve(&[(x, count)]).is_err(), "{count}");
        }
        assert_eq!((a.len(x).unwrap(), a.free_pages()), (1, 3));
    }

    #[test]
    fn freed_pages_are_reused_first_request_page_first() {
        let mut a = pool(6, 2);
        let (x, y, z) = (a.add_request(), a.add_request(), a.add_request());
        a.reserve(&[(x, 4), (y, 2)]).unwrap(); // x: 0, 1; y: 2
        a.remove_request(x).unwrap();
        assert_eq!(a.free_pages(), 5);
        // z takes x's first page, then its second, then the untouched ones.
        let slots = a.reserve(&[(z, 6)]).unwrap();
        assert_eq!(a.pages(z).unwrap(), &[0, 1, 3]);
        assert_eq!(slots, vec![0, 1, 2, 3, 6, 7]);
        // Pages freed last come back first: remove y, then z; a new request gets z's pages.
        a.remove_request(y).unwrap();
        a.remove_request(z).unwrap();
        let w = a.add_request();
        a.reserve(&[(w, 8)]).unwrap();
        assert_eq!(a.pages(w).unwrap(), &[0, 1, 3, 2]);
    }

    #[test]
    fn page_tables_of_reused_pages_address_every_token_once() {
        // Round-robin appends (a prefill, then one token at a time), a removal, and a new
        // request over the freed pages: the table is not the identity, and every slot it
        // yields is where reserve put the token.
        let mut a = pool(16, 4);
        let ids: Vec<RequestId> = (0..3).map(|_| a.add_request()).collect();
        let mut placed: Vec<Vec<i32>> = vec![Vec::new(); 4];
        for (i, &id) in ids.iter().enumerate() {
            placed[i].extend(a.reserve(&[(id, 3 + 2 * i)]).unwrap());
        }
        for _ in 0..5 {
            let step: Vec<(RequestId, usize)> = ids.iter().map(|&id| (id, 1)).collect();
            let slots = a.reserve(&step).unwrap();
            for (i, s) in slots.into_iter().enumerate() {
                placed[i].push(s);
            }
        }
        a.remove_request(ids[1]).unwrap();
        placed[1].clear();
        let late = a.add_request();
        placed[3].extend(a.reserve(&[(late, 9)]).unwrap());
        let live = [ids[0], ids[2], late];
        let table = a.host_page_table(&live).unwrap();
        assert_ne!(
            table.kv_indices(),
            (0..table.kv_indices().len() as i32)
                .collect::<Vec<_>>()
                .as_slice()
        );
        let mut seen = std::collections::HashSet::new();
        for (b, want) in [&placed[0], &placed[2], &placed[3]].iter().enumerate() {
            assert_eq!(table.len_of(b), want.len());
            for (t, &slot) in want.iter().enumerate() {
                assert_eq!(table.slot(b, t), slot as usize, "request {b} token {t}");
                assert!(seen.insert(slot), "slot {slot} given twice");
            }
        }
    }
}
