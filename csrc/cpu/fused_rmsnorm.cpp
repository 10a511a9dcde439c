// cpu/fused_rmsnorm.cpp — the RMSNorm ops on the CPU: rms_norm, add_rms_norm (the residual add fused in,
// as Llama/Qwen2/Mistral/Gemma decoder layers do it) and rms_norm_backward. Math: fused_kernels.h
// (RmsNormRows); kernels: fused_rmsnorm_kernel.h, per ISA. Rows are split over OpenMP threads
// (at::parallel_for); the weight gradient is summed from one fp32 accumulator per thread.
// Layout: x, residual, y, h, grads are [..., D] made row-major; weight [D] in x's dtype or fp32.

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
using cpu::RmsNormRows;

FusedDtype fused_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return FusedDtype::kBF16;
    case at::kDouble: return FusedDtype::kF64;
    default: return FusedDtype::kF32;  // the checks admitted only these three
  }
}

// The lane type of the kernels: fp64 for a float64 input, else fp32 (bf16 math is fp32).
at::ScalarType math_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// Rows per task: ~32K elements, torch's own grain (at::internal::GRAIN_SIZE), so a small norm runs on the
// calling thread instead of paying a parallel region (and, on a loaded machine, a barrier on a descheduled
// thread).
int64_t row_grain(int64_t dim) { return std::max<int64_t>(1, 32768 / dim); }

at::Tensor rms_norm_impl(const at::Tensor& x_in, const at::Tensor* residual_in, at::Tensor* h_out,
                         const at::Tensor& weight, double eps, double weight_offset) {
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = weight.to(math_dtype(x)).contiguous();
  at::Tensor y = advise_large(at::empty(x.sizes(), x.options()));
  RmsNormRows a{};
  a.dim = x.size(-1);
  a.eps = eps;
  a.weight_offset = weight_offset;
  a.weight = w.const_data_ptr();
  a.x = x.const_data_ptr();
  a.y = y.data_ptr();
  at::Tensor residual;
  if (residual_in != nullptr) {
    residual = residual_in->contiguous();
    *h_out = advise_large(at::empty(x.sizes(), x.options()));
    a.residual = residual.const_data_ptr();
    a.h = h_out->data_ptr();
  }
  const int64_t rows = x.numel() / a.dim;
  const FusedDtype dt = fused_dtype(x);
  const auto& k = cpu::fused_kernels_for(dt);
  at::parallel_for(0, rows, row_grain(a.dim), [&](int64_t r0, int64_t r1) { k.rmsnorm_forward(dt, a, r0, r1); });
  return y;
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps, double weight_offset) {
  check_rms_norm_args("rms_norm", x, "x", weight, eps);
  return rms_norm_impl(x, nullptr, nullptr, weight, eps, weight_offset);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                    const at::Tensor& weight, double eps, double weight_offset) {
  check_rms_norm_args("add_rms_norm", x, "x", weight, eps);
  check_like(residual, x, "add_rms_norm", "residual", "x");
  at::Tensor h;
  at::Tensor y = rms_norm_impl(x, &residual, &h, weight, eps, weight_offset);
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_h,
                                                         const at::Tensor& h, const at::Tensor& weight, double eps,
                                                         double weight_offset) {
  constexpr const char* op = "rms_norm_backward";
  check_rms_norm_args(op, h, "h", weight, eps);
  check_like(grad_y, h, op, "grad_y", "h");
  if (grad_h.has_value()) check_like(*grad_h, h, op, "grad_h", "h");
  const at::Tensor hc = h.contiguous(), gy = grad_y.contiguous();
  const at::Tensor gh = grad_h.has_value() ? grad_h->contiguous() : at::Tensor();
  const at::Tensor w = weight.to(math_dtype(hc)).contiguous();
  at::Tensor grad_x = advise_large(at::empty(hc.sizes(), hc.options()));
  const int64_t D = hc.size(-1), rows = hc.numel() / D;
  // One weight-gradient accumulator per task; tasks are contiguous row ranges (deterministic sum order).
  const int64_t tasks =
      std::max<int64_t>(1, std::min<int64_t>(ceil_div(rows, row_grain(D)), at::get_num_threads()));
  at::Tensor acc = at::zeros({tasks, D}, w.options());
  RmsNormRows a{};
  a.dim = D;
  a.eps = eps;
  a.weight_offset = weight_offset;
  a.weight = w.const_data_ptr();
  a.h = const_cast<void*>(hc.const_data_ptr());  // read-only in backward
  a.grad_y = gy.const_data_ptr();
  a.grad_h = gh.defined() ? gh.const_data_ptr() : nullptr;
  a.grad_x = grad_x.data_ptr();
  const FusedDtype dt = fused_dtype(hc);
  const auto& k = cpu::fused_kernels_for(dt);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      RmsNormRows task = a;
      task.grad_w_acc = static_cast<char*>(acc.data_ptr()) + t * D * acc.element_size();
      k.rmsnorm_backward(dt, task, rows * t / tasks, rows * (t + 1) / tasks);
    }
  });
  return {grad_x, acc.sum(0).to(weight.scalar_type())};
}

}  // namespace
}  // namespace lowrank_ext

TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  m.impl("rms_norm", &lowrank_ext::rms_norm_cpu);
  m.impl("add_rms_norm", &lowrank_ext::add_rms_norm_cpu);
  m.impl("rms_norm_backward", &lowrank_ext::rms_norm_backward_cpu);
}
