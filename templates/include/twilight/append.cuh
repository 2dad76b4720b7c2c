// Append of new tokens to the paged cache. Each new token comes with its destination slot
// (page * PAGE_SIZE + offset), chosen by the host-side page allocator, so one launch serves
// decode (one token per request) and prefill (many per request, pages partly full) alike.

template <typename T, int HEAD_DIM, int PAGE_SIZE, bool HND>
TW_DEVICE void tw_append_kv(const T* __restrict__ k_new, const T* __restrict__ v_new, const int* __restrict__ slots,
                            T* __restrict__ k_cache, T* __restrict__ v_cache, int num_tokens, int num_kv_heads) {
  typedef tw_paged_layout<HND, PAGE_SIZE, HEAD_DIM> layout;
  constexpr int TX = HEAD_DIM / 8;
  const int token = blockIdx.x;
  if (token >= num_tokens) return;
  const int slot = slots[token];
  const int page = slot / PAGE_SIZE;
  const int offset = slot % PAGE_SIZE;
  for (int e = threadIdx.x; e < num_kv_heads * TX; e += blockDim.x) {
    const int head = e / TX;
    const int lane = e % TX;
    const tw_i64 src = (tw_i64(token) * num_kv_heads + head) * HEAD_DIM + lane * 8;
    const tw_i64 dst = layout::offset(page, head, offset, num_kv_heads) + lane * 8;
    tw_vec8<T> packet;
    packet.load(k_new + src);
    packet.store(k_cache + dst);
    packet.load(v_new + src);
    packet.store(v_cache + dst);
  }
}
