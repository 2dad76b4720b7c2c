// Candidates and the Twilight pruner. The candidates of (request, KV head) are the valid tokens
// of its selected pages (every page for the `full` selector), numbered in page-list order, or
// the tokens a token selector chose, in position order. The
// pruner estimates each candidate's attention logit from the 4-bit copy of K, finds for every
// query head the exact top-p threshold weight w* (the smallest set of largest softmax weights
// whose sum reaches p, ties at w* all kept), and compacts the union over the group into a list
// of kept token slots.

// Operands of the estimate's integer dot products (tw_prune::estimate). A code word holds the
// 4-bit codes of eight consecutive channels, channel ch + i in bits 4i..4i+3, so its even
// channels are its low nibbles and its odd channels its high ones: one LOP3, or a shift and a
// LOP3, turn a word into a register of four unsigned 8-bit operands, against two instructions
// per two codes for 16-bit floating-point operands.
TW_DEVICE tw_u32 tw_q4_even_channels(tw_u32 word) { return word & 0x0f0f0f0fu; }
TW_DEVICE tw_u32 tw_q4_odd_channels(tw_u32 word) { return (word >> 4) & 0x0f0f0f0fu; }

// The query as the estimate's signed 8-bit operand, per query head: q ~= step * qi with
// qi = round(q * (127 / max|q|)) (ties to even, so |qi| <= 127) and step = max|q| / 127; all
// zero when q is. The CPU reference (reference::top_p::estimate_query) rounds in the same f32
// operations, so both sides estimate with the same integers.
struct tw_q8_head {
  float inv;  // 127 / max|q|, 0 for a zero row
  float step;
};
TW_DEVICE tw_q8_head tw_q8_of_max(float max_abs) {
  return {max_abs > 0.f ? 127.f / max_abs : 0.f, max_abs / 127.f};
}
TW_DEVICE int tw_q8_round(float x, float inv) { return __float2int_rn(x * inv); }

// Candidate c -> token slot, from a page selector's choice: with SELECTED the ids of the
// selector's pages in the pool (rows of `stride`; the request's last page is always the last
// of them), otherwise every page of the request. A SELECTED step whose every request fits the
// budget launches no selection and passes no selection (null): every page, as the selection
// would have chosen them.
template <int PAGE_SIZE, bool SELECTED>
struct tw_page_candidates {
  const int* pages;  // page ids: the selection's row, or the request's page list
  int count;
  int capacity;  // candidates whose page id lies inside `pages`

  TW_DEVICE tw_page_candidates(const int* kv_indptr, const int* kv_indices, const int* kv_last_page_len,
                               const int* selected, const int* selected_count, const int* selected_pages,
                               int request, int head_row, int stride) {
    const int last = kv_last_page_len[request];
    if (SELECTED && selected_pages != nullptr) {
      pages = selected_pages + tw_i64(head_row) * stride;
      count = (selected_count[head_row] - 1) * PAGE_SIZE + last;
      capacity = stride * PAGE_SIZE;
    } else {
      const int first = kv_indptr[request];
      pages = kv_indices + first;
      count = (kv_indptr[request + 1] - first - 1) * PAGE_SIZE + last;
      capacity = count;
    }
  }
  TW_DEVICE int slot(int c) const { return pages[c / PAGE_SIZE] * PAGE_SIZE + c % PAGE_SIZE; }
  // A lookup in steps, for loads issued well before the slot is needed and for any c (past
  // the count the result is meaningless and must not be used, but every read stays in
  // bounds): c's position in the page list (c itself here), the id of that position's page,
  // then the slot. (A request has at least one token, so capacity - 1 is a position.)
  TW_DEVICE int early_position(int c) const { return c; }
  TW_DEVICE int early_page(int position) const { return pages[min(position, capacity - 1) / PAGE_SIZE]; }
  TW_DEVICE static int slot_of(int position, int page) { return page * PAGE_SIZE + position % PAGE_SIZE; }
  TW_DEVICE int early_slot(int c) const { return slot_of(c, early_page(c)); }
};

// Candidate c -> token slot, from a token selector's choice: token positions in rows of
// `stride`, ascending. A step whose every request fits the budget passes no selection (null):
// every token, position c as candidate c.
template <int PAGE_SIZE>
struct tw_token_candidates {
  const int* pages;
  const int* positions;  // null: the identity
  int count;

