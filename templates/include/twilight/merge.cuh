// Merge of flash-decoding partials: each chunk c of a request contributes its normalized output
// o_c and its log-sum-exp lse_c; the exact result is sum_c o_c * exp(lse_c - lse) with
// lse = log(sum_c exp(lse_c)). Only the chunks that cover the request's tokens are read: the
// others were never written.

template <typename T, int HEAD_DIM, int PAGE_SIZE>
TW_DEVICE void tw_merge_states(const float* __restrict__ partial_o, const float* __restrict__ partial_lse,
                               const int* __restrict__ kv_indptr, const int* __restrict__ kv_last_page_len,
                               T* __restrict__ o, float* __restrict__ lse, int num_qo_heads, int chunk_tokens,
                               int num_chunks) {
  const int head = blockIdx.x;  // request * num_qo_heads + qo_head
  const int request = head / num_qo_heads;
  const int len = tw_request_len(kv_indptr, kv_last_page_len, request, PAGE_SIZE);
  const int used = min(num_chunks, (len + chunk_tokens - 1) / chunk_tokens);
  const float* lse_in = partial_lse + tw_i64(head) * num_chunks;
  float lse_max = tw_neg_inf();
  for (int c = 0; c < used; ++c) lse_max = fmaxf(lse_max, lse_in[c]);
  float total = 0.f;
  for (int c = 0; c < used; ++c) total += __expf(lse_in[c] - lse_max);
  const float inv_total = 1.f / total;
  for (int ch = threadIdx.x; ch < HEAD_DIM; ch += blockDim.x) {
    float acc = 0.f;
    for (int c = 0; c < used; ++c) {
      acc = fmaf(partial_o[(tw_i64(head) * num_chunks + c) * HEAD_DIM + ch], __expf(lse_in[c] - lse_max), acc);
    }
    o[tw_i64(head) * HEAD_DIM + ch] = tw_from_float<T>(acc * inv_total);
  }
  if (threadIdx.x == 0) lse[head] = lse_max + logf(total);
}
