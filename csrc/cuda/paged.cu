// paged.cu — paged optimizer state: CUDA tensors backed by managed (unified) memory.
//
//   paged_zeros_like(like, dtype): cudaMallocManaged(numel·elemsize), zero-filled on the current stream,
//       wrapped as a CUDA tensor (like's shape and device) whose deleter calls cudaFree — freed when the
//       storage dies (bitsandbytes never frees its paged buffers). The driver may evict its pages to host
//       RAM under memory pressure, so the state can exceed free GPU memory.
//   paged_prefetch(t, device): cudaMemPrefetchAsync of t's storage to GPU `device` (>= 0) or the host (-1),
//       on the current stream. No-op for memory that is not managed.
//   paged_prefetch_batch(ts, device): the same for a list of tensors on one GPU in one op call — what the paged
//       optimizer issues once per step (lowrank_ext/optim.py). One capture check and one support check per
//       call; managed-ness from the registry of paged_zeros_like's allocations (no cudaPointerGetAttributes for
//       them); then one cudaMemPrefetchBatchAsync (CUDA 13+; on torch's default stream, the legacy one that the
//       batch API refuses, it runs on a pool stream fenced by two events) or, on older runtimes and for fewer
//       than 8 tensors on the default stream, one cudaMemPrefetchAsync per tensor.
//   paged_is_managed(t), paged_last_prefetch_location(t): pointer / range attributes (for tests, tooling).
// CUDA 13 takes a cudaMemLocation in cudaMemPrefetchAsync (12.2+: cudaMemPrefetchAsync_v2); older
// runtimes take a device ordinal (cudaCpuDeviceId for the host).
// paged_prefetch's argument check: adamw_args.h, shared with the CPU (csrc/cpu/adamw.cpp).
//
// Where the runtime cannot prefetch. Without cudaDevAttrConcurrentManagedAccess (Windows WDDM, some vGPU
// and container setups) cudaMemPrefetchAsync fails; paged_prefetch is then a no-op (the pages still
// migrate on demand) and paged_prefetch_supported(device) says so.
// CUDA graphs. cudaMallocManaged / cudaFree are not allowed while a stream captures (a cudaFree there
// invalidates the capture). paged_zeros_like refuses during capture with a clear error; a tensor whose
// storage dies while the current stream captures is not freed then but queued, and the queue is freed
// by the next paged op or deleter that runs outside capture. paged_prefetch is skipped during capture
// (it is a performance hint; a replay migrates pages on demand).
// A failed cudaFree's error is cleared (cudaGetLastError) so that it is not reported by the next op.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <atomic>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

#include "lowrank_ext/adamw_args.h"

namespace lowrank_ext {
namespace {

// Whether the calling thread's current stream is capturing a CUDA graph.
bool capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &status);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return status != cudaStreamCaptureStatusNone;
}

// The allocations paged_zeros_like made and has not freed: membership answers "is this managed?" without a
// driver query (paged_prefetch_batch). Leaked like deferred(): usable from deleters at interpreter exit.
std::mutex& registry_mutex() {
  static std::mutex mu;
  return mu;
}
std::unordered_set<const void*>& registry() {
  static auto* s = new std::unordered_set<const void*>();
  return *s;
}

// cudaFree that never leaves a sticky "last error" behind for the next op to report.
void free_managed(void* p) {
  {
    const std::lock_guard<std::mutex> lock(registry_mutex());
    registry().erase(p);  // before cudaFree: the address may be handed out again right after
  }
  if (cudaFree(p) != cudaSuccess) (void)cudaGetLastError();
}

// Frees that arrived while a capture was running: freed by the next call outside capture.
std::mutex& deferred_mutex() {
  static std::mutex mu;
  return mu;
}
std::vector<void*>& deferred() {
  static auto* v = new std::vector<void*>();  // leaked: safe to use from deleters at interpreter exit
  return *v;
}
void free_deferred() {
  std::vector<void*> todo;
  {
    const std::lock_guard<std::mutex> lock(deferred_mutex());
    todo.swap(deferred());
  }
  for (void* p : todo) free_managed(p);
}