  TW_DEVICE tw_token_candidates(const int* kv_indptr, const int* kv_indices, const int* kv_last_page_len,
                                const int* selected, const int* selected_count, const int*, int request,
                                int head_row, int stride)
      : pages(kv_indices + kv_indptr[request]),
        positions(selected != nullptr ? selected + tw_i64(head_row) * stride : nullptr),
        count(selected != nullptr ? selected_count[head_row]
                                  : tw_request_len(kv_indptr, kv_last_page_len, request, PAGE_SIZE)) {}
  TW_DEVICE int position(int c) const { return positions != nullptr ? positions[c] : c; }
  TW_DEVICE int slot(int c) const {
    const int pos = position(c);
    return pages[pos / PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE;
  }
  // The same steps as tw_page_candidates's. Past the count a position may be stale: 0 there.
  TW_DEVICE int early_position(int c) const { return c < count ? position(c) : 0; }
  TW_DEVICE int early_page(int position) const { return pages[position / PAGE_SIZE]; }
  TW_DEVICE static int slot_of(int position, int page) { return page * PAGE_SIZE + position % PAGE_SIZE; }
  TW_DEVICE int early_slot(int c) const {
    const int position = early_position(c);
    return slot_of(position, early_page(position));
  }
};

template <typename T, int HEAD_DIM, int PAGE_SIZE, int GROUP, bool HND>
struct tw_prune {
  // Candidates per thread in one round of the compaction's scan (see `compact`).
  static constexpr int COMPACT_ITEMS = 8;
  typedef tw_paged_layout<HND, PAGE_SIZE, HEAD_DIM / 2> q4_layout;
  typedef tw_paged_layout<HND, PAGE_SIZE, 2> scale_layout;

