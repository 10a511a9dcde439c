// fused_args.h — argument checks of the fused model ops (RMSNorm + residual, rotary embedding, SwiGLU),
// shared by csrc/cpu/fused_*.cpp and csrc/cuda/fused_ops.cu. Each returns the sizes the kernels need.
// Activations: float32 or bfloat16 (float64 too on the CPU, the gradcheck path); the norm weight:
// the activation dtype or float32.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "lowrank_ext/check.h"

namespace lowrank_ext {

inline void check_fused_activation(const at::Tensor& t, const char* op, const char* arg) {
  const auto st = t.scalar_type();
  const bool cpu = t.device().is_cpu();
  LRX_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || (cpu && st == at::kDouble), op, arg,
                 cpu ? "be float32, bfloat16 or float64" : "be float32 or bfloat16", st);
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg,
                       const char* ref_arg) {
  LRX_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, arg,
                 std::string("have the dtype of ") + ref_arg + " (" + c10::toString(ref.scalar_type()) + ")",
                 t.scalar_type());
  LRX_CHECK(t.sizes() == ref.sizes(), op, arg, std::string("have the shape of ") + ref_arg + " " + shape_str(ref),
            t.sizes());
  check_same_device(t, ref, op, arg, ref_arg);
}

struct RmsNormSizes {
  int64_t rows, dim;
};

// x [..., D] (D >= 1); weight [D] (x's dtype or float32); residual / grad tensors: x's shape and dtype.
inline RmsNormSizes check_rms_norm_args(const char* op, const at::Tensor& x, const char* x_arg,
                                        const at::Tensor& weight, double eps) {
  check_fused_activation(x, op, x_arg);
  LRX_CHECK(x.dim() >= 1 && x.size(-1) >= 1, op, x_arg, "have a last dimension of size >= 1", "shape ",
            x.sizes());
  const int64_t D = x.size(-1);
  LRX_CHECK(weight.dim() == 1 && weight.size(0) == D, op, "weight", "have shape [" + std::to_string(D) + "]",
            weight.sizes());
  LRX_CHECK_TYPE(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat, op, "weight",
                 std::string("have the dtype of ") + x_arg + " (" + c10::toString(x.scalar_type()) + ") or float32",
                 weight.scalar_type());
  check_same_device(weight, x, op, "weight", x_arg);
  LRX_CHECK(eps >= 0.0, op, "eps", "be >= 0", eps);
  return {D == 0 ? 0 : x.numel() / D, D};
}

struct RopeSizes {
  int64_t batch, seq, dim;
};

// q [B, Hq, S, D], k [B, Hk, S, D] (any strides), cos/sin [B or 1, S, D] in q's dtype; D even.
inline RopeSizes check_rope_args(const char* op, const at::Tensor& q, const char* q_arg, const at::Tensor& k,
                                 const char* k_arg, const at::Tensor& cos, const at::Tensor& sin) {
  check_fused_activation(q, op, q_arg);
  LRX_CHECK(q.dim() == 4, op, q_arg, "be 4-D [batch, heads, seq, head_dim]", "shape ", q.sizes());
  const int64_t B = q.size(0), S = q.size(2), D = q.size(3);
  LRX_CHECK(D % 2 == 0, op, q_arg, "have an even head_dim (rotate_half splits it in two)", D);
  LRX_CHECK(k.dim() == 4 && k.size(0) == B && k.size(2) == S && k.size(3) == D, op, k_arg,
            "have shape [" + std::to_string(B) + ", heads, " + std::to_string(S) + ", " + std::to_string(D) + "]",
            k.sizes());
  LRX_CHECK_TYPE(k.scalar_type() == q.scalar_type(), op, k_arg,
                 std::string("have the dtype of ") + q_arg + " (" + c10::toString(q.scalar_type()) + ")",
                 k.scalar_type());
  check_same_device(k, q, op, k_arg, q_arg);
  LRX_CHECK(cos.dim() == 3 && (cos.size(0) == B || cos.size(0) == 1) && cos.size(1) == S && cos.size(2) == D,
            op, "cos",
            "have shape [" + std::to_string(B) + " or 1, " + std::to_string(S) + ", " + std::to_string(D) + "]",
            cos.sizes());
  LRX_CHECK_TYPE(cos.scalar_type() == q.scalar_type(), op, "cos",
                 std::string("have the dtype of ") + q_arg + " (" + c10::toString(q.scalar_type()) + ")",
                 cos.scalar_type());
  check_same_device(cos, q, op, "cos", q_arg);
  check_like(sin, cos, op, "sin", "cos");
  return {B, S, D};
}

// gate, up (and grad): one shape, one dtype, one device.
inline void check_swiglu_args(const char* op, const at::Tensor& gate, const at::Tensor& up) {
  check_fused_activation(gate, op, "gate");
  check_like(up, gate, op, "up", "gate");
}

}  // namespace lowrank_ext
