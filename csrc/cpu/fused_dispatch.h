// cpu/fused_dispatch.h — builds the FusedKernels table (fused_kernels.h) of one instruction set from the
// kernel templates: fp32 and bf16 run on the ISA's vector type V, fp64 on VecF64 (one scalar fp64 lane).
#pragma once

#include "fused_rmsnorm_kernel.h"
#include "fused_rope_kernel.h"
#include "fused_swiglu_kernel.h"

namespace lowrank_ext {
namespace cpu {
inline namespace LRX_FUSED_ISA {

// Calls kernel<Vec, T>(args...) for the storage type of `dtype`.
#define LRX_FUSED_ENTRY(kernel, Args)                                                   \
  [](FusedDtype dtype, const Args& a, int64_t i0, int64_t i1) {                         \
    switch (dtype) {                                                                    \
      case FusedDtype::kF32: return kernel<V, float>(a, i0, i1);                        \
      case FusedDtype::kBF16: return kernel<V, bf16>(a, i0, i1);                        \
      case FusedDtype::kF64: return kernel<VecF64, double>(a, i0, i1);                  \
    }                                                                                   \
  }

template <class V>
FusedKernels make_fused_kernels() {
  return FusedKernels{
      LRX_FUSED_ENTRY(rmsnorm_forward_rows, RmsNormRows), LRX_FUSED_ENTRY(rmsnorm_backward_rows, RmsNormRows),
      LRX_FUSED_ENTRY(rope_rows, RopeRows),               LRX_FUSED_ENTRY(swiglu_forward_span, SwiGluSpan),
      LRX_FUSED_ENTRY(swiglu_backward_span, SwiGluSpan),
  };
}

#undef LRX_FUSED_ENTRY

}  // namespace LRX_FUSED_ISA
}  // namespace cpu
}  // namespace lowrank_ext
