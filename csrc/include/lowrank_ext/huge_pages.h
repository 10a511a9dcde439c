// huge_pages.h — fresh multi-MB CPU results on transparent huge pages (csrc/cpu/nf4.cpp, csrc/cpu/fused_*.cpp).
//
// A fresh multi-MB result costs more in first-touch page faults (one trap + a kernel page clear per
// 4 KiB) than a streaming kernel's own work. Asking for transparent huge pages on its 2 MiB-aligned
// interior, before the first write, cuts the faults 512x (measured: 4096x4096 fp32 empty+fill 70 ->
// 33 ms here). Best effort: what torch's THP_MEM_ALLOC_ENABLE does for every large allocation.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace lowrank_ext {

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t start = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (p + t.nbytes()) & ~(kHuge - 1);
  if (end > start) (void)madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// A CPU kernel's fresh output: huge pages from 4 MiB on (below that the faults are few).
inline at::Tensor advise_large(at::Tensor t) {
  if (t.device().is_cpu() && t.nbytes() >= (size_t{4} << 20)) advise_huge_pages(t);
  return t;
}

}  // namespace lowrank_ext
