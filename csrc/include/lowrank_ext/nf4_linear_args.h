// nf4_linear_args.h — argument checks of the fused NF4 matmul + LoRA ops, one function per op, called by
// both the CPU (csrc/cpu/nf4_linear.cpp) and the CUDA implementation (csrc/cuda/nf4_linear.cu); host only, ATen.
//
// Shapes (N = out_features, K = in_features, M rows, r = LoRA rank), all activations 2-D (the Python
// wrappers in lowrank_ext/ops/linear.py flatten leading dims):
//   x, x_lora [M, K]   grad_y [M, N]   u [M, r]   lora_A [r, K]   lora_B [N, r]   bias [N]
// x, x_lora, lora_A, lora_B, bias share x's dtype and device (the backward: grad_y's); the NF4 bundle
// (nf4_args.h) lives on that device too. The one backend difference is `allow_double`: the CPU takes
// float64 (the gradcheck path), CUDA does not.
// Messages: "lowrank_ext::<op>: <arg> must <expected>, got <actual>" (ValueError; TypeError for dtypes).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <string>

#include "lowrank_ext/check.h"
#include "lowrank_ext/nf4_args.h"

namespace lowrank_ext {

// What the kernels need once the arguments are checked.
struct NF4LinearArgs {
  NF4Scales scales;  // the weight's per-block scales (pointers into absmax / the nested tensors)
  int64_t M = 0;     // rows of x / grad_y (0 for nf4_row_sqnorm)
  int64_t N = 0;     // out_features
  int64_t K = 0;     // in_features
  int64_t r = 0;     // LoRA rank (0 without LoRA)
};

namespace detail {

inline std::string shape2_str(int64_t d0, int64_t d1) {
  return "[" + std::to_string(d0) + ", " + std::to_string(d1) + "]";
}

inline void check_matrix(const at::Tensor& t, const char* op, const char* arg) {
  LRX_CHECK(t.dim() == 2, op, arg, "be 2-D", t.dim(), "-D tensor of shape ", t.sizes());
}

inline void check_shape2(const at::Tensor& t, int64_t d0, int64_t d1, const char* op, const char* arg,
                         const char* what) {
  LRX_CHECK(t.dim() == 2 && t.size(0) == d0 && t.size(1) == d1, op, arg,
            "have shape " + shape2_str(d0, d1) + " " + what, t.sizes());
}

// Same dtype and device as `ref` (the activation that fixes both: x, or grad_y in the backward).
inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* ref_arg, const char* op,
                       const char* arg) {
  LRX_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, arg,
                 std::string("have ") + ref_arg + "'s dtype " + c10::toString(ref.scalar_type()), t.scalar_type());
  check_same_device(t, ref, op, arg, ref_arg);
}

// The activation (x [M, K] or grad_y [M, N]): a float dtype and 2-D.
inline void check_activation(const at::Tensor& a, const char* op, const char* arg, bool allow_double) {
  check_float_input(a, op, arg, allow_double);
  check_matrix(a, op, arg);
}

// The NF4 bundle of an [N, K] weight on `ref`'s device (ref is the activation, or packed itself).
inline NF4Scales check_weight(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                              const c10::optional<at::Tensor>& nested_absmax,
                              const c10::optional<at::Tensor>& nested_map, const c10::optional<at::Tensor>& offset,
                              int64_t blocksize, int64_t N, int64_t K, const at::Tensor& ref, const char* ref_arg) {
  check_same_device(packed, ref, op, "packed", ref_arg);
  LRX_CHECK(N > 0, op, "out_features", "be positive", N);
  LRX_CHECK(K > 0, op, "in_features", "be positive", K);
  const int64_t bytes = ceil_div(N * K, 2);
  LRX_CHECK(packed.numel() == bytes, op, "packed",
            "hold ceil(out_features * in_features / 2) = " + std::to_string(bytes) + " bytes for " +
                shape2_str(N, K),
            packed.numel());
  return check_nf4_weight(op, packed, absmax, nested_absmax, nested_map, offset, blocksize, N * K);
}

inline void check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& x, int64_t N, const char* op) {
  if (!bias.has_value()) return;
  LRX_CHECK(bias->dim() == 1 && bias->size(0) == N, op, "bias",
            "have shape [" + std::to_string(N) + "] (out_features)", bias->sizes());
  check_like(*bias, x, "x", op, "bias");
}

// lora_A [r, K], lora_B [N, r] with the same r > 0, like `ref`. Returns r.
inline int64_t check_lora(const at::Tensor& A, const at::Tensor& B, const at::Tensor& ref, const char* ref_arg,
                          int64_t N, int64_t K, const char* op) {
  check_matrix(A, op, "lora_A");
  check_matrix(B, op, "lora_B");
  const int64_t r = A.size(0);
  LRX_CHECK(r > 0, op, "lora_A", "have rank r = lora_A.shape[0] > 0", A.sizes());
  check_shape2(A, r, K, op, "lora_A", "(r, in_features)");
  check_shape2(B, N, r, op, "lora_B", "(out_features, r = lora_A.shape[0])");
  check_like(A, ref, ref_arg, op, "lora_A");
  check_like(B, ref, ref_arg, op, "lora_B");
  return r;
}

inline void check_scaling(double s, const char* op) { LRX_CHECK(std::isfinite(s), op, "scaling", "be finite", s); }

}  // namespace detail

