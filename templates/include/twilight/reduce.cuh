// Warp reductions over groups of WIDTH consecutive lanes (WIDTH a power of two up to 32),
// written with shuffles because NVRTC builds without CUB.

template <int WIDTH>
TW_DEVICE float tw_group_sum(float x) {
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <int WIDTH>
TW_DEVICE float tw_group_max(float x) {
#pragma unroll
  for (int offset = WIDTH / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Block-wide sum of one value per thread; every thread gets the total. `scratch` holds one
// float per warp. Contains barriers: call from every thread of the block.
template <int BLOCK_THREADS>
TW_DEVICE float tw_block_sum(float x, float* scratch) {
  constexpr int WARPS = BLOCK_THREADS / 32;
  x = tw_group_sum<32>(x);
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) total += scratch[w];
  return total;
}

template <int BLOCK_THREADS>
TW_DEVICE float tw_block_max(float x, float* scratch) {
  constexpr int WARPS = BLOCK_THREADS / 32;
  x = tw_group_max<32>(x);
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
  __syncthreads();
  float m = scratch[0];
#pragma unroll
  for (int w = 1; w < WARPS; ++w) m = fmaxf(m, scratch[w]);
  return m;
}

// The radix selections' digit pick, by one warp (call from all 32 lanes of the block's first
// warp) over a 256-bucket histogram `total` indexed by digit: from the top digit down, the
// first digit where the running total, starting from `above`, reaches `target`. Each lane
// takes 8 buckets and a warp-wide scan of their sums replaces a serial walk over 256 bins.
// `bounds(inclusive, above, target)` sets the start and the target on every lane after the
// scan, given each lane's inclusive scan: lane 31's holds the whole total, so a target relative
// to it costs no second pass over the histogram, and a start read from shared memory only then
// is not held through the scan (read before it, the top-p threshold spilled at 64 registers).
// Returns the digit, with the total of the buckets above it plus `above` in `digit_above`.
// When even the whole total stays below the target (float rounding of a mass), the lowest
// non-empty digit is chosen, or digit 0 with `above` when every bucket is empty.
template <typename V, typename Bounds>
TW_DEVICE int tw_pick_digit(const V* total, Bounds bounds, V& digit_above) {
  const int lane = threadIdx.x;
  V local[8];
  V sum = V(0);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    local[j] = total[255 - (lane * 8 + j)];  // lane 0 holds the top digits
    sum += local[j];
  }
  V inclusive = sum;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const V y = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += y;
  }
  V above, target;
  bounds(inclusive, above, target);
  V cum = above + (inclusive - sum);
  int found = -1, lowest = -1;
  V found_above = V(0), lowest_above = V(0);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (found < 0 && cum + local[j] >= target) {
      found = 255 - (lane * 8 + j);
      found_above = cum;
    }
    if (local[j] > V(0)) {
      lowest = 255 - (lane * 8 + j);
      lowest_above = cum;
    }
    cum += local[j];
  }
  const unsigned hits = __ballot_sync(0xffffffffu, found >= 0);
  int digit;
  if (hits) {
    const int leader = __ffs(hits) - 1;
    digit = __shfl_sync(0xffffffffu, found, leader);
    digit_above = __shfl_sync(0xffffffffu, found_above, leader);
  } else {
    const unsigned nonempty = __ballot_sync(0xffffffffu, lowest >= 0);
    const int leader = nonempty ? 31 - __clz(nonempty) : 0;
    digit = nonempty ? __shfl_sync(0xffffffffu, lowest, leader) : 0;
    digit_above = nonempty ? __shfl_sync(0xffffffffu, lowest_above, leader) : above;
  }
  return digit;
}

// Radix selection over 8-bit digits, shared by the Quest and Double Sparsity selectors (V =
// count). Each warp fills its own histogram, so contention on hot buckets stays within a warp;
// `pick` then sums them and finds, from the top digit down, the first bucket where the running
// total (starting from `above`) reaches `target` (tw_pick_digit).
template <typename V, int THREADS>
struct tw_radix {
  static constexpr int WARPS = THREADS / 32;
  struct storage {
    V hist[WARPS][256];
    V total[256];
    unsigned digit;
    V above;
  };

  TW_DEVICE static void clear(storage& s) {
    for (int i = threadIdx.x; i < WARPS * 256; i += THREADS) s.hist[i / 256][i % 256] = V(0);
  }

  TW_DEVICE static void add(storage& s, unsigned bucket, V value) { atomicAdd(&s.hist[threadIdx.x / 32][bucket], value); }

