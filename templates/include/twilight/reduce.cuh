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

// Exclusive prefix count of a per-thread flag across the block, in thread order; `total`
// receives the block's count. `scratch` holds one int per warp. Contains barriers.
template <int BLOCK_THREADS>
TW_DEVICE int tw_block_exclusive_count(bool flag, int* scratch, int& total) {
  constexpr int WARPS = BLOCK_THREADS / 32;
  const unsigned lane = threadIdx.x % 32;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  const int before_in_warp = __popc(ballot & ((1u << lane) - 1u));
  __syncthreads();
  if (lane == 0) scratch[threadIdx.x / 32] = __popc(ballot);
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) {
    const int c = scratch[w];
    if (w < int(threadIdx.x / 32)) before += c;
    total += c;
  }
  return before + before_in_warp;
}
