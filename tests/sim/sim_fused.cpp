// sim_fused.cpp — the fused model-op CUDA kernels (csrc/cuda/fused_rmsnorm.cuh, fused_rope.cuh,
// fused_swiglu.cuh) on the simulator, with the launcher's CTA sizes (csrc/cuda/fused_ops.cu) and a grid the
// caller picks (small grids exercise the grid-stride loops). Parameter blocks: lowrank_ext/fused_params.h.
// dtype: 0 fp32, 2 bf16 (the codes of tests/_sim.py).
#include "fused_rmsnorm.cuh"
#include "fused_rope.cuh"
#include "fused_swiglu.cuh"
#include "sim_common.h"

namespace {

using namespace lowrank_ext;

template <typename F>
std::string by_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f(float{});
    case 2: return f(__nv_bfloat16{});
    default: return "dtype must be 0 (fp32) or 2 (bf16), got " + std::to_string(dtype);
  }
}

size_t bytes(int64_t n, int dtype) { return static_cast<size_t>(n) * (dtype == 0 ? 4 : 2); }

}  // namespace

// RMSNorm forward (x, residual or null -> h, y) or backward (h, grad_y, grad_h or null -> grad_x, and
// grad_w_acc fp32 [grid, dim] accumulated per CTA). weight fp32 [dim]; activations [rows, dim].
LRX_SIM_API const char* lrx_sim_rms_norm(int dtype, int backward, int64_t rows, int64_t dim, double eps,
                                         double offset, const float* weight, const void* x, const void* residual,
                                         void* h, void* y, const void* grad_y, const void* grad_h, void* grad_x,
                                         float* grad_w_acc, int grid, uint64_t seed) {
  RmsNormRows a{};
  a.dim = dim, a.eps = eps, a.weight_offset = offset, a.weight = weight;
  a.x = x, a.residual = residual, a.h = h, a.y = y;
  a.grad_y = grad_y, a.grad_h = grad_h, a.grad_x = grad_x, a.grad_w_acc = grad_w_acc;
  const size_t n = bytes(rows * dim, dtype);
  std::vector<lrx_sim::Buffer> bufs{{weight, size_t(dim) * 4}};
  for (const void* p : {x, residual, static_cast<const void*>(h), static_cast<const void*>(y), grad_y, grad_h,
                        static_cast<const void*>(grad_x)})
    if (p != nullptr) bufs.push_back({p, n});
  if (grad_w_acc != nullptr) bufs.push_back({grad_w_acc, size_t(grid) * size_t(dim) * 4});
  return lrx_sim::result(by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return lrx_sim::launch(dim3(grid), dim3(fused_cuda::kNormThreads), 0, seed, bufs, [&] {
      if (backward) {
        fused_cuda::rmsnorm_backward_kernel<T>(a, rows);
      } else {
        fused_cuda::rmsnorm_forward_kernel<T>(a, rows);
      }
    });
  }));
}

// Rotary embedding of one [B, H, S, D] tensor with the given strides (elements); cos/sin [B or 1, S, D]
// with strides (cs_sb, cs_ss); in_span / out_span / cs_span: the bytes each buffer covers.
LRX_SIM_API const char* lrx_sim_rope(int dtype, int backward, int64_t B, int64_t H, int64_t S, int64_t D,
                                     const void* in, int64_t in_sb, int64_t in_sh, int64_t in_ss, void* out,
                                     int64_t out_sb, int64_t out_sh, int64_t out_ss, const void* cos, const void* sin,
                                     int64_t cs_sb, int64_t cs_ss, int64_t in_span, int64_t out_span, int64_t cs_span,
                                     int grid, uint64_t seed) {
  RopeRows a{};
  a.heads = H, a.seq = S, a.dim = D;
  a.in = in, a.in_sb = in_sb, a.in_sh = in_sh, a.in_ss = in_ss;
  a.out = out, a.out_sb = out_sb, a.out_sh = out_sh, a.out_ss = out_ss;
  a.cos = cos, a.sin = sin, a.cs_sb = cs_sb, a.cs_ss = cs_ss, a.backward = backward != 0;
  std::vector<lrx_sim::Buffer> bufs{{in, size_t(in_span)}, {out, size_t(out_span)}, {cos, size_t(cs_span)},
                                    {sin, size_t(cs_span)}};
  return lrx_sim::result(by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return lrx_sim::launch(dim3(grid), dim3(fused_cuda::kRopeThreads), 0, seed, bufs,
                           [&] { fused_cuda::rope_kernel<T>(a, B * H * S); });
  }));
}

// SwiGLU forward (gate, up -> out) or backward (grad, gate, up -> grad_gate, grad_up) on n elements.
LRX_SIM_API const char* lrx_sim_swiglu(int dtype, int backward, int64_t n, const void* gate, const void* up, void* out,
                                       const void* grad, void* grad_gate, void* grad_up, int grid, uint64_t seed) {
  SwiGluSpan a{};
  a.gate = gate, a.up = up, a.out = out, a.grad = grad, a.grad_gate = grad_gate, a.grad_up = grad_up;
  std::vector<lrx_sim::Buffer> bufs;
  for (const void* p : {gate, up, static_cast<const void*>(out), grad, static_cast<const void*>(grad_gate),
                        static_cast<const void*>(grad_up)})
    if (p != nullptr) bufs.push_back({p, bytes(n, dtype)});
  return lrx_sim::result(by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return lrx_sim::launch(dim3(grid), dim3(fused_cuda::kSwiGluThreads), 0, seed, bufs, [&] {
      if (backward) {
        fused_cuda::swiglu_backward_kernel<T>(a, n);
      } else {
        fused_cuda::swiglu_forward_kernel<T>(a, n);
      }
    });
  }));
}
