// The exact top-k choice shared by the page selector (Quest) and the token selector (Double
// Sparsity): among `others` scored items, the k best (ties: lower position first), found by a
// radix select on the scores' order-preserving bit patterns, plus item `others` (the request's
// last page or newest token), which is always chosen and needs no score.

// A float's bits reordered so that unsigned comparison matches float comparison.
TW_DEVICE unsigned tw_ordered_bits(float f) {
  const unsigned u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// TOKEN_ROWS tunes the passes for rows of token scores (Double Sparsity: tens of thousands of
// items, crowded into few radix buckets): keys stay in registers between passes and a warp's
// lanes that share a bucket count it with one atomic. Measured on the H200 (bench/PERF-NOTES.md),
// both helped the token rows (89.8 -> 59.0 us) and slowed the page rows of Quest (13.6 ->
// 18.2 us), whose scores spread over many buckets, so page rows count with plain atomics.
template <int THREADS, bool TOKEN_ROWS>
struct tw_top_k {
  static constexpr int WARPS = THREADS / 32;
  static constexpr int CACHED = TOKEN_ROWS ? 64 : 1;  // keys per thread kept in registers
  static constexpr int BATCH = 8;    // keys per thread in flight otherwise
  typedef tw_radix<int, THREADS> radix;
  struct storage {
    typename radix::storage radix_smem;
    int scan_scratch[WARPS];
  };

  // One item into the radix histogram when `flag` holds; call from all 32 lanes of a warp.
  TW_DEVICE static void tally(storage& smem, bool flag, unsigned bucket) {
    if (TOKEN_ROWS) {
      radix::count_if(smem.radix_smem, flag, bucket);
    } else if (flag) {
      radix::add(smem.radix_smem, bucket, 1);
    }
  }

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
    // Rows of up to THREADS * CACHED items keep their keys in registers, loaded once with every
    // load in flight: a pass that loads as it counts waits out one load latency per item.
    const int rounds = (others + THREADS - 1) / THREADS;
    const bool cached = TOKEN_ROWS && rounds <= CACHED;
    unsigned keys[CACHED];
    if (cached) {
#pragma unroll
      for (int j = 0; j < CACHED; ++j) {
        const int i = j * THREADS + int(threadIdx.x);
        keys[j] = j < rounds && i < others ? tw_ordered_bits(row[i]) : 0u;
      }
    }
    if (k > 0) {
      for (int shift = 24; shift >= 0; shift -= 8) {
        radix::clear(smem.radix_smem);
        __syncthreads();
        // Whole warps run every iteration (count_if's shuffle needs them): the bounds are the
        // block's, not the thread's.
        if (cached) {
#pragma unroll
          for (int j = 0; j < CACHED; ++j) {
            const int i = j * THREADS + int(threadIdx.x);
            if (j < rounds) {
              tally(smem, i < others && (keys[j] & mask) == prefix, (keys[j] >> shift) & 255u);
            }
          }
        } else {
          for (int base = 0; base < others; base += THREADS * BATCH) {
            unsigned batch[BATCH];
#pragma unroll
            for (int j = 0; j < BATCH; ++j) {
              const int i = base + j * THREADS + int(threadIdx.x);
              batch[j] = i < others ? tw_ordered_bits(row[i]) : 0u;
            }
#pragma unroll
            for (int j = 0; j < BATCH; ++j) {
              const int i = base + j * THREADS + int(threadIdx.x);
              tally(smem, i < others && (batch[j] & mask) == prefix, (batch[j] >> shift) & 255u);
            }
          }
        }
        radix::pick(smem.radix_smem, 0, remaining);
        prefix |= smem.radix_smem.digit << shift;
        remaining -= smem.radix_smem.above;
        mask |= 255u << shift;
        __syncthreads();
      }
    }
    // prefix is now the k-th largest key; take every larger key and the first `remaining`
    // equal ones in position order, writing positions ascending. Each thread owns ITEMS
    // consecutive positions, so one pair of block scans serves THREADS * ITEMS positions.
    constexpr int ITEMS = 8;
    int written = 0, equal_seen = 0;
    for (int base = 0; base < others; base += THREADS * ITEMS) {
      const int mine = base + int(threadIdx.x) * ITEMS;
      unsigned larger = 0, equal = 0;  // bit j: position mine + j
#pragma unroll
      for (int j = 0; j < ITEMS; ++j) {
        const int i = mine + j;
        if (k > 0 && i < others) {
          const unsigned key = tw_ordered_bits(row[i]);
          larger |= unsigned(key > prefix) << j;
          equal |= unsigned(key == prefix) << j;
        }
      }
      int equal_total = 0;
      int equal_rank = equal_seen + tw_block_exclusive_sum<THREADS>(__popc(equal), smem.scan_scratch, equal_total);
      unsigned take = larger;
#pragma unroll
      for (int j = 0; j < ITEMS; ++j) {
        if ((equal >> j) & 1u) {
          if (equal_rank < remaining) take |= 1u << j;
          ++equal_rank;
        }
      }
      int taken = 0;
      int at = written + tw_block_exclusive_sum<THREADS>(__popc(take), smem.scan_scratch, taken);
#pragma unroll
      for (int j = 0; j < ITEMS; ++j) {
        if ((take >> j) & 1u) out[at++] = mine + j;
      }
      written += taken;
      equal_seen += equal_total;
    }
    if (threadIdx.x == 0) {
      out[written] = others;  // the last item, always
      *count = written + 1;
    }
  }
};
