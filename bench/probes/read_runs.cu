// How fast can a kernel read scattered runs of a pool far larger than L2? Three copy paths over
// the same runs: 16-byte loads into registers, per-warp rings of 16-byte `cp.async` copies, and
// per-warp rings of bulk copies (`cp.async.bulk`, one per run, completed on an mbarrier).
// Built and run on the GPU host (bench/PERF-NOTES.md, v19):
//   nvcc -O3 -std=c++17 -arch=sm_90 bench/probes/read_runs.cu -o read_runs && ./read_runs
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#define CHECK(x)                                                                   \
  do {                                                                             \
    cudaError_t e = (x);                                                           \
    if (e != cudaSuccess) {                                                        \
      std::printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e));        \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)

struct Share {
  int begin, end;
};
__device__ Share warp_share(int n) {
  const long long warps = (long long)gridDim.x * (blockDim.x / 32);
  const long long w = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  return {int(n * w / warps), int(n * (w + 1) / warps)};
}

// The xor of every byte read, written only if it matches a value it never takes, keeps the
// reads alive.
__device__ void keep(unsigned acc, unsigned* out) {
  if (acc == 0x9e3779b9u) *out = acc;
}

template <int RUN, int UNROLL>
__global__ void read_ldg(const unsigned char* pool, const int* runs, int num_runs, unsigned* out) {
  constexpr int CHUNKS = RUN / 16;
  const Share s = warp_share(num_runs);
  const int lane = threadIdx.x % 32;
  const long long total = (long long)(s.end - s.begin) * CHUNKS;
  unsigned acc = 0;
  for (long long c0 = 0; c0 < total; c0 += 32 * UNROLL) {
    uint4 v[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const long long c = min(c0 + u * 32 + lane, total - 1);
      const int run = runs[s.begin + int(c / CHUNKS)];
      v[u] = __ldg(reinterpret_cast<const uint4*>(pool + (long long)run * RUN) + c % CHUNKS);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  keep(acc, out);
}

__device__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// Per-warp ring of 16-byte cp.async copies, STAGE bytes per stage (whole runs).
template <int RUN, int STAGE, int STAGES>
__global__ void read_cp_async(const unsigned char* pool, const int* runs, int num_runs, unsigned* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr int PER_STAGE = STAGE / RUN, COPIES = STAGE / 16 / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  unsigned char* ring = smem + warp * STAGES * STAGE;
  const Share s = warp_share(num_runs);
  const int stages = (s.end - s.begin + PER_STAGE - 1) / PER_STAGE;
  auto issue = [&](int n) {
#pragma unroll
    for (int k = 0; k < COPIES; ++k) {
      const int chunk = k * 32 + lane;
      const int r = min(s.begin + n * PER_STAGE + chunk * 16 / RUN, s.end - 1);
      const unsigned char* src = pool + (long long)runs[r] * RUN + chunk * 16 % RUN;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(ring + (n % STAGES) * STAGE + chunk * 16)),
                   "l"(src));
    }
  };
  for (int k = 0; k < STAGES - 1; ++k) {
    if (k < stages) issue(k);
    asm volatile("cp.async.commit_group;\n");
  }
  unsigned acc = 0;
  for (int n = 0; n < stages; ++n) {
    if (n + STAGES - 1 < stages) issue(n + STAGES - 1);
    asm volatile("cp.async.commit_group;\n");
    asm volatile("cp.async.wait_group %0;\n" ::"n"(STAGES - 1));
    __syncwarp();
    const uint4* st = reinterpret_cast<const uint4*>(ring + (n % STAGES) * STAGE);
#pragma unroll
    for (int k = 0; k < COPIES; ++k) {
      const uint4 v = st[k * 32 + lane];
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    __syncwarp();
  }
  keep(acc, out);
}

// Per-warp ring of bulk copies: lane 0 issues one cp.async.bulk per run of a stage, the stage's
// mbarrier completes when its bytes have landed.
template <int RUN, int STAGE, int STAGES>
__global__ void read_bulk(const unsigned char* pool, const int* runs, int num_runs, unsigned* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ __align__(8) unsigned long long bars[32][STAGES];
  constexpr int PER_STAGE = STAGE / RUN, WORDS = STAGE / 16 / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  unsigned char* ring = smem + warp * STAGES * STAGE;
  const Share s = warp_share(num_runs);
  const int stages = (s.end - s.begin + PER_STAGE - 1) / PER_STAGE;
  if (lane == 0)
    for (int k = 0; k < STAGES; ++k) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_addr(&bars[warp][k])));
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  __syncwarp();
  auto issue = [&](int n) {
    if (lane != 0) return;
    const unsigned bar = smem_addr(&bars[warp][n % STAGES]);
    const int first = s.begin + n * PER_STAGE, count = min(PER_STAGE, s.end - first);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(count * RUN) : "memory");
    for (int r = 0; r < count; ++r)
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                       smem_addr(ring + (n % STAGES) * STAGE + r * RUN)),
                   "l"(pool + (long long)runs[first + r] * RUN), "n"(RUN), "r"(bar)
                   : "memory");
  };
  for (int k = 0; k < STAGES - 1 && k < stages; ++k) issue(k);
  unsigned acc = 0;
  for (int n = 0; n < stages; ++n) {
    if (n + STAGES - 1 < stages) issue(n + STAGES - 1);
    const unsigned bar = smem_addr(&bars[warp][n % STAGES]);
    const unsigned parity = (n / STAGES) & 1;
    asm volatile(
        "{\n .reg .pred done;\n wait_%=:\n mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n @!done bra "
        "wait_%=;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
    const uint4* st = reinterpret_cast<const uint4*>(ring + (n % STAGES) * STAGE);
    const int words = min(PER_STAGE, s.end - s.begin - n * PER_STAGE) * RUN / 16;
#pragma unroll
    for (int k = 0; k < WORDS; ++k) {
      if (k * 32 + lane < words) {
        const uint4 v = st[k * 32 + lane];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
      }
    }
    __syncwarp();
  }
  keep(acc, out);
}

