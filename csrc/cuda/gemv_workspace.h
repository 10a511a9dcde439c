// gemv_workspace.h — the split-K GEMV's scratch memory (fp32 partials [splits, M, N] and one arrival
// counter per row group), kept per (device, stream) instead of allocated on every call: at M <= 16 a
// 4096x4096 NF4 read takes ~2 µs on an H200, so an at::empty + at::zeros + memset per call would cost
// 30-50% (docs/kernels.md, the GEMV). Used by csrc/cuda/nf4_linear.cu.
//
// Protocol. The counters are zeroed once, when their buffer is allocated; every launch leaves them at
// zero again (the last CTA of a row group resets its counter: nf4_gemv_kernel.cuh). The buffer grows
// (never shrinks) when a call needs more; the old one goes back to the caching allocator, which reuses
// it only in stream order.
//
// Thread and stream safety. One workspace per (device, stream): launches on one stream run in order, so
// two launches never share the buffer at the same time; different streams never share one. A lease
// holds a process-wide mutex from the lookup until it is destroyed, so the caller launches while holding
// it: two host threads that use one stream serialize their launches there, and a buffer cannot be
// replaced between a lookup and its launch. The table grows with the distinct streams used (torch's
// stream pools are bounded) and is never freed (its buffers are returned at exit with the context).
//
// CUDA graph capture. While the stream is capturing, a lease gets fresh buffers from the caching
// allocator instead (they land in the graph's private pool and live as long as the graph) with the
// counters zeroed by a captured memset: a persistent buffer could be regrown and freed later while a
// graph still replays into it.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

#include <mutex>

namespace lowrank_ext {

class GemvWorkspaceLease {
 public:
  // Scratch for `counters` ints (zero on entry) and `partial_floats` floats on `device`, for launches on
  // `stream` while this lease lives.
  GemvWorkspaceLease(int64_t counters, int64_t partial_floats, c10::Device device, cudaStream_t stream);
  int* counters() const { return counters_; }
  float* partial() const { return partial_; }
  bool fresh() const { return graph_buffer_.defined(); }  // true during graph capture

 private:
  std::unique_lock<std::mutex> lock_;
  at::Tensor graph_buffer_;
  int* counters_ = nullptr;
  float* partial_ = nullptr;
};

}  // namespace lowrank_ext
