// nf4_gemv_kernel.cuh — small-M (M <= 16) NF4 "GEMV" for fp16/bf16 activations. Torch-free.
//
//   y[M, N] = x[M, K] · deq(W)[N, K]ᵀ (+ scaling · u[M, r] · lora_B[N, r]ᵀ) (+ bias[N])     M <= 16
//
// Memory-bound: every packed byte of W is read once with 128-bit loads, x is staged once per CTA in
// shared memory. The multiply runs on tensor cores (mma.sync m16n8k16, fp32 accumulators) with x as the
// 16-row A operand (rows >= M are zero) — at M = 8..16 fp32 FMAs on CUDA cores would be the bottleneck.
//
// The k permutation. A quad of lanes (q = lane % 4, g = lane / 4) reads 4 x 16 contiguous bytes of one
// row of W: lane q holds the 32 codes k = 32q .. 32q+31 of a 128-wide chunk. The mma's B fragment wants
// lane (g, q) to hold k = 2q + {0,1} and 2q + 8 + {0,1} of a 16-wide step; a dot product does not care
// about the order of k, so mma step s (0..7) of the chunk maps its virtual k onto real k as
//     virtual 2q + {0,1}  ->  real 32q + 4s + {0,1}        virtual 2q + 8 + {0,1} -> real 32q + 4s + {2,3}
// and the A fragment (x) is read with the same map. So each step consumes bytes 2s, 2s+1 of the lane's
// 16 bytes and x[m, 32q + 4s .. 32q + 4s + 3] — no data exchange between lanes at all.
//
// Decode: code -> NF4 level by a warp shuffle of a register holding NF4[lane % 16], times the block scale
// (fp32), rounded once to bf16/fp16 (the mma operand). All 32 codes of a lane share one block (K % 32 == 0,
// blocksize >= 32), so one scale per lane per chunk.
//
// Grid: blockIdx.x = group of 128 output features (4 warps x 32 rows, 4 n-tiles of 8 per warp);
// blockIdx.y = split of K (split-K when N is small). With several splits, each CTA writes fp32 partials
// [split, M, N]; the last CTA of a row group (atomic counter) sums them in split order (deterministic),
// runs the epilogue (LoRA, bias, rounding) and resets its counter to 0. Each warp fetches the next chunk's
// bytes one chunk ahead (registers; the first chunk is in flight while x is staged); 128 registers,
// 4 CTAs (16 warps) per SM: 16 warps x 32 lanes x 2 x 64 B = 64 KB of weights in flight per SM.
// Requirements (checked by the launcher): K % 32 == 0, `packed` 16-byte aligned, sm_80+.
#pragma once

#include "device_ops.cuh"
#include "gemv_plan.h"
#include "nf4_kernel.cuh"
#include "nf4_linear_params.h"

