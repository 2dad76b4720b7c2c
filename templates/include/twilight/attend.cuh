// Decode attention: one query token per request, attending to a list of the request's tokens
// (all of them for dense decode, the kept ones for sparse). A block serves all GROUP query heads
// of one KV head over one chunk of the list, so each K and V row is read once for the whole
// group. Within the block, TX lanes
// share a token row (8 channels each, one 16-byte load), ROWS rows stream different tokens and
// keep their own online-softmax state, merged through shared memory at the end. A list longer
// than one chunk is split over blocks (flash-decoding): each writes its normalized (o, lse), and
// the last of them to finish merges all, so a step needs no separate merge launch.

// Every token of a request, in order, through the page table.
template <int PAGE_SIZE>
struct tw_request_tokens {
  static constexpr bool LISTED = false;
  const int* pages;
  int len;
  TW_DEVICE tw_request_tokens(const int* kv_indptr, const int* kv_indices, const int* kv_last_page_len, int request)
      : pages(kv_indices + kv_indptr[request]),
        len(tw_request_len(kv_indptr, kv_last_page_len, request, PAGE_SIZE)) {}
  TW_DEVICE int length() const { return len; }
  TW_DEVICE int slot(int t) const { return pages[t / PAGE_SIZE] * PAGE_SIZE + t % PAGE_SIZE; }
};

// An explicit list of token slots (page * PAGE_SIZE + offset), e.g. the kept tokens of a head.
struct tw_listed_tokens {
  static constexpr bool LISTED = true;
  const int* slots;
  int len;
  TW_DEVICE int length() const { return len; }
  TW_DEVICE int slot(int t) const { return slots[t]; }
};

template <typename T, int HEAD_DIM, int PAGE_SIZE, int GROUP, bool HND, int BLOCK_THREADS, int UNROLL>
struct tw_attend {
  static constexpr int VEC = 8;
  static constexpr int TX = HEAD_DIM / VEC;
  static constexpr int ROWS = BLOCK_THREADS / TX;
  static constexpr int TILE = ROWS * UNROLL;
  static_assert(HEAD_DIM % VEC == 0 && TX <= 32 && (TX & (TX - 1)) == 0, "head_dim must be 8 * a power of two <= 256");
  static_assert(BLOCK_THREADS % 32 == 0 && BLOCK_THREADS % TX == 0, "block must hold whole rows and warps");
  typedef tw_paged_layout<HND, PAGE_SIZE, HEAD_DIM> layout;

  // Listed chunks up to this long stage their slots in shared memory first.
  static constexpr int SLOT_CACHE = 512;

  struct shared_state {
    int slots[SLOT_CACHE];
    int ticket;
    float m[ROWS][GROUP];
    float d[ROWS][GROUP];
    float o[ROWS][GROUP][HEAD_DIM];
  };

