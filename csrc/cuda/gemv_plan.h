// gemv_plan.h — how the small-M NF4 GEMV (nf4_gemv_kernel.cuh) splits its work: CTAs over rows of 128
// output features (grid.x) and over slices of K (grid.y, split-K). Torch-free and CUDA-free: the launcher
// (nf4_linear.cu) and the kernel simulator (tests/sim/) call the same function.
#pragma once

#include <algorithm>
#include <cstdint>

namespace lowrank_ext {
namespace cuda {

constexpr int kGemvRowsPerCta = 128;  // output features per CTA (== kGemvRows in nf4_gemv_kernel.cuh)
constexpr int kGemvKChunk = 128;      // k per warp step (== kGemvChunk)
constexpr int kGemvKSliceMax = 1024;  // k per CTA at most (== kGemvMaxKSlice: the staged x tile)

struct GemvPlan {
  int64_t row_groups;  // grid.x = ceil(N / 128)
  int kslice;          // k per split: a multiple of 128, <= kGemvKSliceMax
  int splits;          // grid.y = ceil(K / kslice)
};

// Split K until the grid has ~4 CTAs per SM: N is often too small to fill the GPU at M <= 16.
inline GemvPlan plan_gemv(int64_t N, int64_t K, int sm_count) {
  auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const int64_t row_groups = ceil_div(N, kGemvRowsPerCta);
  const int64_t target = 4 * static_cast<int64_t>(sm_count);
  const int64_t want_splits = std::max<int64_t>(1, ceil_div(target, row_groups));
  int64_t kslice = ceil_div(ceil_div(K, want_splits), kGemvKChunk) * kGemvKChunk;
  kslice = std::min<int64_t>(std::max<int64_t>(kslice, kGemvKChunk), kGemvKSliceMax);
  return GemvPlan{row_groups, static_cast<int>(kslice), static_cast<int>(ceil_div(K, kslice))};
}

}  // namespace cuda
}  // namespace lowrank_ext
