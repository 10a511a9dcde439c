// nf4_linear_autocast.cpp — Autocast kernels of the fused NF4 linear ops (AutocastCPU and AutocastCUDA).
//
// Inside torch.autocast(device, dtype) the floating activations and LoRA / bias tensors of nf4_linear
// and nf4_lora_linear are cast to the region's lower-precision dtype (torch.get_autocast_dtype(device))
// before the op runs, as aten's linear does: fp32 activations under autocast take the fp16/bf16 kernels
// (on CUDA the tensor-core GEMV / mma paths) instead of the fp32 fallback. float64 tensors and tensors on
// another device type are left alone (at::autocast::cached_cast's rule); the NF4 bundle (uint8 codes,
// fp32 absmax / nested map / offset) is never cast. The op then runs with autocast excluded, so autograd
// sees the casts and the gradients flow back to the fp32 leaves.
// The backward ops (nf4_linear_grad_input, nf4_lora_linear_backward) have no autocast kernel: they are
// called by our autograd functions with the forward's dtypes.

#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace lowrank_ext {
namespace {

using OptTensor = std::optional<at::Tensor>;

template <c10::DeviceType kDev>
at::Tensor cast(at::ScalarType dt, const at::Tensor& t) {
  return at::autocast::cached_cast(dt, t, kDev);
}

template <c10::DeviceType kDev>
OptTensor cast(at::ScalarType dt, const OptTensor& t) {
  return at::autocast::cached_cast(dt, t, kDev);
}

template <c10::DeviceType kDev>
at::Tensor nf4_linear_autocast(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                               const OptTensor& nested_absmax, const OptTensor& nested_map, const OptTensor& offset,
                               int64_t blocksize, int64_t out_features, const OptTensor& bias) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDev));
  const at::ScalarType dt = at::autocast::get_lower_precision_fp_from_device_type(kDev);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lowrank_ext::nf4_linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const OptTensor&, const OptTensor&, const OptTensor&, int64_t,
                                               int64_t, const OptTensor&)>();
  return op.call(cast<kDev>(dt, x), packed, absmax, nested_absmax, nested_map, offset, blocksize, out_features,
                 cast<kDev>(dt, bias));
}

template <c10::DeviceType kDev>
std::tuple<at::Tensor, at::Tensor> nf4_lora_linear_autocast(
    const at::Tensor& x, const at::Tensor& x_lora, const at::Tensor& packed, const at::Tensor& absmax,
    const OptTensor& nested_absmax, const OptTensor& nested_map, const OptTensor& offset, int64_t blocksize,
    int64_t out_features, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, const OptTensor& bias) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDev));
  const at::ScalarType dt = at::autocast::get_lower_precision_fp_from_device_type(kDev);
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lowrank_ext::nf4_lora_linear", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
              const OptTensor&, const OptTensor&, int64_t, int64_t, const at::Tensor&, const at::Tensor&, double,
              const OptTensor&)>();
  const at::Tensor xc = cast<kDev>(dt, x);
  // x_lora is x when there is no dropout: keep the identity (the backward then fuses gu · A into grad_x)
  const at::Tensor xl = x_lora.is_same(x) ? xc : cast<kDev>(dt, x_lora);
  return op.call(xc, xl, packed, absmax, nested_absmax, nested_map, offset, blocksize, out_features,
                 cast<kDev>(dt, lora_A), cast<kDev>(dt, lora_B), scaling, cast<kDev>(dt, bias));
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, AutocastCPU, m) {
  m.impl("nf4_linear", &nf4_linear_autocast<c10::DeviceType::CPU>);
  m.impl("nf4_lora_linear", &nf4_lora_linear_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(lowrank_ext, AutocastCUDA, m) {
  m.impl("nf4_linear", &nf4_linear_autocast<c10::DeviceType::CUDA>);
  m.impl("nf4_lora_linear", &nf4_lora_linear_autocast<c10::DeviceType::CUDA>);
}

}  // namespace lowrank_ext
