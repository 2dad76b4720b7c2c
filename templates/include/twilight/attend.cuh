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

// What the blocks of one list share at the end: each of ROWS independent walkers of a block
// (rows of lanes, or warps) leaves its online-softmax state (max m and sum d per query head, in
// base 2, and its unnormalized output) here; `finish` merges them into the block's (o, lse). A
// block whose chunk is the list's only one writes o and lse directly; otherwise it writes its
// normalized partial output and lse, and the last block of the list to finish merges all of
// them. `done` counts finished blocks per (request, KV head); the merging block resets it to 0,
// so it is all zeros between steps (and across graph replays).
template <int ROWS, int GROUP, int HEAD_DIM>
struct tw_split_merge {
  float walker_m[ROWS][GROUP];
  float walker_d[ROWS][GROUP];
  float walker_o[ROWS][GROUP][HEAD_DIM];
  int ticket;

  // The merge of `used` chunks' partials of the group's heads (the first is `first_head`), in
  // one pass of L2 reads: each thread owns VECTORS_PER_THREAD 4-channel vectors of the output
  // and folds the chunks' (lse, o) into them with an online softmax, UNROLL chunks in flight at
  // a time, so a short merge waits for one round of reads. (A pass over the lse first, for
  // their max and sum, put two more rounds and a barrier on the step's path.)
  template <typename T, int BLOCK_THREADS>
  TW_DEVICE static void merge_chunks(T* __restrict__ o, float* __restrict__ lse, const float* __restrict__ partial_o,
                                     const float* __restrict__ partial_lse, int first_head, int used, int num_chunks) {
    constexpr int VECTORS = GROUP * HEAD_DIM / 4;
    constexpr int VECTORS_PER_THREAD = (VECTORS + BLOCK_THREADS - 1) / BLOCK_THREADS;
    // Up to sixteen chunks' vectors in flight per thread: more vectors each, fewer chunks at a
    // time. Eight at head_dim 64, where sixteen took the kernel from 80 to 97 registers (one
    // block per SM); at head_dim 128 and up sixteen cost the tensor-core kernels no register.
    constexpr int UNROLL = VECTORS_PER_THREAD >= 4 ? 2 : (HEAD_DIM >= 128 ? 16 : 8) / VECTORS_PER_THREAD;
    const float* lse_in[VECTORS_PER_THREAD];
    const float4* in[VECTORS_PER_THREAD];
    float m[VECTORS_PER_THREAD], total[VECTORS_PER_THREAD];
    float4 acc[VECTORS_PER_THREAD];
#pragma unroll
    for (int j = 0; j < VECTORS_PER_THREAD; ++j) {
      const int v = min(threadIdx.x + j * BLOCK_THREADS, VECTORS - 1);
      const int head = first_head + v / (HEAD_DIM / 4);
      // L2 reads (__ldcg): the partials were written by other blocks.
      lse_in[j] = partial_lse + tw_i64(head) * num_chunks;
      in[j] = reinterpret_cast<const float4*>(partial_o + tw_i64(head) * num_chunks * HEAD_DIM) + v % (HEAD_DIM / 4);
      m[j] = tw_neg_inf();
      total[j] = 0.f;
      acc[j] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    for (int k0 = 0; k0 < used; k0 += UNROLL) {
#pragma unroll
      for (int j = 0; j < VECTORS_PER_THREAD; ++j) {
        float chunk_lse[UNROLL];
        float4 x[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          const int k = k0 + u;
          chunk_lse[u] = k < used ? __ldcg(lse_in[j] + k) : tw_neg_inf();
          x[u] = k < used ? __ldcg(in[j] + tw_i64(k) * (HEAD_DIM / 4)) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
        // Every chunk with tokens has a finite lse, so m_new is finite from the first round
        // on, and chunks past `used` (lse -inf) weigh exactly 0.
        float m_new = m[j];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) m_new = fmaxf(m_new, chunk_lse[u]);
        const float rescale = __expf(m[j] - m_new);
        total[j] *= rescale;
        acc[j].x *= rescale;
        acc[j].y *= rescale;
        acc[j].z *= rescale;
        acc[j].w *= rescale;
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          const float w = __expf(chunk_lse[u] - m_new);
          total[j] += w;
          acc[j].x = fmaf(x[u].x, w, acc[j].x);
          acc[j].y = fmaf(x[u].y, w, acc[j].y);
          acc[j].z = fmaf(x[u].z, w, acc[j].z);
          acc[j].w = fmaf(x[u].w, w, acc[j].w);
        }
        m[j] = m_new;
      }
    }
#pragma unroll
    for (int j = 0; j < VECTORS_PER_THREAD; ++j) {
      const int v = threadIdx.x + j * BLOCK_THREADS;
      if (v >= VECTORS) continue;
      const int c = 4 * (v % (HEAD_DIM / 4));
      const int head = first_head + v / (HEAD_DIM / 4);
      const tw_i64 at = tw_i64(head) * HEAD_DIM + c;
      o[at] = tw_from_float<T>(acc[j].x / total[j]);
      o[at + 1] = tw_from_float<T>(acc[j].y / total[j]);
      o[at + 2] = tw_from_float<T>(acc[j].z / total[j]);
      o[at + 3] = tw_from_float<T>(acc[j].w / total[j]);
      if (c == 0) lse[head] = m[j] + logf(total[j]);
    }
  }

