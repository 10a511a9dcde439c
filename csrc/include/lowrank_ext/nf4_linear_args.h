// nf4_linear_args.h — argument checks of the fused NF4 matmul + LoRA ops, written once and shared by
// the CPU (csrc/cpu/nf4_linear.cpp) and CUDA implementations (host only, ATen).
//
// Shapes (N = out_features, K = in_features, M rows, r = LoRA rank):
//   x, x_lora [M, K]   grad_y [M, N]   u [M, r]   lora_A [r, K]   lora_B [N, r]   bias [N]
// x, x_lora, u, lora_A, lora_B, bias, grad_y share x's dtype and device; the NF4 bundle lives on x's device.
// Messages: "lowrank_ext::<op>: <arg> must <expected>, got <actual>" (ValueError; TypeError for dtypes).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <string>

#include "lowrank_ext/check.h"
#include "lowrank_ext/nf4_args.h"

namespace lowrank_ext {

inline void check_matrix(const at::Tensor& t, const char* op, const char* arg) {
  LRX_CHECK(t.dim() == 2, op, arg, "be 2-D", t.dim(), "-D tensor of shape ", t.sizes());
}

inline void check_shape2(const at::Tensor& t, int64_t d0, int64_t d1, const char* op, const char* arg,
                         const char* what) {
  LRX_CHECK(t.dim() == 2 && t.size(0) == d0 && t.size(1) == d1, op, arg,
            std::string("have shape [") + std::to_string(d0) + ", " + std::to_string(d1) + "] " + what,
            t.sizes());
}

// Same dtype and device as `ref` (the activation that fixes both: x, or grad_y in the backward).
inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* ref_name, const char* op,
                       const char* arg) {
  LRX_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, arg,
                 std::string("have ") + ref_name + "'s dtype " + c10::toString(ref.scalar_type()), t.scalar_type());
  check_same_device(t, ref, op, arg, ref_name);
}

// The activation x [M, K]: float dtype, 2-D, and the NF4 bundle on its device. Returns M.
inline int64_t check_activation(const at::Tensor& x, const at::Tensor& packed, const char* op, const char* arg,
                                bool allow_double) {
  check_float_input(x, op, arg, allow_double);
  check_matrix(x, op, arg);
  check_same_device(packed, x, op, "packed", arg);
  return x.size(0);
}

inline void check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& x, int64_t N, const char* op) {
  if (!bias.has_value()) return;
  LRX_CHECK(bias->dim() == 1 && bias->size(0) == N, op, "bias",
            "have shape [" + std::to_string(N) + "] (out_features)", bias->sizes());
  check_like(*bias, x, "x", op, "bias");
}

inline void check_out_features(int64_t n, const char* op, const char* arg) {
  LRX_CHECK(n > 0, op, arg, "be positive", n);
}

// lora_A [r, K], lora_B [N, r] with the same r. Returns r.
inline int64_t check_lora(const at::Tensor& A, const at::Tensor& B, const at::Tensor& x, const char* x_name,
                          int64_t N, int64_t K, const char* op) {
  check_matrix(A, op, "lora_A");
  check_matrix(B, op, "lora_B");
  const int64_t r = A.size(0);
  LRX_CHECK(r > 0, op, "lora_A", "have rank r = lora_A.shape[0] > 0", A.sizes());
  check_shape2(A, r, K, op, "lora_A", "(r, in_features)");
  check_shape2(B, N, r, op, "lora_B", "(out_features, r = lora_A.shape[0])");
  check_like(A, x, x_name, op, "lora_A");
  check_like(B, x, x_name, op, "lora_B");
  return r;
}

inline void check_scaling(double s, const char* op) { LRX_CHECK(std::isfinite(s), op, "scaling", "be finite", s); }

}  // namespace lowrank_ext
