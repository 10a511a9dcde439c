// cpu/fused_swiglu.cpp — the SwiGLU ops on the CPU: swiglu (silu(gate) · up, the Llama/Qwen2/Mistral MLP's
// activation) and swiglu_backward (σ recomputed from gate: only gate and up are saved). Math:
// fused_kernels.h (SwiGluSpan); kernel: fused_swiglu_kernel.h, per ISA. Flat contiguous buffers, split over
// OpenMP threads in spans of 32K elements.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "fused_kernels.h"
#include "lowrank_ext/fused_args.h"
#include "lowrank_ext/huge_pages.h"

namespace lowrank_ext {
namespace {

using cpu::FusedDtype;
using cpu::SwiGluSpan;

// Elements per parallel task: torch's grain (at::internal::GRAIN_SIZE), a multiple of every ISA's lane count.
constexpr int64_t kSpan = 32768;

FusedDtype fused_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return FusedDtype::kBF16;
    case at::kDouble: return FusedDtype::kF64;
    default: return FusedDtype::kF32;  // the checks admitted only these three
  }
}

at::Tensor swiglu_cpu(const at::Tensor& gate_arg, const at::Tensor& up_arg) {
  check_swiglu_args("swiglu", gate_arg, up_arg);
  const at::Tensor gate = gate_arg.contiguous(), up = up_arg.contiguous();
  at::Tensor out = advise_large(at::empty(gate.sizes(), gate.options()));
  SwiGluSpan a{};
  a.gate = gate.const_data_ptr();
  a.up = up.const_data_ptr();
  a.out = out.data_ptr();
  const FusedDtype dt = fused_dtype(gate);
  const auto& k = cpu::fused_kernels_for(dt);
  at::parallel_for(0, gate.numel(), kSpan, [&](int64_t i0, int64_t i1) { k.swiglu_forward(dt, a, i0, i1); });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad_arg, const at::Tensor& gate_arg,
                                                       const at::Tensor& up_arg) {
  constexpr const char* op = "swiglu_backward";
  check_swiglu_args(op, gate_arg, up_arg);
  check_like(grad_arg, gate_arg, op, "grad", "gate");
  const at::Tensor gate = gate_arg.contiguous(), up = up_arg.contiguous(), grad = grad_arg.contiguous();
  at::Tensor grad_gate = advise_large(at::empty(gate.sizes(), gate.options()));
  at::Tensor grad_up = advise_large(at::empty(gate.sizes(), gate.options()));
  SwiGluSpan a{};
  a.gate = gate.const_data_ptr();
  a.up = up.const_data_ptr();
  a.grad = grad.const_data_ptr();
  a.grad_gate = grad_gate.data_ptr();
  a.grad_up = grad_up.data_ptr();
  const FusedDtype dt = fused_dtype(gate);
  const auto& k = cpu::fused_kernels_for(dt);
  at::parallel_for(0, gate.numel(), kSpan, [&](int64_t i0, int64_t i1) { k.swiglu_backward(dt, a, i0, i1); });
  return {grad_gate, grad_up};
}

}  // namespace
}  // namespace lowrank_ext

TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  m.impl("swiglu", &lowrank_ext::swiglu_cpu);
  m.impl("swiglu_backward", &lowrank_ext::swiglu_backward_cpu);
}
