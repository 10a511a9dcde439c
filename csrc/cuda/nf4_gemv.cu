// nf4_gemv.cu — the bf16 / fp16 instantiations and launches of the small-M NF4 GEMV (nf4_gemv_kernel.cuh).
// Torch-free (bench/sass_budget.py compiles it alone to count the main loop's instructions).
#include "nf4_gemv.h"

namespace lowrank_ext {
namespace cuda {

cudaError_t launch_nf4_gemv_bf16(const GemvArgs& args, dim3 grid, cudaStream_t stream) {
  nf4_gemv_kernel<__nv_bfloat16><<<grid, kGemvThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launch_nf4_gemv_fp16(const GemvArgs& args, dim3 grid, cudaStream_t stream) {
  nf4_gemv_kernel<__half><<<grid, kGemvThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lowrank_ext