  // q: [batch, num_qo_heads, HEAD_DIM]. A block whose chunk is the list's only one writes o and
  // lse directly; otherwise it writes its normalized partial output and lse, and the last block
  // of the list merges them. `done` counts finished blocks per (request, KV head); the merging
  // block resets it to 0, so it is all zeros between steps (and across graph replays).
  template <typename Tokens>
  TW_DEVICE static void run(const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                            const Tokens& tokens, T* __restrict__ o, float* __restrict__ lse,
                            float* __restrict__ partial_o, float* __restrict__ partial_lse, int* __restrict__ done,
                            int num_kv_heads, int min_chunk_tokens, int num_chunks, float sm_scale,
                            shared_state& smem) {
    const int chunk = tw_grid_part();
    const int kv_head = tw_grid_head();
    const int request = tw_grid_request();
    const int len = tokens.length();
    // The list is spread over the grid's num_chunks blocks in whole tiles of at least
    // min_chunk_tokens: a kept list's length is only known here, so a short one takes few
    // blocks (the rest exit at once) and a long one all of them.
    const int spread = (len + num_chunks - 1) / num_chunks;
    const int chunk_tokens = max(min_chunk_tokens, (spread + TILE - 1) / TILE * TILE);
    const int begin = chunk * chunk_tokens;
    // Grids are sized from an upper bound of the lengths: chunks past this list's end idle.
    if (begin >= len) {
      if (len == 0 && chunk == 0) {  // nothing to attend: o = 0, lse = -inf
        const int num_qo_heads = num_kv_heads * GROUP;
        for (int e = threadIdx.x; e < GROUP * HEAD_DIM; e += BLOCK_THREADS) {
          const tw_i64 head = tw_i64(request) * num_qo_heads + kv_head * GROUP + e / HEAD_DIM;
          o[head * HEAD_DIM + e % HEAD_DIM] = tw_from_float<T>(0.f);
          if (e % HEAD_DIM == 0) lse[head] = tw_neg_inf();
        }
      }
      return;
    }
    const int end = min(len, begin + chunk_tokens);
    // A listed chunk's slots are read once into shared memory, so the K/V loads of each tile do
    // not wait behind a dependent global load of their slot.
    const bool slots_staged = Tokens::LISTED && end - begin <= SLOT_CACHE;
    if (slots_staged) {
      for (int i = threadIdx.x; i < end - begin; i += BLOCK_THREADS) smem.slots[i] = tokens.slot(begin + i);
      __syncthreads();
    }
    const int tx = threadIdx.x % TX;
    const int row = threadIdx.x / TX;
    const int num_qo_heads = num_kv_heads * GROUP;

    // Scores are kept in base 2: q is pre-scaled by sm_scale * log2(e).
    const float q_scale = sm_scale * TW_LOG2E;
    float qf[GROUP][VEC];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      tw_vec8<T> packet;
      packet.load(q + (tw_i64(request) * num_qo_heads + kv_head * GROUP + g) * HEAD_DIM + tx * VEC);
      packet.to_float(qf[g]);
#pragma unroll
      for (int i = 0; i < VEC; ++i) qf[g][i] *= q_scale;
    }

    float m[GROUP], d[GROUP], acc[GROUP][VEC];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      m[g] = tw_neg_inf();
      d[g] = 0.f;
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[g][i] = 0.f;
    }

    for (int base = begin; base < end; base += TILE) {
      // All loads of the tile first, so UNROLL K and V packets are in flight per thread.
      tw_vec8<T> k_packet[UNROLL], v_packet[UNROLL];
      bool valid[UNROLL];
#pragma unroll
      for (int j = 0; j < UNROLL; ++j) {
        const int t = base + j * ROWS + row;
        valid[j] = t < end;
        if (valid[j]) {
          const int slot = slots_staged ? smem.slots[t - begin] : tokens.slot(t);
          const tw_i64 at = layout::offset(slot / PAGE_SIZE, kv_head, slot % PAGE_SIZE, num_kv_heads) + tx * VEC;
          k_packet[j].load_stream(k_cache + at);
          v_packet[j].load_stream(v_cache + at);
        } else {
          k_packet[j].zero();
          v_packet[j].zero();
        }
      }
      // Every lane runs every shuffle (rows of one warp may differ in validity), so scores
      // are computed for the whole tile before any branch.
      float s[GROUP][UNROLL];
#pragma unroll
      for (int j = 0; j < UNROLL; ++j) {
        float kf[VEC];
        k_packet[j].to_float(kf);
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
          float partial = 0.f;
#pragma unroll
          for (int i = 0; i < VEC; ++i) partial = fmaf(qf[g][i], kf[i], partial);
          const float total = tw_group_sum<TX>(partial);
          s[g][j] = valid[j] ? total : tw_neg_inf();
        }
      }
      if (!valid[0]) continue;  // this row has no token left in the tile
      float vf[UNROLL][VEC];