  // add(s, bucket, 1) where `flag` holds, for counting histograms, with the lanes of a warp
  // that share a bucket combined first: similar scores put most of a warp into one bucket, and
  // same-address shared-memory atomics serialize. Call from all 32 lanes of the warp.
  TW_DEVICE static void count_if(storage& s, bool flag, unsigned bucket) {
    const unsigned peers = __match_any_sync(0xffffffffu, flag ? bucket : 0xffffffffu);
    if (flag && threadIdx.x % 32 == unsigned(__ffs(peers) - 1)) {
      atomicAdd(&s.hist[threadIdx.x / 32][bucket], V(__popc(peers)));
    }
  }

  // Call from every thread after the histograms are complete (it begins with the barrier that
  // makes them visible). Afterwards s.digit is the chosen digit and s.above the total of the
  // buckets above it plus `above`. When even the whole total stays below `target` (float
  // rounding of a mass), the lowest non-empty digit is chosen.
  TW_DEVICE static void pick(storage& s, V above, V target) {
    __syncthreads();
    for (int d = threadIdx.x; d < 256; d += THREADS) {
      V t = V(0);
#pragma unroll
      for (int w = 0; w < WARPS; ++w) t += s.hist[w][d];
      s.total[d] = t;
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      V new_above;
      const int digit = tw_pick_digit(
          s.total,
          [=](V, V& start, V& goal) {
            start = above;
            goal = target;
          },
          new_above);
      if (threadIdx.x == 0) {
        s.digit = unsigned(digit);
        s.above = new_above;
      }
    }
    __syncthreads();
  }
};

// The top-p threshold's radix histograms: per digit bucket, the number and the mass of the
// weights (positive floats, keys = their bits) whose keys match the descent's prefix. Adding a
// float to shared memory compiles to a compare-and-swap loop on sm_90, and the lanes of a warp
// that share a bucket retry one after another (bench/PERF-NOTES.md, "Threshold's SASS"). Within
// one bucket every weight has the same exponent e (the first digit holds the exponent's low six
// bits; the top three are fixed), so its mass is exactly 2^(e - 150) * (count * (2^23 + m0) +
// the sum of the bits below the digit), m0 the bucket's mantissa bits: two native 32-bit
// integer atomics per weight (`add_exact`), exact and independent of the order of the adds.
// Per warp and bucket the low-bit sum stays below 2^32 for up to 32 * CACHED = 2^9 weights of
// at most 2^21 each. Longer rows add float masses (`add_float`).
//
// Once the chosen bucket holds at most 32 weights, the descent stops: the block gathers them
// (`gather`) and one warp sorts them and walks their masses (`finish`), which gives the same
// key the remaining passes would (both sum exactly in the same order of keys) for two or three
// passes' barriers less.
template <int THREADS>
struct tw_mass_radix {
  static constexpr int WARPS = THREADS / 32;
  static constexpr int CACHED = 16;  // weights per thread the exact path takes
  static constexpr unsigned FEW = 32;  // a bucket this small is finished by one warp
  struct storage {
    unsigned count[WARPS][256];
    union {
      unsigned low[WARPS][256];  // exact path
      float mass[WARPS][256];    // float path
    } sum;
    double total[256];
    unsigned bin_count[256];
    unsigned few_keys[FEW];
    double target;  // p times the whole row's mass, from the first pass
    double above;   // mass of the weights above the current prefix's range
    unsigned digit;
    unsigned chosen_count;  // weights in the chosen bucket
    unsigned gathered;
    unsigned key;  // the threshold's key, from `finish`
  };

  TW_DEVICE static void clear(storage& s) {
    for (int i = threadIdx.x; i < WARPS * 256; i += THREADS) {
      s.count[i / 256][i % 256] = 0u;
      s.sum.low[i / 256][i % 256] = 0u;
    }
  }

  TW_DEVICE static void add_exact(storage& s, unsigned bucket, unsigned low_bits) {
    const int warp = threadIdx.x / 32;
    atomicAdd(&s.count[warp][bucket], 1u);
    if (low_bits) atomicAdd(&s.sum.low[warp][bucket], low_bits);
  }

  TW_DEVICE static void add_float(storage& s, unsigned bucket, float w) {
    const int warp = threadIdx.x / 32;
    atomicAdd(&s.count[warp][bucket], 1u);
    atomicAdd(&s.sum.mass[warp][bucket], w);
  }

