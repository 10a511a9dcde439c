// adamw_kernel.cuh — fused AdamW CUDA kernels (no torch headers): fp32 state and 8-bit blockwise state.
//
//   adamw32_kernel:   p, g [n] (T = float/__half/__nv_bfloat16); m, v fp32 [n]; grid-stride over n
//   adamw8bit_kernel: one CTA of 256 threads per 256-element state block b (grid = ceil(n/256)):
//                     c1, c2 uint8 [n] codes into qmap1/qmap2 (fp32 [256], sorted); absmax1/2 fp32 [nb]
// Step t (torch.optim.AdamW): p <- p·(1 - lr·wd); m <- lerp(m, g, 1-β1); v <- β2·v + (1-β2)·g²;
//                             p <- p - lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps)
// 8-bit: decode m = qmap1[c1]·absmax1[b] (v likewise), update in fp32 (the param uses the unrounded m, v),
// absmax' = max|m| over the block (NaN if any NaN), code = #midpoints of qmap strictly below m/absmax'.
// Every fp32 operation is an explicitly rounded intrinsic in csrc/cpu/adamw.cpp's order, so CPU and CUDA
// states agree bit for bit (tests/test_optim_cuda.py::test_fused_kernels_match_cpu_exactly).
#pragma once

#include <cstdint>

#include "device_ops.cuh"  // CUDA types and intrinsics (or the host simulator's)
#include "dtype_convert.cuh"
#include "lowrank_ext/adamw_scalars.h"

namespace lowrank_ext {
namespace optim_cuda {

struct AdamWKernelScalars {
  float beta2, one_minus_beta1, one_minus_beta2, eps, decay, neg_step_size, bc2_sqrt;
};

// The kernels' scalars of step t (host): the launchers (adamw.cu) and the simulator (tests/sim/) call this.
inline AdamWKernelScalars kernel_scalars(double lr, double beta1, double beta2, double eps, double wd, int64_t step) {
  const AdamWScalars s = adamw_scalars(lr, beta1, beta2, eps, wd, step);
  return {s.beta2, s.one_minus_beta1, s.one_minus_beta2, s.eps, s.decay, -s.step_size, 1.0f / s.inv_bc2_sqrt};
}


// One element: updates p (fp32 copy), m, v in place. Bit-exact with csrc/cpu/adamw.cpp: the same
// operations in the same order, each rounded on its own. nvcc contracts a*b+c into an FMA (one rounding)
// by default and the CPU build does not (-ffp-contract=off), so every operation is an explicitly rounded
// intrinsic, which nvcc never fuses; __fdiv_rn / __fsqrt_rn are IEEE division and square root, as
// _mm256_div_ps / _mm256_sqrt_ps and std::sqrt on the CPU. The one FMA is the first moment, torch's
// lerp(m, g, w) with w = 1 - β1, which the CPU computes with std::fma / Vectorized fmadd (MomentLerp):
//   m = fma(w, g - m, m) for w < 0.5, else fma(w - 1, g - m, g)  (anchored at g: exactly g when β1 = 0)
//   p = p·decay;  v = v·β2 + w2·(g·g);  p = p + (-step)·(m / (sqrt(v)/bc2 + eps))
__device__ __forceinline__ void adamw_update(float& p, float g, float& m, float& v, const AdamWKernelScalars& s) {
  p = __fmul_rn(p, s.decay);
  const bool from_end = !(s.one_minus_beta1 < 0.5f);
  const float coeff = from_end ? __fsub_rn(s.one_minus_beta1, 1.0f) : s.one_minus_beta1;  // exact
  m = __fmaf_rn(coeff, __fsub_rn(g, m), from_end ? g : m);
  v = __fadd_rn(__fmul_rn(v, s.beta2), __fmul_rn(s.one_minus_beta2, __fmul_rn(g, g)));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), s.bc2_sqrt), s.eps);
  p = __fadd_rn(p, __fmul_rn(s.neg_step_size, __fdiv_rn(m, denom)));
}

