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
