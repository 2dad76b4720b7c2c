// Quest selection. Each page except a request's last gets an upper bound of q.k over its
// tokens, summed over the group's query heads: sum_h sum_d max(q[h,d] * max[d], q[h,d] * min[d]).
// The selector keeps the last page and the budget - 1 best others (twilight/select.cuh).
//
// The bounds lie in `page_bounds [num_pages, num_kv_heads, 2, head_dim]`: a page's max row for
// a KV head, then its min row, so scoring one (page, head) reads one run of 2 * head_dim
// elements.

template <typename T, int HEAD_DIM, int PAGE_SIZE, int GROUP, int THREADS>
struct tw_quest {
  static constexpr int PER_LANE = HEAD_DIM / 32;
  static constexpr int WARPS = THREADS / 32;

  // Grid (blocks per row, kv heads, requests), one wave of blocks. Each warp scores a
  // contiguous share of the row's pages, streaming their bounds through a STAGES-deep ring of
  // asynchronous copies of its own (2 KB per stage: 512 / HEAD_DIM pages), so STAGES - 1
  // stages are in flight while it reduces one, without registers held for them. (Against
  // v17's loads into registers, 4 pages at a time per warp over 1.55 waves of blocks, it
  // measured the same at the headline, 24 us with DRAM at 69% of its peak, and 20% faster at
  // batch 1; bench/PERF-NOTES.md, v18.)
  template <int STAGES>
  TW_DEVICE static void score(const T* __restrict__ q, const T* __restrict__ page_bounds,
                              const int* __restrict__ kv_indptr, const int* __restrict__ kv_indices,
                              float* __restrict__ scores, int num_kv_heads, int max_pages) {
    static_assert(STAGES >= 2, "a ring of at least two stages");
    constexpr int ROW_BYTES = HEAD_DIM * int(sizeof(T));  // one bound row
    constexpr int STAGE_BYTES = 2048;
    constexpr int PAGES = STAGE_BYTES / (2 * ROW_BYTES);  // pages per stage
    constexpr int COPIES = STAGE_BYTES / 16 / 32;         // 16-byte copies per lane and stage
    static_assert(PAGES >= 1 && COPIES * 16 * 32 == STAGE_BYTES, "whole pages per stage, whole copies per lane");
    __shared__ __align__(16) unsigned char ring[WARPS][STAGES][STAGE_BYTES];  // per page: max row, min row
    const int kv_head = tw_grid_head();
    const int request = tw_grid_request();
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int first_page = kv_indptr[request];
    const int others = kv_indptr[request + 1] - first_page - 1;  // the last page needs no score
    const int num_qo_heads = num_kv_heads * GROUP;
    // max(q * mx, q * mn) is q * mx for q > 0 and q * mn otherwise (mx >= mn), so the sum over
    // the group is mx * (sum of its positive q) + mn * (sum of its negative q): two FMAs per
    // channel for any group size.
    float q_pos[PER_LANE], q_neg[PER_LANE];
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) q_pos[j] = q_neg[j] = 0.f;
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      float qf[PER_LANE];
      tw_load_floats<T, PER_LANE>(q + (tw_i64(request) * num_qo_heads + kv_head * GROUP + g) * HEAD_DIM + lane * PER_LANE,
                                  qf);
#pragma unroll
      for (int j = 0; j < PER_LANE; ++j) {
        q_pos[j] += fmaxf(qf[j], 0.f);
        q_neg[j] += fminf(qf[j], 0.f);
      }
    }

    // This warp's pages: a contiguous, balanced share of the row's.
    const tw_share share = tw_balanced_share(others, tw_grid_part() * WARPS + warp, gridDim.x * WARPS);
    const int begin = share.begin, end = share.end;
    if (begin >= end) return;
    const int stages = (end - begin + PAGES - 1) / PAGES;
    unsigned char(*my_ring)[STAGE_BYTES] = ring[warp];

    // Page ids come in windows of 32 consecutive pages of the share, one id per lane (one
    // 128-byte load), and reach the lanes that copy a page by a shuffle; the next window's
    // load is issued as soon as the copies enter the current one, STAGES_PER_WINDOW stages
    // before it is needed. (Loaded one stage ahead, each stage's ids stalled the warp for
    // half of its samples, ncu.)
    constexpr int STAGES_PER_WINDOW = 32 / PAGES;
    const auto window_ids = [&](int w) { return kv_indices[first_page + min(begin + 32 * w + lane, end - 1)]; };
    int window_now = window_ids(0), window_next = window_ids(1);
    // Copy k of a lane moves 16 bytes of page (32k + lane) / (2 * ROW_BYTES / 16) of stage n,
    // at byte (32k + lane) * 16 of the stage.
    const auto copy_stage = [&](int n, unsigned char* stage) {
#pragma unroll
      for (int k = 0; k < COPIES; ++k) {
        const int chunk = 32 * k + lane;
        const int page = n % STAGES_PER_WINDOW * PAGES + chunk * 16 / (2 * ROW_BYTES);  // in the window
        const int id = __shfl_sync(0xffffffffu, window_now, page);
        const T* bounds = page_bounds + (tw_i64(id) * num_kv_heads + kv_head) * 2 * HEAD_DIM;
        tw_copy_async_16(tw_shared_address(stage + chunk * 16),
                         reinterpret_cast<const unsigned char*>(bounds) + chunk * 16 % (2 * ROW_BYTES), true);
      }
    };
    // Stage n's copies are the next to go out: keep its window in window_now.
    const auto enter_stage = [&](int n) {
      if (n > 0 && n % STAGES_PER_WINDOW == 0) {
        window_now = window_next;
        window_next = window_ids(n / STAGES_PER_WINDOW + 1);
      }
    };
    static_assert(STAGES - 1 <= STAGES_PER_WINDOW, "the ring's first stages lie in the first window");

