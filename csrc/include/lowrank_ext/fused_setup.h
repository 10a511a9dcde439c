// fused_setup.h — the host half of each fused model op, shared by the CPU launchers (csrc/cpu/fused_*.cpp)
// and the CUDA ones (csrc/cuda/fused_ops.cu): after the checks (fused_args.h), make the inputs row-major,
// allocate the outputs and fill the kernel's parameter block (fused_params.h). What stays per backend: the
// device guard, the dtype dispatch and how the work is split (OpenMP tasks / CTAs), and the weight-gradient
// accumulator of the norm's backward (one row per task there, one per CTA here).
//
// Each Setup struct owns the tensors its parameter block points into, so the pointers stay valid while it
// lives. `alloc` wraps every new output: the CPU passes advise_large (huge pages for big buffers), CUDA
// `as_is`.
#pragma once

#include <ATen/ATen.h>

#include "lowrank_ext/fused_params.h"

namespace lowrank_ext {

using OutputAlloc = at::Tensor (*)(at::Tensor);
inline at::Tensor as_is(at::Tensor t) { return t; }

// The norm weight in the kernels' lane type: fp64 on the CPU's float64 (gradcheck) path, fp32 otherwise
// (bf16 activations are normalized in fp32).
inline at::ScalarType norm_weight_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ---- RMSNorm: y = x̂ · (weight_offset + w), x̂ = h / rms(h), h = x (+ residual) --------------------------
struct RmsNormForwardSetup {
  at::Tensor x, residual, weight, y, h;  // h: undefined without a residual
  RmsNormRows rows{};
  int64_t nrows = 0;
};

inline RmsNormForwardSetup setup_rms_norm_forward(const at::Tensor& x, const at::Tensor* residual,
                                                  const at::Tensor& weight, double eps, double weight_offset,
                                                  OutputAlloc alloc) {
  RmsNormForwardSetup s;
  s.x = x.contiguous();
  s.weight = weight.to(norm_weight_dtype(s.x)).contiguous();
  s.y = alloc(at::empty(s.x.sizes(), s.x.options()));
  RmsNormRows& a = s.rows;
  a.dim = s.x.size(-1);
  a.eps = eps;
  a.weight_offset = weight_offset;
  a.weight = s.weight.const_data_ptr();
  a.x = s.x.const_data_ptr();
  a.y = s.y.data_ptr();
  if (residual != nullptr) {
    s.residual = residual->contiguous();
    s.h = alloc(at::empty(s.x.sizes(), s.x.options()));
    a.residual = s.residual.const_data_ptr();
    a.h = s.h.data_ptr();
  }
  s.nrows = s.x.numel() / a.dim;
  return s;
}

// Backward from h (saved by the forward) and grad_y (+ grad_h when h itself fed a later residual add).
struct RmsNormBackwardSetup {
  at::Tensor h, grad_y, grad_h, weight, grad_x;
  RmsNormRows rows{};  // grad_w_acc: set by the backend, one accumulator row per task / CTA
  int64_t nrows = 0;
};

inline RmsNormBackwardSetup setup_rms_norm_backward(const at::Tensor& grad_y, const std::optional<at::Tensor>& grad_h,
                                                    const at::Tensor& h, const at::Tensor& weight, double eps,
                                                    double weight_offset, OutputAlloc alloc) {
  RmsNormBackwardSetup s;
  s.h = h.contiguous();
  s.grad_y = grad_y.contiguous();
  if (grad_h.has_value()) s.grad_h = grad_h->contiguous();
  s.weight = weight.to(norm_weight_dtype(s.h)).contiguous();
  s.grad_x = alloc(at::empty(s.h.sizes(), s.h.options()));
  RmsNormRows& a = s.rows;
  a.dim = s.h.size(-1);
  a.eps = eps;
  a.weight_offset = weight_offset;
  a.weight = s.weight.const_data_ptr();
  a.h = const_cast<void*>(s.h.const_data_ptr());  // read-only in backward
  a.grad_y = s.grad_y.const_data_ptr();
  a.grad_h = s.grad_h.defined() ? s.grad_h.const_data_ptr() : nullptr;
  a.grad_x = s.grad_x.data_ptr();
  s.nrows = s.h.numel() / a.dim;
  return s;
}

// ---- rotary embedding of one of q / k [B, H, S, D] (its strides kept, the last dim made contiguous) ----
struct RopeSetup {
  at::Tensor in, out;
  RopeRows rows{};
  int64_t nrows = 0;  // B·H·S
};

// cos / sin: [B or 1, S, D], contiguous (the op makes them so once for q and k).
inline RopeSetup setup_rope(const at::Tensor& in, const at::Tensor& cos, const at::Tensor& sin, bool backward,
                            OutputAlloc alloc) {
  RopeSetup s;
  s.in = in.stride(-1) == 1 ? in : in.contiguous();
  s.out = alloc(at::empty_like(s.in));
  RopeRows& a = s.rows;
  a.heads = s.in.size(1);
  a.seq = s.in.size(2);
  a.dim = s.in.size(3);
  a.in = s.in.const_data_ptr();
  a.in_sb = s.in.stride(0), a.in_sh = s.in.stride(1), a.in_ss = s.in.stride(2);
  a.out = s.out.data_ptr();
  a.out_sb = s.out.stride(0), a.out_sh = s.out.stride(1), a.out_ss = s.out.stride(2);
  a.cos = cos.const_data_ptr();
  a.sin = sin.const_data_ptr();
  a.cs_sb = cos.size(0) == 1 ? 0 : cos.stride(0);  // [1, S, D]: one table for the whole batch
  a.cs_ss = cos.stride(1);
  a.backward = backward;
  s.nrows = s.in.size(0) * a.heads * a.seq;
  return s;
}

// ---- SwiGLU: out = silu(gate) · up over flat buffers ------------------------------------------------------
struct SwiGluSetup {
  at::Tensor gate, up, grad, out, grad_gate, grad_up;  // grad / grad_gate / grad_up: backward only
  SwiGluSpan span{};
  int64_t numel = 0;
};

inline SwiGluSetup setup_swiglu_forward(const at::Tensor& gate, const at::Tensor& up, OutputAlloc alloc) {
  SwiGluSetup s;
  s.gate = gate.contiguous();
  s.up = up.contiguous();
  s.out = alloc(at::empty(s.gate.sizes(), s.gate.options()));
  s.span.gate = s.gate.const_data_ptr();
  s.span.up = s.up.const_data_ptr();
  s.span.out = s.out.data_ptr();
  s.numel = s.gate.numel();
  return s;
}

inline SwiGluSetup setup_swiglu_backward(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                                         OutputAlloc alloc) {
  SwiGluSetup s;
  s.gate = gate.contiguous();
  s.up = up.contiguous();
  s.grad = grad.contiguous();
  s.grad_gate = alloc(at::empty(s.gate.sizes(), s.gate.options()));
  s.grad_up = alloc(at::empty(s.gate.sizes(), s.gate.options()));
  s.span.gate = s.gate.const_data_ptr();
  s.span.up = s.up.const_data_ptr();
  s.span.grad = s.grad.const_data_ptr();
  s.span.grad_gate = s.grad_gate.data_ptr();
  s.span.grad_up = s.grad_up.data_ptr();
  s.numel = s.gate.numel();
  return s;
}

}  // namespace lowrank_ext
