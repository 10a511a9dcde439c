// adamw_args.h — argument checks of the fused AdamW ops, shared by csrc/cpu/adamw.cpp and csrc/cuda/adamw.cu,
// and the host-side scalars of one step (bias corrections computed once, in double, like torch).
// Also the check of paged_prefetch (the paged optimizer state's op: csrc/cpu/adamw.cpp, csrc/cuda/paged.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <string>

#include "lowrank_ext/adamw_scalars.h"  // AdamWScalars, adamw_scalars (torch-free)
#include "lowrank_ext/check.h"

namespace lowrank_ext {

constexpr int64_t kOptimBlocksize = 256;  // 8-bit state: one fp32 absmax per 256 flat elements

inline void check_hyper(const char* op, double lr, double beta1, double beta2, double eps, double wd,
                        int64_t step) {
  LRX_CHECK(lr >= 0.0, op, "lr", "be >= 0", lr);
  LRX_CHECK(beta1 >= 0.0 && beta1 < 1.0, op, "beta1", "be in [0, 1)", beta1);
  LRX_CHECK(beta2 >= 0.0 && beta2 < 1.0, op, "beta2", "be in [0, 1)", beta2);
  LRX_CHECK(eps >= 0.0, op, "eps", "be >= 0", eps);
  LRX_CHECK(wd >= 0.0, op, "weight_decay", "be >= 0", wd);
  LRX_CHECK(step >= 1, op, "step", "be >= 1 (the step count after this update)", step);
}

inline void check_param_grad(const char* op, const at::Tensor& param, const at::Tensor& grad) {
  check_float_input(param, op, "param");
  LRX_CHECK(grad.layout() == at::kStrided, op, "grad", "be a dense (strided) tensor", grad.layout());
  LRX_CHECK_TYPE(grad.scalar_type() == param.scalar_type(), op, "grad",
                 std::string("have the dtype of param (") + c10::toString(param.scalar_type()) + ")",
                 grad.scalar_type());
  LRX_CHECK(grad.sizes() == param.sizes(), op, "grad", "have the shape of param " + shape_str(param),
            grad.sizes());
  check_same_device(grad, param, op, "grad", "param");
  LRX_CHECK(param.is_contiguous(), op, "param", "be contiguous", "strides ", param.strides());
}

inline void check_state(const char* op, const at::Tensor& s, const at::Tensor& param, const char* arg,
                        c10::ScalarType dtype, int64_t numel) {
  check_dtype(s, dtype, op, arg);
  check_numel(s, numel, op, arg);
  check_same_device(s, param, op, arg, "param");
  LRX_CHECK(s.is_contiguous(), op, arg, "be contiguous", "strides ", s.strides());
}

inline void check_adamw_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                             const at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps,
                             double wd, int64_t step) {
  constexpr const char* op = "adamw_step";
  check_param_grad(op, param, grad);
  check_state(op, exp_avg, param, "exp_avg", at::kFloat, param.numel());
  check_state(op, exp_avg_sq, param, "exp_avg_sq", at::kFloat, param.numel());
  check_hyper(op, lr, beta1, beta2, eps, wd, step);
}

inline void check_adamw8bit_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& state1,
                                 const at::Tensor& state2, const at::Tensor& absmax1, const at::Tensor& absmax2,
                                 const at::Tensor& qmap1, const at::Tensor& qmap2, double lr, double beta1,
                                 double beta2, double eps, double wd, int64_t step) {
  constexpr const char* op = "adamw8bit_step";
  check_param_grad(op, param, grad);
  const int64_t n = param.numel(), nb = ceil_div(n, kOptimBlocksize);
  check_state(op, state1, param, "state1", at::kByte, n);
  check_state(op, state2, param, "state2", at::kByte, n);
  check_state(op, absmax1, param, "absmax1", at::kFloat, nb);
  check_state(op, absmax2, param, "absmax2", at::kFloat, nb);
  check_state(op, qmap1, param, "qmap1", at::kFloat, 256);
  check_state(op, qmap2, param, "qmap2", at::kFloat, 256);
  check_hyper(op, lr, beta1, beta2, eps, wd, step);
}

// paged_prefetch / paged_prefetch_batch (`op`): a GPU ordinal or -1 (the host).
inline void check_paged_prefetch_args(int64_t device, const char* op = "paged_prefetch") {
  LRX_CHECK(device >= -1, op, "device", "be a device ordinal >= 0 or -1 (host)", device);
}

}  // namespace lowrank_ext
