// The kernels of `twilight bench`, compiled by NVRTC at its start (kernels.rs loads them).
#include <cuda_fp16.h>
#include <cuda_bf16.h>
// Read-only bandwidth probe: every thread streams 16-byte words; the xor keeps the loads
// alive and is stored only under a flag the host never sets.
extern "C" __global__ void twilight_read_probe(const uint4* __restrict__ data, unsigned long long words,
                                                unsigned int* sink, int never) {
  uint4 acc = make_uint4(0u, 0u, 0u, 0u);
  const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < words; i += stride) {
    uint4 w = __ldg(data + i);
    acc.x ^= w.x; acc.y ^= w.y; acc.z ^= w.z; acc.w ^= w.w;
  }
  if (never) sink[threadIdx.x] = acc.x ^ acc.y ^ acc.z ^ acc.w;
}

// The practical floor of a step: `rows` rows of `row_words` 16-byte words, `gridDim.x` CTAs per
// row (blockIdx.y is the row), each streaming a contiguous share of its row. Nothing but the
// reads: the time a kernel needs to move a step's bytes with this grid.
extern "C" __global__ void twilight_bare_read(const uint4* __restrict__ data, unsigned long long row_words,
                                               unsigned int* sink, int never) {
  const unsigned long long share = (row_words + gridDim.x - 1) / gridDim.x;
  const unsigned long long begin = blockIdx.x * share;
  const unsigned long long end = begin + share < row_words ? begin + share : row_words;
  const uint4* row = data + (unsigned long long)blockIdx.y * row_words;
  uint4 acc = make_uint4(0u, 0u, 0u, 0u);
  for (unsigned long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
    uint4 w = __ldg(row + i);
    acc.x ^= w.x; acc.y ^= w.y; acc.z ^= w.z; acc.w ^= w.w;
  }
  if (never) sink[threadIdx.x] = acc.x ^ acc.y ^ acc.z ^ acc.w;
}

// Fills 2-byte values with uniform noise in [-scale, scale] from a hash of the index, so large
// benchmark caches need no host-side generation or upload.
__device__ __forceinline__ float twilight_hash_uniform(unsigned long long i, unsigned int seed) {
  unsigned int x = (unsigned int)(i ^ (i >> 32)) * 0x9E3779B1u ^ seed;
  x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
  return (x >> 8) * (2.0f / 16777216.0f) - 1.0f;
}
extern "C" __global__ void twilight_fill_f16(__half* out, unsigned long long n, unsigned int seed, float scale) {
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x)
    out[i] = __float2half_rn(scale * twilight_hash_uniform(i, seed));
}
extern "C" __global__ void twilight_fill_bf16(__nv_bfloat16* out, unsigned long long n, unsigned int seed, float scale) {
  for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)gridDim.x * blockDim.x)
    out[i] = __float2bfloat16_rn(scale * twilight_hash_uniform(i, seed));
}