// nf4_linear: y [M, N] = x [M, K] · deq(W)ᵀ + bias, K = x.shape[1].
inline NF4LinearArgs check_nf4_linear_args(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                           const c10::optional<at::Tensor>& nested_absmax,
                                           const c10::optional<at::Tensor>& nested_map,
                                           const c10::optional<at::Tensor>& offset, int64_t blocksize,
                                           int64_t out_features, const c10::optional<at::Tensor>& bias,
                                           bool allow_double) {
  constexpr const char* op = "nf4_linear";
  detail::check_activation(x, op, "x", allow_double);
  NF4LinearArgs a;
  a.M = x.size(0), a.N = out_features, a.K = x.size(1);
  a.scales = detail::check_weight(op, packed, absmax, nested_absmax, nested_map, offset, blocksize, a.N, a.K, x, "x");
  detail::check_bias(bias, x, a.N, op);
  return a;
}

// nf4_linear_grad_input: gx [M, K] = grad_y [M, N] · deq(W), N = grad_y.shape[1].
inline NF4LinearArgs check_nf4_linear_grad_input_args(const at::Tensor& grad_y, const at::Tensor& packed,
                                                      const at::Tensor& absmax,
                                                      const c10::optional<at::Tensor>& nested_absmax,
                                                      const c10::optional<at::Tensor>& nested_map,
                                                      const c10::optional<at::Tensor>& offset, int64_t blocksize,
                                                      int64_t in_features, bool allow_double) {
  constexpr const char* op = "nf4_linear_grad_input";
  detail::check_activation(grad_y, op, "grad_y", allow_double);
  NF4LinearArgs a;
  a.M = grad_y.size(0), a.N = grad_y.size(1), a.K = in_features;
  a.scales = detail::check_weight(op, packed, absmax, nested_absmax, nested_map, offset, blocksize, a.N, a.K, grad_y,
                                  "grad_y");
  return a;
}

// nf4_lora_linear: y = x · deq(W)ᵀ + scaling · (x_lora · lora_Aᵀ) · lora_Bᵀ + bias; x_lora has x's shape.
inline NF4LinearArgs check_nf4_lora_linear_args(const at::Tensor& x, const at::Tensor& x_lora,
                                                const at::Tensor& packed, const at::Tensor& absmax,
                                                const c10::optional<at::Tensor>& nested_absmax,
                                                const c10::optional<at::Tensor>& nested_map,
                                                const c10::optional<at::Tensor>& offset, int64_t blocksize,
                                                int64_t out_features, const at::Tensor& lora_A,
                                                const at::Tensor& lora_B, double scaling,
                                                const c10::optional<at::Tensor>& bias, bool allow_double) {
  constexpr const char* op = "nf4_lora_linear";
  detail::check_activation(x, op, "x", allow_double);
  NF4LinearArgs a;
  a.M = x.size(0), a.N = out_features, a.K = x.size(1);
  a.scales = detail::check_weight(op, packed, absmax, nested_absmax, nested_map, offset, blocksize, a.N, a.K, x, "x");
  detail::check_shape2(x_lora, a.M, a.K, op, "x_lora", "(x's shape)");
  detail::check_like(x_lora, x, "x", op, "x_lora");
  a.r = detail::check_lora(lora_A, lora_B, x, "x", a.N, a.K, op);
  detail::check_bias(bias, x, a.N, op);
  detail::check_scaling(scaling, op);
  return a;
}

// nf4_lora_linear_backward: grad_y [M, N], x_lora [M, K], u [M, r] (the forward's u).
inline NF4LinearArgs check_nf4_lora_linear_backward_args(
    const at::Tensor& grad_y, const at::Tensor& x_lora, const at::Tensor& u, const at::Tensor& packed,
    const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
    const c10::optional<at::Tensor>& nested_map, const c10::optional<at::Tensor>& offset, int64_t blocksize,
    int64_t in_features, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, bool allow_double) {
  constexpr const char* op = "nf4_lora_linear_backward";
  detail::check_activation(grad_y, op, "grad_y", allow_double);
  NF4LinearArgs a;
  a.M = grad_y.size(0), a.N = grad_y.size(1), a.K = in_features;
  a.scales = detail::check_weight(op, packed, absmax, nested_absmax, nested_map, offset, blocksize, a.N, a.K, grad_y,
                                  "grad_y");
  a.r = detail::check_lora(lora_A, lora_B, grad_y, "grad_y", a.N, a.K, op);
  detail::check_shape2(x_lora, a.M, a.K, op, "x_lora", "(grad_y.shape[0], in_features)");
  detail::check_like(x_lora, grad_y, "grad_y", op, "x_lora");
  detail::check_shape2(u, a.M, a.r, op, "u", "(grad_y.shape[0], r)");
  detail::check_like(u, grad_y, "grad_y", op, "u");
  detail::check_scaling(scaling, op);
  return a;
}

// nf4_row_sqnorm: the bundle of an [out_features, in_features] weight (no activation).
inline NF4LinearArgs check_nf4_row_sqnorm_args(const at::Tensor& packed, const at::Tensor& absmax,
                                               const c10::optional<at::Tensor>& nested_absmax,
                                               const c10::optional<at::Tensor>& nested_map,
                                               const c10::optional<at::Tensor>& offset, int64_t blocksize,
                                               int64_t out_features, int64_t in_features) {
  constexpr const char* op = "nf4_row_sqnorm";
  NF4LinearArgs a;
  a.N = out_features, a.K = in_features;
  a.scales = detail::check_weight(op, packed, absmax, nested_absmax, nested_map, offset, blocksize, a.N, a.K, packed,
                                  "packed");
  return a;
}

}  // namespace lowrank_ext
