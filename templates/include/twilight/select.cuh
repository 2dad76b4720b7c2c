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
  // Once the bucket holding the k-th key has at most FEW items, the descent stops: the block
  // gathers them and one warp sorts them, which names the k-th key (and how many of its equals
  // to take) as the remaining passes would, for their barriers.
  static constexpr int FEW = 32;
  struct storage {
    typename radix::storage radix_smem;
    int scan_scratch[WARPS];
    unsigned long long few[FEW];  // (key, ~position) of the gathered items
    unsigned gathered;
    unsigned kth_key;
    int kth_remaining;
  };

  // One item into the radix histogram when `flag` holds; call from all 32 lanes of a warp.
  TW_DEVICE static void tally(storage& smem, bool flag, unsigned bucket) {
    if (TOKEN_ROWS) {
      radix::count_if(smem.radix_smem, flag, bucket);
    } else if (flag) {
      radix::add(smem.radix_smem, bucket, 1);
    }
  }

  // The end of the descent once the chosen bucket (keys matching `prefix` under `mask`) holds
  // at most FEW items, `remaining` of which are to be taken: gathers them, and one warp sorts
  // them by key, largest first, ties by position, lowest first. The remaining-th of that order
  // is the k-th key; the final pass takes every larger key and, in position order, as many of
  // its equals as that order does. Sets smem.kth_key and smem.kth_remaining. Call from every
  // thread.
  TW_DEVICE static void finish_few(const float* __restrict__ row, int others, bool cached, int rounds,
                                   const unsigned (&keys)[CACHED], unsigned prefix, unsigned mask, int remaining,
                                   storage& smem) {
    const auto gather = [&](unsigned key, int i) {
      const unsigned at = atomicAdd(&smem.gathered, 1u);
      smem.few[at] = (static_cast<unsigned long long>(key) << 32) | static_cast<unsigned>(~i);
    };
    if (cached) {
#pragma unroll
      for (int j = 0; j < CACHED; ++j) {
        const int i = j * THREADS + int(threadIdx.x);
        if (j < rounds && i < others && (keys[j] & mask) == prefix) gather(keys[j], i);
      }
    } else {
      for (int i = threadIdx.x; i < others; i += THREADS) {
        const unsigned key = tw_ordered_bits(row[i]);
        if ((key & mask) == prefix) gather(key, i);
      }
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      const unsigned lane = threadIdx.x;
      const unsigned n = smem.gathered;
      unsigned long long item = lane < n ? smem.few[lane] : 0ull;
      // Bitonic sort over the warp, descending: key first, then ~position (lower first).
#pragma unroll
      for (unsigned size = 2; size <= 32; size *= 2) {
#pragma unroll
        for (unsigned stride = size / 2; stride > 0; stride /= 2) {
          const unsigned long long other = __shfl_xor_sync(0xffffffffu, item, stride);
          const bool lower = (lane & stride) == 0;
          const bool descending = (lane & size) == 0;
          const unsigned long long larger = item > other ? item : other;
          const unsigned long long smaller = item > other ? other : item;
          item = (lower == descending) ? larger : smaller;
        }
      }
      // remaining >= 1 items of this bucket are to be taken, and it holds at least that many.
      const unsigned kth = static_cast<unsigned>(__shfl_sync(0xffffffffu, item, remaining - 1) >> 32);
      const unsigned larger = __ballot_sync(0xffffffffu, lane < n && static_cast<unsigned>(item >> 32) > kth);
      if (lane == 0) {
        smem.kth_key = kth;
        smem.kth_remaining = remaining - __popc(larger);
      }
    }
    __syncthreads();
  }

  // Call from every thread of the block. With items <= budget every item is chosen; otherwise
  // the budget - 1 best of the first items - 1 (scored in `row`) and the last item. Writes the
  // chosen positions ascending to out and their count to *count; with `ids`, also each chosen
  // item's id (ids[position]) to out_ids at the same index.
  TW_DEVICE static void run(const float* __restrict__ row, int items, int budget, int* __restrict__ out,
                            int* __restrict__ count, storage& smem, const int* __restrict__ ids = nullptr,
                            int* __restrict__ out_ids = nullptr) {
    const auto emit = [&](int at, int position) {
      out[at] = position;
      if (ids) out_ids[at] = ids[position];
    };
    if (items <= budget) {
      for (int i = threadIdx.x; i < items; i += THREADS) emit(i, i);
      if (threadIdx.x == 0) *count = items;
      return;
    }
    const int others = items - 1;
    const int k = budget - 1;  // best items to take besides the last one
    unsigned prefix = 0, mask = 0;
    if (threadIdx.x == 0) smem.gathered = 0u;  // ordered before any gather by the passes' barriers
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
        const bool few = shift > 0 && smem.radix_smem.total[smem.radix_smem.digit] <= FEW;
        __syncthreads();
        if (few) {
          finish_few(row, others, cached, rounds, keys, prefix, mask, remaining, smem);
          prefix = smem.kth_key;
          remaining = smem.kth_remaining;
          break;
        }
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
        if ((take >> j) & 1u) emit(at++, mine + j);
      }
      written += taken;
      equal_seen += equal_total;
    }
    if (threadIdx.x == 0) {
      emit(written, others);  // the last item, always
      *count = written + 1;
    }
  }
};