#pragma unroll
    for (int k = 0; k < STAGES - 1; ++k) {
      if (k < stages) copy_stage(k, my_ring[k]);
      tw_copy_async_commit();
    }

    float* row_scores = scores + (tw_i64(request) * num_kv_heads + kv_head) * max_pages;
#pragma unroll 1
    for (int n = 0; n < stages; ++n) {
      const int ahead = n + STAGES - 1;
      if (ahead < stages) {
        enter_stage(ahead);
        copy_stage(ahead, my_ring[ahead % STAGES]);
      }
      tw_copy_async_commit();
      tw_copy_async_wait<STAGES - 1>();  // stage n has landed
      __syncwarp();
      const unsigned char* stage = my_ring[n % STAGES];
      float mx_f[PAGES][PER_LANE], mn_f[PAGES][PER_LANE];
#pragma unroll
      for (int b = 0; b < PAGES; ++b) {
        // PER_LANE consecutive channels per lane: one 4-, 8- or 16-byte read each of max and min.
        const T* rows = reinterpret_cast<const T*>(stage + b * 2 * ROW_BYTES);
        tw_load_floats<T, PER_LANE>(rows + lane * PER_LANE, mx_f[b]);
        tw_load_floats<T, PER_LANE>(rows + HEAD_DIM + lane * PER_LANE, mn_f[b]);
      }
      __syncwarp();  // the stage is free for the copies of the next iteration
      float totals[PAGES];
#pragma unroll
      for (int b = 0; b < PAGES; ++b) {
        float partial = 0.f;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) partial = fmaf(q_pos[j], mx_f[b][j], fmaf(q_neg[j], mn_f[b][j], partial));
        totals[b] = tw_group_sum<32>(partial);
      }
      // Lane b writes page b's score: one store for the stage.
      float mine = totals[0];
#pragma unroll
      for (int b = 1; b < PAGES; ++b) mine = lane == b ? totals[b] : mine;
      const int pos = begin + n * PAGES + lane;
      if (lane < PAGES && pos < end) row_scores[pos] = mine;
    }
  }

  // Grid (cluster size, kv heads, requests), a cluster per row: writes the selected page
  // positions, ascending, their count (at most budget_pages) and the selected pages' ids in
  // the pool, with blocks of SELECT_THREADS holding KEYS page scores per thread in registers
  // (0: radix passes only; tw_top_k).
  template <int SELECT_THREADS, int KEYS>
  TW_DEVICE static void select(const float* __restrict__ scores, const int* __restrict__ kv_indptr,
                               const int* __restrict__ kv_indices, int* __restrict__ selected,
                               int* __restrict__ selected_count, int* __restrict__ selected_pages, int num_kv_heads,
                               int max_pages, int budget_pages) {
    __shared__ typename tw_top_k<SELECT_THREADS, false, KEYS>::storage smem;
    const int head_row = tw_grid_row();
    const int first_page = kv_indptr[tw_grid_request()];
    const int pages = kv_indptr[tw_grid_request() + 1] - first_page;
    const tw_i64 out_row = tw_i64(head_row) * budget_pages;
    tw_top_k<SELECT_THREADS, false, KEYS>::run(scores + tw_i64(head_row) * max_pages, pages, budget_pages,
                                               selected + out_row, selected_count + head_row, smem,
                                               kv_indices + first_page, selected_pages + out_row);
  }
};