  // The output of a list with no token: o = 0, lse = -inf (written by its first block).
  template <typename T, int BLOCK_THREADS>
  TW_DEVICE static void write_empty(T* __restrict__ o, float* __restrict__ lse, int request, int kv_head,
                                    int num_kv_heads) {
    const int num_qo_heads = num_kv_heads * GROUP;
    for (int e = threadIdx.x; e < GROUP * HEAD_DIM; e += BLOCK_THREADS) {
      const tw_i64 head = tw_i64(request) * num_qo_heads + kv_head * GROUP + e / HEAD_DIM;
      o[head * HEAD_DIM + e % HEAD_DIM] = tw_from_float<T>(0.f);
      if (e % HEAD_DIM == 0) lse[head] = tw_neg_inf();
    }
  }

  // Called by every thread once every walker's state is in place (after a barrier).
  template <typename T, int BLOCK_THREADS>
  TW_DEVICE void finish(T* __restrict__ o, float* __restrict__ lse, float* __restrict__ partial_o,
                        float* __restrict__ partial_lse, int* __restrict__ done, int request, int kv_head,
                        int chunk, int used, int num_kv_heads, int num_chunks) {
    const int num_qo_heads = num_kv_heads * GROUP;
    const bool alone = used == 1;
    for (int e = threadIdx.x; e < GROUP * HEAD_DIM; e += BLOCK_THREADS) {
      const int g = e / HEAD_DIM;
      const int c = e % HEAD_DIM;
      float m_all = tw_neg_inf();
#pragma unroll
      for (int r = 0; r < ROWS; ++r) m_all = fmaxf(m_all, walker_m[r][g]);
      float d_all = 0.f, o_all = 0.f;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        // A walker that saw no token has m = -inf and d = 0: its weight is exactly 0.
        const float w = exp2f(walker_m[r][g] - m_all);
        d_all = fmaf(walker_d[r][g], w, d_all);
        o_all = fmaf(walker_o[r][g][c], w, o_all);
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
    if (threadIdx.x == 0) ticket = atomicAdd(done + head_row, 1);
    __syncthreads();
    if (ticket != used - 1) return;
    __threadfence();
    merge_chunks<T, BLOCK_THREADS>(o, lse, partial_o, partial_lse, request * num_qo_heads + kv_head * GROUP, used,
                                   num_chunks);
    if (threadIdx.x == 0) done[head_row] = 0;
  }
};

// Which chunk of which list a block takes, from a grid of (chunks, KV heads, requests). The
// hardware dispatches blocks in linear order; `chunk_major` numbers them chunk by chunk instead
// of list by list, so that where a step's kept lists are few and mostly far shorter than the
// grid's bound, every list's first chunk is dispatched before the empty chunks of the lists
// ahead of it. The launch decides (the Rust `chunk_major_attention`): with many lists, or
// dense ones, the grid's own order measured faster.
struct tw_attend_block {
  int chunk, kv_head, request;
  TW_DEVICE static tw_attend_block current(bool chunk_major) {
    if (!chunk_major) return {int(blockIdx.x), int(blockIdx.y), int(blockIdx.z)};
    const int rows = gridDim.y * gridDim.z;
    const int linear = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int row = linear % rows;
    return {linear / rows, row % int(gridDim.y), row / int(gridDim.y)};
  }
  // request * KV heads + KV head: the list's index in per-row buffers.
  TW_DEVICE int row() const { return request * gridDim.y + kv_head; }
};

// The chunk of a list one block takes. The list is spread over the grid's num_chunks blocks in
// whole tiles of at least min_chunk_tokens: a kept list's length is only known here, so a short
// one takes few blocks (the rest exit at once) and a long one all of them.
template <int TILE>
TW_DEVICE int tw_chunk_tokens(int len, int min_chunk_tokens, int num_chunks) {
  const int spread = (len + num_chunks - 1) / num_chunks;
  return max(min_chunk_tokens, (spread + TILE - 1) / TILE * TILE);
}

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