namespace lowrank_ext {
namespace cuda {

constexpr int kGemvThreads = 128;     // 4 warps
constexpr int kGemvWarpRows = 32;     // output features per warp (4 mma n-tiles of 8)
constexpr int kGemvRows = 128;        // output features per CTA
constexpr int kGemvChunk = 128;       // k per warp step: 4 lanes x 32 codes
constexpr int kGemvMaxM = 16;         // the mma's 16 rows
constexpr int kGemvMaxKSlice = 1024;  // k per CTA (shared memory: 16 x (1024 + 8) x 2 B = 33 KB)
static_assert(kGemvRows == kGemvRowsPerCta && kGemvChunk == kGemvKChunk && kGemvMaxKSlice == kGemvKSliceMax,
              "gemv_plan.h and the kernel disagree");

struct GemvArgs {
  NF4MatmulParams p;
  int kslice;         // k per split: multiple of kGemvChunk, <= kGemvMaxKSlice
  int splits;         // ceil(K / kslice)
  float* partial;     // [splits, M, N] fp32 (splits > 1)
  int* counters;      // [ceil(N / 128)] zeros (splits > 1); left at zero afterwards (the workspace relies
                      // on it: gemv_workspace.h zeroes them only when it allocates them)
};

// Shared-memory column of element kk of a staged x row: 16-byte chunks j = kk / 8 are XOR-swizzled
// (bit 1 of j flipped when bit 3 is set) so that the 8 lanes of a quarter warp — two rows (row stride
// = kslice + 8 elements: a 16-byte skew) x 4 lanes 64 bytes apart — hit 8 different 16-byte bank groups.
__device__ __forceinline__ int gemv_swizzle(int kk) {
  const int j = kk >> 3;
  return ((j ^ ((j >> 2) & 2)) << 3) | (kk & 7);
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (lower k) in the low 16 bits
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// y[m, n] = acc + Σ_r T(scaling · u[m, r]) · lora_B[n, r] + bias[n], rounded once to T. The low-rank
// input s·u is rounded once to T as in the mma kernel's rank steps (the products are then exact in fp32),
// so the GEMV and mma paths differ only in the fp32 summation order.
template <typename T>
__device__ __forceinline__ void gemv_store(const NF4MatmulParams& p, int64_t m, int64_t n, float acc) {
  if (p.lowrank != nullptr) {
    const T* u = static_cast<const T*>(p.lowrank) + m * p.ld_lowrank;
    const T* b = static_cast<const T*>(p.lowrank_w) + n * p.ld_lowrank_w;
    float lr = 0.f;
    for (int j = 0; j < p.r; ++j) lr = fmaf(round_to<T>(p.scaling * to_float<T>(u[j])), to_float<T>(b[j]), lr);
    acc += lr;
  }
  if (p.bias != nullptr) acc += to_float<T>(static_cast<const T*>(p.bias)[n]);
  static_cast<T*>(p.out)[m * p.ld_out + n] = from_float<T>(acc);
}

template <typename T>
__global__ void __launch_bounds__(kGemvThreads, 4) nf4_gemv_kernel(GemvArgs args) {  // 4 CTAs/SM: <= 128 regs
  const NF4MatmulParams& p = args.p;
  __shared__ __align__(16) T s_x[kGemvMaxM * (kGemvMaxKSlice + 8)];
  __shared__ float s_map[256];
  __shared__ int s_is_last;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int64_t M = p.M, N = p.w.N, K = p.w.K;
  const int64_t ks = static_cast<int64_t>(blockIdx.y) * args.kslice;
  const int klen = static_cast<int>((K - ks < args.kslice) ? K - ks : args.kslice);  // multiple of 32
  const int ldsx = args.kslice + 8;

  const int bs_shift = __ffs(p.w.blocksize) - 1;  // blocksize is a power of two: i / blocksize = i >> shift
  const int64_t n_warp = static_cast<int64_t>(blockIdx.x) * kGemvRows + warp * kGemvWarpRows;
  const NF4Scales& scales = p.w.scales;
  const bool dq = scales.double_quant();
  const float offset = dq ? *scales.offset : 0.f;

  // Raw loads of one chunk for the lane's 4 rows: 16 packed bytes each and the scale's ingredients
  // (fp32 absmax, or the 8-bit code and nested absmax). Fetched one chunk ahead (register double buffer)
  // so that the next chunk's bytes are in flight while this one is multiplied.
  struct Raw {
    uint4 w[4];
    float a[4];     // absmax (plain) or absmax2 (double quant)
    uint32_t c[4];  // qabsmax code (double quant)
    uint32_t ok;    // bit t: row n and the chunk are in range
  };
  auto fetch = [&](int kk, Raw& r) {
    r.ok = 0;
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int64_t n = n_warp + 8 * t + g;
      const int64_t flat = n * K + ks + kk;
      const bool ok = kk < klen && n < N;  // the lane's 32 codes are all inside the slice or all outside
      const int64_t b = ok ? flat >> bs_shift : 0;
      r.ok |= static_cast<uint32_t>(ok) << t;
      r.w[t] = ok ? __ldcs(reinterpret_cast<const uint4*>(p.w.packed + (flat >> 1))) : make_uint4(0, 0, 0, 0);
      r.a[t] = ok ? (dq ? scales.absmax2[b / kNestedBlocksize] : scales.absmax_f32[b]) : 0.f;
      r.c[t] = (ok && dq) ? scales.qabsmax[b] : 0u;
    }
  };
  Raw next;
  fetch(32 * q, next);  // the first chunk's weights load while x is staged

  // ---- stage x[0:M, ks:ks+klen) into shared memory (swizzled), and the nested map ----
  if (dq) {
    for (int i = tid; i < 256; i += kGemvThreads) s_map[i] = scales.nested_map[i];
  }
  {
    const T* x = static_cast<const T*>(p.a);
    const bool vec = (reinterpret_cast<uintptr_t>(x) % 16 == 0) && (p.lda % 8 == 0);
    const int nvec = klen / 8;
    if (vec) {
      for (int v = tid; v < M * nvec; v += kGemvThreads) {
        const int m = v / nvec, kk = (v % nvec) * 8;
        const uint4 val = *reinterpret_cast<const uint4*>(x + m * p.lda + ks + kk);
        *reinterpret_cast<uint4*>(s_x + m * ldsx + gemv_swizzle(kk)) = val;
      }
    } else {
      for (int v = tid; v < M * klen; v += kGemvThreads) {
        const int m = v / klen, kk = v % klen;
        s_x[m * ldsx + gemv_swizzle(kk)] = x[m * p.lda + ks + kk];
      }
    }
  }
  __syncthreads();

  // ---- main loop: this warp's 32 rows over the CTA's k slice ----
  const float lut = kNF4CodebookDev[lane & 15];  // NF4 level of code (lane % 16), fetched by shuffles
  float acc[4][4] = {};
  const bool row_lo_ok = g < M, row_hi_ok = g + 8 < M;
  for (int kk = 32 * q; kk - 32 * q < klen; kk += kGemvChunk) {
    const bool k_ok = kk < klen;
    const Raw cur = next;
    if (kk + kGemvChunk - 32 * q < klen) fetch(kk + kGemvChunk, next);  // warp-uniform condition
    const uint4* wv = cur.w;
    float sc[4];  // block scale (0 for out-of-range lanes: they add exact zeros)
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const float scale = dq ? add_rn(mul_rn(s_map[cur.c[t]], cur.a[t]), offset) : cur.a[t];
      sc[t] = ((cur.ok >> t) & 1) ? scale : 0.f;
    }
    // x fragments: rows g and g+8, the lane's 32 k as 4 x 16 bytes (8 k each)
    uint4 xa[4], xb[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int col = gemv_swizzle(kk + 8 * i);
      xa[i] = (k_ok && row_lo_ok) ? *reinterpret_cast<const uint4*>(s_x + g * ldsx + col) : make_uint4(0, 0, 0, 0);
      xb[i] = (k_ok && row_hi_ok) ? *reinterpret_cast<const uint4*>(s_x + (g + 8) * ldsx + col)
                                  : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      // step s: x[m, 32q + 4s + {0,1}] and x[m, 32q + 4s + {2,3}] = words 2(s%2), 2(s%2)+1 of chunk s/2
      const uint32_t* pa = reinterpret_cast<const uint32_t*>(&xa[s >> 1]);
      const uint32_t* pb = reinterpret_cast<const uint32_t*>(&xb[s >> 1]);
      const uint32_t a0 = pa[2 * (s & 1)], a1 = pb[2 * (s & 1)], a2 = pa[2 * (s & 1) + 1], a3 = pb[2 * (s & 1) + 1];
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        // bytes 2s, 2s+1 of the lane's 16: codes of k = 4s (high nibble), 4s+1, 4s+2 (high), 4s+3
        const uint32_t word = reinterpret_cast<const uint32_t*>(&wv[t])[s >> 1];
        const uint32_t h = (word >> (16 * (s & 1))) & 0xFFFFu;
        const float w0 = __shfl_sync(0xffffffffu, lut, (h >> 4) & 0xF) * sc[t];
        const float w1 = __shfl_sync(0xffffffffu, lut, h & 0xF) * sc[t];
        const float w2 = __shfl_sync(0xffffffffu, lut, (h >> 12) & 0xF) * sc[t];
        const float w3 = __shfl_sync(0xffffffffu, lut, (h >> 8) & 0xF) * sc[t];
        const uint32_t a[4] = {a0, a1, a2, a3}, b[2] = {pack2<T>(w0, w1), pack2<T>(w2, w3)};
        dev::mma_m16n8k16<T>(acc[t], a, b);
      }
    }
  }