using Kernel = void (*)(const unsigned char*, const int*, int, unsigned*);

struct Case {
  const char* name;
  int run;          // bytes per run
  long long bytes;  // bytes read per launch
  bool contiguous;  // runs in pool order
};

static float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int main() {
  const long long pool_bytes = 4ll << 30;
  unsigned char* pool;
  CHECK(cudaMalloc(&pool, pool_bytes));
  CHECK(cudaMemset(pool, 1, pool_bytes));
  unsigned* out;
  CHECK(cudaMalloc(&out, 4));
  int sms;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const Case cases[] = {
      {"512B runs, 67 MB (QuestScore per head)", 512, 64ll << 20, false},
      {"4KB runs, 67 MB (QuestScore all heads)", 4096, 64ll << 20, false},
      {"4KB runs, 1 GiB (dense K/V pages)", 4096, 1ll << 30, false},
      {"4KB runs, 1 GiB contiguous", 4096, 1ll << 30, true},
  };
  std::mt19937 rng(7);
  for (const Case& c : cases) {
    const int num_runs = int(c.bytes / c.run);
    const long long pool_runs = pool_bytes / c.run;
    // Four different run lists, used in turn, so one launch's runs are not in L2 from the last.
    constexpr int LISTS = 4;
    std::vector<int> host((size_t)num_runs * LISTS);
    if (c.contiguous) {
      for (int l = 0; l < LISTS; ++l)
        for (int i = 0; i < num_runs; ++i) host[(size_t)l * num_runs + i] = int((long long)l * num_runs % pool_runs + i);
    } else {
      std::vector<int> all(pool_runs);
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng);
      for (size_t i = 0; i < host.size(); ++i) host[i] = all[i % all.size()];
    }
    int* runs;
    CHECK(cudaMalloc(&runs, host.size() * 4));
    CHECK(cudaMemcpy(runs, host.data(), host.size() * 4, cudaMemcpyHostToDevice));
    struct Method {
      const char* name;
      Kernel k;
      int threads, smem;
    };
    std::vector<Method> methods;
    if (c.run == 512) {
      methods = {{"ldg x4", read_ldg<512, 4>, 256, 0},
                 {"ldg x8", read_ldg<512, 8>, 256, 0},
                 {"cp.async 2KB x3", read_cp_async<512, 2048, 3>, 256, 8 * 3 * 2048},
                 {"cp.async 2KB x4", read_cp_async<512, 2048, 4>, 256, 8 * 4 * 2048},
                 {"bulk 512B, 2KB x3", read_bulk<512, 2048, 3>, 256, 8 * 3 * 2048},
                 {"bulk 512B, 2KB x6", read_bulk<512, 2048, 6>, 128, 4 * 6 * 2048}};
    } else {
      methods = {{"ldg x4", read_ldg<4096, 4>, 256, 0},
                 {"ldg x8", read_ldg<4096, 8>, 256, 0},
                 {"cp.async 4KB x2", read_cp_async<4096, 4096, 2>, 256, 8 * 2 * 4096},
                 {"cp.async 4KB x3", read_cp_async<4096, 4096, 3>, 128, 4 * 3 * 4096},
                 {"bulk 4KB x2", read_bulk<4096, 4096, 2>, 256, 8 * 2 * 4096},
                 {"bulk 4KB x3", read_bulk<4096, 4096, 3>, 128, 4 * 3 * 4096},
                 {"bulk 4KB x4", read_bulk<4096, 4096, 4>, 128, 4 * 4 * 4096},
                 {"bulk 4KB x6", read_bulk<4096, 4096, 6>, 64, 2 * 6 * 4096}};
    }
    std::printf("%s: %d runs\n", c.name, num_runs);
    for (const Method& m : methods) {
      CHECK(cudaFuncSetAttribute(m.k, cudaFuncAttributeMaxDynamicSharedMemorySize, m.smem));
      int per_sm;
      CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, m.k, m.threads, m.smem));
      const int blocks = per_sm * sms;
      cudaEvent_t a, b;
      CHECK(cudaEventCreate(&a));
      CHECK(cudaEventCreate(&b));
      std::vector<float> times;
      for (int it = 0; it < 24; ++it) {
        const int* list = runs + (size_t)(it % LISTS) * num_runs;
        CHECK(cudaEventRecord(a));
        m.k<<<blocks, m.threads, m.smem>>>(pool, list, num_runs, out);
        CHECK(cudaEventRecord(b));
        CHECK(cudaEventSynchronize(b));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, a, b));
        if (it >= 4) times.push_back(ms * 1000.f);
      }
      CHECK(cudaGetLastError());
      const float us = median(times);
      std::printf("  %-20s %3d blocks/SM x %3d threads: %8.1f us  %.2f TB/s\n", m.name, per_sm, m.threads, us,
                  c.bytes / us / 1e6);
    }
    CHECK(cudaFree(runs));
  }
  return 0;
}
