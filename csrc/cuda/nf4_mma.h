// nf4_mma.h — entry points of the tensor-core (mma.sync m16n8k16) NF4 GEMM kernels, called by the
// dispatcher in nf4_linear.cu for large M with fp16/bf16 activations.
//
// Both return false (launching nothing) when the shape/dtype/alignment is outside what the tensor-core
// path supports, so the dispatcher can pick another kernel; they never silently compute something else.
#pragma once

#include <cuda_runtime_api.h>

#include "nf4_linear_params.h"

namespace lowrank_ext {

// y[M, N] = x[M, K] · deq(W)ᵀ (+ scaling · u · lora_Bᵀ) (+ bias)   — params.a = x
bool launch_nf4_mma_nt(const NF4MatmulParams& params, cudaStream_t stream);

// gx[M, K] = gy[M, N] · deq(W) (+ gu · lora_A)                    — params.a = gy
bool launch_nf4_mma_nn(const NF4MatmulParams& params, cudaStream_t stream);

}  // namespace lowrank_ext
