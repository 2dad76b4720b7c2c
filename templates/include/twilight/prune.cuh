// Candidates and the Twilight pruner. The candidates of (request, KV head) are the valid tokens
// of its selected pages (every page for the `full` selector), numbered in page-list order. The
// pruner estimates each candidate's attention logit from the 4-bit copy of K, finds for every
// query head the exact top-p threshold weight w* (the smallest set of largest softmax weights
// whose sum reaches p, ties at w* all kept), and compacts the union over the group into a list
// of kept token slots.

// The low nibble of `bits` as a float, exactly: 2^23 + c has c in its mantissa, so one OR and
// one subtraction replace an integer-to-float conversion, which runs at a quarter of the FMA
// rate and dominated the estimate.
TW_DEVICE float tw_nibble_to_float(unsigned bits) {
  return __uint_as_float(0x4b000000u | (bits & 15u)) - 8388608.f;
}

// Candidate c -> token slot. With SELECTED the selector's page positions are used (the request's
// last page is always the last of them), otherwise every page of the request.
template <int PAGE_SIZE, bool SELECTED>
struct tw_candidates {
  const int* pages;
  const int* positions;
  int count;

  TW_DEVICE tw_candidates(const int* kv_indptr, const int* kv_indices, const int* kv_last_page_len,
                          const int* selected, const int* selected_count, int request, int head_row,
                          int budget_pages) {
    pages = kv_indices + kv_indptr[request];
    const int last = kv_last_page_len[request];
    if (SELECTED) {
      positions = selected + tw_i64(head_row) * budget_pages;
      count = (selected_count[head_row] - 1) * PAGE_SIZE + last;
    } else {
      positions = nullptr;
      count = (kv_indptr[request + 1] - kv_indptr[request] - 1) * PAGE_SIZE + last;
    }
  }
  TW_DEVICE int slot(int c) const {
    const int pos = SELECTED ? positions[c / PAGE_SIZE] : c / PAGE_SIZE;
    return pages[pos] * PAGE_SIZE + c % PAGE_SIZE;
  }
};

template <typename T, int HEAD_DIM, int PAGE_SIZE, int GROUP, bool HND>
struct tw_prune {
  typedef tw_paged_layout<HND, PAGE_SIZE, HEAD_DIM / 2> q4_layout;
  typedef tw_paged_layout<HND, PAGE_SIZE, 2> scale_layout;

  // Grid (candidate blocks, kv heads, batch); each thread estimates PER_THREAD candidates
  // (THREADS apart, so a warp's loads stay contiguous): base-2 logits
  // sm_scale * log2(e) * q[h] . dequant(k_q4[t]) for every query head h of the group, written to
  // logits[request, qo head, candidate]. dequant = code * scale + min, so
  // q . dequant = scale * (q . code) + min * sum(q). q sits in shared memory, and each float4
  // read of it serves PER_THREAD candidates: shared-memory bandwidth, not arithmetic, bounds a
  // kernel that reads it once per candidate.
  template <int THREADS, int PER_THREAD, typename Candidates>
  TW_DEVICE static void estimate(const T* __restrict__ q, const unsigned char* __restrict__ k_q4,
                                 const half* __restrict__ k_q4_scale_min, const Candidates& cands,
                                 float* __restrict__ logits, int num_kv_heads, int max_cands, float sm_scale) {
    __shared__ __align__(16) float q_s[GROUP][HEAD_DIM];
    __shared__ float q_sum[GROUP];
    const int kv_head = blockIdx.y;
    const int request = blockIdx.z;
    const int num_qo_heads = num_kv_heads * GROUP;
    const int base = blockIdx.x * THREADS * PER_THREAD;
    if (base >= cands.count) return;  // whole block past the candidates
    const float q_scale = sm_scale * TW_LOG2E;
    for (int e = threadIdx.x; e < GROUP * HEAD_DIM; e += THREADS) {
      q_s[e / HEAD_DIM][e % HEAD_DIM] =
          q_scale * tw_to_float(q[(tw_i64(request) * num_qo_heads + kv_head * GROUP) * HEAD_DIM + e]);
    }
    __syncthreads();
    if (threadIdx.x < GROUP) {
      float s = 0.f;
      for (int d = 0; d < HEAD_DIM; ++d) s += q_s[threadIdx.x][d];
      q_sum[threadIdx.x] = s;
    }
    __syncthreads();
    const uint4* codes[PER_THREAD];
    float scale[PER_THREAD], minimum[PER_THREAD];
    bool valid[PER_THREAD];
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
      const int c = base + j * THREADS + threadIdx.x;
      valid[j] = c < cands.count;
      const int slot = valid[j] ? cands.slot(c) : 0;
      const int page = slot / PAGE_SIZE, offset = slot % PAGE_SIZE;
      codes[j] = reinterpret_cast<const uint4*>(k_q4 + q4_layout::offset(page, kv_head, offset, num_kv_heads));
      const half* sm = k_q4_scale_min + scale_layout::offset(page, kv_head, offset, num_kv_heads);
      scale[j] = valid[j] ? __half2float(sm[0]) : 0.f;
      minimum[j] = valid[j] ? __half2float(sm[1]) : 0.f;
    }
    float acc[PER_THREAD][GROUP];
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
#pragma unroll
      for (int g = 0; g < GROUP; ++g) acc[j][g] = 0.f;
    }
