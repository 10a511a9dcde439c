// fused_ops.cu — CUDA launchers of the fused model ops (rms_norm, add_rms_norm, rms_norm_backward, rope,
// rope_backward, swiglu, swiglu_backward): checks (lowrank_ext/fused_args.h, shared with the CPU), device
// guard, the current stream, dtype dispatch (fp32, bf16), launch. Kernels: fused_rmsnorm.cuh,
// fused_rope.cuh, fused_swiglu.cuh; the math: lowrank_ext/fused_params.h. Layouts as on the CPU
// (csrc/cpu/fused_{rmsnorm,rope,swiglu}.cpp): row-major activations, rope keeps q/k's strides.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "fused_rmsnorm.cuh"
#include "fused_rope.cuh"
#include "fused_swiglu.cuh"
#include "lowrank_ext/fused_args.h"
#include "lowrank_ext/fused_setup.h"

namespace lowrank_ext {
namespace {

using namespace fused_cuda;

template <typename F>
void dispatch(c10::ScalarType st, F&& f) {  // the checks admitted fp32 and bf16 only
  if (st == at::kBFloat16) {
    f(__nv_bfloat16{});
  } else {
    f(float{});
  }
}

// Enough CTAs to fill the GPU (8 per SM) for the grid-stride loops, never more than the work.
int64_t grid_for(int64_t work_blocks) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>(work_blocks, int64_t(sms) * 8));
}

at::Tensor rms_norm_impl(const at::Tensor& x, const at::Tensor* residual, at::Tensor* h_out, const at::Tensor& weight,
                         double eps, double weight_offset) {
  const c10::cuda::CUDAGuard guard(x.device());
  const RmsNormForwardSetup s = setup_rms_norm_forward(x, residual, weight, eps, weight_offset, as_is);
  if (h_out != nullptr) *h_out = s.h;
  if (s.nrows == 0) return s.y;
  dispatch(s.x.scalar_type(), [&](auto tag) {
    rmsnorm_forward_kernel<decltype(tag)><<<grid_for(s.nrows), kNormThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        s.rows, s.nrows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return s.y;
}

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps, double weight_offset) {
  check_rms_norm_args("rms_norm", x, "x", weight, eps);
  return rms_norm_impl(x, nullptr, nullptr, weight, eps, weight_offset);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps, double weight_offset) {
  check_rms_norm_args("add_rms_norm", x, "x", weight, eps);
  check_like(residual, x, "add_rms_norm", "residual", "x");
  at::Tensor h;
  at::Tensor y = rms_norm_impl(x, &residual, &h, weight, eps, weight_offset);
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_y,
                                                          const std::optional<at::Tensor>& grad_h,
                                                          const at::Tensor& h, const at::Tensor& weight, double eps,
                                                          double weight_offset) {
  constexpr const char* op = "rms_norm_backward";
  check_rms_norm_args(op, h, "h", weight, eps);
  check_like(grad_y, h, op, "grad_y", "h");
  if (grad_h.has_value()) check_like(*grad_h, h, op, "grad_h", "h");
  const c10::cuda::CUDAGuard guard(h.device());
  RmsNormBackwardSetup s = setup_rms_norm_backward(grad_y, grad_h, h, weight, eps, weight_offset, as_is);
  const int64_t grid = grid_for(s.nrows);
  at::Tensor acc = at::zeros({grid, s.rows.dim}, s.weight.options());  // one weight-gradient row per CTA
  s.rows.grad_w_acc = acc.data_ptr();
  if (s.nrows > 0) {
    dispatch(s.h.scalar_type(), [&](auto tag) {
      rmsnorm_backward_kernel<decltype(tag)><<<grid, kNormThreads, 0, at::cuda::getCurrentCUDAStream()>>>(s.rows,
                                                                                                          s.nrows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {s.grad_x, acc.sum(0).to(weight.scalar_type())};
}

// Rotates one of q / k (forward, or the transpose for backward) into a new tensor.
at::Tensor rotate(const at::Tensor& in, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const RopeSetup s = setup_rope(in, cos, sin, backward, as_is);
  if (s.nrows == 0) return s.out;
  const int64_t pairs = s.nrows * (s.rows.dim / 2);
  dispatch(s.in.scalar_type(), [&](auto tag) {
    rope_kernel<decltype(tag)><<<grid_for((pairs + kRopeThreads - 1) / kRopeThreads), kRopeThreads, 0,
                                 at::cuda::getCurrentCUDAStream()>>>(s.rows, s.nrows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return s.out;
}

std::tuple<at::Tensor, at::Tensor> rope_impl(const char* op, const at::Tensor& q, const char* q_arg,
                                             const at::Tensor& k, const char* k_arg, const at::Tensor& cos_arg,
                                             const at::Tensor& sin_arg, bool backward) {
  check_rope_args(op, q, q_arg, k, k_arg, cos_arg, sin_arg);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor cos = cos_arg.contiguous(), sin = sin_arg.contiguous();
  return {rotate(q, cos, sin, backward), rotate(k, cos, sin, backward)};
}

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                             const at::Tensor& sin) {
  return rope_impl("rope", q, "q", k, "k", cos, sin, false);
}

std::tuple<at::Tensor, at::Tensor> rope_backward_cuda(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                      const at::Tensor& cos, const at::Tensor& sin) {
  return rope_impl("rope_backward", grad_q, "grad_q", grad_k, "grad_k", cos, sin, true);
}

at::Tensor swiglu_cuda(const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu_args("swiglu", gate, up);
  const c10::cuda::CUDAGuard guard(gate.device());
  const SwiGluSetup s = setup_swiglu_forward(gate, up, as_is);
  if (s.numel == 0) return s.out;
  dispatch(s.gate.scalar_type(), [&](auto tag) {
    swiglu_forward_kernel<decltype(tag)><<<grid_for((s.numel + kSwiGluThreads - 1) / kSwiGluThreads),
                                           kSwiGluThreads, 0, at::cuda::getCurrentCUDAStream()>>>(s.span, s.numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return s.out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cuda(const at::Tensor& grad, const at::Tensor& gate,
                                                        const at::Tensor& up) {
  constexpr const char* op = "swiglu_backward";
  check_swiglu_args(op, gate, up);
  check_like(grad, gate, op, "grad", "gate");
  const c10::cuda::CUDAGuard guard(gate.device());
  const SwiGluSetup s = setup_swiglu_backward(grad, gate, up, as_is);
  if (s.numel == 0) return {s.grad_gate, s.grad_up};
  dispatch(s.gate.scalar_type(), [&](auto tag) {
    swiglu_backward_kernel<decltype(tag)><<<grid_for((s.numel + kSwiGluThreads - 1) / kSwiGluThreads),
                                            kSwiGluThreads, 0, at::cuda::getCurrentCUDAStream()>>>(s.span, s.numel);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {s.grad_gate, s.grad_up};
}

}  // namespace
}  // namespace lowrank_ext

TORCH_LIBRARY_IMPL(lowrank_ext, CUDA, m) {
  m.impl("rms_norm", &lowrank_ext::rms_norm_cuda);
  m.impl("add_rms_norm", &lowrank_ext::add_rms_norm_cuda);
  m.impl("rms_norm_backward", &lowrank_ext::rms_norm_backward_cuda);
  m.impl("rope", &lowrank_ext::rope_cuda);
  m.impl("rope_backward", &lowrank_ext::rope_backward_cuda);
  m.impl("swiglu", &lowrank_ext::swiglu_cuda);
  m.impl("swiglu_backward", &lowrank_ext::swiglu_backward_cuda);
}
