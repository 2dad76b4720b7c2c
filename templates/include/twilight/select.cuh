// The exact top-k choice shared by the page selector (Quest) and the token selector (Double
// Sparsity): among `others` scored items, the k best (ties: lower position first), found by a
// radix select on the scores' order-preserving bit patterns, plus item `others` (the request's
// last page or newest token), which is always chosen and needs no score.

// A float's bits reordered so that unsigned comparison matches float comparison.
TW_DEVICE unsigned tw_ordered_bits(float f) {
  const unsigned u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Of up to 32 gathered (key, ~position) items, lane l holding item l (lanes from n on hold 0),
// the remaining-th in the order key descending, position ascending: sets kth to its key and
// kth_remaining to how many items equal to it that order takes (remaining minus the larger
// items). Call from all 32 lanes of one warp.
TW_DEVICE void tw_kth_of_few(unsigned long long item, unsigned n, int remaining, unsigned& kth,
                             int& kth_remaining) {
  const unsigned lane = threadIdx.x % 32;
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
  // remaining >= 1 items are to be taken, and there are at least that many.
  kth = static_cast<unsigned>(__shfl_sync(0xffffffffu, item, remaining - 1) >> 32);
  const unsigned larger = __ballot_sync(0xffffffffu, lane < n && static_cast<unsigned>(item >> 32) > kth);
  kth_remaining = remaining - __popc(larger);
}

// The same choice for rows of at most THREADS * CACHED scored items per CTA, with every key
// in registers, on a cluster of CTAs per row (sm_90's distributed shared memory; the launch
// sets the cluster's size, 1 to MAX_CLUSTER, and a launch without clusters is a cluster of
// one), each CTA holding a balanced share of the row. Warp w of a CTA owns its share's
// positions [w * 32 * CACHED, (w + 1) * 32 * CACHED), lane l of it those at offsets j * 32 + l,
// so loads and stores are coalesced and a short share occupies few warps. The k-th key is
// found four bits at a time from the top: each thread counts its keys per 4-bit bucket in
// packed 8-bit fields (no branches: a lane's keys differ in which bucket they hit), a warp sums
// the 16 buckets with a butterfly of 9 shuffles, and after one barrier over the cluster every
// warp reads every CTA's per-warp sums and picks the same digit; once the chosen bucket holds
// at most FEW keys they are gathered and one warp per CTA sorts them. Every CTA reads the same
// sums, so all of them take the same branches and reach the same barriers.
// Chosen positions are then written with one scan of per-warp counts over the cluster, in
// rank order, and ballots within each warp.
template <int THREADS, int CACHED, bool WITH_IDS>
struct tw_top_k_cached {
  static constexpr int WARPS = THREADS / 32;
  static constexpr int TILE = 32 * CACHED;  // positions per warp
  static constexpr int FEW = 32;
  static constexpr int MAX_CLUSTER = 8;  // the portable cluster size
  static_assert(CACHED <= 255, "a thread counts its keys per bucket in 8-bit fields");
  static_assert(TILE < 65536, "a warp's bucket sums and counts use 16-bit fields");
  struct storage {
    unsigned counts[2][WARPS][8];  // per warp: 8 words of two 16-bit bucket sums; two sets, alternating
    int warp_counts[WARPS];        // per warp: chosen larger keys, and equal ones << 16
    unsigned long long few[FEW];   // (key, ~position) of this CTA's gathered keys
    unsigned gathered;
    unsigned kth_key;
    int kth_remaining;
  };

  // Whether a row of `others` scored items is taken by this path on clusters of `cluster` CTAs.
  TW_DEVICE static bool fits(int others, unsigned cluster) { return others <= int(cluster) * THREADS * CACHED; }

  // This warp's sums of the 16 buckets, counted per thread in bytes (digits 0-7 of `low`, 8-15
  // of `high`) and widened to 16-bit fields: lane l returns word w = l / 4 summed over the
  // warp, which holds digit 4 * (w / 2) + w % 2 in its low half and that plus 2 in its high
  // half (see digit_word). Call from all 32 lanes.
  TW_DEVICE static unsigned warp_bucket_sums(unsigned long long low, unsigned long long high) {
    const unsigned lane = threadIdx.x % 32;
    unsigned w[8];  // w[2i]: even bytes of 32-bit word i, w[2i + 1]: its odd bytes
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const unsigned word = static_cast<unsigned>((i < 2 ? low : high) >> (32 * (i & 1)));
      w[2 * i] = word & 0x00ff00ffu;
      w[2 * i + 1] = (word >> 8) & 0x00ff00ffu;
    }
    // Reduce-scatter: each step halves the words a lane keeps and doubles the lanes summed.
    const bool b4 = lane & 16u, b3 = lane & 8u, b2 = lane & 4u;
    unsigned v4[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const unsigned send = b4 ? w[i] : w[i + 4];
      v4[i] = (b4 ? w[i + 4] : w[i]) + __shfl_xor_sync(0xffffffffu, send, 16);
    }
    unsigned v2[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const unsigned send = b3 ? v4[i] : v4[i + 2];
      v2[i] = (b3 ? v4[i + 2] : v4[i]) + __shfl_xor_sync(0xffffffffu, send, 8);
    }
    unsigned x = (b2 ? v2[1] : v2[0]) + __shfl_xor_sync(0xffffffffu, b2 ? v2[0] : v2[1], 4);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x;
  }

  // The word of warp_bucket_sums that holds `digit`, and (high) whether in its high half.
  TW_DEVICE static unsigned digit_word(unsigned digit, bool& high) {
    high = (digit >> 1) & 1u;
    return 2u * (digit >> 2) + (digit & 1u);
  }

  // Calls read(pointer, c) for every CTA c of the cluster with `local`'s twin in c's shared
  // memory. A cluster of one reads its own through `local` itself, which the compiler knows to
  // be shared (shared-space loads); a mapped twin is a generic pointer (generic loads, slower:
  // Quest's 8192-page rows took 0.7 us longer on one CTA through them, bench/PERF-NOTES.md
  // v24). The loads of all CTAs are unrolled and predicated, so that they are in flight together.
  template <typename V, typename Read>
  TW_DEVICE static void for_each_cta(const V* local, unsigned cluster, Read read) {
    if (cluster == 1) {
      read(local, 0);
      return;
    }
#pragma unroll
    for (int c = 0; c < MAX_CLUSTER; ++c) {
      if (c < int(cluster)) read(tw_cluster_map(local, unsigned(c)), c);
    }
  }
  // A barrier over the cluster that orders shared memory across it.
  TW_DEVICE static void sync_cluster(unsigned cluster) {
    if (cluster == 1) {
      __syncthreads();
    } else {
      tw_cluster_sync();
    }
  }

  // Writes the best k of the `others` items in `row` (1 <= k < others, fits(others, cluster)),
  // ties by position, to out[0..k) ascending, and with WITH_IDS each one's id (ids[position])
  // to out_ids at the same index; the ids are loaded with the keys, so no load waits on the
  // choice. Call from every thread of every CTA of the row's cluster.
  TW_DEVICE static void run(const float* __restrict__ row, int others, int k, const int* __restrict__ ids,
                            int* __restrict__ out, int* __restrict__ out_ids, storage& smem) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const unsigned cluster = tw_cluster_size(), rank = cluster == 1 ? 0u : tw_cluster_rank();
    const tw_share share = tw_balanced_share(others, int(rank), int(cluster));
    // Warps of the cluster's CTA c that own positions: its share is others / cluster, plus
    // one for the first others % cluster CTAs.
    const int share_size = others / int(cluster), share_extra = others % int(cluster);
    const auto active_warps_of = [&](int c) { return (share_size + (c < share_extra) + TILE - 1) / TILE; };
    const int base = share.begin + warp * TILE + lane;
    const bool active = warp < active_warps_of(int(rank));
    // Every load is issued before any is used: a load behind a branch on its position, with
    // its conversion in the same branch, waits out its latency before the next one issues.
    // Positions past the share load its last item, which the counts never take.
    unsigned keys[CACHED];
    int item_ids[WITH_IDS ? CACHED : 1];
#pragma unroll
    for (int j = 0; j < CACHED; ++j) {
      const int i = max(min(base + j * 32, share.end - 1), 0);
      keys[j] = __float_as_uint(row[i]);
      if (WITH_IDS) item_ids[j] = ids[i];
    }
#pragma unroll
    for (int j = 0; j < CACHED; ++j) keys[j] = tw_ordered_bits(__uint_as_float(keys[j]));
    const auto mine = [&](int j) { return base + j * 32 < share.end; };
    if (threadIdx.x == 0) smem.gathered = 0u;  // ordered before any gather by the digits' barriers
    unsigned prefix = 0, mask = 0;
    int remaining = k;  // how many of the keys matching `prefix` under `mask` are still to be taken
    bool all_of_bucket = false;
#pragma unroll 1
    for (int shift = 28, parity = 0; shift >= 0; shift -= 4, parity ^= 1) {
      if (active) {
        unsigned long long low = 0, high = 0;  // one byte per digit: 0-7, 8-15
#pragma unroll
        for (int j = 0; j < CACHED; ++j) {
          const unsigned digit = (keys[j] >> shift) & 15u;
          const bool counted = mine(j) && (keys[j] & mask) == prefix;
          const unsigned long long one = static_cast<unsigned long long>(counted) << ((digit & 7u) * 8u);
          const bool upper = digit & 8u;
          high += upper ? one : 0ull;
          low += upper ? 0ull : one;
        }
        const unsigned sums = warp_bucket_sums(low, high);
        if (lane % 4 == 0) smem.counts[parity][warp][lane / 4] = sums;
      }
      // One barrier per digit: the next digit writes the other set, and the one after writes
      // this set again only past the next digit's barrier, which every reader of this set (in
      // any CTA of the cluster) reaches after reading it.
      sync_cluster(cluster);
      // Lanes l, l ^ 8, l ^ 16 and l ^ 24 sum word l % 8 over a quarter of each CTA's warps,
      // its two 16-bit halves apart: a cluster's row may hold more than 65535 keys.
      // Every load is predicated in unrolled loops, so that they are in flight together.
      unsigned word_low = 0, word_high = 0;
      for_each_cta(&smem.counts[parity][0][lane % 8], cluster, [&](const unsigned* counts, int c) {
        const int warps = active_warps_of(c);
#pragma unroll
        for (int w = lane / 8, i = 0; i < (WARPS + 3) / 4; ++i, w += 4) {
          if (w < warps) {
            const unsigned word = counts[w * 8];
            word_low += word & 0xffffu;
            word_high += word >> 16;
          }
        }
      });
      word_low += __shfl_xor_sync(0xffffffffu, word_low, 8);
      word_low += __shfl_xor_sync(0xffffffffu, word_low, 16);
      word_high += __shfl_xor_sync(0xffffffffu, word_high, 8);
      word_high += __shfl_xor_sync(0xffffffffu, word_high, 16);
      // Lane d < 16: digit d's total, then the keys of the prefix in digits d..15.
      bool high_half;
      const unsigned holder = digit_word(lane % 16, high_half);
      const unsigned holder_low = __shfl_sync(0xffffffffu, word_low, holder);
      const unsigned holder_high = __shfl_sync(0xffffffffu, word_high, holder);
      const unsigned total = lane < 16 ? (high_half ? holder_high : holder_low) : 0u;
      unsigned at_or_above = total;
#pragma unroll
      for (int offset = 1; offset < 16; offset *= 2) {
        const unsigned y = __shfl_down_sync(0xffffffffu, at_or_above, offset);
        if (lane + offset < 16) at_or_above += y;
      }
      const unsigned above = at_or_above - total;
      const unsigned want = unsigned(remaining);
      const unsigned hit = __ballot_sync(0xffffffffu, lane < 16 && above < want && want <= at_or_above);
      const int digit = __ffs(hit) - 1;
      const unsigned digit_above = __shfl_sync(0xffffffffu, above, digit);
      const unsigned digit_total = __shfl_sync(0xffffffffu, total, digit);
      prefix |= unsigned(digit) << shift;
      mask |= 15u << shift;
      remaining -= int(digit_above);
      if (unsigned(remaining) == digit_total) {
        // Every key of the chosen bucket is taken: the lower digits no longer matter.
        all_of_bucket = true;
        break;
      }
      if (shift > 0 && digit_total <= FEW) {
        // Few keys left in the bucket (over the cluster): each CTA gathers its own, and one
        // warp per CTA reads all of them, in rank order, and names the k-th.
#pragma unroll
        for (int j = 0; j < CACHED; ++j) {
          if (mine(j) && (keys[j] & mask) == prefix) {
            const unsigned slot = atomicAdd(&smem.gathered, 1u);
            smem.few[slot] = (static_cast<unsigned long long>(keys[j]) << 32) | static_cast<unsigned>(~(base + j * 32));
          }
        }
        sync_cluster(cluster);
        if (warp == 0) {
          unsigned long long item = 0ull;
          unsigned n = 0;
          for_each_cta(&smem, cluster, [&](const storage* theirs, int) {
            const unsigned here = theirs->gathered;
            if (unsigned(lane) >= n && unsigned(lane) < n + here) item = theirs->few[lane - n];
            n += here;
          });
          unsigned kth;
          int kth_remaining;
          tw_kth_of_few(item, n, remaining, kth, kth_remaining);
          if (lane == 0) {
            smem.kth_key = kth;
            smem.kth_remaining = kth_remaining;
          }
        }
        __syncthreads();
        prefix = smem.kth_key;
        remaining = smem.kth_remaining;
        break;
      }
    }
    // Taken: every key above the k-th and, in position order, the first `remaining` equal to
    // it; or, when the descent stopped with a whole bucket, every key at or above `prefix`.
    const auto larger_than_kth = [&](int j) {
      return mine(j) && (all_of_bucket ? keys[j] >= prefix : keys[j] > prefix);
    };
    const auto equal_to_kth = [&](int j) { return mine(j) && !all_of_bucket && keys[j] == prefix; };
    int warp_counts = 0;  // larger in the low half, equal in the high half
#pragma unroll
    for (int j = 0; j < CACHED; ++j) {
      warp_counts += __popc(__ballot_sync(0xffffffffu, larger_than_kth(j)));
      warp_counts += __popc(__ballot_sync(0xffffffffu, equal_to_kth(j))) << 16;
    }
    // The warps before this one over the cluster, numbered rank * WARPS + warp: of each CTA's
    // warps lane l adds warps l, l + 32, ... where they come earlier, the halves apart. Each
    // warp's count is written once, so no barrier is needed before the write.
    if (lane == 0) smem.warp_counts[warp] = warp_counts;
    sync_cluster(cluster);
    const int me = int(rank) * WARPS + warp;
    int larger_before = 0, equal_before = 0;
    for_each_cta(smem.warp_counts, cluster, [&](const int* counts, int c) {
#pragma unroll
      for (int w = lane, i = 0; i < (WARPS + 31) / 32; ++i, w += 32) {
        if (w < WARPS && c * WARPS + w < me) {
          larger_before += counts[w] & 0xffff;
          equal_before += counts[w] >> 16;
        }
      }
    });
    // This CTA's shared memory must stay readable until every CTA of the cluster has read it.
    if (cluster > 1) tw_cluster_arrive();
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      larger_before += __shfl_xor_sync(0xffffffffu, larger_before, offset);
      equal_before += __shfl_xor_sync(0xffffffffu, equal_before, offset);
    }
    const unsigned lower_lanes = (1u << lane) - 1u;
