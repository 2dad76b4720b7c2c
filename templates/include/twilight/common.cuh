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
