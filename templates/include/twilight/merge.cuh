// Merge of flash-decoding partials: each chunk c of a head's token list contributes its
// normalized output o_c and its log-sum-exp lse_c; the exact result is sum_c o_c * exp(lse_c - lse)
// with lse = log(sum_c exp(lse_c)). Only the chunks that cover the list (`len` tokens) are read:
// the others were never written. An empty list yields o = 0 and lse = -inf.

template <typename T, int HEAD_DIM>
TW_DEVICE void tw_merge_states(const float* __restrict__ partial_o, const float* __restrict__ partial_lse, int len,
                               T* __restrict__ o, float* __restrict__ lse, int chunk_tokens, int num_chunks) {
  const int head = blockIdx.x;  // request * num_qo_heads + qo_head
  const int used = min(num_chunks, (len + chunk_tokens - 1) / chunk_tokens);
  const float* lse_in = partial_lse + tw_i64(head) * num_chunks;
  float lse_max = tw_neg_inf();
  for (int c = 0; c < used; ++c) lse_max = fmaxf(lse_max, lse_in[c]);
  float total = 0.f;
  for (int c = 0; c < used; ++c) total += __expf(lse_in[c] - lse_max);
  const float inv_total = used > 0 ? 1.f / total : 0.f;
  for (int ch = threadIdx.x; ch < HEAD_DIM; ch += blockDim.x) {
    float acc = 0.f;
    for (int c = 0; c < used; ++c) {
      acc = fmaf(partial_o[(tw_i64(head) * num_chunks + c) * HEAD_DIM + ch], __expf(lse_in[c] - lse_max), acc);
    }
    o[tw_i64(head) * HEAD_DIM + ch] = tw_from_float<T>(acc * inv_total);
  }
  if (threadIdx.x == 0) lse[head] = used > 0 ? lse_max + logf(total) : tw_neg_inf();
}
