// cpu/fused_rope.cpp — the rotary-embedding ops on the CPU: rope (q and k rotated in one call, in place of
// transformers' apply_rotary_pos_emb with unsqueeze_dim=1) and rope_backward (the transposed rotation;
// cos and sin are constants: no gradient flows to them). Math: fused_kernels.h (RopeRows); kernel:
// fused_rope_kernel.h, per ISA. Rows (b, h, s) of q and of k are split over OpenMP threads.
// Layout: q, k [B, H, S, D] with any strides but a contiguous last dim (q_proj(x).view(...).transpose(1, 2)
// is taken as it is, no copy); outputs are empty_like(input), i.e. the same strides; cos/sin [B or 1, S, D].

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "fused_kernels.h"
#include "lowrank_ext/fused_args.h"
#include "lowrank_ext/huge_pages.h"

namespace lowrank_ext {
namespace {

using cpu::FusedDtype;
using cpu::RopeRows;

FusedDtype fused_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return FusedDtype::kBF16;
    case at::kDouble: return FusedDtype::kF64;
    default: return FusedDtype::kF32;  // the checks admitted only these three
  }
}

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Rotates one of q / k (forward, or the transpose for backward) into a new tensor.
at::Tensor rotate(const at::Tensor& in_arg, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const at::Tensor in = last_dim_contiguous(in_arg);
  at::Tensor out = advise_large(at::empty_like(in));
  if (in.numel() == 0) return out;
  RopeRows a{};
  a.heads = in.size(1);
  a.seq = in.size(2);
  a.dim = in.size(3);
  a.in = in.const_data_ptr();
  a.in_sb = in.stride(0), a.in_sh = in.stride(1), a.in_ss = in.stride(2);
  a.out = out.data_ptr();
  a.out_sb = out.stride(0), a.out_sh = out.stride(1), a.out_ss = out.stride(2);
  a.cos = cos.const_data_ptr();
  a.sin = sin.const_data_ptr();
  a.cs_sb = cos.size(0) == 1 ? 0 : cos.stride(0);  // [1, S, D]: one table for the whole batch
  a.cs_ss = cos.stride(1);
  a.backward = backward;
  const int64_t rows = in.size(0) * a.heads * a.seq;
  const FusedDtype dt = fused_dtype(in);
  const auto& k = cpu::fused_kernels_for(dt);
  const int64_t grain = std::max<int64_t>(1, 32768 / a.dim);  // ~32K elements a task (torch's grain)
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) { k.rope(dt, a, r0, r1); });
  return out;
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