  typedef tw_split_merge<ROWS, GROUP, HEAD_DIM> merge_state;
  struct shared_state {
    int slots[SLOT_CACHE];
    merge_state merge;
  };

  // q: [batch, num_qo_heads, HEAD_DIM]; the outputs as tw_split_merge describes.
  template <typename Tokens>
  TW_DEVICE static void run(const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                            const tw_attend_block& block, const Tokens& tokens, T* __restrict__ o,
                            float* __restrict__ lse,
                            float* __restrict__ partial_o, float* __restrict__ partial_lse, int* __restrict__ done,
                            int num_kv_heads, int min_chunk_tokens, int num_chunks, float sm_scale,
                            shared_state& smem) {
    const int chunk = block.chunk;
    const int kv_head = block.kv_head;
    const int request = block.request;
    const int len = tokens.length();
    const int chunk_tokens = tw_chunk_tokens<TILE>(len, min_chunk_tokens, num_chunks);
    const int begin = chunk * chunk_tokens;
    // Grids are sized from an upper bound of the lengths: chunks past this list's end idle.
    if (begin >= len) {
      if (len == 0 && chunk == 0) merge_state::template write_empty<T, BLOCK_THREADS>(o, lse, request, kv_head, num_kv_heads);
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
        smem.merge.walker_m[row][g] = m[g];
        smem.merge.walker_d[row][g] = d[g];
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) smem.merge.walker_o[row][g][tx * VEC + i] = acc[g][i];
    }
    __syncthreads();
    const int used = (len + chunk_tokens - 1) / chunk_tokens;  // chunks holding tokens of the list
    smem.merge.template finish<T, BLOCK_THREADS>(o, lse, partial_o, partial_lse, done, request, kv_head, chunk, used,
                                                 num_kv_heads, num_chunks);
  }
};

