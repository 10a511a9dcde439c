// nf4_simt_kernel.cuh — SIMT (CUDA-core, fp32 FMA) NF4 GEMM: the fallback for any M, any dtype, any K.
// Torch-free.
//
// One kernel computes C[M, P] = A[M, J] · B(J, P) + A2[M, R] · B2(R, P) (+ bias[P]) for both directions:
//   NT (forward):  A = x [M, K],  B(j, p) = deq(W)[p, j]   (J = K, P = N);  A2 = scaling·u, B2(j, p) = lora_B[p, j]
//   NN (grad in):  A = gy [M, N], B(j, p) = deq(W)[j, p]   (J = N, P = K);  A2 = gu,        B2(j, p) = lora_A[j, p]
// i.e. the LoRA product is the K-concatenation y = [x | s·u] · [deq(W) | B]ᵀ: R more reduction steps
// after the NF4 ones. deq(W)[n, k] = NF4[code of flat index n*K + k] * absmax_hat[(n*K + k) / blocksize]
// is decoded tile by tile into shared memory (any K: codes are addressed by nibble), never to global.
// Tiles: 64 x 64 outputs per CTA of 256 threads (4 x 4 per thread, rows ty + 16i, cols tx + 16j),
// reduction steps of 16, fp32 in shared memory, fp32 accumulation, one rounding at the store.
// Operands for fp16/bf16 (T != float): deq(W) and the NT low-rank input s·u are rounded once to T before
// they enter the tile — the values the mma and GEMV kernels multiply — so every path computes the same
// exact products and differs from the others only in the fp32 summation order (docs/kernels.md,
// "Results across paths"). For fp32, round_to is the identity.
#pragma once

#include "nf4_kernel.cuh"
#include "nf4_linear_params.h"

namespace lowrank_ext {
namespace cuda {

constexpr int kSimtThreads = 256;
constexpr int kSimtTileM = 64, kSimtTileP = 64, kSimtTileJ = 16;

// deq(W)[n, k] in fp32 (nibble addressing: even flat index in the high nibble). bs_shift = log2(blocksize).
__device__ __forceinline__ float nf4_element(const NF4WeightView& w, const float* code, int bs_shift, int64_t n,
                                             int64_t k) {
  const int64_t i = n * w.K + k;
  const uint8_t byte = w.packed[i >> 1];
  return code[(i & 1) ? nf4_low(byte) : nf4_high(byte)] * w.scales.block_scale(i >> bs_shift);
}

template <typename T, bool kNN>
__global__ void __launch_bounds__(kSimtThreads) nf4_simt_kernel(NF4MatmulParams p) {
  __shared__ float s_a[kSimtTileJ][kSimtTileM];      // A tile, transposed: [j][m]
  __shared__ float s_b[kSimtTileJ][kSimtTileP + 1];  // B tile: [j][p] (+1: no conflicts on the NT store)
  __shared__ float s_code[16];
  __shared__ float s_map[256];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  if (tid < 16) s_code[tid] = kNF4CodebookDev[tid];
  NF4WeightView w = p.w;
  if (w.scales.double_quant()) {
    s_map[tid] = w.scales.nested_map[tid];  // 256 threads, 256 entries
    w.scales.nested_map = s_map;
  }
  __syncthreads();

  const int bs_shift = __ffs(w.blocksize) - 1;  // blocksize is a power of two
  const int64_t M = p.M;
  const int64_t J = kNN ? w.N : w.K;  // NF4 reduction length
  const int64_t P = kNN ? w.K : w.N;  // output columns
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kSimtTileM;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kSimtTileP;
  const T* a = static_cast<const T*>(p.a);
  const T* a2 = static_cast<const T*>(p.lowrank);
  const T* b2 = static_cast<const T*>(p.lowrank_w);
  const int64_t R = (p.lowrank != nullptr) ? p.r : 0;
  float acc[4][4] = {};

  // Reduction steps 0 .. J-1 over the NF4 weight, then J .. J+R-1 over the low-rank pair.
  for (int64_t j0 = 0; j0 < J + R; j0 += kSimtTileJ) {
    // A tile: 64 x 16 elements, 4 per thread; consecutive threads on consecutive j (row-major A)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int idx = tid + e * kSimtThreads;
      const int mm = idx / kSimtTileJ, jj = idx % kSimtTileJ;
      const int64_t m = m0 + mm, j = j0 + jj;
      float v = 0.f;
      if (m < M) {
        if (j < J) {
          v = to_float<T>(a[m * p.lda + j]);
        } else if (j < J + R) {
          v = to_float<T>(a2[m * p.ld_lowrank + (j - J)]);
          if (!kNN) v = round_to<T>(p.scaling * v);  // NT: the low-rank rows are s · u, rounded once to T
        }
      }
      s_a[jj][mm] = v;
    }
    // B tile: 16 x 64 elements, 4 per thread, walking the contiguous dimension of W / lora_B / lora_A
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int idx = tid + e * kSimtThreads;
      // NT: B(j, p) = W[p, j] is contiguous in j;  NN: B(j, p) = W[j, p] is contiguous in p
      const int jj = kNN ? idx / kSimtTileP : idx % kSimtTileJ;
      const int pp = kNN ? idx % kSimtTileP : idx / kSimtTileJ;
      const int64_t j = j0 + jj, col = p0 + pp;
      float v = 0.f;
      if (col < P) {
        if (j < J) {
          v = round_to<T>(kNN ? nf4_element(w, s_code, bs_shift, j, col) : nf4_element(w, s_code, bs_shift, col, j));
        } else if (j < J + R) {
          v = kNN ? to_float<T>(b2[(j - J) * p.ld_lowrank_w + col]) : to_float<T>(b2[col * p.ld_lowrank_w + (j - J)]);
        }
      }
      s_b[jj][pp] = v;
    }
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < kSimtTileJ; ++jj) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = s_a[jj][ty + 16 * i];
#pragma unroll
      for (int i = 0; i < 4; ++i) bv[i] = s_b[jj][tx + 16 * i];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[i][k] = fmaf(av[i], bv[k], acc[i][k]);
      }
    }
    __syncthreads();
  }

  T* out = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty + 16 * i;
    if (m >= M) continue;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t col = p0 + tx + 16 * k;
      if (col >= P) continue;
      float v = acc[i][k];
      if (!kNN && bias != nullptr) v += to_float<T>(bias[col]);
      out[m * p.ld_out + col] = from_float<T>(v);
    }
  }
}

// sq[n] = Σ_k deq(W)[n, k]²  (fp32; one warp per row, lanes stride over k; DoRA's row norms)
static __global__ void nf4_row_sqnorm_kernel(NF4WeightView w, float* __restrict__ sq) {
  __shared__ float s_code[16];
  if (threadIdx.x < 16) s_code[threadIdx.x] = kNF4CodebookDev[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int bs_shift = __ffs(w.blocksize) - 1;
  const int64_t n = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (n >= w.N) return;
  float s = 0.f;
  for (int64_t k = lane; k < w.K; k += 32) {
    const float v = nf4_element(w, s_code, bs_shift, n, k);
    s = fmaf(v, v, s);
  }
  for (int o = 16; o >= 1; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) sq[n] = s;
}

}  // namespace cuda
}  // namespace lowrank_ext
