// Append of new tokens to the paged cache, and of everything derived from K that the variant
// reads, in one launch. The host groups the new tokens by destination page into jobs
// {page, first_offset, count, src_row}: the `count` tokens starting at row `src_row` of k_new/v_new
// land at offsets first_offset.. of `page`. One block owns one page, so the page's Quest min/max
// can be updated without atomics, from its old value when the page already held tokens.
// LABELS > 0 also writes Double Sparsity's label of each new key: its values at the KV head's
// LABELS calibrated channels `ds_channels[head]`.
// With k_new == nullptr the keys are already in the cache (an engine wrote them with its own
// kernel): each is read where it lies, K and V are not written, and only the derived
// structures are, exactly as an append of the same rows would write them.

template <typename T, int HEAD_DIM, int PAGE_SIZE, bool HND, bool QUEST, bool QUANT4, int LABELS, int THREADS>
struct tw_append {
  static constexpr int TX = HEAD_DIM / 8;
  static constexpr int WARPS = THREADS / 32;
  static constexpr int PER_LANE = HEAD_DIM / 32;  // channels per lane when a warp owns a row
  typedef tw_paged_layout<HND, PAGE_SIZE, HEAD_DIM> kv_layout;
  typedef tw_paged_layout<HND, PAGE_SIZE, HEAD_DIM / 2> q4_layout;  // bytes: two codes each
  typedef tw_paged_layout<HND, PAGE_SIZE, 2> scale_layout;           // (scale, min) pairs
  typedef tw_paged_layout<HND, PAGE_SIZE, (LABELS > 0 ? LABELS : 1)> label_layout;

  // Row i of a job's new keys for one head: in k_new, or in the cache when k_new is null.
  TW_DEVICE static const T* key_row(const T* k_new, const T* k_cache, int page, int first, int src_row, int i,
                                    int head, int num_kv_heads) {
    return k_new != nullptr ? k_new + (tw_i64(src_row + i) * num_kv_heads + head) * HEAD_DIM
                            : k_cache + kv_layout::offset(page, head, first + i, num_kv_heads);
  }

  TW_DEVICE static void run(const T* __restrict__ k_new, const T* __restrict__ v_new, const int* __restrict__ jobs,
                            T* __restrict__ k_cache, T* __restrict__ v_cache, T* __restrict__ page_bounds,
                            unsigned char* __restrict__ k_q4,
                            half* __restrict__ k_q4_scale_min, T* __restrict__ k_label,
                            const int* __restrict__ ds_channels, int num_jobs, int num_kv_heads) {
    const int job_id = blockIdx.x;
    if (job_id >= num_jobs) return;
    const int page = jobs[4 * job_id];
    const int first = jobs[4 * job_id + 1];
    const int count = jobs[4 * job_id + 2];
    const int src_row = jobs[4 * job_id + 3];

    const bool in_place = k_new == nullptr;
    for (int e = threadIdx.x; !in_place && e < count * num_kv_heads * TX; e += THREADS) {
      const int i = e / (num_kv_heads * TX);
      const int head = e / TX % num_kv_heads;
      const int lane = e % TX;
      const tw_i64 src = (tw_i64(src_row + i) * num_kv_heads + head) * HEAD_DIM + lane * 8;
      const tw_i64 dst = kv_layout::offset(page, head, first + i, num_kv_heads) + lane * 8;
      tw_vec8<T> packet;
      packet.load(k_new + src);
      packet.store(k_cache + dst);
      packet.load(v_new + src);
      packet.store(v_cache + dst);
    }

    if (LABELS > 0) {
      for (int e = threadIdx.x; e < count * num_kv_heads * LABELS; e += THREADS) {
        const int i = e / (num_kv_heads * LABELS);
        const int head = e / LABELS % num_kv_heads;
        const int j = e % LABELS;
        const int channel = ds_channels[head * LABELS + j];
        k_label[label_layout::offset(page, head, first + i, num_kv_heads) + j] =
            key_row(k_new, k_cache, page, first, src_row, i, head, num_kv_heads)[channel];
      }
    }

    if (QUANT4) {
      // One warp per (token, head) row: asymmetric 4-bit codes with the row's own scale and min.
      const int warp = threadIdx.x / 32;
      const int lane = threadIdx.x % 32;
      for (int row = warp; row < count * num_kv_heads; row += WARPS) {
        const int i = row / num_kv_heads;
        const int head = row % num_kv_heads;
        const T* src = key_row(k_new, k_cache, page, first, src_row, i, head, num_kv_heads) + lane * PER_LANE;
        float x[PER_LANE];
        float lo = 3.402823466e38f, hi = -3.402823466e38f;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
          x[j] = tw_to_float(src[j]);
          lo = fminf(lo, x[j]);
          hi = fmaxf(hi, x[j]);
        }
        lo = -tw_group_max<32>(-lo);
        hi = tw_group_max<32>(hi);
        const float scale = fmaxf(hi - lo, 1e-6f) / 15.f;
        unsigned char* dst = k_q4 + q4_layout::offset(page, head, first + i, num_kv_heads) + lane * (PER_LANE / 2);
#pragma unroll
        for (int j = 0; j < PER_LANE; j += 2) {
          const float c0 = fminf(fmaxf(roundf((x[j] - lo) / scale), 0.f), 15.f);
          const float c1 = fminf(fmaxf(roundf((x[j + 1] - lo) / scale), 0.f), 15.f);
          dst[j / 2] = (unsigned char)(int(c0) | (int(c1) << 4));
        }
        if (lane == 0) {
          half* sm = k_q4_scale_min + scale_layout::offset(page, head, first + i, num_kv_heads);
          sm[0] = __float2half_rn(scale);
          sm[1] = __float2half_rn(lo);
        }
      }
    }

    if (QUEST) {
      // Element-wise max/min over the page's valid tokens: the old bound (if the page held
      // tokens) merged with the new rows, read from k_new rather than the cache just written.
      // A job from offset 0 starts the page: a freed page that is reused forgets its bounds.
      for (int e = threadIdx.x; e < num_kv_heads * HEAD_DIM; e += THREADS) {
        const int head = e / HEAD_DIM;
        const int d = e % HEAD_DIM;
        // The page's bounds for the head: its max row, then its min row (twilight/quest.cuh).
        const tw_i64 meta = (tw_i64(page) * num_kv_heads + head) * 2 * HEAD_DIM + d;
        float mx = first > 0 ? tw_to_float(page_bounds[meta]) : -3.402823466e38f;
        float mn = first > 0 ? tw_to_float(page_bounds[meta + HEAD_DIM]) : 3.402823466e38f;
        for (int i = 0; i < count; ++i) {
          const float x = tw_to_float(key_row(k_new, k_cache, page, first, src_row, i, head, num_kv_heads)[d]);
          mx = fmaxf(mx, x);
          mn = fminf(mn, x);
        }
        page_bounds[meta] = tw_from_float<T>(mx);
        page_bounds[meta + HEAD_DIM] = tw_from_float<T>(mn);
      }
    }
  }
};
