// The exact top-k choice shared by the page selector (Quest) and the token selector (Double
// Sparsity): among `others` scored items, the k best (ties: lower position first), found by a
// radix select on the scores' order-preserving bit patterns, plus item `others` (the request's
// last page or newest token), which is always chosen and needs no score.

// A float's bits reordered so that unsigned comparison matches float comparison.
TW_DEVICE unsigned tw_ordered_bits(float f) {
  const unsigned u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <int THREADS>
struct tw_top_k {
  static constexpr int WARPS = THREADS / 32;
  typedef tw_radix<int, THREADS> radix;
  struct storage {
    typename radix::storage radix_smem;
    int scan_scratch[WARPS];
  };

  // Call from every thread of the block. With items <= budget every item is chosen; otherwise
  // the budget - 1 best of the first items - 1 (scored in `row`) and the last item. Writes the
  // chosen positions ascending to out and their count to *count.
  TW_DEVICE static void run(const float* __restrict__ row, int items, int budget, int* __restrict__ out,
                            int* __restrict__ count, storage& smem) {
    if (items <= budget) {
      for (int i = threadIdx.x; i < items; i += THREADS) out[i] = i;
      if (threadIdx.x == 0) *count = items;
      return;
    }
    const int others = items - 1;
    const int k = budget - 1;  // best items to take besides the last one
    unsigned prefix = 0, mask = 0;
    int remaining = k;  // how many of the items matching `prefix` are still to be taken
    if (k > 0) {
      for (int shift = 24; shift >= 0; shift -= 8) {
        radix::clear(smem.radix_smem);
        __syncthreads();
        for (int i = threadIdx.x; i < others; i += THREADS) {
          const unsigned key = tw_ordered_bits(row[i]);
          if ((key & mask) == prefix) radix::add(smem.radix_smem, (key >> shift) & 255u, 1);
        }
        radix::pick(smem.radix_smem, 0, remaining);
        prefix |= smem.radix_smem.digit << shift;
        remaining -= smem.radix_smem.above;
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
      const int equal_rank = equal_seen + tw_block_exclusive_count<THREADS>(equal, smem.scan_scratch, equal_total);
      const bool take = larger || (equal && equal_rank < remaining);
      int taken = 0;
      const int at = written + tw_block_exclusive_count<THREADS>(take, smem.scan_scratch, taken);
      if (take) out[at] = i;
      written += taken;
      equal_seen += equal_total;
    }
    if (threadIdx.x == 0) {
      out[written] = others;  // the last item, always
      *count = written + 1;
    }
  }
};
