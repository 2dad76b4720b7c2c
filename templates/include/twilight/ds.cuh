// Double Sparsity selection. Each token of a request except its newest gets the score
// sum_h sum_i q[h, c_i] * label[t, i] over the group's query heads h and the KV head's R
// calibrated channels c; a label is the key's values at those channels, written by the append.
// The selector keeps the newest token and the budget - 1 best others (twilight/select.cuh).

template <typename T, int HEAD_DIM, int PAGE_SIZE, int GROUP, int R, bool HND>
struct tw_double_sparse {
  static constexpr int LANES = R / 8;  // lanes sharing a token's label row, 16 bytes each
  static_assert(R % 8 == 0 && LANES <= 32 && (LANES & (LANES - 1)) == 0, "R must be 8 * a power of two <= 256");
  typedef tw_paged_layout<HND, PAGE_SIZE, R> label_layout;

  // Grid (ceil(max_tokens / BLOCK_TOKENS), kv heads, batch). LANES lanes read one token's
  // label row with one 16-byte load each, so a warp's loads cover whole rows; the group's
  // query heads are summed at the R channels once per block, before any token.
  template <int THREADS, int BLOCK_TOKENS>
  TW_DEVICE static void score(const T* __restrict__ q, const T* __restrict__ k_label,
                              const int* __restrict__ ds_channels, const int* __restrict__ kv_indptr,
                              const int* __restrict__ kv_indices, const int* __restrict__ kv_last_page_len,
                              float* __restrict__ scores, int num_kv_heads, int max_tokens, int budget) {
    constexpr int TOKENS = THREADS / LANES;  // tokens per pass of the block
    __shared__ __align__(16) float q_label[R];
    const int kv_head = tw_grid_head();
    const int request = tw_grid_request();
    const int len = tw_request_len(kv_indptr, kv_last_page_len, request, PAGE_SIZE);
    const int others = len - 1;  // the newest token needs no score
    const int begin = tw_grid_part() * BLOCK_TOKENS;
    // A request within the budget selects every token without looking at scores.
    if (len <= budget || begin >= others) return;
    if (threadIdx.x < R) {
      const int channel = ds_channels[kv_head * R + threadIdx.x];
      const T* q_group = q + (tw_i64(request) * num_kv_heads + kv_head) * GROUP * HEAD_DIM;
      float s = 0.f;
#pragma unroll
      for (int g = 0; g < GROUP; ++g) s += tw_to_float(q_group[g * HEAD_DIM + channel]);
      q_label[threadIdx.x] = s;
    }
    __syncthreads();
    const int sub = threadIdx.x % LANES;
    float qv[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) qv[j] = q_label[sub * 8 + j];
    const int* pages = kv_indices + kv_indptr[request];
    float* row = scores + (tw_i64(request) * num_kv_heads + kv_head) * max_tokens;
    const int end = min(others, begin + BLOCK_TOKENS);
    // Every lane runs every pass (the shuffles need whole warps); lanes past the end load nothing.
    for (int base = begin; base < end; base += TOKENS) {
      const int t = base + int(threadIdx.x) / LANES;
      float partial = 0.f;
      if (t < end) {
        tw_vec8<T> packet;
        packet.load_stream(k_label + label_layout::offset(pages[t / PAGE_SIZE], kv_head, t % PAGE_SIZE, num_kv_heads) +
                           sub * 8);
        float x[8];
        packet.to_float(x);
#pragma unroll
        for (int j = 0; j < 8; ++j) partial = fmaf(qv[j], x[j], partial);
      }
      const float total = tw_group_sum<LANES>(partial);
      if (t < end && sub == 0) row[t] = total;
    }
  }

  // Grid (cluster size, kv heads, requests), a cluster per row: the chosen token positions,
  // ascending, in rows of `stride`, and their count (at most budget).
  template <int THREADS, int KEYS>
  TW_DEVICE static void select(const float* __restrict__ scores, const int* __restrict__ kv_indptr,
                               const int* __restrict__ kv_last_page_len, int* __restrict__ selected,
                               int* __restrict__ selected_count, int num_kv_heads, int max_tokens, int budget,
                               int stride) {
    __shared__ typename tw_top_k<THREADS, true, KEYS>::storage smem;
    const int head_row = tw_grid_row();
    const int len = tw_request_len(kv_indptr, kv_last_page_len, tw_grid_request(), PAGE_SIZE);
    tw_top_k<THREADS, true, KEYS>::run(scores + tw_i64(head_row) * max_tokens, len, budget,
                                       selected + tw_i64(head_row) * stride, selected_count + head_row, smem);
  }
};
