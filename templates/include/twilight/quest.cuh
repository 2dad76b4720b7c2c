// Quest selection. Each page except a request's last gets an upper bound of q.k over its
// tokens, summed over the group's query heads: sum_h sum_d max(q[h,d] * max[d], q[h,d] * min[d]).
// The selector keeps the last page and the budget - 1 best others (twilight/select.cuh).

template <typename T, int HEAD_DIM, int PAGE_SIZE, int GROUP, int THREADS>
struct tw_quest {
  static constexpr int PER_LANE = HEAD_DIM / 32;
  static constexpr int WARPS = THREADS / 32;

  // Grid (page blocks, kv heads, requests); one warp scores one page at a time.
  TW_DEVICE static void score(const T* __restrict__ q, const T* __restrict__ page_max, const T* __restrict__ page_min,
                              const int* __restrict__ kv_indptr, const int* __restrict__ kv_indices,
                              float* __restrict__ scores, int num_kv_heads, int max_pages) {
    const int kv_head = tw_grid_head();
    const int request = tw_grid_request();
    const int lane = threadIdx.x % 32;
    const int first_page = kv_indptr[request];
    const int others = kv_indptr[request + 1] - first_page - 1;  // the last page needs no score
    const int num_qo_heads = num_kv_heads * GROUP;
    // max(q * mx, q * mn) is q * mx for q > 0 and q * mn otherwise (mx >= mn), so the sum over
    // the group is mx * (sum of its positive q) + mn * (sum of its negative q): two FMAs per
    // channel for any group size.
    float q_pos[PER_LANE], q_neg[PER_LANE];
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) q_pos[j] = q_neg[j] = 0.f;
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      float qf[PER_LANE];
      tw_load_floats<T, PER_LANE>(q + (tw_i64(request) * num_qo_heads + kv_head * GROUP + g) * HEAD_DIM + lane * PER_LANE,
                                  qf);
#pragma unroll
      for (int j = 0; j < PER_LANE; ++j) {
        q_pos[j] += fmaxf(qf[j], 0.f);
        q_neg[j] += fminf(qf[j], 0.f);
      }
    }
    // Each warp has BATCH pages' bounds in flight before it reduces any: one page's 2 x 16
    // bytes per lane are too little to cover the memory latency.
    constexpr int BATCH = HEAD_DIM >= 256 ? 2 : 4;
    const int stride = gridDim.x * WARPS;
    float* row_scores = scores + (tw_i64(request) * num_kv_heads + kv_head) * max_pages;
    for (int first = tw_grid_part() * WARPS + threadIdx.x / 32; first < others; first += stride * BATCH) {
      float mx_f[BATCH][PER_LANE], mn_f[BATCH][PER_LANE];
#pragma unroll
      for (int b = 0; b < BATCH; ++b) {
        const int pos = first + b * stride;
        // PER_LANE consecutive channels per lane: one 4-, 8- or 16-byte load each of max and min.
        const tw_i64 meta =
            (tw_i64(kv_indices[first_page + min(pos, others - 1)]) * num_kv_heads + kv_head) * HEAD_DIM +
            lane * PER_LANE;
        tw_load_floats<T, PER_LANE>(page_max + meta, mx_f[b]);
        tw_load_floats<T, PER_LANE>(page_min + meta, mn_f[b]);
      }
#pragma unroll
      for (int b = 0; b < BATCH; ++b) {
        float partial = 0.f;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) partial = fmaf(q_pos[j], mx_f[b][j], fmaf(q_neg[j], mn_f[b][j], partial));
        const float total = tw_group_sum<32>(partial);
        const int pos = first + b * stride;
        if (lane == 0 && pos < others) row_scores[pos] = total;
      }
    }
  }

  // Grid (1, kv heads, requests): writes the selected page positions, ascending, their count
  // (at most budget_pages) and the selected pages' ids in the pool, with blocks of
  // SELECT_THREADS holding KEYS page scores per thread in registers (tw_top_k).
  template <int SELECT_THREADS, int KEYS>
  TW_DEVICE static void select(const float* __restrict__ scores, const int* __restrict__ kv_indptr,
                               const int* __restrict__ kv_indices, int* __restrict__ selected,
                               int* __restrict__ selected_count, int* __restrict__ selected_pages, int num_kv_heads,
                               int max_pages, int budget_pages) {
    __shared__ typename tw_top_k<SELECT_THREADS, false, KEYS>::storage smem;
    const int head_row = tw_grid_row();
    const int first_page = kv_indptr[tw_grid_request()];
    const int pages = kv_indptr[tw_grid_request() + 1] - first_page;
    const tw_i64 out_row = tw_i64(head_row) * budget_pages;
    tw_top_k<SELECT_THREADS, false, KEYS>::run(scores + tw_i64(head_row) * max_pages, pages, budget_pages,
                                               selected + out_row, selected_count + head_row, smem,
                                               kv_indices + first_page, selected_pages + out_row);
  }
};
