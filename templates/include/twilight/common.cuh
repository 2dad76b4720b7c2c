// Basic types and helpers shared by every twilight kernel. NVRTC has no C++ standard library
// here, so fixed-width integers are spelled out.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef long long tw_i64;
typedef unsigned int tw_u32;

#define TW_DEVICE __device__ __forceinline__

// log2(e) and ln(2): scores are kept in base 2 so that exponentials are one exp2f each.
#define TW_LOG2E 1.4426950408889634f
#define TW_LN2 0.6931471805599453f

TW_DEVICE float tw_neg_inf() { return __int_as_float(0xff800000); }

template <int A, int B>
struct tw_ceil_div {
  static constexpr int value = (A + B - 1) / B;
};

// Every kernel that works per row runs on a grid of (parts, heads, requests): blockIdx.x is a
// part of the row, blockIdx.y the head (KV or query, as the kernel's grid says) and blockIdx.z
// the request. The host builds every such grid in one place (`Grid::rows` in the library), so
// a kernel reads its position only through these.
TW_DEVICE int tw_grid_part() { return blockIdx.x; }
TW_DEVICE int tw_grid_head() { return blockIdx.y; }
TW_DEVICE int tw_grid_request() { return blockIdx.z; }
// request * heads + head: the row's index in per-row buffers.
TW_DEVICE int tw_grid_row() { return blockIdx.z * gridDim.y + blockIdx.y; }

// Part `part` of `parts` of a balanced split of `items` (none if items <= 0): [begin, end),
// sizes differing by at most one. 32-bit quotients only: a 64-bit division is a long software
// routine, and a product items * part could overflow 32 bits.
struct tw_share {
  int begin, end;
};
TW_DEVICE tw_share tw_balanced_share(int items, int part, int parts) {
  if (items <= 0) return tw_share{0, 0};
  const unsigned base = unsigned(items) / unsigned(parts), extra = unsigned(items) % unsigned(parts);
  const unsigned p = unsigned(part);
  const unsigned begin = p * base + min(p, extra);
  return tw_share{int(begin), int(begin + base + (p < extra ? 1u : 0u))};
}

// Programmatic dependent launch (sm_90 and later). A kernel launched with launch overlap on
// may be scheduled while the stream's previous kernel is still finishing: it waits here, before
// it reads or writes anything, until that kernel has completed and its writes are visible, and
// then lets the stream's next kernel be scheduled in turn (so that kernel's launch and ramp-up
// overlap this one's work). Every entry calls this first; launched without overlap, both
// instructions return at once.
TW_DEVICE void tw_after_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Thread-block clusters (sm_90 and later): the CTA's rank in its cluster, a barrier over the
// whole cluster that orders memory (release before, acquire after), and a load from another
// CTA's shared memory (distributed shared memory) at the address of `local` in this CTA.
TW_DEVICE unsigned tw_cluster_rank() {
  unsigned rank = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
#endif
  return rank;
}
// CTAs in this CTA's cluster: 1 for a launch without clusters.
TW_DEVICE unsigned tw_cluster_size() {
  unsigned size = 1;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(size));
#endif
  return size;
}
TW_DEVICE void tw_cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
  __syncthreads();
#endif
}
// The two halves of tw_cluster_sync, for a CTA that must stay resident (its shared memory
// readable by the others) until they are done, but has work of its own in between.
TW_DEVICE void tw_cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
#endif
}
TW_DEVICE void tw_cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}
template <typename V>
TW_DEVICE V tw_cluster_load(const V* local, unsigned rank) {
  static_assert(sizeof(V) == 4, "32-bit values only");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(local));
  unsigned remote, bits;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(address), "r"(rank));
  asm volatile("ld.shared::cluster.u32 %0, [%1];" : "=r"(bits) : "r"(remote) : "memory");
  V value;
  *reinterpret_cast<unsigned*>(&value) = bits;
  return value;
#else
  return *local;
#endif
}
// `local`'s twin in the shared memory of the cluster's CTA `rank`, as a generic pointer:
// loads through it are ordinary loads, which the compiler may keep in flight together (each
// tw_cluster_load waits for its own), ordered by the cluster barriers like any other.
template <typename V>
TW_DEVICE const V* tw_cluster_map(const V* local, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned long long remote;
  asm("mapa.u64 %0, %1, %2;" : "=l"(remote) : "l"(reinterpret_cast<unsigned long long>(local)), "r"(rank));
  return reinterpret_cast<const V*>(remote);
#else
  return local;
#endif
}
