// fused_common.cuh — what the fused model-op CUDA kernels (fused_rmsnorm.cuh, fused_rope.cuh,
// fused_swiglu.cuh) share: fp32 <-> storage conversions (bf16 rounds to nearest even) and a block sum.
// No torch headers; builds with nvcc and in the host simulator (device_ops.cuh).
#pragma once

#include <cstdint>

#include "device_ops.cuh"  // CUDA types and intrinsics (or the host simulator's)
#include "lowrank_ext/fused_params.h"

namespace lowrank_ext {
namespace fused_cuda {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Σ v over the CTA (kThreads, a multiple of 32), returned to every thread. `scratch`: kThreads/32 floats of
// shared memory; the trailing barrier lets the caller reuse it at once.
template <int kThreads>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];  // same order in every thread: one result
  __syncthreads();
  return total;
}

}  // namespace fused_cuda
}  // namespace lowrank_ext
