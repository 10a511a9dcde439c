// sim_common.h — shared by the simulator's kernel entry points (sim_*.cpp): the C ABI the tests call through
// ctypes (raw pointers + sizes, an error string back) and the NF4 matmul parameters built from it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "device_ops.cuh"  // -DLRX_CUDA_SIM: the simulator (lrx_cuda_sim.h)
#include "nf4_linear_params.h"

#define LRX_SIM_API extern "C" __attribute__((visibility("default")))

namespace lrx_sim {

// The error of the last call on this thread ("" = success); entry points return its c_str().
inline const char* result(std::string err) {
  static thread_local std::string last;
  last = std::move(err);
  return last.c_str();
}

// stats (may be null): context switches, warp collectives, barriers of the launch.
inline void put_stats(uint64_t* stats, const LaunchStats& s) {
  if (stats != nullptr) stats[0] = s.context_switches, stats[1] = s.collectives, stats[2] = s.barriers;
}

// Bytes of a row-major [rows, cols] operand with row stride ld (elements of `elem` bytes).
inline size_t span_bytes(int64_t rows, int64_t cols, int64_t ld, size_t elem) {
  return rows <= 0 || cols <= 0 ? 0 : static_cast<size_t>((rows - 1) * ld + cols) * elem;
}

// The NF4 weight's buffers as global-memory ranges (what __ldg / cp.async may read).
inline void add_weight(std::vector<Buffer>& g, const lowrank_ext::NF4WeightView& w) {
  const int64_t nb = (w.N * w.K + w.blocksize - 1) / w.blocksize;
  g.push_back({w.packed, static_cast<size_t>((w.N * w.K + 1) / 2)});
  if (w.scales.qabsmax != nullptr) {
    g.push_back({w.scales.qabsmax, static_cast<size_t>(nb)});
    g.push_back({w.scales.absmax2, static_cast<size_t>((nb + 255) / 256) * 4});
    g.push_back({w.scales.nested_map, 256 * 4});
    g.push_back({w.scales.offset, 4});
  } else {
    g.push_back({w.scales.absmax_f32, static_cast<size_t>(nb) * 4});
  }
}

}  // namespace lrx_sim

// The flat argument list of every NF4 matmul entry point (sim_mma.cpp, sim_gemv.cpp, sim_simt.cpp):
//   dtype 0 fp32 / 1 fp16 / 2 bf16; NT: a = x [M, K], out = y [M, N]; NN: a = gy [M, N], out = gx [M, K];
//   qabsmax == null: plain fp32 absmax; lowrank == null: no LoRA term; bias == null: none.
#define LRX_SIM_MATMUL_ARGS                                                                                  \
  int dtype, int64_t M, int64_t N, int64_t K, int blocksize, const uint8_t *packed, const float *absmax,     \
      const uint8_t *qabsmax, const float *absmax2, const float *nested_map, const float *offset,           \
      const void *a, int64_t lda, const void *lowrank, int64_t ld_lowrank, const void *lowrank_w,           \
      int64_t ld_lowrank_w, int r, float scaling, const void *bias, void *out, int64_t ld_out, uint64_t seed, \
      uint64_t *stats

namespace lrx_sim {

// NF4MatmulParams from the flat arguments, and the global buffers they name (for the launch's checks).
#define LRX_SIM_MATMUL_PARAMS(nn, p, globals)                                                                   \
  lowrank_ext::NF4MatmulParams p{};                                                                             \
  std::vector<lrx_sim::Buffer> globals;                                                                         \
  lrx_sim::fill_params(nn, p, globals, dtype, M, N, K, blocksize, packed, absmax, qabsmax, absmax2, nested_map, \
                       offset, a, lda, lowrank, ld_lowrank, lowrank_w, ld_lowrank_w, r, scaling, bias, out, ld_out)

inline void fill_params(bool nn, lowrank_ext::NF4MatmulParams& p, std::vector<Buffer>& g, int dtype, int64_t M,
                        int64_t N, int64_t K, int blocksize, const uint8_t* packed, const float* absmax,
                        const uint8_t* qabsmax, const float* absmax2, const float* nested_map, const float* offset,
                        const void* a, int64_t lda, const void* lowrank, int64_t ld_lowrank, const void* lowrank_w,
                        int64_t ld_lowrank_w, int r, float scaling, const void* bias, void* out, int64_t ld_out) {
  using namespace lowrank_ext;
  const size_t es = dtype == 0 ? 4 : 2;
  NF4Scales sc;
  if (qabsmax != nullptr) {
    sc.qabsmax = qabsmax, sc.absmax2 = absmax2, sc.nested_map = nested_map, sc.offset = offset;
  } else {
    sc.absmax_f32 = absmax;
  }
  p.dtype = static_cast<ActDType>(dtype);
  p.M = M;
  p.w = NF4WeightView{packed, sc, blocksize, N, K};
  p.a = a, p.lda = lda;
  p.lowrank = lowrank, p.ld_lowrank = ld_lowrank, p.lowrank_w = lowrank_w, p.ld_lowrank_w = ld_lowrank_w;
  p.r = lowrank != nullptr ? r : 0;
  p.scaling = scaling;
  p.bias = bias;
  p.out = out, p.ld_out = ld_out;
  const int64_t red = nn ? N : K, cols = nn ? K : N;
  add_weight(g, p.w);
  g.push_back({a, span_bytes(M, red, lda, es)});
  if (lowrank != nullptr) {
    g.push_back({lowrank, span_bytes(M, r, ld_lowrank, es)});
    g.push_back({lowrank_w, nn ? span_bytes(r, K, ld_lowrank_w, es) : span_bytes(N, r, ld_lowrank_w, es)});
  }
  if (bias != nullptr) g.push_back({bias, static_cast<size_t>(N) * es});
  g.push_back({out, span_bytes(M, cols, ld_out, es)});
}

}  // namespace lrx_sim
