// cpu/fused_kernels.h — the interface between the fused model ops (fused_rmsnorm.cpp, fused_rope.cpp,
// fused_swiglu.cpp: checks, allocation, threading) and their vectorized row kernels (fused_*_kernel.h,
// compiled once per instruction set in fused_kernels_avx2.cpp and fused_kernels_avx512.cpp). Torch-free.
//
// Each kernel entry runs a range of rows (or elements) on the calling thread; the op files split the work
// over OpenMP threads (at::parallel_for). Tensors are passed as raw pointers (lowrank_ext/fused_params.h:
// the parameter blocks and the math) with the dtype alongside.
#pragma once

#include <cstdint>

#include "cpu_isa.h"
#include "lowrank_ext/fused_params.h"

namespace lowrank_ext {
namespace cpu {

// Storage of one bfloat16: the high 16 bits of an fp32 (same layout as c10::BFloat16).
struct bf16 {
  uint16_t bits;
};

enum class FusedDtype : int { kF32, kBF16, kF64 };

using ::lowrank_ext::RmsNormRows;  // the parameter blocks and their math: lowrank_ext/fused_params.h
using ::lowrank_ext::RopeRows;
using ::lowrank_ext::SwiGluSpan;

struct FusedKernels {
  void (*rmsnorm_forward)(FusedDtype, const RmsNormRows&, int64_t r0, int64_t r1);
  void (*rmsnorm_backward)(FusedDtype, const RmsNormRows&, int64_t r0, int64_t r1);
  void (*rope)(FusedDtype, const RopeRows&, int64_t r0, int64_t r1);
  void (*swiglu_forward)(FusedDtype, const SwiGluSpan&, int64_t i0, int64_t i1);
  void (*swiglu_backward)(FusedDtype, const SwiGluSpan&, int64_t i0, int64_t i1);
};

const FusedKernels& fused_kernels_avx2();    // fused_kernels_avx2.cpp (also the fp64 path)
const FusedKernels& fused_kernels_avx512();  // fused_kernels_avx512.cpp
const FusedKernels& fused_kernels_avx512bf16();  // fused_kernels_avx512bf16.cpp (bf16 stores by vcvtneps2bf16)

// The table for this dtype on the kernel family cpu_isa() picks (LOWRANK_EXT_CPU_ISA may force a lower one;
// amx CPUs take the avx512bf16 table);
// fp64 always takes the scalar fp64 lanes of the avx2 table.
inline const FusedKernels& fused_kernels_for(FusedDtype dtype) {
  if (dtype == FusedDtype::kF64) return fused_kernels_avx2();
  const CpuIsa isa = cpu_isa();
  if (isa >= CpuIsa::kAvx512Bf16) return fused_kernels_avx512bf16();
  return isa >= CpuIsa::kAvx512 ? fused_kernels_avx512() : fused_kernels_avx2();
}

}  // namespace cpu
}  // namespace lowrank_ext
