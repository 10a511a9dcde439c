// fused_rmsnorm.cuh — RMSNorm (+ residual add) CUDA kernels, forward and backward; the math is in
// lowrank_ext/fused_params.h (RmsNormRows), the same as the CPU kernels'. No torch headers.
// Geometry: one CTA of kThreads per row at a time (grid-stride over rows); thread t handles columns
// t, t + kThreads, ...; the row sums are block sums. Backward: CTA b accumulates its rows' weight gradient
// into its own fp32 row a.grad_w_acc[b, :] (no atomics); the launcher sums those rows.
#pragma once

#include "fused_common.cuh"

namespace lowrank_ext {
namespace fused_cuda {

constexpr int kNormThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kNormThreads) rmsnorm_forward_kernel(RmsNormRows a, int64_t rows) {
  __shared__ float scratch[kNormThreads / 32];
  const int64_t D = a.dim;
  const float* w = static_cast<const float*>(a.weight);
  const float offset = static_cast<float>(a.weight_offset);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* x = static_cast<const T*>(a.x) + r * D;
    const T* res = a.residual != nullptr ? static_cast<const T*>(a.residual) + r * D : nullptr;
    T* h = res != nullptr ? static_cast<T*>(a.h) + r * D : nullptr;
    T* y = static_cast<T*>(a.y) + r * D;
    float ss = 0.0f;
    for (int64_t j = threadIdx.x; j < D; j += kNormThreads) {
      float v = to_float(x[j]);
      if (res != nullptr) {
        const T hv = from_float<T>(v + to_float(res[j]));  // h rounded as stored: the norm sees what is saved
        h[j] = hv;
        v = to_float(hv);
      }
      ss += v * v;
    }
    const float rstd = 1.0f / sqrtf(block_sum<kNormThreads>(ss, scratch) / static_cast<float>(D) +
                                    static_cast<float>(a.eps));
    const T* src = res != nullptr ? h : x;  // each thread re-reads only the columns it wrote
    for (int64_t j = threadIdx.x; j < D; j += kNormThreads)
      y[j] = from_float<T>(to_float(src[j]) * rstd * (offset + w[j]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kNormThreads) rmsnorm_backward_kernel(RmsNormRows a, int64_t rows) {
  __shared__ float scratch[kNormThreads / 32];
  const int64_t D = a.dim;
  const float* w = static_cast<const float*>(a.weight);
  float* gw = static_cast<float*>(a.grad_w_acc) + static_cast<int64_t>(blockIdx.x) * D;
  const float offset = static_cast<float>(a.weight_offset);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* h = static_cast<const T*>(a.h) + r * D;
    const T* gy = static_cast<const T*>(a.grad_y) + r * D;
    const T* gh = a.grad_h != nullptr ? static_cast<const T*>(a.grad_h) + r * D : nullptr;
    T* gx = static_cast<T*>(a.grad_x) + r * D;
    float ss = 0.0f, gdot = 0.0f;
    for (int64_t j = threadIdx.x; j < D; j += kNormThreads) {
      const float hv = to_float(h[j]);
      ss += hv * hv;
      gdot += to_float(gy[j]) * (offset + w[j]) * hv;
    }
    ss = block_sum<kNormThreads>(ss, scratch);
    gdot = block_sum<kNormThreads>(gdot, scratch);
    const float rstd = 1.0f / sqrtf(ss / static_cast<float>(D) + static_cast<float>(a.eps));
    const float c = rstd * rstd * rstd * gdot / static_cast<float>(D);
    for (int64_t j = threadIdx.x; j < D; j += kNormThreads) {
      const float hv = to_float(h[j]), gyv = to_float(gy[j]);
      float g = rstd * gyv * (offset + w[j]) - c * hv;  // rstd·g − h·rstd³·Σ(g·h)/D
      if (gh != nullptr) g += to_float(gh[j]);
      gx[j] = from_float<T>(g);
      gw[j] += gyv * hv * rstd;  // only this thread touches column j of this CTA's row
    }
  }
}

}  // namespace fused_cuda
}  // namespace lowrank_ext
