// nf4_kernel.cuh — CUDA kernels of the NF4 format ops (quantize, double quant, dequantize). Torch-free.
//
// Bit-exact with the CPU implementation (csrc/cpu/nf4.cpp) and bitsandbytes' quant_type="nf4":
//   absmax[b]  = max |x| over block b;  m = max(absmax[b], 1e-38);  s = x * (1/m)  (x / m in a partial last block)
//   code       = #{NF4 midpoints < s}; all-zero block -> code 7;  byte j = code[2j] << 4 | code[2j+1]
//   qabsmax[b] = argmin_c |map[c] - (absmax[b]-offset) * (1/absmax2[b/256])|  (first minimum: ties low)
//   out[i]     = NF4[code[i]] * absmax_hat[i / blocksize]  (fp32, rounded once to the output type)
// Every product/sum that must match the CPU bit for bit is written with __fmul_rn/__fadd_rn/__fdiv_rn
// (nvcc would otherwise be free to contract a*b+c into an FMA).
#pragma once

#include <cstdint>

#include "device_ops.cuh"  // CUDA types and intrinsics (or the host simulator's)
#include "dtype_convert.cuh"

#include "lowrank_ext/nf4.h"

namespace lowrank_ext {
namespace cuda {

// bitsandbytes' clamp of absmax before the reciprocal (an fp32 subnormal: 0x006CE3EE), as cpu/nf4.cpp.
constexpr float kMinAbsmax = 1e-38f;

// The NF4 levels in constant memory (read once per thread into shared memory or a register).
static __constant__ float kNF4CodebookDev[16] = LRX_NF4_CODEBOOK;

// ------------------------------------------------------------------------------------------------
// quantize: one warp per NF4 block. Lane l reads elements i0 + l, i0 + l + 32, ... for the absmax,
// then writes bytes (element pairs) l, l + 32, ... of the block. Blocks start at even flat indices
// (blocksize is even), so a byte never spans two blocks.
// bad_block: lowest block index holding a NaN/Inf (atomicMin; the launcher reports it).
// ------------------------------------------------------------------------------------------------
template <typename T>
__global__ void nf4_quantize_kernel(const T* __restrict__ x, int64_t n, int blocksize, int64_t nblocks,
                                    uint8_t* __restrict__ packed, float* __restrict__ absmax,
                                    unsigned long long* __restrict__ bad_block) {
  const int lane = threadIdx.x & 31;
  const int64_t b = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (b >= nblocks) return;  // whole warps exit together (b is uniform in a warp)
  const int64_t i0 = b * blocksize;
  const int64_t i1 = (i0 + blocksize < n) ? i0 + blocksize : n;
  float m = 0.f;
  bool finite = true;
  for (int64_t i = i0 + lane; i < i1; i += 32) {
    const float v = fabsf(to_float<T>(x[i]));
    finite &= isfinite(v);
    m = fmaxf(m, v);  // max is exact: the order of the reduction does not matter
  }
  for (int off = 16; off >= 1; off >>= 1) {
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  }
  finite = __all_sync(0xffffffffu, finite);
  if (lane == 0) {
    absmax[b] = m;
    if (!finite) atomicMin(bad_block, static_cast<unsigned long long>(b));
  }
  const bool partial = (i1 - i0) < blocksize;
  // The reciprocal / divisor uses max(absmax, 1e-38) as bitsandbytes and the CPU do: a block of
  // subnormals (absmax < 1e-38) would otherwise get an infinite reciprocal and codes 0/15. The stored
  // absmax above stays unclamped. (No -ftz in this build: fmaxf and __frcp_rn keep subnormals.)
  const float mc = fmaxf(m, kMinAbsmax);
  const float inv = __frcp_rn(mc);  // IEEE 1/mc, as the CPU's 1.0f / m
  for (int64_t i = i0 + 2 * lane; i < i1; i += 64) {
    uint8_t c[2] = {kNF4ZeroCode, kNF4ZeroCode};
    if (m != 0.f) {  // all-zero block: code 7 (exact 0), as bitsandbytes' CPU path
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        if (i + k < i1) {
          const float v = to_float<T>(x[i + k]);
          // bitsandbytes divides in a partial last block and multiplies by the reciprocal elsewhere
          c[k] = nf4_encode(partial ? __fdiv_rn(v, mc) : __fmul_rn(v, inv));
        }
      }
    }
    packed[i >> 1] = nf4_pack(c[0], c[1]);
  }
}

// ------------------------------------------------------------------------------------------------
// double quant: one CTA of 256 threads per nested block of 256 absmax values; thread t owns value
// b = 256*blockIdx.x + t. The 256-entry map sits in shared memory; the nearest entry is found by a
// linear scan with a strict '<' (first minimum = lowest code), exactly the CPU's search.
// ------------------------------------------------------------------------------------------------
static __global__ void __launch_bounds__(256) nf4_double_quant_kernel(const float* __restrict__ absmax, int64_t nb,
                                                               const float* __restrict__ map,
                                                               const float* __restrict__ offset,
                                                               uint8_t* __restrict__ qabsmax,
                                                               float* __restrict__ absmax2) {
  __shared__ float s_map[256];
  __shared__ float s_warp_max[8];
  const int t = threadIdx.x;
  s_map[t] = map[t];
  const int64_t b = static_cast<int64_t>(blockIdx.x) * 256 + t;
  const float off = *offset;
  const float c = (b < nb) ? __fsub_rn(absmax[b], off) : 0.f;
  float m = fabsf(c);
  for (int o = 16; o >= 1; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if ((t & 31) == 0) s_warp_max[t >> 5] = m;
  __syncthreads();
  m = s_warp_max[0];
#pragma unroll
  for (int w = 1; w < 8; ++w) m = fmaxf(m, s_warp_max[w]);
  if (t == 0) absmax2[blockIdx.x] = m;
  if (b >= nb) return;
  const float s = __fmul_rn(c, __frcp_rn(m));
  int best = 0;
  float best_d = fabsf(__fsub_rn(s_map[0], s));
  for (int k = 1; k < 256; ++k) {
    const float d = fabsf(__fsub_rn(s_map[k], s));
    if (d < best_d) best_d = d, best = k;
  }
  qabsmax[b] = static_cast<uint8_t>(best);
}

// ------------------------------------------------------------------------------------------------
// dequantize: thread t expands 8 packed bytes (16 codes, flat elements 16t .. 16t+15). blocksize >= 32
// is a multiple of 16, so all 16 share one block scale. Full groups use one 8-byte load when `packed`
// is 8-byte aligned; the last partial group (numel not a multiple of 16) goes element by element.
// The 16 results go out as 16-byte vector stores when `out` is 16-byte aligned (i0 % 16 == 0 keeps every
// thread's group aligned then); any other buffer (dequantize_nf4_out accepts any contiguous one, e.g. a
// view offset by one element) takes scalar stores — a misaligned vector store would fault and kill the
// CUDA context.
// ------------------------------------------------------------------------------------------------
template <typename T>
__global__ void nf4_dequantize_kernel(const uint8_t* __restrict__ packed, NF4Scales scales, int blocksize,
                                      int64_t numel, bool packed_aligned8, bool out_aligned16,
                                      T* __restrict__ out) {
  // The codebook in shared memory: 16 distinct words in 16 banks, so a warp's lookups never conflict
  // (a local constexpr array indexed at run time would live in local memory).
  __shared__ float kCode[16];
  if (threadIdx.x < 16) kCode[threadIdx.x] = kNF4CodebookDev[threadIdx.x];
  __syncthreads();
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t i0 = g * 16;
  if (i0 >= numel) return;
  const float scale = scales.block_scale(i0 / blocksize);
  if (i0 + 16 <= numel) {
    uint8_t bytes[8];
    if (packed_aligned8) {
      const uint2 v = *reinterpret_cast<const uint2*>(packed + (i0 >> 1));
      *reinterpret_cast<uint2*>(bytes) = v;
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) bytes[j] = packed[(i0 >> 1) + j];
    }
    alignas(16) T vals[16];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      vals[2 * j] = from_float<T>(__fmul_rn(kCode[nf4_high(bytes[j])], scale));
      vals[2 * j + 1] = from_float<T>(__fmul_rn(kCode[nf4_low(bytes[j])], scale));
    }
    if (out_aligned16) {  // 16 * sizeof(T) bytes at out + i0, 16-byte aligned (i0 % 16 == 0)
      constexpr int kVec = 16 / sizeof(T);
#pragma unroll
      for (int j = 0; j < 16; j += kVec) {
        *reinterpret_cast<uint4*>(out + i0 + j) = *reinterpret_cast<const uint4*>(vals + j);
      }
    } else {
#pragma unroll
      for (int j = 0; j < 16; ++j) out[i0 + j] = vals[j];
    }
  } else {
    for (int64_t i = i0; i < numel; ++i) {
      const uint8_t byte = packed[i >> 1];
      const uint8_t code = (i & 1) ? nf4_low(byte) : nf4_high(byte);
      out[i] = from_float<T>(__fmul_rn(kCode[code], scale));
    }
  }
}

}  // namespace cuda
}  // namespace lowrank_ext
