// device_ops.cuh — the one interface between the CUDA kernels and the hardware's warp-level instructions.
//
// Every kernel (.cuh) reaches ldmatrix, mma.sync, cp.async and dynamic shared memory only through the
// names below. Two builds of the same kernel source:
//   nvcc (the extension):       inline PTX, as written here;
//   g++ with LRX_CUDA_SIM=1:    the host simulator (tests/sim/lrx_cuda_sim.h, a test-only target) provides
//                               the same names — and __syncthreads, __shfl_*_sync, atomics, threadIdx,
//                               __half / __nv_bfloat16 ... — implemented from the PTX ISA's documented
//                               layouts, so tests/test_simulated_kernels.py runs these kernels on the CPU.
// Nothing else in a kernel may be PTX: a kernel that uses an instruction not listed here does not build
// in the simulator, which is the point.
//
//   cp_async16(dst, src, valid)   16-byte global->shared async copy; !valid writes 16 zero bytes, reads nothing
//   cp_async4(dst, src, valid)    the same for 4 bytes
//   cp_async_commit()             close this thread's current group of async copies
//   cp_async_wait<N>()            wait until at most N of this thread's committed groups are in flight
//   ldmatrix_x4<kTrans>(r, p)     four 8x8 b16 matrices from shared memory; lane l gives the address of row
//                                 l % 8 of matrix l / 8; r[i] = lane's fragment of matrix i (.trans: transposed)
//   mma_m16n8k16<T>(d, a, b)      d[4] += A(16x16, row) · B(16x8, col), T = __nv_bfloat16 | __half, fp32 accumulate
//   LRX_DYNAMIC_SMEM(name)        `unsigned char* name`: the CTA's dynamic shared memory (16-byte aligned)
#pragma once

#include <cstdint>

#if defined(LRX_CUDA_SIM)
#include "lrx_cuda_sim.h"  // test-only: the host simulator (tests/sim/)
#else

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#define LRX_DYNAMIC_SMEM(name)                                \
  extern __shared__ __align__(16) unsigned char name##_raw[]; \
  unsigned char* name = name##_raw

namespace lowrank_ext {
namespace dev {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 4 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
  }
}

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same_v<T, __half>, "mma_m16n8k16: T must be __nv_bfloat16 or __half");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  __trap();  // the launchers never pick a tensor-core kernel below sm_80
#endif
}

}  // namespace dev
}  // namespace lowrank_ext

#endif  // LRX_CUDA_SIM