// The same attention on tensor cores, with K and V streamed through shared memory. Each warp
// walks its own 16-token tiles of the block's chunk (tile i of warp w is the chunk's tile
// w + i * WARPS) in a STAGES-deep cp.async pipeline of its own, so up to STAGES - 1 tiles per
// warp are in flight while it computes one, without holding them in registers, and warps never
// wait for each other until the end. Per tile, with the group's query heads as the MMA's N
// (zero columns past GROUP):
//   S^T (16 tokens x 8 heads) = K (16 x HEAD_DIM, from shared memory) . q^T, in f32;
//   the online softmax per head runs on S^T's accumulators (a head's 16 scores sit in one
//   column: four lanes' registers, reduced over the eight rows of lanes);
//   O^T (HEAD_DIM x 8) += V^T (HEAD_DIM x 16, read transposed from shared memory) . P^T, where
//   P^T's f32 accumulators are rounded to T and transposed in registers into the B operand.
// Rows of the staged tiles are swizzled (16-byte piece c of row r stored at c ^ (r % 8)) so
// that the eight rows an ldmatrix reads at once fall in different banks.
template <typename T, int HEAD_DIM, int PAGE_SIZE, int GROUP, bool HND, int WARPS, int STAGES>
struct tw_attend_mma {
  static constexpr int BLOCK_THREADS = WARPS * 32;
  static constexpr int TILE = WARPS * 16;    // tokens per round of all warps; chunks are whole tiles
  static constexpr int PIECES = HEAD_DIM / 8;  // 16-byte pieces of a row
  static constexpr int STEPS = HEAD_DIM / 16;  // k-steps of S^T, and 16-channel blocks of O^T
  static constexpr int COPIES = 16 * PIECES / 32;  // pieces of K (and of V) each lane copies per tile
  static_assert(GROUP <= 8, "the group's heads are the MMA's 8 columns");
  static_assert(PIECES >= 8 && PIECES % 8 == 0 && COPIES >= 1, "head_dim must be 64, 128 or 256");
  static_assert(STAGES >= 2, "a pipeline needs two stages");
  typedef tw_paged_layout<HND, PAGE_SIZE, HEAD_DIM> layout;
  typedef tw_split_merge<WARPS, GROUP, HEAD_DIM> merge_state;

  struct tile_buffer {
    uint4 k[16 * PIECES];
    uint4 v[16 * PIECES];
  };
  struct shared_state {
    // The tiles are dead once every warp has left its loop; the merge reuses their space.
    union {
      tile_buffer tiles[WARPS][STAGES];
      merge_state merge;
    };
  };

  TW_DEVICE static int swizzled(int row, int piece) { return row * PIECES + (piece ^ (row & 7)); }

  // Queues the copies of one tile of K and V. Lane l copies pieces l + 32j (row (l + 32j) /
  // PIECES); `slot` is, in lane r < 16, the slot of the tile's row r (-1 past the chunk's end).
  TW_DEVICE static void copy_tile(const T* __restrict__ k_cache, const T* __restrict__ v_cache, tile_buffer& buffer,
                                  int slot, int kv_head, int num_kv_heads, int lane) {
#pragma unroll
    for (int j = 0; j < COPIES; ++j) {
      const int piece = lane + 32 * j;
      const int row = piece / PIECES;
      const int column = piece % PIECES;
      const int row_slot = __shfl_sync(0xffffffffu, slot, row);
      const bool valid = row_slot >= 0;
      const tw_i64 at = valid ? layout::offset(row_slot / PAGE_SIZE, kv_head, row_slot % PAGE_SIZE, num_kv_heads) +
                                    column * 8
                              : 0;
      tw_copy_async_16(tw_shared_address(&buffer.k[swizzled(row, column)]), k_cache + at, valid);
      tw_copy_async_16(tw_shared_address(&buffer.v[swizzled(row, column)]), v_cache + at, valid);
    }
  }

  // In lanes 0-15, the slot of token `first + lane` if it is before `end`, else -1.
  template <typename Tokens>
  TW_DEVICE static int tile_slot(const Tokens& tokens, int first, int end, int lane) {
    const int t = first + (lane & 15);
    return t < end ? tokens.slot(t) : -1;
  }

