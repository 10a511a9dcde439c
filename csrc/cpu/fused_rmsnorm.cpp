// cpu/fused_rmsnorm.cpp — the RMSNorm ops on the CPU: rms_norm, add_rms_norm (the residual add fused in,
// as Llama/Qwen2/Mistral/Gemma decoder layers do it) and rms_norm_backward. Math: fused_kernels.h
// (RmsNormRows); kernels: fused_rmsnorm_kernel.h, per ISA. Rows are split over OpenMP threads
// (at::parallel_for); the weight gradient is summed from one fp32 accumulator per thread.
// Layout: x, residual, y, h, grads are [..., D] made row-major; weight [D] in x's dtype or fp32.

#include <torch/library.h>

#include <tuple>

#include "fused_launch.h"

namespace lowrank_ext {
namespace {

using cpu::fused_dtype;
using cpu::FusedDtype;
using cpu::row_grain;

at::Tensor rms_norm_impl(const at::Tensor& x, const at::Tensor* residual, at::Tensor* h_out, const at::Tensor& weight,
                         double eps, double weight_offset) {
  const RmsNormForwardSetup s = setup_rms_norm_forward(x, residual, weight, eps, weight_offset, advise_large);
  const FusedDtype dt = fused_dtype(s.x);
  const auto& k = cpu::fused_kernels_for(dt);
  at::parallel_for(0, s.nrows, row_grain(s.rows.dim),
                   [&](int64_t r0, int64_t r1) { k.rmsnorm_forward(dt, s.rows, r0, r1); });
  if (h_out != nullptr) *h_out = s.h;
  return s.y;
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
  const RmsNormBackwardSetup s = setup_rms_norm_backward(grad_y, grad_h, h, weight, eps, weight_offset, advise_large);
  const int64_t D = s.rows.dim, rows = s.nrows;
  // One weight-gradient accumulator per task; tasks are contiguous row ranges (deterministic sum order).
  const int64_t tasks =
      std::max<int64_t>(1, std::min<int64_t>(ceil_div(rows, row_grain(D)), at::get_num_threads()));
  at::Tensor acc = at::zeros({tasks, D}, s.weight.options());
  const FusedDtype dt = fused_dtype(s.h);
  const auto& k = cpu::fused_kernels_for(dt);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      RmsNormRows task = s.rows;
      task.grad_w_acc = static_cast<char*>(acc.data_ptr()) + t * D * acc.element_size();
      k.rmsnorm_backward(dt, task, rows * t / tasks, rows * (t + 1) / tasks);
    }
  });
  return {s.grad_x, acc.sum(0).to(weight.scalar_type())};
}

}  // namespace
}  // namespace lowrank_ext

TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  m.impl("rms_norm", &lowrank_ext::rms_norm_cpu);
  m.impl("add_rms_norm", &lowrank_ext::add_rms_norm_cpu);
  m.impl("rms_norm_backward", &lowrank_ext::rms_norm_backward_cpu);
}
