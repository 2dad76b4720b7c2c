// Conversions between the storage types (half, __nv_bfloat16) and float, element-wise and for
// the 16-byte packets that every kernel loads.

TW_DEVICE float tw_to_float(half x) { return __half2float(x); }
TW_DEVICE float tw_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
TW_DEVICE T tw_from_float(float x);
template <>
TW_DEVICE half tw_from_float<half>(float x) { return __float2half_rn(x); }
template <>
TW_DEVICE __nv_bfloat16 tw_from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

TW_DEVICE float2 tw_pair_to_float2(tw_u32 bits, half) {
  half2 h = *reinterpret_cast<half2*>(&bits);
  return __half22float2(h);
}
TW_DEVICE float2 tw_pair_to_float2(tw_u32 bits, __nv_bfloat16) {
  __nv_bfloat162 h = *reinterpret_cast<__nv_bfloat162*>(&bits);
  return __bfloat1622float2(h);
}