  // Grid (blocks per row, kv heads, batch): base-2 logits sm_scale * log2(e) * q8[h] .
  // dequant(k_q4[c]) for every query head h of the group, written to logits[request, qo head,
  // candidate], where q8 is the query rounded to 8 bits per head (tw_q8_head). dequant = code *
  // scale + min, so q8 . dequant = step * (scale * (qi . code) + min * sum(qi)), and qi . code
  // is exact in 32-bit integers.
  //
  // The row's candidates go in groups of 32; each warp of the row's blocks takes a contiguous
  // share of the groups and streams their codes and (scale, min) pairs through a STAGES-deep
  // ring of asynchronous copies of its own, so STAGES - 1 groups are in flight while it
  // multiplies one, and the warp's setup (B, the heads' steps) is paid once per share rather
  // than once per group. With one group per warp and its loads in registers (v17), 4096 short
  // blocks ran in four waves, each warp waiting out its page ids and then its codes (ncu: DRAM
  // at 46%). The ring measured 18 us at the headline against 19 (bench/PERF-NOTES.md, v18).
  //
  // The dot products run on the tensor cores as integer MMAs (mma.m16n8k32, unsigned 8-bit A,
  // signed 8-bit B, 32-bit accumulators). A group is two tiles of 16 candidates; each multiplies
  // A (16 candidates x HEAD_DIM channels, the codes) by B (HEAD_DIM channels x 8 columns: the
  // group's qi, zero columns past GROUP). With 16-bit float operands (v18) a group took twice
  // the MMAs and 136 conversion instructions against 48 here; the kernel now issues 16% fewer
  // instructions and the stage measured 17.4 us against 18.1 (bench/PERF-NOTES.md, v19).
  //
  // Fragments of mma.m16n8k32 with 8-bit operands (PTX ISA), lane = 4 * g + t: A a0 = row g,
  // columns 4t..4t+3, a1 = row g+8, same columns, a2 / a3 = rows g / g+8, columns 16+4t..16+4t+3;
  // B b0 = rows 4t..4t+3, b1 = rows 16+4t..16+4t+3, column g; C c0, c1 = row g, columns (2t,
  // 2t+1), c2, c3 = row g+8. The lowest column (A) or row (B) sits in a register's low byte. The
  // k order is free as long as A and B share it, so lane t owns one contiguous quarter of every
  // candidate's codes (a single 16-byte read for head_dim 128; the 4 lanes of a row read it
  // whole): k-step s takes its code word s, whose even channels (tw_q4_even_channels) are a0 /
  // a1 and odd channels a2 / a3. That depends on t alone, so every lane's A columns meet the
  // matching B rows.
  template <int THREADS, int STAGES, typename Candidates>
  TW_DEVICE static void estimate(const T* __restrict__ q, const unsigned char* __restrict__ k_q4,
                                 const half* __restrict__ k_q4_scale_min, const Candidates& cands,
                                 float* __restrict__ logits, int num_kv_heads, int max_cands, float sm_scale) {
    static_assert(THREADS % 32 == 0, "whole warps");
    static_assert(STAGES >= 2, "a ring of at least two groups");
    static_assert(GROUP <= 8, "the group's query heads are the 8 columns of B");
    constexpr int WARPS = THREADS / 32;
    constexpr int TILES = 2;                                  // 16-candidate tiles per group
    constexpr int ROW_BYTES = HEAD_DIM / 2;                   // one candidate's codes
    constexpr int ROW_CHUNKS = ROW_BYTES / 16;                // its 16-byte copies
    constexpr int LANE_BYTES = HEAD_DIM / 8;                  // a lane's quarter of a row
    constexpr int CHUNK = LANE_BYTES < 16 ? LANE_BYTES : 16;  // bytes per shared-memory read
    constexpr int CHUNK_WORDS = CHUNK / 4;
    constexpr int WORDS = LANE_BYTES / 4;  // code words per row and lane, one k-step each
    static_assert(32 % ROW_CHUNKS == 0, "a group's rows split evenly over the lanes' copies");
    // First channel of code word w of lane t: its chunk u = w / CHUNK_WORDS lies at byte
    // u * 4 * CHUNK + t * CHUNK of the row (so the 4 lanes of a row read 4 * CHUNK contiguous
    // bytes per read), two channels per byte.
    const auto code_channel = [](int lane_t, int w) {
      return 2 * (w / CHUNK_WORDS * 4 * CHUNK + lane_t * CHUNK + w % CHUNK_WORDS * 4);
    };
    // Where byte b of row r sits in a ring stage. A 128-byte row (head_dim 256) swaps its
    // halves on odd rows: the two rows one quarter-warp reads at once would share banks.
    const auto stage_byte = [](int r, int b) {
      const int swizzle = ROW_CHUNKS == 8 ? (r & 1) * 64 : 0;
      return r * ROW_BYTES + (b ^ swizzle);
    };
    struct ring_stage {
      unsigned char codes[32 * ROW_BYTES];
      tw_u32 scale_min[32];
    };
    __shared__ __align__(16) ring_stage ring[WARPS][STAGES];
    const int kv_head = tw_grid_head();
    const int request = tw_grid_request();
    const int num_qo_heads = num_kv_heads * GROUP;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;

    // B is built by each warp on its own, in registers: lane 4n + t holds (b0, b1) of every
    // k-step s for head n, the even and the odd channels of its code word s. Lanes 4n..4n+3
    // hold head n's whole row between them, so its largest |q| and sum(qi) take two shuffles,
    // and no barrier stands before a warp's first copies. q's loads go out first, the first
    // lookups' next, and q is rounded while both are in flight. (Built once per block in shared
    // memory behind a barrier, with two more passes over q, the stage took 20.7 us at the
    // headline against 17.4 this way; bench/PERF-NOTES.md, v19.)
    const T* q_heads = q + (tw_i64(request) * num_qo_heads + kv_head * GROUP) * HEAD_DIM;
    uint4 q_words[WORDS];  // channels code_channel(t, s) .. + 7 of head g (a valid head past GROUP)
#pragma unroll
    for (int s = 0; s < WORDS; ++s)
      q_words[s] = *reinterpret_cast<const uint4*>(q_heads + min(g, GROUP - 1) * HEAD_DIM + code_channel(t, s));

    // This warp's groups: a contiguous, balanced share of the row's capacity (max_cands
    // candidates), so that the first lookups below need not wait for the row's count; a share
    // is cut at the count once it arrives.
    const tw_share share =
        tw_balanced_share((max_cands + 31) / 32, tw_grid_part() * WARPS + warp, gridDim.x * WARPS);
    const int begin = share.begin;
    const int count = cands.count;
    ring_stage* my_ring = ring[warp];

    // Copies group n's codes and (scale, min) pairs into `stage`, given the slot of the lane's
    // candidate 32n + lane; past the row's end they read nothing and write zeros.
    const auto copy_group = [&](int n, unsigned slot, ring_stage& stage) {
      const int page = slot / PAGE_SIZE, offset = slot % PAGE_SIZE;
      const tw_i64 codes_at = q4_layout::offset(page, kv_head, offset, num_kv_heads);
      const half* scale_min = k_q4_scale_min + scale_layout::offset(page, kv_head, offset, num_kv_heads);
      tw_copy_async_4(tw_shared_address(&stage.scale_min[lane]), scale_min, 32 * n + lane < count);
#pragma unroll
      for (int k = 0; k < ROW_CHUNKS; ++k) {
        // Rows r of a copy instruction are consecutive and each is read whole by its lanes.
        const int r = lane / ROW_CHUNKS + k * (32 / ROW_CHUNKS), chunk = lane % ROW_CHUNKS;
        const tw_i64 row_at = __shfl_sync(0xffffffffu, codes_at, r);
        tw_copy_async_16(tw_shared_address(stage.codes + stage_byte(r, 16 * chunk)), k_q4 + row_at + 16 * chunk,
                         32 * n + r < count);
      }
    };

    // The ring. A lane's candidate in a group is found in two dependent loads (its position
    // in the page list for token candidates, then its page's id), each issued one iteration
    // before its result is used: the copies of group n + STAGES - 1 use a page id loaded
    // during group n - 1. (Looked up in the iteration that copies, the slot's load stalled each
    // warp for a fifth of its samples, ncu.)
    unsigned first_slots[STAGES - 1];
#pragma unroll
    for (int k = 0; k < STAGES - 1; ++k) first_slots[k] = cands.early_slot(32 * (begin + k) + lane);

    // Head g's qi (tw_q8_head) into B: its largest |q| over the four lanes of the head.
    float max_abs = 0.f;
#pragma unroll
    for (int s = 0; s < WORDS; ++s) {
      const T* channels = reinterpret_cast<const T*>(&q_words[s]);
#pragma unroll
      for (int i = 0; i < 8; ++i) max_abs = fmaxf(max_abs, fabsf(tw_to_float(channels[i])));
    }
    max_abs = fmaxf(max_abs, __shfl_xor_sync(0xffffffffu, max_abs, 1));
    max_abs = fmaxf(max_abs, __shfl_xor_sync(0xffffffffu, max_abs, 2));
    const tw_q8_head head_q8 = tw_q8_of_max(max_abs);
    uint2 b_frag[WORDS];
    int qi_sum = 0;
#pragma unroll
    for (int s = 0; s < WORDS; ++s) {
      const T* channels = reinterpret_cast<const T*>(&q_words[s]);
      uint2 b = make_uint2(0u, 0u);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int qi = tw_q8_round(tw_to_float(channels[i]), head_q8.inv);
        qi_sum += qi;
        const tw_u32 byte = (static_cast<tw_u32>(qi) & 0xffu) << (8 * (i / 2));
        if (i % 2 == 0) {
          b.x |= byte;
        } else {
          b.y |= byte;
        }
      }
      b_frag[s] = g < GROUP ? b : make_uint2(0u, 0u);
    }
    qi_sum += __shfl_xor_sync(0xffffffffu, qi_sum, 1);
    qi_sum += __shfl_xor_sync(0xffffffffu, qi_sum, 2);

