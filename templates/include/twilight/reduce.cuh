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