#pragma unroll
      for (int j = 0; j < UNROLL; ++j) v_packet[j].to_float(vf[j]);
#pragma unroll
      for (int g = 0; g < GROUP; ++g) {
        float m_new = m[g];
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) m_new = fmaxf(m_new, s[g][j]);
        const float rescale = exp2f(m[g] - m_new);
        d[g] *= rescale;
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[g][i] *= rescale;
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) {
          const float p = exp2f(s[g][j] - m_new);
          d[g] += p;
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[g][i] = fmaf(p, vf[j][i], acc[g][i]);
        }
        m[g] = m_new;
      }
    }

    // Merge the ROWS partial states of the block.
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      if (tx == 0) {
        smem.m[row][g] = m[g];
        smem.d[row][g] = d[g];
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) smem.o[row][g][tx * VEC + i] = acc[g][i];
    }
    __syncthreads();
    const int used = (len + chunk_tokens - 1) / chunk_tokens;  // chunks holding tokens of the list
    const bool alone = used == 1;
    for (int e = threadIdx.x; e < GROUP * HEAD_DIM; e += BLOCK_THREADS) {
      const int g = e / HEAD_DIM;
      const int c = e % HEAD_DIM;
      float m_all = tw_neg_inf();
#pragma unroll
      for (int r = 0; r < ROWS; ++r) m_all = fmaxf(m_all, smem.m[r][g]);
      float d_all = 0.f, o_all = 0.f;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        // A row that saw no token has m = -inf and d = 0: its weight is exactly 0.
        const float w = exp2f(smem.m[r][g] - m_all);
        d_all = fmaf(smem.d[r][g], w, d_all);
        o_all = fmaf(smem.o[r][g][c], w, o_all);
      }
      const float out = o_all / d_all;
      const float lse_nat = (m_all + log2f(d_all)) * TW_LN2;
      const tw_i64 head = tw_i64(request) * num_qo_heads + kv_head * GROUP + g;
      if (alone) {
        o[head * HEAD_DIM + c] = tw_from_float<T>(out);
        if (c == 0) lse[head] = lse_nat;
      } else {
        partial_o[(head * num_chunks + chunk) * HEAD_DIM + c] = out;
        if (c == 0) partial_lse[head * num_chunks + chunk] = lse_nat;
      }
    }
    if (alone) return;

    // The last block of the list to finish merges every chunk's (o, lse): the exact result is
    // sum_c o_c * exp(lse_c - lse) with lse = log(sum_c exp(lse_c)).
    const int head_row = request * num_kv_heads + kv_head;
    __threadfence();  // this block's partials are visible before its ticket is
    __syncthreads();
    if (threadIdx.x == 0) smem.ticket = atomicAdd(done + head_row, 1);
    __syncthreads();
    if (smem.ticket != used - 1) return;
    __threadfence();
    for (int e = threadIdx.x; e < GROUP * HEAD_DIM; e += BLOCK_THREADS) {
      const int c = e % HEAD_DIM;
      const tw_i64 head = tw_i64(request) * num_qo_heads + kv_head * GROUP + e / HEAD_DIM;
      const float* lse_in = partial_lse + head * num_chunks;
      float lse_max = tw_neg_inf();
      for (int k = 0; k < used; ++k) lse_max = fmaxf(lse_max, __ldcg(lse_in + k));
      float total = 0.f, merged = 0.f;
      for (int k = 0; k < used; ++k) {
        // L2 reads (__ldcg): the partials were written by other blocks.
        const float w = __expf(__ldcg(lse_in + k) - lse_max);
        total += w;
        merged = fmaf(__ldcg(partial_o + (head * num_chunks + k) * HEAD_DIM + c), w, merged);
      }
      o[head * HEAD_DIM + c] = tw_from_float<T>(merged / total);
      if (c == 0) lse[head] = lse_max + logf(total);
    }
    if (threadIdx.x == 0) done[head_row] = 0;
  }
};