    // logit = scale * (q_scale * step * (qi . code)) + min * (q_scale * step * sum(qi)) for
    // this lane's heads 2t + e (held by lanes 8t + 4e), with the factors that do not depend on
    // the candidate taken out of the loop.
    const float q_scale = sm_scale * TW_LOG2E;
    float code_factor[2], min_factor[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int holder = 4 * (2 * t + e);
      code_factor[e] = q_scale * __shfl_sync(0xffffffffu, head_q8.step, holder);
      min_factor[e] = code_factor[e] * static_cast<float>(__shfl_sync(0xffffffffu, qi_sum, holder));
    }

    const int end = min(share.end, (count + 31) / 32);
    if (begin >= end) return;  // no barrier follows
#pragma unroll
    for (int k = 0; k < STAGES - 1; ++k) {
      if (begin + k < end) copy_group(begin + k, first_slots[k], my_ring[k]);
      tw_copy_async_commit();
    }
    int copy_position = cands.early_position(32 * (begin + STAGES - 1) + lane);
    int copy_page = cands.early_page(copy_position);
    int next_position = cands.early_position(32 * (begin + STAGES) + lane);

    float* out = logits + (tw_i64(request) * num_qo_heads + kv_head * GROUP) * max_cands;
#pragma unroll 1
    for (int n = begin; n < end; ++n) {
      const int ahead = n + STAGES - 1;
      // The next lookups' loads go out before this group's copies, whose queue they would
      // otherwise wait behind.
      const unsigned slot = Candidates::slot_of(copy_position, copy_page);
      copy_position = next_position;
      copy_page = cands.early_page(copy_position);
      next_position = cands.early_position(32 * (ahead + 2) + lane);
      if (ahead < end) copy_group(ahead, slot, my_ring[(ahead - begin) % STAGES]);
      tw_copy_async_commit();
      tw_copy_async_wait<STAGES - 1>();  // group n has landed
      __syncwarp();
      const ring_stage& stage = my_ring[(n - begin) % STAGES];

      // This lane's A rows: candidates 16i + g (h = 0) and + 8 (h = 1) of the group's tile i.
      tw_u32 codes[TILES][2][WORDS];
      tw_u32 row_scale_min[TILES][2];
#pragma unroll
      for (int i = 0; i < TILES; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = 16 * i + g + 8 * h;
          row_scale_min[i][h] = stage.scale_min[r];
#pragma unroll
          for (int u = 0; u < WORDS / CHUNK_WORDS; ++u) {
            const unsigned char* at = stage.codes + stage_byte(r, u * 4 * CHUNK + t * CHUNK);
            tw_u32* dst = &codes[i][h][u * CHUNK_WORDS];
            if constexpr (CHUNK == 16) {
              const uint4 v = *reinterpret_cast<const uint4*>(at);
              dst[0] = v.x;
              dst[1] = v.y;
              dst[2] = v.z;
              dst[3] = v.w;
            } else {
              const uint2 v = *reinterpret_cast<const uint2*>(at);
              dst[0] = v.x;
              dst[1] = v.y;
            }
          }
        }
      }
      __syncwarp();  // the stage is free for the copies of the next iteration

