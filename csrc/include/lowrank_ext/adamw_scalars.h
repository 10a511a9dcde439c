// adamw_scalars.h — the host-side scalars of one AdamW step (bias corrections computed once, in double, like
// torch). Torch-free: used by the argument checks (adamw_args.h), the CPU ops and the CUDA kernels' host
// helper (csrc/cuda/adamw_kernel.cuh: kernel_scalars, also built by the host simulator, tests/sim/).
#pragma once

#include <cmath>
#include <cstdint>

namespace lowrank_ext {

// Scalars of step t, in the form the kernels use:
//   decay     = 1 - lr·wd                 (decoupled weight decay, applied to p first)
//   step_size = lr / (1 - β1^t)
//   bc2_sqrt  = sqrt(1 - β2^t)            denom = sqrt(v) / bc2_sqrt + eps
struct AdamWScalars {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, decay, step_size, inv_bc2_sqrt;
};

inline AdamWScalars adamw_scalars(double lr, double beta1, double beta2, double eps, double wd, int64_t step) {
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  return {static_cast<float>(beta1), static_cast<float>(beta2), static_cast<float>(1.0 - beta1),
          static_cast<float>(1.0 - beta2), static_cast<float>(eps), static_cast<float>(1.0 - lr * wd),
          static_cast<float>(lr / bc1), static_cast<float>(1.0 / std::sqrt(bc2))};
}

}  // namespace lowrank_ext
