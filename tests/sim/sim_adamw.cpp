// sim_adamw.cpp — the fused AdamW kernels (csrc/cuda/adamw_kernel.cuh) on the simulator, with the launcher's
// geometry (csrc/cuda/adamw.cu): 32-bit grid-stride over min(ceil(n/256), 8·sm_count) CTAs of 256 threads,
// 8-bit one CTA of 256 threads per 256-element state block; the step's scalars from kernel_scalars().
#include <algorithm>

#include "adamw_kernel.cuh"
#include "sim_common.h"

namespace {

using namespace lowrank_ext;
using optim_cuda::AdamWKernelScalars;

template <typename F>
std::string by_dtype(int dtype, F&& f) {  // dtype 0 fp32 / 1 fp16 / 2 bf16
  switch (dtype) {
    case 0: return f(float{});
    case 1: return f(__half{});
    case 2: return f(__nv_bfloat16{});
    default: return "dtype must be 0 (fp32), 1 (fp16) or 2 (bf16), got " + std::to_string(dtype);
  }
}

}  // namespace

// One adamw_step on p, g [n] (dtype), m, v fp32 [n], in place.
LRX_SIM_API const char* lrx_sim_adamw32(int dtype, void* p, const void* g, float* m, float* v, int64_t n, double lr,
                                        double beta1, double beta2, double eps, double wd, int64_t step,
                                        int sm_count, uint64_t seed) {
  const AdamWKernelScalars s = optim_cuda::kernel_scalars(lr, beta1, beta2, eps, wd, step);
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(sm_count) * 8);
  const size_t es = dtype == 0 ? 4 : 2;
  std::vector<lrx_sim::Buffer> bufs{{p, n * es}, {g, n * es}, {m, size_t(n) * 4}, {v, size_t(n) * 4}};
  return lrx_sim::result(by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return lrx_sim::launch(dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, seed, bufs, [&] {
      optim_cuda::adamw32_kernel<T>(static_cast<T*>(p), static_cast<const T*>(g), m, v, n, s);
    });
  }));
}

// One adamw8bit_step: c1, c2 uint8 [n]; absmax1, absmax2 fp32 [ceil(n/256)]; qmap1, qmap2 fp32 [256].
LRX_SIM_API const char* lrx_sim_adamw8bit(int dtype, void* p, const void* g, uint8_t* c1, uint8_t* c2, float* absmax1,
                                          float* absmax2, const float* qmap1, const float* qmap2, int64_t n,
                                          double lr, double beta1, double beta2, double eps, double wd, int64_t step,
                                          uint64_t seed) {
  const AdamWKernelScalars s = optim_cuda::kernel_scalars(lr, beta1, beta2, eps, wd, step);
  const int64_t blocks = (n + optim_cuda::kStateBlock - 1) / optim_cuda::kStateBlock;
  const size_t es = dtype == 0 ? 4 : 2;
  std::vector<lrx_sim::Buffer> bufs{{p, n * es},          {g, n * es},          {c1, size_t(n)},
                                    {c2, size_t(n)},      {absmax1, size_t(blocks) * 4}, {absmax2, size_t(blocks) * 4},
                                    {qmap1, 1024},        {qmap2, 1024}};
  return lrx_sim::result(by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return lrx_sim::launch(dim3(static_cast<unsigned>(blocks)), dim3(optim_cuda::kStateBlock), 0, seed, bufs, [&] {
      optim_cuda::adamw8bit_kernel<T>(static_cast<T*>(p), static_cast<const T*>(g), c1, c2, absmax1, absmax2, qmap1,
                                      qmap2, n, s);
    });
  }));
}
