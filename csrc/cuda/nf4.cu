// cuda/nf4.cu — NF4 quantize, double quant and dequantize on CUDA (kernels: nf4_kernel.cuh).
//
//   quantize_nf4:   x [n] (fp32/fp16/bf16) -> packed uint8 [(n+1)//2, 1], absmax fp32 [ceil(n/bs)]
//   double_quant:   absmax fp32 [nb] -> qabsmax uint8 [nb], nested_absmax fp32 [ceil(nb/256)], offset fp32 [1]
//   dequantize_nf4: the bundle -> flat [numel] in fp32/fp16/bf16
// Argument checks: nf4_args.h (check_<op>_args, shared with the CPU); same bytes as the CPU kernels.
// double_quant's offset is torch's CUDA mean of absmax (a reduction in another order than the CPU's:
// it can differ from the CPU offset in the last bit; everything downstream of the offset is exact).
// Quantize clamps absmax to 1e-38 for the reciprocal, as the CPU and bitsandbytes do (the stored absmax
// is the true maximum). Dequantize stores 16-byte vectors only into a 16-byte aligned output; any other
// contiguous buffer gets scalar stores (last_kernel_path("dequantize") says which ran).
// The checks copy nested_map (256 floats) to the host to test that it is sorted, as on the CPU (whose
// nearest-code search needs it; the kernel here scans all 256 entries).

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mean.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "lowrank_ext/kernel_path.h"
#include "lowrank_ext/nf4_args.h"
#include "nf4_kernel.cuh"

namespace lowrank_ext {
namespace {

// Calls f(T{}) with T the CUDA type of a float ScalarType (fp32 / fp16 / bf16).
template <typename F>
void dispatch_float(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_INTERNAL_ASSERT(false, "unreachable dtype ", st);
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_nf4_cuda(const at::Tensor& x_in, int64_t blocksize) {
  check_quantize_nf4_args(x_in, blocksize);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous().view(-1);
  const int64_t n = x.numel();
  const int64_t nblocks = ceil_div(n, blocksize);
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, x.options().dtype(at::kFloat));
  // lowest block with a NaN/Inf; INT64_MAX = none (int64 storage for the unsigned atomicMin)
  at::Tensor bad = at::full({1}, std::numeric_limits<int64_t>::max(), x.options().dtype(at::kLong));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;  // 8 warps = 8 NF4 blocks per CTA
  const int64_t grid = ceil_div(nblocks, kThreads / 32);
  record_kernel_path(KernelProduct::kQuantize, "warp-per-block");
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    cuda::nf4_quantize_kernel<T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
        reinterpret_cast<const T*>(x.const_data_ptr()), n, static_cast<int>(blocksize), nblocks,
        packed.mutable_data_ptr<uint8_t>(), absmax.mutable_data_ptr<float>(),
        reinterpret_cast<unsigned long long*>(bad.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // One device->host sync (quantization is a one-off per weight): the CPU raises on NaN/Inf too.
  const int64_t b = bad.item<int64_t>();
  check_quantize_nf4_finite(b == std::numeric_limits<int64_t>::max(), b, b * blocksize,
                            std::min(n, (b + 1) * blocksize) - 1);
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> double_quant_cuda(const at::Tensor& absmax_in,
                                                                 const at::Tensor& nested_map) {
  check_double_quant_args(absmax_in, nested_map);
  const c10::cuda::CUDAGuard guard(absmax_in.device());
  const at::Tensor absmax = absmax_in.contiguous().view(-1);
  const at::Tensor map = nested_map.contiguous();
  const int64_t nb = absmax.numel();
  const int64_t nb2 = ceil_div(nb, kNestedBlocksize);
  at::Tensor offset = at::mean(absmax).reshape({1});  // stays on the device
  at::Tensor qabsmax = at::empty({nb}, absmax.options().dtype(at::kByte));
  at::Tensor absmax2 = at::empty({nb2}, absmax.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cuda::nf4_double_quant_kernel<<<static_cast<unsigned>(nb2), 256, 0, stream>>>(
      absmax.const_data_ptr<float>(), nb, map.const_data_ptr<float>(), offset.const_data_ptr<float>(),
      qabsmax.mutable_data_ptr<uint8_t>(), absmax2.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {qabsmax, absmax2, offset};
}

// Launches the dequantize kernel writing `out` (contiguous, numel elements, fp32/fp16/bf16).
void dequantize_into(const NF4Scales& scales, const at::Tensor& packed, int64_t blocksize, int64_t numel,
                     at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(packed.device());
  const uint8_t* src = packed.const_data_ptr<uint8_t>();
  const bool aligned8 = reinterpret_cast<uintptr_t>(src) % 8 == 0;
  // out may be any contiguous buffer (a view offset by one element, say): vector stores only when aligned
  const bool out_aligned16 = reinterpret_cast<uintptr_t>(out.const_data_ptr()) % 16 == 0;
  record_kernel_path(KernelProduct::kDequantize, out_aligned16 ? "vec16" : "scalar-store");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;
  const int64_t grid = ceil_div(ceil_div(numel, 16), kThreads);  // 16 elements per thread
  dispatch_float(out.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    cuda::nf4_dequantize_kernel<T><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
        src, scales, static_cast<int>(blocksize), numel, aligned8, out_aligned16,
        reinterpret_cast<T*>(out.mutable_data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor dequantize_nf4_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                               const c10::optional<at::Tensor>& nested_absmax,
                               const c10::optional<at::Tensor>& nested_map, const c10::optional<at::Tensor>& offset,
                               int64_t blocksize, int64_t numel, at::ScalarType dtype) {
  const NF4Scales scales =
      check_dequantize_nf4_args(packed, absmax, nested_absmax, nested_map, offset, blocksize, numel, dtype);
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  dequantize_into(scales, packed, blocksize, numel, out);
  return out;
}

// Same, into the caller's buffer.
void dequantize_nf4_out_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                             const c10::optional<at::Tensor>& nested_absmax,
                             const c10::optional<at::Tensor>& nested_map, const c10::optional<at::Tensor>& offset,
                             int64_t blocksize, int64_t numel, at::Tensor out) {
  const NF4Scales scales =
      check_dequantize_nf4_out_args(packed, absmax, nested_absmax, nested_map, offset, blocksize, numel, out);
  dequantize_into(scales, packed, blocksize, numel, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, CUDA, m) {
  m.impl("quantize_nf4", &quantize_nf4_cuda);
  m.impl("double_quant", &double_quant_cuda);
  m.impl("dequantize_nf4", &dequantize_nf4_cuda);
  m.impl("dequantize_nf4_out", &dequantize_nf4_out_cuda);
}

}  // namespace lowrank_ext