template <typename T>
__global__ void adamw32_kernel(T* __restrict__ p, const T* __restrict__ g, float* __restrict__ m,
                               float* __restrict__ v, int64_t n, AdamWKernelScalars s) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float pf = to_float(p[i]), mf = m[i], vf = v[i];
    adamw_update(pf, to_float(g[i]), mf, vf, s);
    p[i] = from_float<T>(pf);
    m[i] = mf;
    v[i] = vf;
  }
}

constexpr int kStateBlock = 256;  // elements per absmax == threads per CTA of the 8-bit kernel

// max over the CTA of x (x >= 0), via warp shuffles then 8 warp partials in shared memory.
__device__ __forceinline__ float cta_max(float x, float* partial) {
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = x;
  __syncthreads();
  float r = partial[0];
  for (int w = 1; w < kStateBlock / 32; ++w) r = fmaxf(r, partial[w]);
  __syncthreads();  // partial is reused by the next call
  return r;
}

// Nearest code: the number of midpoints strictly below x (8 halvings; NaN lands on code 0).
__device__ __forceinline__ uint8_t nearest_code(const float* mid, float x) {
  int c = 0;
#pragma unroll
  for (int step = 128; step >= 1; step >>= 1) c += (mid[c + step - 1] < x) ? step : 0;
  return static_cast<uint8_t>(c);
}

template <typename T>
__global__ void __launch_bounds__(kStateBlock)
    adamw8bit_kernel(T* __restrict__ p, const T* __restrict__ g, uint8_t* __restrict__ c1, uint8_t* __restrict__ c2,
                     float* __restrict__ absmax1, float* __restrict__ absmax2, const float* __restrict__ qmap1,
                     const float* __restrict__ qmap2, int64_t n, AdamWKernelScalars s) {
  __shared__ float map1[256], map2[256], mid1[256], mid2[256], partial[kStateBlock / 32];
  const int t = threadIdx.x;
  const int64_t b = blockIdx.x, i = b * kStateBlock + t;
  map1[t] = qmap1[t];
  map2[t] = qmap2[t];
  __syncthreads();
  mid1[t] = t < 255 ? __fmul_rn(__fadd_rn(map1[t], map1[t + 1]), 0.5f) : INFINITY;  // as cpu midpoints()
  mid2[t] = t < 255 ? __fmul_rn(__fadd_rn(map2[t], map2[t + 1]), 0.5f) : INFINITY;
  const bool valid = i < n;
  float m = 0.f, v = 0.f;
  if (valid) {
    m = __fmul_rn(map1[c1[i]], absmax1[b]);  // decode, as the CPU: qmap[code] · absmax
    v = __fmul_rn(map2[c2[i]], absmax2[b]);
    float pf = to_float(p[i]);
    adamw_update(pf, to_float(g[i]), m, v, s);
    p[i] = from_float<T>(pf);
  }
  // __syncthreads_or also orders every read of absmax1/2[b] (above) before thread 0's write (below).
  const bool nan1 = __syncthreads_or(valid && isnan(m)), nan2 = __syncthreads_or(valid && isnan(v));
  const float a1 = nan1 ? NAN : cta_max(fabsf(m), partial);
  const float a2 = nan2 ? NAN : cta_max(fabsf(v), partial);
  if (valid) {
    // requantize, as the CPU's requantize(): x · (1/absmax'), 0 for an all-zero (or NaN) block
    c1[i] = nearest_code(mid1, __fmul_rn(m, a1 > 0.f ? __fdiv_rn(1.0f, a1) : 0.f));
    c2[i] = nearest_code(mid2, __fmul_rn(v, a2 > 0.f ? __fdiv_rn(1.0f, a2) : 0.f));
  }
  if (t == 0) {
    absmax1[b] = a1;
    absmax2[b] = a2;
  }
}

}  // namespace optim_cuda
}  // namespace lowrank_ext
