// gemv_plan.h — how the small-M NF4 GEMV (nf4_gemv_kernel.cuh) splits its work: CTAs over rows of 128
// output features (grid.x) and over slices of K (grid.y, split-K). Torch-free and CUDA-free: the launcher
// (nf4_linear.cu), the kernel simulator (tests/sim/) and tests/test_gemv_plan.py (g++) call the same function.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace lowrank_ext {
namespace cuda {

constexpr int kGemvRowsPerCta = 128;  // output features per CTA (== kGemvRows in nf4_gemv_kernel.cuh)
constexpr int kGemvKChunk = 128;      // k per warp step (== kGemvChunk)
constexpr int kGemvMaxRows = 16;      // M <= 16 (the mma's 16 rows)
constexpr int kGemvXPiece = 256;      // k of x staged in shared memory per piece (double-buffered)
constexpr int kGemvMinKSlice = 256;   // a split covers at least this much of K (the CTA's fixed costs:
                                      // the 32 KB level table, the first x piece, the epilogue)
constexpr int kGemvCtasPerSm = 4;     // __launch_bounds__(128, 4): <= 128 registers, 16 warps per SM
// Static shared memory per CTA: the replicated level table (256 bytes x 16 copies x 8 B) + 2 x-pieces
// (2 x 16 rows x 256 x 2 B). Exactly the 48 KB a kernel may declare statically.
constexpr int kGemvSmemBytes = 256 * 16 * 8 + 2 * kGemvMaxRows * kGemvXPiece * 2;
static_assert(kGemvSmemBytes <= 48 * 1024, "static shared memory is limited to 48 KB");

struct GemvPlan {
  int64_t row_groups;  // grid.x = ceil(N / 128)
  int kslice;          // k per split: a multiple of 128 (any length: x is staged in 256-wide pieces)
  int splits;          // grid.y = ceil(K / kslice)
};

// CTAs of the GEMV that fit on one SM: 4 (registers) unless shared memory allows fewer (A100: 164 KB per SM
// -> 3). smem_per_sm / reserved_per_cta: cudaDeviceProp::sharedMemPerMultiprocessor / reservedSharedMemPerBlock.
inline int gemv_ctas_per_sm(size_t smem_per_sm, size_t reserved_per_cta) {
  const size_t fit = smem_per_sm / (static_cast<size_t>(kGemvSmemBytes) + reserved_per_cta);
  return static_cast<int>(std::clamp<size_t>(fit, 1, kGemvCtasPerSm));
}

// The split of K, from the shape, the SM count and the kernel's occupancy.
//
// Cost model. The kernel is bound by memory traffic, and each resident warp keeps a fixed number of bytes in
// flight (one 2 KB chunk of W ahead), so by Little's law the bandwidth it draws grows with the number of
// resident CTAs until all C = ctas_per_sm x sm_count slots are busy:
//     time(S)  ~  bytes(S) / min(1, R x S / C)                R = ceil(N / 128) row groups, S splits
//     bytes(S) =  N K / 2                          the NF4 weight W (every byte read once; scales ignored)
//              +  [S > 1] x 2 x S x M x N x 4      fp32 partials, written once and read once by the last CTA
// While the fill is below 1 the time of S >= 2 splits is (C / R)(W / S + 8 M N): it falls with S, the better
// fill always outweighing the partials; once the fill is 1 only the partials grow. So the best S is one of:
// 1 (no partials at all), the largest S that leaves slots idle, and the smallest S that fills them all,
// where S ranges over the split counts a slice length (a multiple of 128, at least kGemvMinKSlice) can give.
// When the row groups alone fill the GPU (R >= C) that is S = 1: no split.
// (The tail wave of a grid larger than C is not modelled: a memory-bound CTA runs faster on an emptier GPU.)
// Examples on 132 SMs (C = 528), M = 16: a 128256 x 8192 LM head R = 1002 -> 1 split; 28672 x 8192 R = 224
// -> time(2) = 1.06 W / 0.85, time(3) = 1.09 W / 1 -> 3; 4096 x 4096 R = 32 -> 16 (kslice 256).
// tests/test_gemv_plan.py checks the choice against every slice length.
inline GemvPlan plan_gemv(int64_t N, int64_t K, int sm_count, int64_t M = kGemvMaxRows,
                          int ctas_per_sm = kGemvCtasPerSm) {
  auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const int64_t row_groups = ceil_div(N, kGemvRowsPerCta);
  const int64_t slots = std::max<int64_t>(1, static_cast<int64_t>(ctas_per_sm) * sm_count);
  const double weight_bytes = 0.5 * static_cast<double>(N) * static_cast<double>(K);
  const int64_t whole = ceil_div(K, kGemvKChunk) * kGemvKChunk;                   // kslice of 1 split
  const int64_t shortest = std::min<int64_t>(whole, kGemvMinKSlice);               // the most splits
  auto time_for = [&](int64_t kslice) {  // the model above
    const int64_t s = ceil_div(K, kslice);
    const double partial_bytes = s > 1 ? 2.0 * s * M * N * 4.0 : 0.0;
    const double fill = std::min(1.0, static_cast<double>(row_groups * s) / static_cast<double>(slots));
    return (weight_bytes + partial_bytes) / fill;
  };
  int64_t best = whole;
  const int64_t s_fill = ceil_div(slots, row_groups);  // the fewest splits that fill every slot
  if (s_fill >= 2) {
    // the largest split count below s_fill: the shortest slice with ceil(K / kslice) <= s_fill - 1
    const int64_t under = std::max(shortest, ceil_div(ceil_div(K, s_fill - 1), kGemvKChunk) * kGemvKChunk);
    // the smallest split count >= s_fill: the longest slice with ceil(K / kslice) >= s_fill
    const int64_t over = std::max(shortest, (ceil_div(K, s_fill - 1) - 1) / kGemvKChunk * kGemvKChunk);
    for (const int64_t kslice : {under, over}) {
      if (time_for(kslice) < time_for(best)) best = kslice;
    }
  }
  // The same split count with the slices as even as 128-granularity allows (the model assumes equal CTAs).
  const int64_t splits = ceil_div(K, best);
  const int64_t kslice = ceil_div(ceil_div(K, splits), kGemvKChunk) * kGemvKChunk;
  return GemvPlan{row_groups, static_cast<int>(kslice), static_cast<int>(splits)};
}

}  // namespace cuda
}  // namespace lowrank_ext
