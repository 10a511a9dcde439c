// fused_params.h — the parameter blocks of the fused model-op kernels (RMSNorm + residual, rotary
// embedding, SwiGLU) with their math: one definition for the CPU kernels (csrc/cpu/fused_*_kernel.h) and the
// CUDA kernels (csrc/cuda/fused_*.cuh). Plain structs of raw pointers and sizes; torch-free, host and device.
// Activations are fp32, bf16 (fp32 math, one rounding per output) or, on the CPU, fp64 (the gradcheck path);
// the norm weight and its gradient accumulator are fp32 (fp64 on the fp64 path).
#pragma once

#include <cstdint>

namespace lowrank_ext {

// RMSNorm with the residual add, rows of a row-major [rows, dim] matrix:
//   h = x + residual (rounded to the activation dtype: h is the next residual stream)   (h = x if no residual)
//   y = h · rstd · (weight_offset + weight),   rstd = 1 / sqrt(mean(h²) + eps)
// backward, from the saved h alone (rstd is recomputed: one pass over the row):
//   g = grad_y · (weight_offset + weight);  grad_x = rstd·g − h·rstd³·Σ(g·h)/dim (+ grad_h)
//   grad_w_acc += grad_y · h · rstd          (the caller sums one accumulator per thread)
struct RmsNormRows {
  int64_t dim;
  double eps, weight_offset;
  const void* weight;           // [dim] fp32 (fp64 on the fp64 path)
  const void* x;                // forward input
  const void* residual;         // forward: nullptr for the plain norm
  void* h;                      // forward output h (nullptr without residual); backward input h
  void* y;                      // forward output
  const void* grad_y;           // backward
  const void* grad_h;           // backward: nullptr when h got no gradient of its own
  void* grad_x;                 // backward output
  void* grad_w_acc;             // backward: [dim] fp32/fp64 accumulator of this thread
};

// Rotary embedding of one of q / k, viewed as [B, H, S, D] with any strides except a contiguous last dim.
// Row r = (b·H + h)·S + s. With half = D/2, c = cos[b, s], s_ = sin[b, s] (batch stride 0 to broadcast):
//   forward   out[:half] = in[:half]·c[:half] − in[half:]·s_[:half]       (in·cos + rotate_half(in)·sin,
//             out[half:] = in[half:]·c[half:] + in[:half]·s_[half:]         rotate_half(v) = [−v[half:], v[:half]])
//   backward  the transpose: out[:half] = g[:half]·c[:half] + g[half:]·s_[half:],
//                            out[half:] = g[half:]·c[half:] − g[:half]·s_[:half]
struct RopeRows {
  int64_t heads, seq, dim;
  const void* in;
  int64_t in_sb, in_sh, in_ss;  // strides (elements) of batch, head, position
  void* out;
  int64_t out_sb, out_sh, out_ss;
  const void* cos;
  const void* sin;
  int64_t cs_sb, cs_ss;  // strides of cos and sin (the same for both); cs_sb = 0 broadcasts over batch
  bool backward;
};

// SwiGLU on flat contiguous tensors, elements [i0, i1):
//   forward   out = silu(gate) · up,  silu(g) = g · σ(g),  σ(g) = 1 / (1 + e^−g)
//   backward  grad_gate = grad · up · σ(g)·(1 + g·(1 − σ(g))),  grad_up = grad · silu(g)   (σ recomputed)
struct SwiGluSpan {
  const void* gate;
  const void* up;
  void* out;              // forward
  const void* grad;       // backward
  void* grad_gate;        // backward
  void* grad_up;          // backward
};

}  // namespace lowrank_ext
