// dtype_convert.cuh — fp32 <-> the kernels' storage types (float, __half, __nv_bfloat16), for every CUDA
// kernel: one definition (the format, matmul, optimizer and fused-op kernels all convert the same way).
//   to_float(v)        widen exactly to fp32
//   from_float<T>(v)   fp32 -> T, round to nearest even (what c10::Half / c10::BFloat16 do on the CPU)
//   round_to<T>(v)     v rounded once to T and widened back (identity for fp32): the operand value a
//                      tensor-core path sees
// No torch headers; builds with nvcc and in the host simulator (device_ops.cuh).
#pragma once

#include "device_ops.cuh"  // CUDA types and intrinsics (or the host simulator's)

namespace lowrank_ext {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float<T>(from_float<T>(v));
}

}  // namespace lowrank_ext