  template <typename Tokens>
  TW_DEVICE static void run(const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                            const tw_attend_block& block, const Tokens& tokens, T* __restrict__ o,
                            float* __restrict__ lse,
                            float* __restrict__ partial_o, float* __restrict__ partial_lse, int* __restrict__ done,
                            int num_kv_heads, int min_chunk_tokens, int num_chunks, float sm_scale,
                            shared_state& smem) {
    const int chunk = block.chunk;
    const int kv_head = block.kv_head;
    const int request = block.request;
    const int len = tokens.length();
    const int chunk_tokens = tw_chunk_tokens<TILE>(len, min_chunk_tokens, num_chunks);
    const int begin = chunk * chunk_tokens;
    if (begin >= len) {
      if (len == 0 && chunk == 0) merge_state::template write_empty<T, BLOCK_THREADS>(o, lse, request, kv_head, num_kv_heads);
      return;
    }
    const int end = min(len, begin + chunk_tokens);
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int g = lane / 4;  // fragment row group
    const int t = lane % 4;  // fragment column pair
    // This warp's tiles: starts begin + (warp + i * WARPS) * 16 for i < tiles.
    const int first_tile = begin + warp * 16;
    const int tiles = first_tile < end ? (end - first_tile + TILE - 1) / TILE : 0;

    // q^T as the B operand of every k-step: column g is query head g of the group.
    const int num_qo_heads = num_kv_heads * GROUP;
    uint2 q_frag[STEPS];
    {
      const T* q_head = q + (tw_i64(request) * num_qo_heads + kv_head * GROUP + g) * HEAD_DIM;
#pragma unroll
      for (int s = 0; s < STEPS; ++s) {
        q_frag[s] = g < GROUP ? make_uint2(*reinterpret_cast<const tw_u32*>(q_head + 16 * s + 2 * t),
                                           *reinterpret_cast<const tw_u32*>(q_head + 16 * s + 8 + 2 * t))
                              : make_uint2(0u, 0u);
      }
    }
    const float q_scale = sm_scale * TW_LOG2E;  // scores in base 2

    // Online-softmax state of heads 2t and 2t+1 (the same in every row group once reduced),
    // this lane's share of their sums, and O^T's accumulators: block s holds channels
    // 16s + g and 16s + g + 8 of heads 2t and 2t+1.
    float m[2] = {tw_neg_inf(), tw_neg_inf()};
    float d[2] = {0.f, 0.f};
    float acc[STEPS][4];
#pragma unroll
    for (int s = 0; s < STEPS; ++s) acc[s][0] = acc[s][1] = acc[s][2] = acc[s][3] = 0.f;

    tile_buffer* buffers = smem.tiles[warp];
    // Prologue: the first STAGES - 1 tiles in flight; the slot of the next is loaded ahead, so
    // its page-table read is not on the path of a copy.
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) {
      if (i < tiles) {
        copy_tile(k_cache, v_cache, buffers[i], tile_slot(tokens, first_tile + i * TILE, end, lane), kv_head,
                  num_kv_heads, lane);
      }
      tw_copy_async_commit();
    }
    int next_slot = STAGES - 1 < tiles ? tile_slot(tokens, first_tile + (STAGES - 1) * TILE, end, lane) : -1;

