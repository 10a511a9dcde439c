// fused_swiglu.cuh — SwiGLU CUDA kernels, forward and backward; the math is in lowrank_ext/fused_params.h
// (SwiGluSpan), the same as the CPU kernels'. No torch headers. Grid-stride, one element per thread-step;
// σ(g) = 1 / (1 + e^−g) with the accurate expf (no fast math), recomputed in backward.
#pragma once

#include "fused_common.cuh"

namespace lowrank_ext {
namespace fused_cuda {

constexpr int kSwiGluThreads = 256;

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

template <typename T>
__global__ void __launch_bounds__(kSwiGluThreads) swiglu_forward_kernel(SwiGluSpan a, int64_t n) {
  const T* gate = static_cast<const T*>(a.gate);
  const T* up = static_cast<const T*>(a.up);
  T* out = static_cast<T*>(a.out);
  for (int64_t i = blockIdx.x * int64_t{kSwiGluThreads} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * kSwiGluThreads) {
    const float g = to_float(gate[i]);
    out[i] = from_float<T>(g * sigmoid(g) * to_float(up[i]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kSwiGluThreads) swiglu_backward_kernel(SwiGluSpan a, int64_t n) {
  const T* gate = static_cast<const T*>(a.gate);
  const T* up = static_cast<const T*>(a.up);
  const T* grad = static_cast<const T*>(a.grad);
  T* grad_gate = static_cast<T*>(a.grad_gate);
  T* grad_up = static_cast<T*>(a.grad_up);
  for (int64_t i = blockIdx.x * int64_t{kSwiGluThreads} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * kSwiGluThreads) {
    const float g = to_float(gate[i]), gy = to_float(grad[i]), sg = sigmoid(g);
    grad_gate[i] = from_float<T>(gy * to_float(up[i]) * sg * (1.0f + g * (1.0f - sg)));  // d silu/dg = σ(1 + g(1−σ))
    grad_up[i] = from_float<T>(gy * g * sg);
  }
}

}  // namespace fused_cuda
}  // namespace lowrank_ext
