// cpu/fused_swiglu.cpp — the SwiGLU ops on the CPU: swiglu (silu(gate) · up, the Llama/Qwen2/Mistral MLP's
// activation) and swiglu_backward (σ recomputed from gate: only gate and up are saved). Math:
// fused_kernels.h (SwiGluSpan); kernel: fused_swiglu_kernel.h, per ISA. Flat contiguous buffers, split over
// OpenMP threads in spans of 32K elements.

#include <torch/library.h>

#include <tuple>

#include "fused_launch.h"

namespace lowrank_ext {
namespace {

using cpu::fused_dtype;
using cpu::FusedDtype;
using cpu::kTaskElements;

at::Tensor swiglu_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu_args("swiglu", gate, up);
  const SwiGluSetup s = setup_swiglu_forward(gate, up, advise_large);
  const FusedDtype dt = fused_dtype(s.gate);
  const auto& k = cpu::fused_kernels_for(dt);
  at::parallel_for(0, s.numel, kTaskElements, [&](int64_t i0, int64_t i1) { k.swiglu_forward(dt, s.span, i0, i1); });
  return s.out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad, const at::Tensor& gate,
                                                       const at::Tensor& up) {
  constexpr const char* op = "swiglu_backward";
  check_swiglu_args(op, gate, up);
  check_like(grad, gate, op, "grad", "gate");
  const SwiGluSetup s = setup_swiglu_backward(grad, gate, up, advise_large);
  const FusedDtype dt = fused_dtype(s.gate);
  const auto& k = cpu::fused_kernels_for(dt);
  at::parallel_for(0, s.numel, kTaskElements, [&](int64_t i0, int64_t i1) { k.swiglu_backward(dt, s.span, i0, i1); });
  return {s.grad_gate, s.grad_up};
}

}  // namespace
}  // namespace lowrank_ext

TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  m.impl("swiglu", &lowrank_ext::swiglu_cpu);
  m.impl("swiglu_backward", &lowrank_ext::swiglu_backward_cpu);
}
