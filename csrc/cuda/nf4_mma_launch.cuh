// nf4_mma_launch.cuh — the launch of the tensor-core NF4 GEMM kernel (nf4_mma_kernel.cuh), included by the
// per-dtype instantiation files nf4_mma_{bf16,fp16}.cu. Torch-free; nvcc only (the simulator launches the
// same kernel with the same grid_of / log2_blocksize / kSmemBytes, tests/sim/).
#pragma once

#include "nf4_mma_kernel.cuh"
#include "per_device.h"

namespace lowrank_ext {
namespace mma {

// Launch on `stream`; the caller has checked the requirements (nf4_mma.cu). Returns the launch error.
// The kernel's dynamic shared memory opt-in is set once per device and instantiation (per_device.h), not per
// launch; a failed set is returned and retried by the next launch.
template <typename T, bool kNN>
cudaError_t launch(const NF4MatmulParams& p, cudaStream_t stream) {
  auto kernel = nf4_mma_kernel<T, kNN>;
  static PerDeviceFlag smem_configured;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (!smem_configured.test(dev)) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (err != cudaSuccess) return err;
    smem_configured.set(dev);
  }
  kernel<<<grid_of<kNN>(p), kThreads, kSmemBytes, stream>>>(p, log2_blocksize(p));
  return cudaGetLastError();
}

}  // namespace mma
}  // namespace lowrank_ext
