// nf4_gemv.h — launch entry points of the small-M tensor-core NF4 GEMV (nf4_gemv_kernel.cuh), instantiated
// in the torch-free nf4_gemv.cu; the split plan is gemv_plan.h. Called by the dispatcher in nf4_linear.cu.
#pragma once

#include <cuda_runtime_api.h>

#include "nf4_gemv_kernel.cuh"

namespace lowrank_ext {
namespace cuda {

// Launch the GEMV on `stream` with grid (row_groups, splits); returns the launch error.
cudaError_t launch_nf4_gemv_bf16(const GemvArgs& args, dim3 grid, cudaStream_t stream);
cudaError_t launch_nf4_gemv_fp16(const GemvArgs& args, dim3 grid, cudaStream_t stream);

}  // namespace cuda
}  // namespace lowrank_ext
