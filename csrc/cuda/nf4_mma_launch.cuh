// nf4_mma_launch.cuh — the launch of the tensor-core NF4 GEMM kernel (nf4_mma_kernel.cuh), included by the
// per-dtype instantiation files nf4_mma_{bf16,fp16}.cu. Torch-free; nvcc only (the simulator launches the
// same kernel with the same grid_of / log2_blocksize / kSmemBytes, tests/sim/).
#pragma once

#include "nf4_mma_kernel.cuh"

namespace lowrank_ext {
namespace mma {

// Launch on `stream`; the caller has checked the requirements (nf4_mma.cu). Returns the launch error.
template <typename T, bool kNN>
cudaError_t launch(const NF4MatmulParams& p, cudaStream_t stream) {
  auto kernel = nf4_mma_kernel<T, kNN>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<grid_of<kNN>(p), kThreads, kSmemBytes, stream>>>(p, log2_blocksize(p));
  return cudaGetLastError();
}

}  // namespace mma
}  // namespace lowrank_ext
