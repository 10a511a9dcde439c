// sim_nf4.cpp — the NF4 format kernels (csrc/cuda/nf4_kernel.cuh: quantize, double quant, dequantize) and the
// SIMT fp32 GEMM / row sqnorm (nf4_simt_kernel.cuh) on the simulator, with the launchers' geometry
// (csrc/cuda/nf4.cu and nf4_linear.cu: 256 threads; quantize 8 NF4 blocks per CTA, double quant one CTA per 256
// absmax, dequantize 16 elements per thread, SIMT 64 x 64 tiles, sqnorm 8 rows per CTA).
#include "nf4_simt_kernel.cuh"
#include "sim_common.h"

namespace {

using namespace lowrank_ext;

template <typename F>
std::string by_dtype(int dtype, F&& f) {  // dtype 0 fp32 / 1 fp16 / 2 bf16
  switch (dtype) {
    case 0: return f(float{});
    case 1: return f(__half{});
    case 2: return f(__nv_bfloat16{});
    default: return "dtype must be 0 (fp32), 1 (fp16) or 2 (bf16), got " + std::to_string(dtype);
  }
}

size_t elem_size(int dtype) { return dtype == 0 ? 4 : 2; }

}  // namespace

// packed [(n+1)/2], absmax [ceil(n/bs)] from x [n]; bad_block = lowest block with a NaN/Inf (else untouched).
LRX_SIM_API const char* lrx_sim_quantize(int dtype, const void* x, int64_t n, int blocksize, uint8_t* packed,
                                         float* absmax, unsigned long long* bad_block, uint64_t seed) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  constexpr int kThreads = 256;  // nf4.cu: 8 warps = 8 NF4 blocks per CTA
  const dim3 grid(static_cast<unsigned>((nblocks + kThreads / 32 - 1) / (kThreads / 32)));
  std::vector<lrx_sim::Buffer> g{{x, n * elem_size(dtype)}, {packed, size_t((n + 1) / 2)},
                                 {absmax, size_t(nblocks) * 4}, {bad_block, 8}};
  return lrx_sim::result(by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return lrx_sim::launch(grid, dim3(kThreads), 0, seed, g, [&] {
      cuda::nf4_quantize_kernel<T>(static_cast<const T*>(x), n, blocksize, nblocks, packed, absmax, bad_block);
    });
  }));
}

// qabsmax [nb], absmax2 [ceil(nb/256)] from absmax [nb], the 256-entry map and the offset (mean of absmax).
LRX_SIM_API const char* lrx_sim_double_quant(const float* absmax, int64_t nb, const float* map, const float* offset,
                                             uint8_t* qabsmax, float* absmax2, uint64_t seed) {
  const int64_t nb2 = (nb + 255) / 256;
  std::vector<lrx_sim::Buffer> g{{absmax, size_t(nb) * 4}, {map, 1024}, {offset, 4}, {qabsmax, size_t(nb)},
                                 {absmax2, size_t(nb2) * 4}};
  return lrx_sim::result(lrx_sim::launch(dim3(static_cast<unsigned>(nb2)), dim3(256), 0, seed, g, [&] {
    cuda::nf4_double_quant_kernel(absmax, nb, map, offset, qabsmax, absmax2);
  }));
}

// out [numel] (any address: the launcher picks vector stores only for a 16-byte aligned out).
LRX_SIM_API const char* lrx_sim_dequantize(int dtype, const uint8_t* packed, int blocksize, int64_t numel,
                                           const float* absmax, const uint8_t* qabsmax, const float* absmax2,
                                           const float* nested_map, const float* offset, void* out, uint64_t seed,
                                           int* out_aligned16_out) {
  NF4Scales sc;
  if (qabsmax != nullptr) sc.qabsmax = qabsmax, sc.absmax2 = absmax2, sc.nested_map = nested_map, sc.offset = offset;
  else sc.absmax_f32 = absmax;
  std::vector<lrx_sim::Buffer> g{{out, numel * elem_size(dtype)}};
  lrx_sim::add_weight(g, NF4WeightView{packed, sc, blocksize, 1, numel});
  const bool aligned8 = reinterpret_cast<uintptr_t>(packed) % 8 == 0;
  const bool out_aligned16 = reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (out_aligned16_out != nullptr) *out_aligned16_out = out_aligned16;
  constexpr int kThreads = 256;
  const dim3 grid(static_cast<unsigned>(((numel + 15) / 16 + kThreads - 1) / kThreads));
  return lrx_sim::result(by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return lrx_sim::launch(grid, dim3(kThreads), 0, seed, g, [&] {
      cuda::nf4_dequantize_kernel<T>(packed, sc, blocksize, numel, aligned8, out_aligned16, static_cast<T*>(out));
    });
  }));
}

// The SIMT GEMM (nn = 0: NT forward, 1: NN grad input), any dtype, any K.
LRX_SIM_API const char* lrx_sim_nf4_simt(int nn, LRX_SIM_MATMUL_ARGS) {
  LRX_SIM_MATMUL_PARAMS(nn != 0, p, globals);
  const int64_t cols = nn ? K : N;
  const dim3 grid(static_cast<unsigned>((cols + cuda::kSimtTileP - 1) / cuda::kSimtTileP),
                  static_cast<unsigned>((M + cuda::kSimtTileM - 1) / cuda::kSimtTileM));
  lrx_sim::LaunchStats st;
  std::string err = by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return lrx_sim::launch(grid, dim3(cuda::kSimtThreads), 0, seed, globals, [&] {
      if (nn) cuda::nf4_simt_kernel<T, true>(p);
      else cuda::nf4_simt_kernel<T, false>(p);
    }, &st);
  });
  lrx_sim::put_stats(stats, st);
  return lrx_sim::result(err);
}

// sq[n] = Σ_k deq(W)[n, k]² (fp32).
LRX_SIM_API const char* lrx_sim_row_sqnorm(int64_t N, int64_t K, int blocksize, const uint8_t* packed,
                                           const float* absmax, const uint8_t* qabsmax, const float* absmax2,
                                           const float* nested_map, const float* offset, float* sq, uint64_t seed) {
  NF4Scales sc;
  if (qabsmax != nullptr) sc.qabsmax = qabsmax, sc.absmax2 = absmax2, sc.nested_map = nested_map, sc.offset = offset;
  else sc.absmax_f32 = absmax;
  const NF4WeightView w{packed, sc, blocksize, N, K};
  std::vector<lrx_sim::Buffer> g{{sq, size_t(N) * 4}};
  lrx_sim::add_weight(g, w);
  constexpr int kThreads = 256;  // nf4_linear.cu: one warp per row
  return lrx_sim::result(lrx_sim::launch(dim3(static_cast<unsigned>((N + 7) / 8)), dim3(kThreads), 0, seed, g,
                                         [&] { cuda::nf4_row_sqnorm_kernel(w, sq); }));
}
