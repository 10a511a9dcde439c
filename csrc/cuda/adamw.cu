// adamw.cu — launchers of the fused AdamW CUDA kernels (adamw_kernel.cuh): checks (shared with the CPU
// backend, adamw_args.h), device guard, current stream, dtype dispatch, launch check.
//
//   adamw_step:     p, g [n] fp32/fp16/bf16; exp_avg, exp_avg_sq fp32 [n]                 (in place)
//   adamw8bit_step: p, g [n]; state1/state2 uint8 [n]; absmax1/absmax2 fp32 [ceil(n/256)]; qmaps fp32 [256]
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "adamw_kernel.cuh"
#include "lowrank_ext/adamw_args.h"
#include "lowrank_ext/kernel_path.h"

namespace lowrank_ext {
namespace {

using optim_cuda::AdamWKernelScalars;
using optim_cuda::kernel_scalars;  // adamw_kernel.cuh (host; the simulator uses it too)

// Calls f(T{}) with T the CUDA scalar type of `st` (fp32 / fp16 / bf16; checked before).
template <typename F>
void dispatch_param(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    default: f(__nv_bfloat16{}); break;
  }
}

void adamw_step_cuda(const at::Tensor& param, const at::Tensor& grad_in, const at::Tensor& exp_avg,
                     const at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps, double wd,
                     int64_t step) {
  check_adamw_args(param, grad_in, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, wd, step);
  const c10::cuda::CUDAGuard guard(param.device());
  const at::Tensor grad = grad_in.contiguous();
  const int64_t n = param.numel();
  if (n == 0) return;
  const AdamWKernelScalars s = kernel_scalars(lr, beta1, beta2, eps, wd, step);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  constexpr int threads = 256;
  // grid-stride: at most ~8 CTAs per SM worth of blocks is enough to saturate bandwidth
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, int64_t(sms) * 8);
  record_kernel_path(KernelProduct::kAdamW, "adamw32");
  dispatch_param(param.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    optim_cuda::adamw32_kernel<T><<<blocks, threads, 0, stream>>>(
        reinterpret_cast<T*>(param.data_ptr()), reinterpret_cast<const T*>(grad.const_data_ptr()),
        exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), n, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void adamw8bit_step_cuda(const at::Tensor& param, const at::Tensor& grad_in, const at::Tensor& state1,
                         const at::Tensor& state2, const at::Tensor& absmax1, const at::Tensor& absmax2,
                         const at::Tensor& qmap1, const at::Tensor& qmap2, double lr, double beta1, double beta2,
                         double eps, double wd, int64_t step) {
  check_adamw8bit_args(param, grad_in, state1, state2, absmax1, absmax2, qmap1, qmap2, lr, beta1, beta2, eps,
                       wd, step);
  const c10::cuda::CUDAGuard guard(param.device());
  const at::Tensor grad = grad_in.contiguous();
  const int64_t n = param.numel();
  if (n == 0) return;
  const AdamWKernelScalars s = kernel_scalars(lr, beta1, beta2, eps, wd, step);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = ceil_div(n, kOptimBlocksize);  // one CTA per state block (grid.x limit 2^31-1)
  record_kernel_path(KernelProduct::kAdamW, "adamw8bit");
  dispatch_param(param.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    optim_cuda::adamw8bit_kernel<T><<<blocks, optim_cuda::kStateBlock, 0, stream>>>(
        reinterpret_cast<T*>(param.data_ptr()), reinterpret_cast<const T*>(grad.const_data_ptr()),
        state1.data_ptr<uint8_t>(), state2.data_ptr<uint8_t>(), absmax1.data_ptr<float>(),
        absmax2.data_ptr<float>(), qmap1.const_data_ptr<float>(), qmap2.const_data_ptr<float>(), n, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, CUDA, m) {
  m.impl("adamw_step", &adamw_step_cuda);
  m.impl("adamw8bit_step", &adamw8bit_step_cuda);
}

}  // namespace lowrank_ext
