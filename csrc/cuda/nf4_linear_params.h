// nf4_linear_params.h — the parameter structs shared by the CUDA NF4 matmul kernels and their
// dispatcher (csrc/cuda/nf4_linear.cu). Torch-free: kernels (.cuh) include only this and nf4.h.
//
//   NT ("forward"):  y[M, N]  = x[M, K] · deq(W)[N, K]ᵀ  (+ scaling · u[M, r] · lora_B[N, r]ᵀ) (+ bias[N])
//   NN ("grad in"):  gx[M, K] = gy[M, N] · deq(W)[N, K]  (+ gu[M, r] · lora_A[r, K])
// deq(W) is the NF4 weight (flat row-major index i = n*K + k, block i / blocksize); never materialized.
// Row strides are in elements; the last dimension of every operand is contiguous.
#pragma once

#include <cstdint>

#include "lowrank_ext/nf4.h"

namespace lowrank_ext {

enum class ActDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct NF4WeightView {
  const uint8_t* packed;  // ceil(N*K/2) bytes, even flat index in the high nibble
  NF4Scales scales;       // per-block absmax (plain or double-quantized)
  int blocksize;
  int64_t N, K;           // out_features, in_features
};

struct NF4MatmulParams {
  ActDType dtype;
  int64_t M;
  NF4WeightView w;
  const void* a;      // NT: x [M, K]; NN: gy [M, N]
  int64_t lda;
  // Low-rank add (optional, lowrank == nullptr means none):
  //   NT: + scaling * u[M, r] · lora_B[N, r]ᵀ      NN: + gu[M, r] · lora_A[r, K]  (scaling = 1)
  const void* lowrank = nullptr;     // u or gu [M, r]
  int64_t ld_lowrank = 0;
  const void* lowrank_w = nullptr;   // lora_B [N, r] (NT) or lora_A [r, K] (NN)
  int64_t ld_lowrank_w = 0;
  int r = 0;
  float scaling = 1.0f;
  const void* bias = nullptr;        // NT only: [N]
  void* out;                         // NT: y [M, N]; NN: gx [M, K]
  int64_t ld_out;
};

}  // namespace lowrank_ext