      int acc[TILES][4];
#pragma unroll
      for (int i = 0; i < TILES; ++i) {
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[i][k] = 0;
      }
#pragma unroll
      for (int s = 0; s < WORDS; ++s) {
        const uint2 b = b_frag[s];
#pragma unroll
        for (int i = 0; i < TILES; ++i) {
          const tw_u32 lo = codes[i][0][s], hi = codes[i][1][s];
          const tw_u32 a[4] = {tw_q4_even_channels(lo), tw_q4_even_channels(hi), tw_q4_odd_channels(lo),
                               tw_q4_odd_channels(hi)};
          tw_mma_m16n8k32_u8s8(acc[i], a, b);
        }
      }

      // acc[i][2h + e] is qi . code of candidate 32n + 16i + g + 8h against head 2t + e.
#pragma unroll
      for (int i = 0; i < TILES; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int c = 32 * n + 16 * i + g + 8 * h;
          if (c >= count) continue;
          const float2 sm = tw_pair_to_float2(row_scale_min[i][h], half());  // (scale, min)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int head = 2 * t + e;
            if (head < GROUP) {
              out[tw_i64(head) * max_cands + c] =
                  fmaf(sm.x * code_factor[e], static_cast<float>(acc[i][2 * h + e]), sm.y * min_factor[e]);
            }
          }
        }
      }
    }
  }

  // Calls f(key) for every weight of a threshold's row whose key (its bits, at least
  // FLOOR_KEY) matches `prefix` under `mask`: from the registers of a cached row, else
  // recomputed from the logits.
  template <int THREADS, int CACHED, typename F>
  TW_DEVICE static void for_matching_keys(const float (&w)[CACHED], bool cached, int n, const float* __restrict__ row,
                                          float mx, unsigned prefix, unsigned mask, F&& f) {
    constexpr unsigned FLOOR_KEY = 0x20000000u;
    if (cached) {
#pragma unroll
      for (int j = 0; j < CACHED; ++j) {
        const unsigned key = max(__float_as_uint(w[j]), FLOOR_KEY);
        if (j * THREADS + int(threadIdx.x) < n && (key & mask) == prefix) f(key);
      }
    } else {
      for (int i = threadIdx.x; i < n; i += THREADS) {
        const unsigned key = max(__float_as_uint(exp2f(row[i] - mx)), FLOOR_KEY);
        if ((key & mask) == prefix) f(key);
      }
    }
  }

  // One block per (request, qo head): the row's max logit and the exact top-p threshold weight
  // w* (weights w = exp2(logit - max), unnormalized). A radix descent over the weights' bits
  // (positive floats order like their bits) sums the weight mass per digit bucket and follows
  // the bucket where the mass from the top first reaches p * sum(w); the kept set is every
  // weight >= w*. stats[row] = (max, w*); p >= 1 keeps everything (w* = 0).
  // `row_id` is request * num_qo_heads + qo head. Returns (max, w*) to every thread.
  template <int THREADS, typename Candidates>
  TW_DEVICE static float2 threshold(const float* __restrict__ logits, const Candidates& cands,
                                    float* __restrict__ stats, int max_cands, float p, int row_id) {
    typedef tw_mass_radix<THREADS> radix;
    __shared__ typename radix::storage radix_smem;
    __shared__ float scratch[THREADS / 32];
    const float* row = logits + tw_i64(row_id) * max_cands;
    const int n = cands.count;
    // Rows of up to THREADS * CACHED candidates (every Quest budget up to 8k tokens) keep their
    // weights in registers: one read of the logits and one exp2f each, instead of one per pass,
    // and their bucket masses are exact integer sums (tw_mass_radix).
    constexpr int CACHED = radix::CACHED;
    const bool cached = n <= THREADS * CACHED;
    float w[CACHED];
    float mx = tw_neg_inf();
    if (cached) {
#pragma unroll
      for (int j = 0; j < CACHED; ++j) {
        const int i = j * THREADS + threadIdx.x;
        w[j] = i < n ? row[i] : tw_neg_inf();
        mx = fmaxf(mx, w[j]);
      }
    } else {
      for (int i = threadIdx.x; i < n; i += THREADS) mx = fmaxf(mx, row[i]);
    }
    mx = tw_block_max<THREADS>(mx, scratch);
    if (p >= 1.f) {
      if (threadIdx.x == 0) {
        stats[2 * row_id] = mx;
        stats[2 * row_id + 1] = 0.f;
      }
      return make_float2(mx, 0.f);
    }
    if (cached) {
#pragma unroll
      for (int j = 0; j < CACHED; ++j) w[j] = exp2f(w[j] - mx);  // exactly 0 past the row's end (exp2(-inf))
    }
    // Weights lie in (0, 1], so a key's top three bits are 001 from 2^-63 up: the digits start
    // below them. The first digit is then 6 exponent bits and 2 mantissa bits (quarter-octave
    // buckets) rather than the top 8 bits (two-octave buckets, where most of a peaked row's
    // weights would meet in a few bins). Weights below 2^-63 are binned, and weighed, as 2^-63:
    // their mass, under n * 2^-63, cannot reach the 1 - p of the row's that p < 1 leaves out.
    constexpr unsigned FLOOR_KEY = 0x20000000u;  // 2^-63
    constexpr int SHIFTS[4] = {21, 13, 5, 0};
    constexpr unsigned WIDTHS[4] = {255u, 255u, 255u, 31u};
    unsigned prefix = FLOOR_KEY, mask = 0xE0000000u;
    radix::clear(radix_smem);
    __syncthreads();
#pragma unroll
    for (int pass = 0; pass < 4; ++pass) {
      const int shift = SHIFTS[pass];
      const unsigned width = WIDTHS[pass];
      for_matching_keys<THREADS>(w, cached, n, row, mx, prefix, mask, [&](unsigned key) {
        const unsigned bucket = (key >> shift) & width;
        if (cached) {
          radix::add_exact(radix_smem, bucket, key & ((1u << shift) - 1u));
        } else {
          radix::add_float(radix_smem, bucket, __uint_as_float(key));
        }
      });
      radix::pick(radix_smem, cached, prefix, shift, pass == 0, p);
      prefix |= radix_smem.digit << shift;
      mask |= width << shift;
      if (pass < 3 && radix_smem.chosen_count <= radix::FEW) {
        for_matching_keys<THREADS>(w, cached, n, row, mx, prefix, mask, [&](unsigned key) { radix::gather(radix_smem, key); });
        radix::finish(radix_smem);
        prefix = radix_smem.key;
        break;
      }
    }
    if (threadIdx.x == 0) {
      stats[2 * row_id] = mx;
      stats[2 * row_id + 1] = __uint_as_float(prefix);
    }
    return make_float2(mx, __uint_as_float(prefix));
  }

  // One block per (request, kv head): the kept candidates (any head of the group keeps it; with
  // PRUNE false, every candidate) as token slots in candidate order, and their count.
  template <int THREADS, bool PRUNE, typename Candidates>
  TW_DEVICE static void compact(const float* __restrict__ logits, const float* __restrict__ stats,
                                const Candidates& cands, int* __restrict__ kept, int* __restrict__ kept_count,
                                int num_kv_heads, int max_cands) {
    __shared__ int scan_scratch[THREADS / 32];
    const int head_row = tw_grid_row();  // grid (1, kv heads, requests)
    const int first_qo = head_row * GROUP;  // request * num_qo_heads + kv_head * GROUP
    // Every thread reads the group's (max, w*) itself (the same few addresses for the whole
    // block), so its logit loads need not wait for a barrier.
    float row_max[GROUP], row_threshold[GROUP];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      row_max[g] = PRUNE ? stats[2 * (first_qo + g)] : 0.f;
      row_threshold[g] = PRUNE ? stats[2 * (first_qo + g) + 1] : 0.f;
    }
    int* out = kept + tw_i64(head_row) * max_cands;
    int written = 0;
    // Each thread owns ITEMS consecutive candidates, so one block-wide scan of per-thread counts
    // (not one per candidate) places every kept slot, in candidate order.
    constexpr int ITEMS = COMPACT_ITEMS;
    // Rows on a 16-byte boundary read each head's ITEMS logits as float4s: a warp's load
    // instruction then covers 512 contiguous bytes, where one float per lane 32 bytes apart
    // touches 32 sectors for 32 floats.
    const bool vector_rows = (max_cands % 4) == 0;
    for (int base = 0; base < cands.count; base += THREADS * ITEMS) {
      const int first = base + threadIdx.x * ITEMS;
      // Every candidate's slot is looked up before the scan, while the logits load: after it
      // they would cost two dependent loads (position, then page) on the way out.
      int slots[ITEMS];
#pragma unroll
      for (int j = 0; j < ITEMS; ++j) slots[j] = cands.early_slot(first + j);
      unsigned keep_bits = 0;
      if (!PRUNE || first + ITEMS > cands.count || !vector_rows) {
#pragma unroll
        for (int j = 0; j < ITEMS; ++j) {
          const int c = first + j;
          bool keep = c < cands.count;
          if (PRUNE && keep) keep = kept_by_group(logits, first_qo, max_cands, c, row_max, row_threshold);
          keep_bits |= unsigned(keep) << j;
        }
      } else {
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
          const float4* at = reinterpret_cast<const float4*>(logits + tw_i64(first_qo + g) * max_cands + first);
#pragma unroll
          for (int v = 0; v < ITEMS / 4; ++v) {
            const float4 x = at[v];
            const float l[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              // The same expression as in `threshold`, so a weight equal to w* there is equal here.
              keep_bits |= unsigned(exp2f(l[e] - row_max[g]) >= row_threshold[g]) << (4 * v + e);
            }
          }
        }
      }
      int total = 0;
      int at = written + tw_block_exclusive_sum<THREADS>(__popc(keep_bits), scan_scratch, total);
