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

// Radix selection over 8-bit digits, shared by the Quest selector (V = count) and the top-p
// threshold (V = weight mass). Each warp fills its own histogram, so contention on hot buckets
// stays within a warp; `pick` then sums them and finds, from the top digit down, the first
// bucket where the running total (starting from `above`) reaches `target`, with a warp-wide
// scan instead of a serial walk over 256 bins.
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
      const int lane = threadIdx.x;
      V local[8];
      V sum = V(0);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        local[j] = s.total[255 - (lane * 8 + j)];  // lane 0 holds the top digits
        sum += local[j];
      }
      V inclusive = sum;
#pragma unroll
      for (int offset = 1; offset < 32; offset *= 2) {
        const V y = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) inclusive += y;
      }
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
      V new_above;
      if (hits) {
        const int leader = __ffs(hits) - 1;
        digit = __shfl_sync(0xffffffffu, found, leader);
        new_above = __shfl_sync(0xffffffffu, found_above, leader);
      } else {
        const unsigned nonempty = __ballot_sync(0xffffffffu, lowest >= 0);
        const int leader = nonempty ? 31 - __clz(nonempty) : 0;
        digit = nonempty ? __shfl_sync(0xffffffffu, lowest, leader) : 0;
        new_above = nonempty ? __shfl_sync(0xffffffffu, lowest_above, leader) : above;
      }
      if (lane == 0) {
        s.digit = unsigned(digit);
        s.above = new_above;
      }
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