#pragma unroll
    for (int j = 0; j < CACHED; ++j) {
      const bool larger = larger_than_kth(j), equal = equal_to_kth(j);
      const unsigned larger_lanes = __ballot_sync(0xffffffffu, larger);
      const unsigned equal_lanes = __ballot_sync(0xffffffffu, equal);
      const int my_larger = larger_before + __popc(larger_lanes & lower_lanes);
      const int my_equal = equal_before + __popc(equal_lanes & lower_lanes);
      if (larger || (equal && my_equal < remaining)) {
        const int slot = my_larger + min(my_equal, remaining);
        out[slot] = base + j * 32;
        if (WITH_IDS) out_ids[slot] = item_ids[j];
      }
      larger_before += __popc(larger_lanes);
      equal_before += __popc(equal_lanes);
    }
    if (cluster > 1) tw_cluster_wait();
  }
};

// Rows the register path does not take (longer than its cluster holds, or short rows:
// REGISTERS_FROM) take radix passes over 8-bit digits that reload the row from global
// memory each pass. The register path needs a block per SM; the passes run in smaller blocks,
// several per SM, so each selector has one kernel of each (CACHED = 0: passes only), and the
// decoder launches the register kernel only for steps of at most one row per SM or whose
// longest row it holds. TOKEN_ROWS tunes them for rows of
// token scores (Double Sparsity: crowded into few radix buckets): a warp's lanes that share a
// bucket count it with one atomic; page rows (Quest), whose scores spread over many buckets,
// count with plain atomics (bench/PERF-NOTES.md, v7 and v8). CACHED = 0 sends every row
// through the passes. Launched in clusters, the block is one CTA of a row's cluster: the
// register path spreads the row over the cluster, and everything else (short rows, the
// passes) is left to the CTA of rank 0.
template <int THREADS, bool TOKEN_ROWS, int CACHED>
struct tw_top_k {
  static constexpr int WARPS = THREADS / 32;
  static constexpr int BATCH = 8;  // keys per thread in flight in a pass
  typedef tw_radix<int, THREADS> radix;
  typedef tw_top_k_cached<THREADS, CACHED == 0 ? 1 : CACHED, !TOKEN_ROWS> in_registers;
  // Rows of up to this many scored items take the passes even when a cluster holds them in
  // registers, where a short row would leave most warps idle: on the H200 the register path
  // (one CTA per row) chose 8192 pages faster than the passes (20.5 against 27.3 us) but 2048
  // slower (14.0 against 12.5 us), and token rows of 32768 took about as long both ways (55.1
  // against 56.3 us) (bench/PERF-NOTES.md, v17). Token rows of 8192 in registers (4 of 16 warps
  // busy) made double_sparse(32) steps at 8k tokens 7-19% slower than the passes had (v19's
  // grid).
  static constexpr int REGISTERS_FROM = THREADS * CACHED / 2;
  // Once the bucket holding the k-th key has at most FEW items, the descent stops: the block
  // gathers them and one warp sorts them, which names the k-th key (and how many of its equals
  // to take) as the remaining passes would, for their barriers.
  static constexpr int FEW = 32;
  struct storage {
    union {  // a row takes the passes or the register path, never both
      typename radix::storage radix_smem;
      typename in_registers::storage registers_smem;
    };
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
  TW_DEVICE static void finish_few(const float* __restrict__ row, int others, unsigned prefix, unsigned mask,
                                   int remaining, storage& smem) {
    for (int i = threadIdx.x; i < others; i += THREADS) {
      const unsigned key = tw_ordered_bits(row[i]);
      if ((key & mask) == prefix) {
        const unsigned at = atomicAdd(&smem.gathered, 1u);
        smem.few[at] = (static_cast<unsigned long long>(key) << 32) | static_cast<unsigned>(~i);
      }
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      unsigned kth;
      int kth_remaining;
      const unsigned n = smem.gathered;
      tw_kth_of_few(threadIdx.x < n ? smem.few[threadIdx.x] : 0ull, n, remaining, kth, kth_remaining);
      if (threadIdx.x == 0) {
        smem.kth_key = kth;
        smem.kth_remaining = kth_remaining;
      }
    }
    __syncthreads();
  }

