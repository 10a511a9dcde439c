// gemv_workspace.cpp — the persistent per-(device, stream) scratch of the split-K GEMV (gemv_workspace.h).
//
// Buffer layout (bytes): [counters: counter_cap ints, rounded up to 256 B][partials: partial_cap floats].

#include "gemv_workspace.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <map>
#include <utility>

namespace lowrank_ext {
namespace {

constexpr int64_t kAlign = 256;  // bytes; the partials start 256-byte aligned

int64_t counter_bytes(int64_t counters) { return (counters * int64_t(sizeof(int)) + kAlign - 1) / kAlign * kAlign; }

struct Entry {
  at::Tensor buffer;
  int64_t counter_cap = 0, partial_cap = 0;
};

std::mutex& table_mutex() {
  static std::mutex mu;
  return mu;
}

// Leaked on purpose: destroying CUDA tensors from a static destructor can run after CUDA shut down.
std::map<std::pair<int, cudaStream_t>, Entry>& table() {
  static auto* t = new std::map<std::pair<int, cudaStream_t>, Entry>();
  return *t;
}

// A byte buffer for the layout above with the counters zeroed on `stream`.
at::Tensor allocate(int64_t counter_cap, int64_t partial_cap, c10::Device device, cudaStream_t stream) {
  const int64_t cbytes = counter_bytes(counter_cap);
  at::Tensor buf = at::empty({cbytes + partial_cap * int64_t(sizeof(float))},
                             at::TensorOptions().dtype(at::kByte).device(device));
  C10_CUDA_CHECK(cudaMemsetAsync(buf.mutable_data_ptr(), 0, static_cast<size_t>(cbytes), stream));
  return buf;
}

}  // namespace

GemvWorkspaceLease::GemvWorkspaceLease(int64_t counters, int64_t partial_floats, c10::Device device,
                                       cudaStream_t stream)
    : lock_(table_mutex()) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  at::Tensor* buf = nullptr;
  int64_t counter_cap = counters;
  if (capture != cudaStreamCaptureStatusNone) {
    graph_buffer_ = allocate(counters, partial_floats, device, stream);  // owned by the graph's pool
    buf = &graph_buffer_;
  } else {
    Entry& e = table()[{static_cast<int>(device.index()), stream}];
    if (!e.buffer.defined() || e.counter_cap < counters || e.partial_cap < partial_floats) {
      e.counter_cap = std::max(e.counter_cap, counters);
      e.partial_cap = std::max(e.partial_cap, partial_floats);
      e.buffer = allocate(e.counter_cap, e.partial_cap, device, stream);  // the old one: freed in stream order
    }
    buf = &e.buffer;
    counter_cap = e.counter_cap;
  }
  uint8_t* base = static_cast<uint8_t*>(buf->mutable_data_ptr());
  counters_ = reinterpret_cast<int*>(base);
  partial_ = reinterpret_cast<float*>(base + counter_bytes(counter_cap));
}

}  // namespace lowrank_ext