  // Call from every thread once the pass's adds are issued (it begins with the barrier that
  // completes them). Sums the warps' histograms into bucket masses, clearing them for the next
  // pass; on the first pass sets the target p * (the whole mass); then picks, from the top
  // digit down, the first bucket where the running mass (from `above`) reaches the target.
  // Afterwards s.digit is the chosen digit, s.above the mass above it and s.chosen_count its
  // weights. Should the whole mass stay below the target (rounding of the float path), the
  // lowest non-empty digit is chosen.
  TW_DEVICE static void pick(storage& s, bool exact, unsigned prefix, int shift, bool first, float p) {
    __syncthreads();
    for (int d = threadIdx.x; d < 256; d += THREADS) {
      unsigned count = 0;
      double t = 0.0;
      unsigned long long low = 0;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) {
        count += s.count[w][d];
        s.count[w][d] = 0u;
        if (exact) {
          low += s.sum.low[w][d];
          s.sum.low[w][d] = 0u;
        } else {
          t += s.sum.mass[w][d];
          s.sum.mass[w][d] = 0.f;
        }
      }
      if (exact) {
        const unsigned base = prefix | (unsigned(d) << shift);
        // 2^(e - 150) as a double's bits: e is 64..127 here, so the power is a normal double.
        const double unit = __longlong_as_double((long long)(int(base >> 23) - 150 + 1023) << 52);
        t = double((unsigned long long)count * (8388608ull + (base & 0x7fffffu)) + low) * unit;
      }
      s.total[d] = t;
      s.bin_count[d] = count;
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      double target, new_above;
      const int digit = tw_pick_digit(
          s.total,
          [&](double inclusive, double& start, double& goal) {
            start = first ? 0.0 : s.above;
            target = first ? double(p) * __shfl_sync(0xffffffffu, inclusive, 31) : s.target;
            goal = target;
          },
          new_above);
      if (threadIdx.x == 0) {
        s.digit = unsigned(digit);
        s.above = new_above;
        s.target = target;
        s.chosen_count = s.bin_count[digit];
        s.gathered = 0u;
      }
    }
    __syncthreads();
  }

  // One weight of the chosen bucket (at most FEW of them in all) into the finishing list.
  TW_DEVICE static void gather(storage& s, unsigned key) { s.few_keys[atomicAdd(&s.gathered, 1u)] = key; }

  // Call from every thread after the gather: one warp sorts the gathered keys, largest first,
  // and takes the first whose running mass (from s.above, keys weighed as the floats they are)
  // reaches the target, or the smallest should none. Afterwards s.key is the threshold's key.
  TW_DEVICE static void finish(storage& s) {
    __syncthreads();
    if (threadIdx.x < 32) {
      const unsigned lane = threadIdx.x;
      const unsigned n = s.gathered;
      unsigned key = lane < n ? s.few_keys[lane] : 0u;
      // Bitonic sort over the warp, descending.
#pragma unroll
      for (unsigned size = 2; size <= 32; size *= 2) {
#pragma unroll
        for (unsigned stride = size / 2; stride > 0; stride /= 2) {
          const unsigned other = __shfl_xor_sync(0xffffffffu, key, stride);
          const bool lower = (lane & stride) == 0;
          const bool descending = (lane & size) == 0;
          const unsigned larger = max(key, other), smaller = min(key, other);
          key = (lower == descending) ? larger : smaller;
        }
      }
      const double mass = lane < n ? double(__uint_as_float(key)) : 0.0;
      double inclusive = mass;
#pragma unroll
      for (int offset = 1; offset < 32; offset *= 2) {
        const double y = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (int(lane) >= offset) inclusive += y;
      }
      const unsigned hits = __ballot_sync(0xffffffffu, lane < n && s.above + inclusive >= s.target);
      const int at = hits ? __ffs(hits) - 1 : int(n) - 1;
      const unsigned chosen = __shfl_sync(0xffffffffu, key, max(at, 0));
      if (lane == 0) s.key = chosen;
    }
    __syncthreads();
  }
};

// Exclusive prefix sum of one int per thread across the block, in thread order; `total`
// receives the block's sum. `scratch` holds one int per warp. Contains barriers.
template <int BLOCK_THREADS>
TW_DEVICE int tw_block_exclusive_sum(int value, int* scratch, int& total) {
  constexpr int WARPS = BLOCK_THREADS / 32;
  const int lane = threadIdx.x % 32;
  int inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int y = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += y;
  }
  __syncthreads();
  if (lane == 31) scratch[threadIdx.x / 32] = inclusive;
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) {
    const int c = scratch[w];
    if (w < int(threadIdx.x / 32)) before += c;
    total += c;
  }
  return before + inclusive - value;
}
