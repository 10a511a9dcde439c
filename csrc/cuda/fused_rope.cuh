// fused_rope.cuh — rotary embedding CUDA kernel (forward, and the transposed rotation for backward); the
// math is in lowrank_ext/fused_params.h (RopeRows), the same as the CPU kernel's. No torch headers.
// One thread per pair (row, i < D/2): it reads in[i], in[i + D/2] and writes both outputs (grid-stride).
#pragma once

#include "fused_common.cuh"

namespace lowrank_ext {
namespace fused_cuda {

constexpr int kRopeThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kRopeThreads) rope_kernel(RopeRows a, int64_t rows) {
  const int64_t half = a.dim / 2, pairs = rows * half;
  for (int64_t p = blockIdx.x * int64_t{kRopeThreads} + threadIdx.x; p < pairs;
       p += int64_t{gridDim.x} * kRopeThreads) {
    const int64_t i = p % half, r = p / half;  // row r = (b·H + h)·S + s
    const int64_t s = r % a.seq, bh = r / a.seq, hd = bh % a.heads, b = bh / a.heads;
    const T* in = static_cast<const T*>(a.in) + b * a.in_sb + hd * a.in_sh + s * a.in_ss;
    T* out = static_cast<T*>(a.out) + b * a.out_sb + hd * a.out_sh + s * a.out_ss;
    const int64_t cs = b * a.cs_sb + s * a.cs_ss;
    const T* cos = static_cast<const T*>(a.cos) + cs;
    const T* sin = static_cast<const T*>(a.sin) + cs;
    const float lo = to_float(in[i]), hi = to_float(in[i + half]);
    float s_lo = to_float(sin[i]), s_hi = to_float(sin[i + half]);
    if (a.backward) {  // the transpose: (s[:half], s[half:]) -> (−s[half:], −s[:half])
      const float t = s_lo;
      s_lo = -s_hi;
      s_hi = -t;
    }
    out[i] = from_float<T>(lo * to_float(cos[i]) - hi * s_lo);
    out[i + half] = from_float<T>(hi * to_float(cos[i + half]) + lo * s_hi);
  }
}

}  // namespace fused_cuda
}  // namespace lowrank_ext
