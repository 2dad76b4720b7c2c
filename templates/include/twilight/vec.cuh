// Eight 2-byte elements moved as one 16-byte access: the unit of every K, V, q and o load.

template <typename T>
struct tw_vec8 {
  uint4 bits;

  TW_DEVICE void load(const T* ptr) { bits = *reinterpret_cast<const uint4*>(ptr); }
  // Read-only path with no L1 allocation: K and V are streamed once per step.
  TW_DEVICE void load_stream(const T* ptr) { bits = __ldg(reinterpret_cast<const uint4*>(ptr)); }
  TW_DEVICE void store(T* ptr) const { *reinterpret_cast<uint4*>(ptr) = bits; }
  TW_DEVICE void zero() { bits = make_uint4(0u, 0u, 0u, 0u); }

  TW_DEVICE void to_float(float out[8]) const {
    const tw_u32 words[4] = {bits.x, bits.y, bits.z, bits.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 f = tw_pair_to_float2(words[i], T());
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }

  TW_DEVICE void from_float(const float in[8]) {
    T tmp[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) tmp[i] = tw_from_float<T>(in[i]);
    bits = *reinterpret_cast<const uint4*>(tmp);
  }
};

// N consecutive 2-byte elements (N = 2, 4 or 8: 4, 8 or 16 bytes, aligned to that size) loaded
// in one access and converted to float.
template <typename T, int N>
TW_DEVICE void tw_load_floats(const T* ptr, float out[N]) {
  static_assert(N == 2 || N == 4 || N == 8, "2, 4 or 8 elements");
  unsigned words[N / 2];
  // Indices wrap (`k % (N / 2)`) in the branches that are dead for a smaller N, so no branch
  // ever names an element past the array.
  if (N == 2) {
    words[0] = *reinterpret_cast<const unsigned*>(ptr);
  } else if (N == 4) {
    const uint2 v = *reinterpret_cast<const uint2*>(ptr);
    words[0] = v.x;
    words[1 % (N / 2)] = v.y;
  } else {
    const uint4 v = *reinterpret_cast<const uint4*>(ptr);
    words[0] = v.x;
    words[1 % (N / 2)] = v.y;
    words[2 % (N / 2)] = v.z;
    words[3 % (N / 2)] = v.w;
  }
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    const float2 f = tw_pair_to_float2(words[i], T());
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}
