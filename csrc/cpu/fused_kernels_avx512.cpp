// cpu/fused_kernels_avx512.cpp — the fused model-op kernels (fused_*_kernel.h) on AVX-512 F + BW,
// 16 fp32 lanes (fused_kernels_avx512_impl.h), bf16 stores rounded with integer ops.
// Only this file is compiled for its target (pragma; the build's baseline is AVX2), and its table runs
// only where cpu_isa() allows it (csrc/cpu/cpu_isa.h, fused_kernels_for). Its template copies live in the
// inline namespace isa_avx512 (fused_vec.h), so none can stand in for another ISA's copy at link time.

// Standard and intrinsic headers first, compiled for the baseline: only our own code gets the target.
#include "avx512_intrinsics.h"  // <immintrin.h>, and GCC 12's false warning in it silenced

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_isa.h"
#include "fused_kernels.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")
#define LRX_FUSED_ISA isa_avx512
#define LRX_FUSED_NATIVE_BF16 0
#define LRX_FUSED_TABLE fused_kernels_avx512
#include "fused_kernels_avx512_impl.h"
#pragma GCC pop_options

#else  // not x86 with a GCC-compatible compiler: cpu_isa() never reports AVX-512 there

namespace lowrank_ext {
namespace cpu {
const FusedKernels& fused_kernels_avx512() { return fused_kernels_avx2(); }
}  // namespace cpu
}  // namespace lowrank_ext

#endif
