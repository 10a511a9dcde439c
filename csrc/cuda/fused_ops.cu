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

at::Tensor rms_norm_impl(const at::Tensor& x_in, const at::Tensor* residual_in, at::Tensor* h_out,
                         const at::Tensor& weight, double eps, double weight_offset) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
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
    *h_out = at::empty(x.sizes(), x.options());
    a.residual = residual.const_data_ptr();
    a.h = h_out->data_ptr();
  }
  const int64_t rows = x.numel() / a.dim;
  if (rows == 0) return y;
  dispatch(x.scalar_type(), [&](auto tag) {
    rmsnorm_forward_kernel<decltype(tag)><<<grid_for(rows), kNormThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        a, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
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
  const at::Tensor hc = h.contiguous(), gy = grad_y.contiguous();
  const at::Tensor gh = grad_h.has_value() ? grad_h->contiguous() : at::Tensor();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor grad_x = at::empty(hc.sizes(), hc.options());
  const int64_t D = hc.size(-1), rows = hc.numel() / D;
  const int64_t grid = grid_for(rows);
  at::Tensor acc = at::zeros({grid, D}, w.options());  // one weight-gradient row per CTA
  RmsNormRows a{};
  a.dim = D;
  a.eps = eps;
  a.weight_offset = weight_offset;
  a.weight = w.const_data_ptr();
  a.h = const_cast<void*>(hc.const_data_ptr());  // read-only in backward
  a.grad_y = gy.const_data_ptr();
  a.grad_h = gh.defined() ? gh.const_data_ptr() : nullptr;
  a.grad_x = grad_x.data_ptr();
  a.grad_w_acc = acc.data_ptr();
  if (rows > 0) {
    dispatch(hc.scalar_type(), [&](auto tag) {
      rmsnorm_backward_kernel<decltype(tag)><<<grid, kNormThreads, 0, at::cuda::getCurrentCUDAStream()>>>(a, rows);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_x, acc.sum(0).to(weight.scalar_type())};
}

at::Tensor rotate(const at::Tensor& in_arg, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const at::Tensor in = in_arg.stride(-1) == 1 ? in_arg : in_arg.contiguous();
  at::Tensor out = at::empty_like(in);
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
  a.cs_sb = cos.size(0) == 1 ? 0 : cos.stride(0);
  a.cs_ss = cos.stride(1);
  a.backward = backward;
  const int64_t rows = in.size(0) * a.heads * a.seq;
  const int64_t pairs = rows * (a.dim / 2);
  dispatch(in.scalar_type(), [&](auto tag) {
    rope_kernel<decltype(tag)><<<grid_for((pairs + kRopeThreads - 1) / kRopeThreads), kRopeThreads, 0,
                                 at::cuda::getCurrentCUDAStream()>>>(a, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
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

at::Tensor swiglu_cuda(const at::Tensor& gate_arg, const at::Tensor& up_arg) {
  check_swiglu_args("swiglu", gate_arg, up_arg);
  const c10::cuda::CUDAGuard guard(gate_arg.device());
  const at::Tensor gate = gate_arg.contiguous(), up = up_arg.contiguous();
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  const int64_t n = gate.numel();
  if (n == 0) return out;
  SwiGluSpan a{};
  a.gate = gate.const_data_ptr();
  a.up = up.const_data_ptr();
  a.out = out.data_ptr();
  dispatch(gate.scalar_type(), [&](auto tag) {
    swiglu_forward_kernel<decltype(tag)><<<grid_for((n + kSwiGluThreads - 1) / kSwiGluThreads), kSwiGluThreads, 0,
                                           at::cuda::getCurrentCUDAStream()>>>(a, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cuda(const at::Tensor& grad_arg, const at::Tensor& gate_arg,
                                                        const at::Tensor& up_arg) {
  constexpr const char* op = "swiglu_backward";
  check_swiglu_args(op, gate_arg, up_arg);
  check_like(grad_arg, gate_arg, op, "grad", "gate");
  const c10::cuda::CUDAGuard guard(gate_arg.device());
  const at::Tensor gate = gate_arg.contiguous(), up = up_arg.contiguous(), grad = grad_arg.contiguous();
  at::Tensor grad_gate = at::empty(gate.sizes(), gate.options());
  at::Tensor grad_up = at::empty(gate.sizes(), gate.options());
  const int64_t n = gate.numel();
  if (n == 0) return {grad_gate, grad_up};
  SwiGluSpan a{};
  a.gate = gate.const_data_ptr();
  a.up = up.const_data_ptr();
  a.grad = grad.const_data_ptr();
  a.grad_gate = grad_gate.data_ptr();
  a.grad_up = grad_up.data_ptr();
  dispatch(gate.scalar_type(), [&](auto tag) {
    swiglu_backward_kernel<decltype(tag)><<<grid_for((n + kSwiGluThreads - 1) / kSwiGluThreads), kSwiGluThreads,
                                            0, at::cuda::getCurrentCUDAStream()>>>(a, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_gate, grad_up};
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
