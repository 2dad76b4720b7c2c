// Addressing of a FlashInfer-compatible paged KV cache. A request's token t lives on page
// kv_indices[kv_indptr[b] + t / PAGE_SIZE] at slot t % PAGE_SIZE; the request holds
// (pages - 1) * PAGE_SIZE + last_page_len tokens.

template <bool HND, int PAGE_SIZE, int HEAD_DIM>
struct tw_paged_layout {
  // Element offset of (page, kv_head, slot, channel 0).
  TW_DEVICE static tw_i64 offset(int page, int kv_head, int slot, int num_kv_heads) {
    if (HND) {
      return ((tw_i64(page) * num_kv_heads + kv_head) * PAGE_SIZE + slot) * HEAD_DIM;
    } else {
      return ((tw_i64(page) * PAGE_SIZE + slot) * num_kv_heads + kv_head) * HEAD_DIM;
    }
  }
};

TW_DEVICE int tw_request_len(const int* kv_indptr, const int* kv_last_page_len, int request, int page_size) {
  const int pages = kv_indptr[request + 1] - kv_indptr[request];
  return pages == 0 ? 0 : (pages - 1) * page_size + kv_last_page_len[request];
}