// The storage deleter. cudaFree synchronizes the device, so no kernel still uses the pages when they go.
// A deleter must not throw: an error here (e.g. at interpreter exit) is cleared and dropped.
void delete_managed(void* p) {
  if (capturing()) {
    const std::lock_guard<std::mutex> lock(deferred_mutex());
    deferred().push_back(p);
    return;
  }
  free_deferred();
  free_managed(p);
}

at::Tensor paged_zeros_like_cuda(const at::Tensor& like, at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(like.device());
  LRX_CHECK(!capturing(), "paged_zeros_like", "the current stream",
            "not be capturing a CUDA graph (cudaMallocManaged is not capturable: create the state before capture)",
            "a capturing stream");
  free_deferred();
  const size_t bytes = static_cast<size_t>(like.numel()) * c10::elementSize(dtype);
  const auto options = like.options().dtype(dtype);
  if (bytes == 0) return at::empty(like.sizes(), options);
  void* ptr = nullptr;
  C10_CUDA_CHECK(cudaMallocManaged(&ptr, bytes, cudaMemAttachGlobal));
  const cudaError_t err = cudaMemsetAsync(ptr, 0, bytes, at::cuda::getCurrentCUDAStream());
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // report the memset's error below, not a later one
    free_managed(ptr);
    C10_CUDA_CHECK(err);
  }
  {
    const std::lock_guard<std::mutex> lock(registry_mutex());
    registry().insert(ptr);
  }
  return at::from_blob(ptr, like.sizes(), &delete_managed, options);
}

}  // namespace

// cudaDevAttrConcurrentManagedAccess of `device`, cached per device (also the op paged_prefetch_supported).
bool paged_prefetch_supported(int64_t device) {
  LRX_CHECK(device >= 0, "paged_prefetch_supported", "device", "be a GPU ordinal >= 0", device);
  static std::mutex mu;
  static std::vector<int> cache;  // -1 unknown, 0 / 1
  const std::lock_guard<std::mutex> lock(mu);
  if (cache.empty()) cache.assign(static_cast<size_t>(c10::cuda::device_count()), -1);
  LRX_CHECK(device < static_cast<int64_t>(cache.size()), "paged_prefetch_supported", "device",
            "be < the number of GPUs (" + std::to_string(cache.size()) + ")", device);
  int& c = cache[static_cast<size_t>(device)];
  if (c < 0) {
    int value = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrConcurrentManagedAccess, static_cast<int>(device)));
    c = value != 0;
  }
  return c == 1;
}