#pragma unroll
    for (int w = 0; w < HEAD_DIM / 32; ++w) {
      unsigned words[PER_THREAD][4];
#pragma unroll
      for (int j = 0; j < PER_THREAD; ++j) {
        const uint4 packet = valid[j] ? codes[j][w] : make_uint4(0u, 0u, 0u, 0u);
        words[j][0] = packet.x;
        words[j][1] = packet.y;
        words[j][2] = packet.z;
        words[j][3] = packet.w;
      }
#pragma unroll
      for (int half_word = 0; half_word < 8; ++half_word) {
        // Two bytes: four channels, read from shared memory as one float4 per head.
        const int ch = w * 32 + half_word * 4;
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
          const float4 qv = *reinterpret_cast<const float4*>(&q_s[g][ch]);
#pragma unroll
          for (int j = 0; j < PER_THREAD; ++j) {
            const unsigned bits = words[j][half_word / 2] >> (16 * (half_word % 2));
            acc[j][g] = fmaf(qv.x, tw_nibble_to_float(bits),
                             fmaf(qv.y, tw_nibble_to_float(bits >> 4),
                                  fmaf(qv.z, tw_nibble_to_float(bits >> 8),
                                       fmaf(qv.w, tw_nibble_to_float(bits >> 12), acc[j][g]))));
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
      if (!valid[j]) continue;
      const int c = base + j * THREADS + threadIdx.x;
#pragma unroll
      for (int g = 0; g < GROUP; ++g) {
        logits[(tw_i64(request) * num_qo_heads + kv_head * GROUP + g) * max_cands + c] =
            fmaf(scale[j], acc[j][g], minimum[j] * q_sum[g]);
      }
    }
  }

  // One block per (request, qo head): the row's max logit and the exact top-p threshold weight
  // w* (weights w = exp2(logit - max), unnormalized). A radix descent over the weights' bits
  // (positive floats order like their bits) sums the weight mass per digit bucket and follows
  // the bucket where the mass from the top first reaches p * sum(w). stats[row] = (max, w*);
  // p >= 1 keeps everything (w* = 0).
  template <int THREADS, typename Candidates>
  TW_DEVICE static void threshold(const float* __restrict__ logits, const Candidates& cands,
                                  float* __restrict__ stats, int max_cands, float p) {
    typedef tw_radix<float, THREADS> radix;
    __shared__ typename radix::storage radix_smem;
    __shared__ float scratch[THREADS / 32];
    const int row_id = blockIdx.y * gridDim.x + blockIdx.x;  // request * num_qo_heads + qo head
    const float* row = logits + tw_i64(row_id) * max_cands;
    const int n = cands.count;
    // Rows of up to THREADS * CACHED candidates (every Quest budget up to 8k tokens) keep their
    // weights in registers: one read of the logits and one exp2f each, instead of one per pass.
    constexpr int CACHED = 16;
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
    float z = 0.f;
    if (cached) {
#pragma unroll
      for (int j = 0; j < CACHED; ++j) {
        w[j] = exp2f(w[j] - mx);  // exactly 0 past the row's end (exp2(-inf))
        z += w[j];
      }
    } else {
      for (int i = threadIdx.x; i < n; i += THREADS) z += exp2f(row[i] - mx);
    }
    z = tw_block_sum<THREADS>(z, scratch);
    if (p >= 1.f) {
      if (threadIdx.x == 0) {
        stats[2 * row_id] = mx;
        stats[2 * row_id + 1] = 0.f;
      }
      return;
    }
    const float target = p * z;
    unsigned prefix = 0, mask = 0;
    float above = 0.f;  // mass of the weights beyond the current prefix's range
    for (int shift = 24; shift >= 0; shift -= 8) {
      radix::clear(radix_smem);
      __syncthreads();
      if (cached) {
#pragma unroll
        for (int j = 0; j < CACHED; ++j) {
          const unsigned key = __float_as_uint(w[j]);
          if (j * THREADS + int(threadIdx.x) < n && (key & mask) == prefix) {
            radix::add(radix_smem, (key >> shift) & 255u, w[j]);
          }
        }
      } else {
        for (int i = threadIdx.x; i < n; i += THREADS) {
          const float wi = exp2f(row[i] - mx);
          const unsigned key = __float_as_uint(wi);
          if ((key & mask) == prefix) radix::add(radix_smem, (key >> shift) & 255u, wi);
        }
      }
      radix::pick(radix_smem, above, target);
      prefix |= radix_smem.digit << shift;
      above = radix_smem.above;
      mask |= 255u << shift;
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      stats[2 * row_id] = mx;
      stats[2 * row_id + 1] = __uint_as_float(prefix);
    }
  }

  // One block per (request, kv head): the kept candidates (any head of the group keeps it; with
  // PRUNE false, every candidate) as token slots in candidate order, and their count.
  template <int THREADS, bool PRUNE, typename Candidates>
  TW_DEVICE static void compact(const float* __restrict__ logits, const float* __restrict__ stats,
                                const Candidates& cands, int* __restrict__ kept, int* __restrict__ kept_count,
                                int num_kv_heads, int max_cands) {
    __shared__ int scan_scratch[THREADS / 32];
    __shared__ float row_max[GROUP], row_threshold[GROUP];
    const int kv_head = blockIdx.x;
    const int request = blockIdx.y;
    const int head_row = request * num_kv_heads + kv_head;
    const int first_qo = head_row * GROUP;  // request * num_qo_heads + kv_head * GROUP
    if (PRUNE && threadIdx.x < GROUP) {
      row_max[threadIdx.x] = stats[2 * (first_qo + threadIdx.x)];
      row_threshold[threadIdx.x] = stats[2 * (first_qo + threadIdx.x) + 1];
    }
    __syncthreads();
    int* out = kept + tw_i64(head_row) * max_cands;
    int written = 0;
    // Each thread owns ITEMS consecutive candidates, so one block-wide scan of per-thread counts
    // (not one per candidate) places every kept slot, in candidate order.
    constexpr int ITEMS = 8;
    for (int base = 0; base < cands.count; base += THREADS * ITEMS) {
      const int first = base + threadIdx.x * ITEMS;
      unsigned keep_bits = 0;
#pragma unroll
      for (int j = 0; j < ITEMS; ++j) {
        const int c = first + j;
        bool keep = c < cands.count;
        if (PRUNE && keep) {
          keep = false;
#pragma unroll
          for (int g = 0; g < GROUP; ++g) {
            // The same expression as in `threshold`, so a weight equal to w* there is equal here.
            keep |= exp2f(logits[tw_i64(first_qo + g) * max_cands + c] - row_max[g]) >= row_threshold[g];
          }
        }
        keep_bits |= unsigned(keep) << j;
      }
      int total = 0;
      int at = written + tw_block_exclusive_sum<THREADS>(__popc(keep_bits), scan_scratch, total);
#pragma unroll
      for (int j = 0; j < ITEMS; ++j) {
        if (keep_bits & (1u << j)) out[at++] = cands.slot(first + j);
      }
      written += total;
    }
    if (threadIdx.x == 0) kept_count[head_row] = written;
  }
};
