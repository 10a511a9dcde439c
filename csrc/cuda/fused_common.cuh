// fused_common.cuh — what the fused model-op CUDA kernels (fused_rmsnorm.cuh, fused_rope.cuh,
// fused_swiglu.cuh) share: the fp32 <-> storage conversions (dtype_convert.cuh) and a block sum.
// No torch headers; builds with nvcc and in the host simulator (device_ops.cuh).
#pragma once

#include <cstdint>

#include "device_ops.cuh"  // CUDA types and intrinsics (or the host simulator's)
#include "dtype_convert.cuh"
#include "lowrank_ext/fused_params.h"

namespace lowrank_ext {
namespace fused_cuda {

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