namespace {

bool is_managed_ptr(const void* ptr) {
  if (ptr == nullptr) return false;
  cudaPointerAttributes attr{};
  C10_CUDA_CHECK(cudaPointerGetAttributes(&attr, ptr));
  return attr.type == cudaMemoryTypeManaged;
}

bool paged_is_managed_cuda(const at::Tensor& t) { return is_managed_ptr(t.storage().data()); }

// Managed memory: an allocation of paged_zeros_like (registry, no driver call), else a pointer query.
bool is_managed_fast(const void* ptr) {
  {
    const std::lock_guard<std::mutex> lock(registry_mutex());
    if (registry().count(ptr) != 0) return true;
  }
  return is_managed_ptr(ptr);
}

// One cudaMemPrefetchAsync of [ptr, ptr + bytes) to GPU `device` (>= 0) or the host (-1).
void prefetch_one(const void* ptr, size_t bytes, int64_t device, cudaStream_t stream) {
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

void paged_prefetch_cuda(const at::Tensor& t, int64_t device) {
  check_paged_prefetch_args(device);
  const c10::cuda::CUDAGuard guard(t.device());
  if (capturing()) return;  // a hint only: not issued into a graph
  free_deferred();
  const void* ptr = t.storage().data();
  const size_t bytes = t.storage().nbytes();
  if (bytes == 0 || !is_managed_fast(ptr)) return;
  // Without concurrent managed access the runtime refuses prefetches: run without (on-demand migration).
  if (!paged_prefetch_supported(device >= 0 ? device : t.device().index())) return;
  prefetch_one(ptr, bytes, device, at::cuda::getCurrentCUDAStream());
}

#if CUDART_VERSION >= 13000
// Whether cudaMemPrefetchBatchAsync may be tried: it needs concurrent managed access on EVERY GPU of the system
// (its documented precondition). Checked once; cleared for good when the runtime refuses the call (an older
// driver under a CUDA 13 runtime), after which the per-tensor loop is used.
std::atomic<int> g_batch_api{-1};  // -1 unknown, 0 no, 1 yes

bool batch_api_usable() {
  int v = g_batch_api.load(std::memory_order_acquire);
  if (v < 0) {
    v = 1;
    for (int64_t d = 0; d < static_cast<int64_t>(c10::cuda::device_count()); ++d) v &= paged_prefetch_supported(d);
    g_batch_api.store(v, std::memory_order_release);
  }
  return v == 1;
}
#endif

void paged_prefetch_batch_cuda(at::TensorList tensors, int64_t device) {
  check_paged_prefetch_args(device, "paged_prefetch_batch");
  if (tensors.empty()) return;
  const c10::Device where = tensors[0].device();
  for (size_t i = 0; i < tensors.size(); ++i)
    LRX_CHECK(tensors[i].device() == where, "paged_prefetch_batch", "tensors[" + std::to_string(i) + "]",
              "be on " + where.str() + " like tensors[0]", tensors[i].device().str());
  LRX_CHECK(where.is_cuda(), "paged_prefetch_batch", "tensors", "be CUDA tensors", where.str());
  const c10::cuda::CUDAGuard guard(where);
  if (capturing()) return;  // a hint only: not issued into a graph
  free_deferred();
  if (!paged_prefetch_supported(device >= 0 ? device : where.index())) return;
  std::vector<void*> ptrs;
  std::vector<size_t> sizes;
  ptrs.reserve(tensors.size());
  sizes.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    void* ptr = const_cast<void*>(t.storage().data());
    const size_t bytes = t.storage().nbytes();
    if (bytes == 0 || !is_managed_fast(ptr)) continue;
    ptrs.push_back(ptr);
    sizes.push_back(bytes);
  }
  if (ptrs.empty()) return;
  const at::cuda::CUDAStream current = at::cuda::getCurrentCUDAStream();
  const cudaStream_t stream = current.stream();
#if CUDART_VERSION >= 13000
  // The batch API refuses the legacy default stream, which is torch's default stream. There the batch runs on a
  // pool stream ordered between the current stream's earlier and later work by two events: 4 more calls
  // (2 event records, 2 waits; events created and destroyed once each), worth it from kSideStreamMin tensors on.
  constexpr size_t kSideStreamMin = 8;
  const bool legacy = stream == nullptr || stream == cudaStreamLegacy;
  if (batch_api_usable() && (!legacy || ptrs.size() >= kSideStreamMin)) {
    cudaMemLocation loc{};
    loc.type = device >= 0 ? cudaMemLocationTypeDevice : cudaMemLocationTypeHost;
    loc.id = device >= 0 ? static_cast<int>(device) : 0;
    size_t first = 0;  // one location for the whole batch, applying from operation 0
    at::cuda::CUDAStream batch_stream = current;
    at::cuda::CUDAEvent before, after;
    if (legacy) {
      batch_stream = at::cuda::getStreamFromPool(/*isHighPriority=*/false, where.index());
      before.record(current);
      before.block(batch_stream);  // the batch starts after everything already queued on `current`
    }
    const cudaError_t err = cudaMemPrefetchBatchAsync(ptrs.data(), sizes.data(), ptrs.size(), &loc, &first, 1, 0,
                                                      batch_stream.stream());
    if (legacy) {
      after.record(batch_stream);
      after.block(current);  // work queued on `current` later starts after the batch
    }
    if (err == cudaSuccess) return;
    (void)cudaGetLastError();
    if (err != cudaErrorNotSupported && err != cudaErrorCallRequiresNewerDriver) C10_CUDA_CHECK(err);
    g_batch_api.store(0, std::memory_order_release);  // this driver lacks the batch API: loop from now on
  }
#endif
  for (size_t i = 0; i < ptrs.size(); ++i) prefetch_one(ptrs[i], sizes[i], device, stream);
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
  m.impl("paged_prefetch_batch", &paged_prefetch_batch_cuda);
  m.impl("paged_is_managed", &paged_is_managed_cuda);
  m.impl("paged_last_prefetch_location", &paged_last_prefetch_location_cuda);
}

}  // namespace lowrank_ext
