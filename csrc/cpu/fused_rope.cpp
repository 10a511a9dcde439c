// cpu/fused_rope.cpp — the rotary-embedding ops on the CPU: rope (q and k rotated in one call, in place of
// transformers' apply_rotary_pos_emb with unsqueeze_dim=1) and rope_backward (the transposed rotation;
// cos and sin are constants: no gradient flows to them). Math: fused_kernels.h (RopeRows); kernel:
// fused_rope_kernel.h, per ISA. Rows (b, h, s) of q and of k are split over OpenMP threads.
// Layout: q, k [B, H, S, D] with any strides but a contiguous last dim (q_proj(x).view(...).transpose(1, 2)
// is taken as it is, no copy); outputs are empty_like(input), i.e. the same strides; cos/sin [B or 1, S, D].

#include <torch/library.h>

#include <tuple>

#include "fused_launch.h"

namespace lowrank_ext {
namespace {

using cpu::fused_dtype;
using cpu::FusedDtype;

// Rotates one of q / k (forward, or the transpose for backward) into a new tensor.
at::Tensor rotate(const at::Tensor& in, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const RopeSetup s = setup_rope(in, cos, sin, backward, advise_large);
  if (s.nrows == 0) return s.out;
  const FusedDtype dt = fused_dtype(s.in);
  const auto& k = cpu::fused_kernels_for(dt);
  at::parallel_for(0, s.nrows, cpu::row_grain(s.rows.dim), [&](int64_t r0, int64_t r1) { k.rope(dt, s.rows, r0, r1); });
  return s.out;
}

std::tuple<at::Tensor, at::Tensor> rope_impl(const char* op, const at::Tensor& q, const char* q_arg,
                                             const at::Tensor& k, const char* k_arg, const at::Tensor& cos_arg,
                                             const at::Tensor& sin_arg, bool backward) {
  check_rope_args(op, q, q_arg, k, k_arg, cos_arg, sin_arg);
  const at::Tensor cos = cos_arg.contiguous(), sin = sin_arg.contiguous();
  return {rotate(q, cos, sin, backward), rotate(k, cos, sin, backward)};
}

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                            const at::Tensor& sin) {
  return rope_impl("rope", q, "q", k, "k", cos, sin, /*backward=*/false);
}

std::tuple<at::Tensor, at::Tensor> rope_backward_cpu(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                     const at::Tensor& cos, const at::Tensor& sin) {
  return rope_impl("rope_backward", grad_q, "grad_q", grad_k, "grad_k", cos, sin, /*backward=*/true);
}

}  // namespace
}  // namespace lowrank_ext

TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  m.impl("rope", &lowrank_ext::rope_cpu);
  m.impl("rope_backward", &lowrank_ext::rope_backward_cpu);
}