#pragma unroll
      for (int j = 0; j < ITEMS; ++j) {
        if (keep_bits & (1u << j)) out[at++] = slots[j];
      }
      written += total;
    }
    if (threadIdx.x == 0) kept_count[head_row] = written;
  }

  // The union test of `compact` for candidate c: any head of the group keeps it. The same
  // expression as in `threshold`, so a weight equal to w* there is equal here.
  TW_DEVICE static bool kept_by_group(const float* __restrict__ logits, tw_i64 first_qo, int max_cands, int c,
                                      const float* row_max, const float* row_threshold) {
    bool keep = false;
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      keep |= exp2f(logits[(first_qo + g) * max_cands + c] - row_max[g]) >= row_threshold[g];
    }
    return keep;
  }

  // Threshold and compaction of one (request, KV head) in one launch: a cluster of GROUP CTAs,
  // CTA r computing the threshold of the group's query head r (in parallel, as the separate
  // threshold kernel does), then, once every head's (max, w*) is in the cluster's shared
  // memory, compacting the r-th contiguous share of the candidates: it counts what it keeps,
  // takes the counts of the shares before it from their CTAs, and writes its kept slots at
  // that offset, so the list is in candidate order as `compact` writes it. Grid (GROUP, kv
  // heads, requests), cluster (GROUP, 1, 1).
  template <int THREADS, typename Candidates>
  TW_DEVICE static void threshold_compact(const float* __restrict__ logits, const Candidates& cands,
                                          float* __restrict__ stats, int* __restrict__ kept,
                                          int* __restrict__ kept_count, int num_kv_heads, int max_cands, float p) {
    __shared__ float head_stats[2];   // this CTA's head: (max, w*), read by the whole cluster
    __shared__ int share_count;       // kept candidates of this CTA's share, read by later ranks
    __shared__ float row_max[GROUP], row_threshold[GROUP];
    __shared__ int scan_scratch[THREADS / 32];
    __shared__ int offset;
    const int rank = int(tw_cluster_rank());
    const int head_row = tw_grid_row();  // grid (GROUP, kv heads, requests)
    const tw_i64 first_qo = tw_i64(head_row) * GROUP;
    const float2 st = threshold<THREADS>(logits, cands, stats, max_cands, p, int(first_qo) + rank);
    if (threadIdx.x == 0) {
      head_stats[0] = st.x;
      head_stats[1] = st.y;
    }
    tw_cluster_sync();  // every head's threshold is in its CTA's shared memory
    if (threadIdx.x < GROUP) {
      row_max[threadIdx.x] = tw_cluster_load(&head_stats[0], threadIdx.x);
      row_threshold[threadIdx.x] = tw_cluster_load(&head_stats[1], threadIdx.x);
    }
    __syncthreads();
    const int share = (cands.count + GROUP - 1) / GROUP;
    const int begin = min(cands.count, rank * share);
    const int end = min(cands.count, begin + share);
    // Pass 1: this share's count.
    int mine = 0;
    for (int c = begin + threadIdx.x; c < end; c += THREADS) {
      mine += kept_by_group(logits, first_qo, max_cands, c, row_max, row_threshold);
    }
    int total = 0;
    tw_block_exclusive_sum<THREADS>(mine, scan_scratch, total);
    if (threadIdx.x == 0) share_count = total;
    tw_cluster_sync();  // every share's count is visible
    if (threadIdx.x == 0) {
      int before = 0, all = 0;
      for (int r = 0; r < GROUP; ++r) {
        const int n = tw_cluster_load(&share_count, r);
        if (r < rank) before += n;
        all += n;
      }
      offset = before;
      if (rank == 0) kept_count[head_row] = all;
    }
    __syncthreads();
    // Pass 2: place each kept slot, ITEMS consecutive candidates per thread, in order.
    int* out = kept + tw_i64(head_row) * max_cands;
    int written = offset;
    constexpr int ITEMS = 4;
    for (int base = begin; base < end; base += THREADS * ITEMS) {
      const int first = base + threadIdx.x * ITEMS;
      unsigned keep_bits = 0;
#pragma unroll
      for (int j = 0; j < ITEMS; ++j) {
        const int c = first + j;
        if (c < end && kept_by_group(logits, first_qo, max_cands, c, row_max, row_threshold)) keep_bits |= 1u << j;
      }
      int step_total = 0;
      int at = written + tw_block_exclusive_sum<THREADS>(__popc(keep_bits), scan_scratch, step_total);
#pragma unroll
      for (int j = 0; j < ITEMS; ++j) {
        if (keep_bits & (1u << j)) out[at++] = cands.slot(first + j);
      }
      written += step_total;
    }
    // No CTA may leave while another can still read its shared memory.
    tw_cluster_sync();
  }
};
