// per_device.h — facts about a GPU that do not change while the process runs, computed once per device and
// read without a driver call afterwards, so a kernel launch path makes no cudaDeviceGetAttribute /
// cudaFuncSetAttribute per launch (nf4_mma.cu, nf4_mma_launch.cuh).
// Torch-free and CUDA-free: the host test compiles it with g++ alone (tests/test_launch_cache.py).
//
//   PerDevice<T>::get(device, compute)   compute(device) once per device (std::call_once per slot); every later
//                                        call returns the stored value (one acquire load on the fast path).
//                                        compute may throw (e.g. C10_CUDA_CHECK): nothing is stored and the
//                                        next call computes again (std::call_once's rule).
//   PerDeviceFlag::test(device) / set()  a per-device "done" bit for idempotent set-up calls that report errors
//                                        by return value: set only after success; two racing first callers may
//                                        both run the set-up, which is harmless because it is idempotent.
// Ordinals outside [0, kMaxCachedDevices) are not cached: get() computes every time, test() is always false.
#pragma once

#include <array>
#include <atomic>
#include <mutex>

namespace lowrank_ext {

constexpr int kMaxCachedDevices = 64;  // ordinals 0..63; a 64+-GPU process still works, uncached above that

template <typename T>
class PerDevice {
 public:
  template <typename Compute>
  T get(int device, Compute&& compute) {
    if (device < 0 || device >= kMaxCachedDevices) return compute(device);
    const auto i = static_cast<size_t>(device);
    std::call_once(once_[i], [&] { value_[i] = compute(device); });
    return value_[i];
  }

 private:
  std::array<std::once_flag, kMaxCachedDevices> once_;
  std::array<T, kMaxCachedDevices> value_{};
};

class PerDeviceFlag {
 public:
  bool test(int device) const {
    return device >= 0 && device < kMaxCachedDevices &&
           done_[static_cast<size_t>(device)].load(std::memory_order_acquire);
  }
  void set(int device) {
    if (device >= 0 && device < kMaxCachedDevices)
      done_[static_cast<size_t>(device)].store(true, std::memory_order_release);
  }

 private:
  std::array<std::atomic<bool>, kMaxCachedDevices> done_{};
};

}  // namespace lowrank_ext
