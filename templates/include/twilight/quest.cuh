// Quest selection. Each page except a request's last gets an upper bound of q.k over its
// tokens, summed over the group's query heads: sum_h sum_d max(q[h,d] * max[d], q[h,d] * min[d]).
// The selector keeps the last page and the budget - 1 best others (ties: lower position first),
// found exactly by a radix select on the scores' order-preserving bit patterns.

// A float's bits reordered so that unsigned comparison matches float comparison.
TW_DEVICE unsigned tw_ordered_bits(float f) {
  const unsigned u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <typename T, int HEAD_DIM, int PAGE_SIZE, int GROUP, int THREADS>
struct tw_quest {
  static constexpr int PER_LANE = HEAD_DIM / 32;
  static constexpr int WARPS = THREADS / 32;

  // Grid (page blocks, kv heads, batch); one warp scores one page at a time.
  TW_DEVICE static void score(const T* __restrict__ q, const T* __restrict__ page_max, const T* __restrict__ page_min,
                              const int* __restrict__ kv_indptr, const int* __restrict__ kv_indices,
                              float* __restrict__ scores, int num_kv_heads, int max_pages) {
    const int kv_head = blockIdx.y;
    const int request = blockIdx.z;
    const int lane = threadIdx.x % 32;
    const int first_page = kv_indptr[request];
    const int others = kv_indptr[request + 1] - first_page - 1;  // the last page needs no score
    const int num_qo_heads = num_kv_heads * GROUP;
    float qf[GROUP][PER_LANE];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
#pragma unroll
      for (int j = 0; j < PER_LANE; ++j) {
        qf[g][j] = tw_to_float(q[(tw_i64(request) * num_qo_heads + kv_head * GROUP + g) * HEAD_DIM + lane * PER_LANE + j]);
      }
    }
    for (int pos = blockIdx.x * WARPS + threadIdx.x / 32; pos < others; pos += gridDim.x * WARPS) {
      const tw_i64 meta = (tw_i64(kv_indices[first_page + pos]) * num_kv_heads + kv_head) * HEAD_DIM + lane * PER_LANE;
      // PER_LANE consecutive channels per lane: one 4-, 8- or 16-byte load each of max and min.
      float mx_f[PER_LANE], mn_f[PER_LANE];
      tw_load_floats<T, PER_LANE>(page_max + meta, mx_f);
      tw_load_floats<T, PER_LANE>(page_min + meta, mn_f);
      float partial = 0.f;
#pragma unroll
      for (int j = 0; j < PER_LANE; ++j) {
        const float mx = mx_f[j];
        const float mn = mn_f[j];
#pragma unroll
        for (int g = 0; g < GROUP; ++g) partial += fmaxf(qf[g][j] * mx, qf[g][j] * mn);
      }
      const float total = tw_group_sum<32>(partial);
      if (lane == 0) scores[(tw_i64(request) * num_kv_heads + kv_head) * max_pages + pos] = total;
    }
  }

  // One block per (request, kv head): writes the selected page positions, ascending, and their
  // count (at most budget_pages).
  TW_DEVICE static void select(const float* __restrict__ scores, const int* __restrict__ kv_indptr,
                               int* __restrict__ selected, int* __restrict__ selected_count, int num_kv_heads,
                               int max_pages, int budget_pages) {
    typedef tw_radix<int, THREADS> radix;
    __shared__ typename radix::storage radix_smem;
    __shared__ int scan_scratch[WARPS];
    const int kv_head = blockIdx.x;
    const int request = blockIdx.y;
    const int head_row = request * num_kv_heads + kv_head;
    const int pages = kv_indptr[request + 1] - kv_indptr[request];
    int* out = selected + tw_i64(head_row) * budget_pages;
    if (pages <= budget_pages) {
      for (int i = threadIdx.x; i < pages; i += THREADS) out[i] = i;
      if (threadIdx.x == 0) selected_count[head_row] = pages;
      return;
    }
    const int others = pages - 1;
    const int k = budget_pages - 1;  // best pages to take besides the last one
    const float* row = scores + tw_i64(head_row) * max_pages;
    unsigned prefix = 0, mask = 0;
    int remaining = k;  // how many of the items matching `prefix` are still to be taken
    if (k > 0) {
      for (int shift = 24; shift >= 0; shift -= 8) {
        radix::clear(radix_smem);
        __syncthreads();
        for (int i = threadIdx.x; i < others; i += THREADS) {
          const unsigned key = tw_ordered_bits(row[i]);
          if ((key & mask) == prefix) radix::add(radix_smem, (key >> shift) & 255u, 1);
        }
        radix::pick(radix_smem, 0, remaining);
        prefix |= radix_smem.digit << shift;
        remaining -= radix_smem.above;
        mask |= 255u << shift;
        __syncthreads();
      }
    }
    // prefix is now the k-th largest key; take every larger key and the first `remaining`
    // equal ones in position order, writing positions ascending.
    int written = 0, equal_seen = 0;
    for (int base = 0; base < others; base += THREADS) {
      const int i = base + threadIdx.x;
      const unsigned key = i < others ? tw_ordered_bits(row[i]) : 0u;
      const bool larger = k > 0 && i < others && key > prefix;
      const bool equal = k > 0 && i < others && key == prefix;
      int equal_total = 0;
      const int equal_rank = equal_seen + tw_block_exclusive_count<THREADS>(equal, scan_scratch, equal_total);
      const bool take = larger || (equal && equal_rank < remaining);
      int taken = 0;
      const int at = written + tw_block_exclusive_count<THREADS>(take, scan_scratch, taken);
      if (take) out[at] = i;
      written += taken;
      equal_seen += equal_total;
    }
    if (threadIdx.x == 0) {
      out[written] = others;  // the last page, always
      selected_count[head_row] = written + 1;
    }
  }
};
