// cpu/fused_launch.h — what the three CPU launchers of the fused model ops (fused_rmsnorm.cpp,
// fused_rope.cpp, fused_swiglu.cpp) share: the checks (fused_args.h), the host setup shared with CUDA
// (fused_setup.h), the kernel table (fused_kernels.h), the dtype tag of a tensor and the OpenMP grain.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "fused_kernels.h"
#include "lowrank_ext/fused_args.h"
#include "lowrank_ext/fused_setup.h"
#include "lowrank_ext/huge_pages.h"

namespace lowrank_ext {
namespace cpu {

inline FusedDtype fused_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return FusedDtype::kBF16;
    case at::kDouble: return FusedDtype::kF64;
    default: return FusedDtype::kF32;  // the checks admitted only these three
  }
}

// Elements per parallel task: ~32K, torch's own grain (at::internal::GRAIN_SIZE), so a small op runs on the
// calling thread instead of paying a parallel region (and, on a loaded machine, a barrier on a descheduled
// thread). A multiple of every ISA's lane count.
constexpr int64_t kTaskElements = 32768;

// Rows of `dim` elements per task.
inline int64_t row_grain(int64_t dim) { return std::max<int64_t>(1, kTaskElements / dim); }

}  // namespace cpu
}  // namespace lowrank_ext
