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