  // Call from every thread of the block. With items <= budget every item is chosen; otherwise
  // the budget - 1 best of the first items - 1 (scored in `row`) and the last item. Writes the
  // chosen positions ascending to out and their count to *count; with `ids` (page rows only),
  // also each chosen item's id (ids[position]) to out_ids at the same index.
  TW_DEVICE static void run(const float* __restrict__ row, int items, int budget, int* __restrict__ out,
                            int* __restrict__ count, storage& smem, const int* __restrict__ ids = nullptr,
                            int* __restrict__ out_ids = nullptr) {
    const unsigned cluster = tw_cluster_size();
    const bool first_of_cluster = cluster == 1 || tw_cluster_rank() == 0;
    if (items <= budget) {
      if (!first_of_cluster) return;
      for (int i = threadIdx.x; i < items; i += THREADS) {
        out[i] = i;
        if (ids) out_ids[i] = ids[i];
      }
      if (threadIdx.x == 0) *count = items;
      return;
    }
    const int others = items - 1;
    const int k = budget - 1;  // best items to take besides the last one
    // The last item's id, loaded now rather than after the choice.
    const int last_id = ids && threadIdx.x == 0 ? ids[others] : 0;
    if (CACHED > 0 && k > 0 && others > REGISTERS_FROM && in_registers::fits(others, cluster)) {
      in_registers::run(row, others, k, ids, out, out_ids, smem.registers_smem);
      if (first_of_cluster && threadIdx.x == 0) {
        out[k] = others;  // the last item, always
        if (ids) out_ids[k] = last_id;
        *count = budget;
      }
      return;
    }
    if (!first_of_cluster) return;
    unsigned prefix = 0, mask = 0;
    if (threadIdx.x == 0) smem.gathered = 0u;  // ordered before any gather by the passes' barriers
    int remaining = k;  // how many of the items matching `prefix` are still to be taken
    if (k > 0) {
      for (int shift = 24; shift >= 0; shift -= 8) {
        radix::clear(smem.radix_smem);
        __syncthreads();
        // Whole warps run every iteration (count_if's shuffle needs them): the bounds are the
        // block's, not the thread's.
        for (int base = 0; base < others; base += THREADS * BATCH) {
          unsigned batch[BATCH];
#pragma unroll
          for (int j = 0; j < BATCH; ++j) {
            const int i = base + j * THREADS + int(threadIdx.x);
            batch[j] = tw_ordered_bits(row[min(i, others - 1)]);  // past the row: not tallied
          }
#pragma unroll
          for (int j = 0; j < BATCH; ++j) {
            const int i = base + j * THREADS + int(threadIdx.x);
            tally(smem, i < others && (batch[j] & mask) == prefix, (batch[j] >> shift) & 255u);
          }
        }
        radix::pick(smem.radix_smem, 0, remaining);
        prefix |= smem.radix_smem.digit << shift;
        remaining -= smem.radix_smem.above;
        mask |= 255u << shift;
        const bool few = shift > 0 && smem.radix_smem.total[smem.radix_smem.digit] <= FEW;
        __syncthreads();
        if (few) {
          finish_few(row, others, prefix, mask, remaining, smem);
          prefix = smem.kth_key;
          remaining = smem.kth_remaining;
          break;
        }
      }
    }
    // prefix is now the k-th largest key; take every larger key and the first `remaining`
    // equal ones in position order, writing positions ascending. Each thread owns ITEMS
    // consecutive positions, so one block scan (larger and equal counts packed in 16-bit
    // halves) serves THREADS * ITEMS positions. Keys and ids are loaded before any is used
    // (positions past the row load its last item, never taken), so the ids of the chosen
    // items need no load after the scan.
    constexpr int ITEMS = 8;
    static_assert(THREADS * ITEMS < 65536, "a round's counts are packed in 16-bit halves");
    int larger_seen = 0, equal_seen = 0;
    for (int base = 0; k > 0 && base < others; base += THREADS * ITEMS) {
      const int mine = base + int(threadIdx.x) * ITEMS;
      unsigned bits[ITEMS];
      int item_ids[ITEMS];
#pragma unroll
      for (int j = 0; j < ITEMS; ++j) {
        const int i = min(mine + j, others - 1);
        bits[j] = __float_as_uint(row[i]);
        item_ids[j] = ids ? ids[i] : 0;
      }
      unsigned larger = 0, equal = 0;  // bit j: position mine + j
#pragma unroll
      for (int j = 0; j < ITEMS; ++j) {
        const unsigned key = tw_ordered_bits(__uint_as_float(bits[j]));
        const bool inside = mine + j < others;
        larger |= unsigned(inside && key > prefix) << j;
        equal |= unsigned(inside && key == prefix) << j;
      }
      int round_total = 0;
      const int before =
          tw_block_exclusive_sum<THREADS>(__popc(larger) | (__popc(equal) << 16), smem.scan_scratch, round_total);
      int equal_rank = equal_seen + (before >> 16);
      int at = larger_seen + (before & 0xffff) + min(equal_rank, remaining);
#pragma unroll
      for (int j = 0; j < ITEMS; ++j) {
        bool take = (larger >> j) & 1u;
        if ((equal >> j) & 1u) take = equal_rank++ < remaining;
        if (take) {
          out[at] = mine + j;
          if (ids) out_ids[at] = item_ids[j];
          ++at;
        }
      }
      larger_seen += round_total & 0xffff;
      equal_seen += round_total >> 16;
    }
    if (threadIdx.x == 0) {
      const int written = larger_seen + min(equal_seen, remaining);
      out[written] = others;  // the last item, always
      if (ids) out_ids[written] = last_id;
      *count = written + 1;
    }
  }
};