    for (int i = 0; i < tiles; ++i) {
      // Tile i + STAGES - 1 goes into the buffer tile i - 1 used (every lane is past it).
      const int ahead = i + STAGES - 1;
      if (ahead < tiles) {
        copy_tile(k_cache, v_cache, buffers[ahead % STAGES], next_slot, kv_head, num_kv_heads, lane);
        if (ahead + 1 < tiles) next_slot = tile_slot(tokens, first_tile + (ahead + 1) * TILE, end, lane);
      }
      tw_copy_async_commit();
      tw_copy_async_wait<STAGES - 1>();
      __syncwarp();
      const tile_buffer& buffer = buffers[i % STAGES];

      // S^T = K . q^T: A from K rows (tokens) as stored; lanes 0-7 / 8-15 address rows 0-7 /
      // 8-15 at piece 2s, lanes 16-31 the same rows at piece 2s + 1.
      float s_acc[4] = {0.f, 0.f, 0.f, 0.f};
      {
        const int row = (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
        for (int s = 0; s < STEPS; ++s) {
          tw_u32 a[4];
          tw_ldmatrix_x4(a, tw_shared_address(&buffer.k[swizzled(row, 2 * s + (lane >> 4))]));
          tw_mma_m16n8k16(s_acc, a, q_frag[s], T());
        }
      }
      // Scores of tokens g and g + 8 for heads 2t and 2t + 1; tokens past the chunk's end
      // (their rows were zero-filled) weigh nothing.
      const int tile_first = first_tile + i * TILE;
      const bool low_valid = tile_first + g < end;
      const bool high_valid = tile_first + g + 8 < end;
      float score[4];
      score[0] = low_valid ? s_acc[0] * q_scale : tw_neg_inf();
      score[1] = low_valid ? s_acc[1] * q_scale : tw_neg_inf();
      score[2] = high_valid ? s_acc[2] * q_scale : tw_neg_inf();
      score[3] = high_valid ? s_acc[3] * q_scale : tw_neg_inf();
      float p[4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float tile_max = fmaxf(score[h], score[h + 2]);
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 4));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 8));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 16));
        // The tile holds at least one valid token, so m_new is finite.
        const float m_new = fmaxf(m[h], tile_max);
        const float rescale = exp2f(m[h] - m_new);
        p[h] = exp2f(score[h] - m_new);
        p[h + 2] = exp2f(score[h + 2] - m_new);
        d[h] = fmaf(d[h], rescale, p[h] + p[h + 2]);
        m[h] = m_new;
#pragma unroll
        for (int s = 0; s < STEPS; ++s) {
          acc[s][h] *= rescale;
          acc[s][h + 2] *= rescale;
        }
      }
      // P^T's rows 0-7 and 8-15 (tokens) transposed: lane 4g + t then holds tokens 2t, 2t+1
      // (and 2t+8, 2t+9) of head g, the B operand of O^T += V^T . P^T.
      const uint2 p_frag = make_uint2(tw_movmatrix_trans(tw_pack_pair(p[0], p[1], T())),
                                      tw_movmatrix_trans(tw_pack_pair(p[2], p[3], T())));
      {
        // V^T blocks read transposed: lanes 0-7 / 16-23 address token rows 0-7 / 8-15 at piece
        // 2s, lanes 8-15 / 24-31 the same rows at piece 2s + 1.
        const int row = (lane & 7) + (lane >> 4) * 8;
#pragma unroll
        for (int s = 0; s < STEPS; ++s) {
          tw_u32 a[4];
          tw_ldmatrix_x4_trans(a, tw_shared_address(&buffer.v[swizzled(row, 2 * s + ((lane >> 3) & 1))]));
          tw_mma_m16n8k16(acc[s], a, p_frag, T());
        }
      }
      __syncwarp();
    }
    tw_copy_async_wait<0>();

    // Each head's sum over the eight row groups; then the warps' states meet in shared memory
    // (over the tile buffers, once every warp is done with them).
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      d[h] += __shfl_xor_sync(0xffffffffu, d[h], 4);
      d[h] += __shfl_xor_sync(0xffffffffu, d[h], 8);
      d[h] += __shfl_xor_sync(0xffffffffu, d[h], 16);
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int head = 2 * t + h;
      if (head >= GROUP) continue;
      if (g == 0) {
        smem.merge.walker_m[warp][head] = m[h];
        smem.merge.walker_d[warp][head] = d[h];
      }
#pragma unroll
      for (int s = 0; s < STEPS; ++s) {
        smem.merge.walker_o[warp][head][16 * s + g] = acc[s][h];
        smem.merge.walker_o[warp][head][16 * s + g + 8] = acc[s][h + 2];
      }
    }
    __syncthreads();
    const int used = (len + chunk_tokens - 1) / chunk_tokens;  // chunks holding tokens of the list
    smem.merge.template finish<T, BLOCK_THREADS>(o, lse, partial_o, partial_lse, done, request, kv_head, chunk, used,
                                                 num_kv_heads, num_chunks);
  }
};