  // ---- epilogue: acc[t] = {y[g, c], y[g, c+1], y[g+8, c], y[g+8, c+1]}, c = n_warp + 8t + 2q ----
  if (args.splits == 1) {
#pragma unroll
    for (int t = 0; t < 4; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t m = g + 8 * (e >> 1), n = n_warp + 8 * t + 2 * q + (e & 1);
        if (m < M && n < N) gemv_store<T>(p, m, n, acc[t][e]);
      }
    }
    return;
  }
  float* part = args.partial + static_cast<int64_t>(blockIdx.y) * M * N;
#pragma unroll
  for (int t = 0; t < 4; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t m = g + 8 * (e >> 1), n = n_warp + 8 * t + 2 * q + (e & 1);
      if (m < M && n < N) part[m * N + n] = acc[t][e];
    }
  }
  __threadfence();  // partials visible device-wide before the counter says so
  __syncthreads();
  if (tid == 0) s_is_last = atomicAdd(&args.counters[blockIdx.x], 1) == args.splits - 1;
  __syncthreads();
  if (!s_is_last) return;
  __threadfence();
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kGemvRows;
  for (int i = tid; i < M * kGemvRows; i += kGemvThreads) {
    const int64_t m = i / kGemvRows, n = n0 + i % kGemvRows;
    if (n >= N) continue;
    float sum = 0.f;
    for (int sp = 0; sp < args.splits; ++sp) sum += __ldcg(args.partial + (sp * M + m) * N + n);  // L2, not L1
    gemv_store<T>(p, m, n, sum);
  }
  if (tid == 0) args.counters[blockIdx.x] = 0;  // ready for the next launch that reuses the buffer
}

}  // namespace cuda
}  // namespace lowrank_ext
