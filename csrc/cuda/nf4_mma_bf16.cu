// nf4_mma_bf16.cu — bf16 instantiations of the tensor-core NF4 GEMMs (nf4_mma_kernel.cuh). One file per
// dtype so nvcc compiles them in parallel; torch-free.
#include "nf4_mma_launch.cuh"

namespace lowrank_ext {
namespace mma {

// nn == false: y = x · deq(W)ᵀ (+ s·u·Bᵀ) (+ bias);  nn == true: gx = gy · deq(W) (+ gu·A).
cudaError_t run_bf16(const NF4MatmulParams& p, bool nn, cudaStream_t stream) {
  return nn ? launch<__nv_bfloat16, true>(p, stream) : launch<__nv_bfloat16, false>(p, stream);
}

}  // namespace mma
}  // namespace lowrank_ext
