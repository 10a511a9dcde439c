// paged.cu — paged optimizer state: CUDA tensors backed by managed (unified) memory.
//
//   paged_zeros_like(like, dtype): cudaMallocManaged(numel·elemsize), zero-filled on the current stream,
//       wrapped as a CUDA tensor (like's shape and device) whose deleter calls cudaFree — freed when the
//       storage dies (bitsandbytes never frees its paged buffers). The driver may evict its pages to host
//       RAM under memory pressure, so the state can exceed free GPU memory.
//   paged_prefetch(t, device): cudaMemPrefetchAsync of t's storage to GPU `device` (>= 0) or the host (-1),
//       on the current stream. No-op for memory that is not managed.
//   paged_is_managed(t), paged_last_prefetch_location(t): pointer / range attributes (for tests, tooling).
// CUDA 13 takes a cudaMemLocation in cudaMemPrefetchAsync (12.2+: cudaMemPrefetchAsync_v2); older
// runtimes take a device ordinal (cudaCpuDeviceId for the host).
// paged_prefetch's argument check: adamw_args.h, shared with the CPU (csrc/cpu/adamw.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "lowrank_ext/adamw_args.h"

namespace lowrank_ext {
namespace {

at::Tensor paged_zeros_like_cuda(const at::Tensor& like, at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(like.device());
  const size_t bytes = static_cast<size_t>(like.numel()) * c10::elementSize(dtype);
  const auto options = like.options().dtype(dtype);
  if (bytes == 0) return at::empty(like.sizes(), options);
  void* ptr = nullptr;
  C10_CUDA_CHECK(cudaMallocManaged(&ptr, bytes, cudaMemAttachGlobal));
  const cudaError_t err = cudaMemsetAsync(ptr, 0, bytes, at::cuda::getCurrentCUDAStream());
  if (err != cudaSuccess) {
    cudaFree(ptr);
    C10_CUDA_CHECK(err);
  }
  // cudaFree synchronizes the device, so no kernel still uses the pages when they go.
  // A deleter must not throw: an error here (e.g. at interpreter exit) is dropped.
  return at::from_blob(
      ptr, like.sizes(), [](void* p) { (void)cudaFree(p); }, options);
}

bool is_managed_ptr(const void* ptr) {
  if (ptr == nullptr) return false;
  cudaPointerAttributes attr{};
  C10_CUDA_CHECK(cudaPointerGetAttributes(&attr, ptr));
  return attr.type == cudaMemoryTypeManaged;
}

bool paged_is_managed_cuda(const at::Tensor& t) { return is_managed_ptr(t.storage().data()); }

void paged_prefetch_cuda(const at::Tensor& t, int64_t device) {
  check_paged_prefetch_args(device);
  const void* ptr = t.storage().data();
  const size_t bytes = t.storage().nbytes();
  if (bytes == 0 || !is_managed_ptr(ptr)) return;
  const c10::cuda::CUDAGuard guard(t.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
#if CUDART_VERSION >= 12020
  cudaMemLocation loc{};
  loc.type = device >= 0 ? cudaMemLocationTypeDevice : cudaMemLocationTypeHost;
  loc.id = device >= 0 ? static_cast<int>(device) : 0;  // id is ignored for the host
#if CUDART_VERSION >= 13000
  C10_CUDA_CHECK(cudaMemPrefetchAsync(ptr, bytes, loc, 0, stream));
#else
  C10_CUDA_CHECK(cudaMemPrefetchAsync_v2(ptr, bytes, loc, 0, stream));
#endif
#else
  C10_CUDA_CHECK(cudaMemPrefetchAsync(ptr, bytes, device >= 0 ? static_cast<int>(device) : cudaCpuDeviceId, stream));
#endif
}

int64_t paged_last_prefetch_location_cuda(const at::Tensor& t) {
  const void* ptr = t.storage().data();
  if (t.storage().nbytes() == 0 || !is_managed_ptr(ptr)) return -2;
  int loc = cudaInvalidDeviceId;  // -2; cudaCpuDeviceId is -1
  C10_CUDA_CHECK(cudaMemRangeGetAttribute(&loc, sizeof(loc), cudaMemRangeAttributeLastPrefetchLocation,
                                          ptr, t.storage().nbytes()));
  return loc;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, CUDA, m) {
  m.impl("paged_zeros_like", &paged_zeros_like_cuda);
  m.impl("paged_prefetch", &paged_prefetch_cuda);
  m.impl("paged_is_managed", &paged_is_managed_cuda);
  m.impl("paged_last_prefetch_location", &paged_last_prefetch_location_cuda);
}

}  // namespace lowrank_ext
