// sim_gemv.cpp — the small-M tensor-core NF4 GEMV (csrc/cuda/nf4_gemv_kernel.cuh) on the simulator, with the
// launcher's plan (gemv_plan.h: plan_gemv(N, K, sm_count), grid (row_groups, splits), kGemvThreads) and the
// split-K workspace protocol (nf4_linear.cu / gemv_workspace.h: counters zero on entry and on exit).
#include <cmath>

#include "nf4_gemv_kernel.cuh"
#include "sim_common.h"

// y = x · deq(W)ᵀ (+ s·u·lora_Bᵀ) (+ bias), M <= 16; sm_count drives the split-K plan like the device's SM count.
// plan_out (may be null): {row_groups, kslice, splits}.
LRX_SIM_API const char* lrx_sim_nf4_gemv(int sm_count, int64_t* plan_out, LRX_SIM_MATMUL_ARGS) {
  using namespace lowrank_ext;
  LRX_SIM_MATMUL_PARAMS(false, p, globals);
  if (dtype != 1 && dtype != 2) return lrx_sim::result("lrx_sim_nf4_gemv: dtype must be 1 (fp16) or 2 (bf16)");
  if (M < 1 || M > cuda::kGemvMaxM || K % 32 != 0 || reinterpret_cast<uintptr_t>(packed) % 16 != 0)
    return lrx_sim::result("lrx_sim_nf4_gemv: needs 1 <= M <= 16, K % 32 == 0, packed 16-byte aligned");
  const cuda::GemvPlan plan = cuda::plan_gemv(N, K, sm_count);
  if (plan_out != nullptr) plan_out[0] = plan.row_groups, plan_out[1] = plan.kslice, plan_out[2] = plan.splits;
  // Split-K scratch: partials start as NaN (unwritten device memory is garbage), counters at zero.
  std::vector<float> partial(plan.splits > 1 ? static_cast<size_t>(plan.splits) * M * N : 0, NAN);
  std::vector<int> counters(plan.splits > 1 ? plan.row_groups : 0, 0);
  cuda::GemvArgs args{p, plan.kslice, plan.splits, partial.empty() ? nullptr : partial.data(),
                      counters.empty() ? nullptr : counters.data()};
  globals.push_back({partial.data(), partial.size() * sizeof(float)});
  globals.push_back({counters.data(), counters.size() * sizeof(int)});
  const dim3 grid(static_cast<unsigned>(plan.row_groups), static_cast<unsigned>(plan.splits));
  lrx_sim::LaunchStats st;
  std::string err = lrx_sim::launch(grid, dim3(cuda::kGemvThreads), 0, seed, std::move(globals), [&] {
    if (dtype == 2) cuda::nf4_gemv_kernel<__nv_bfloat16>(args);
    else cuda::nf4_gemv_kernel<__half>(args);
  }, &st);
  lrx_sim::put_stats(stats, st);
  if (err.empty()) {
    for (size_t i = 0; i < counters.size(); ++i) {
      if (counters[i] != 0) {
        err = "nf4_gemv_kernel left counters[" + std::to_string(i) + "] = " + std::to_string(counters[i]) +
              " (the workspace protocol wants every counter back at 0)";
        break;
      }
    }
  }
  return lrx_sim::result(err);
}
