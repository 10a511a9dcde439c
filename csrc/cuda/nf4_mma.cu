// nf4_mma.cu — entry points of the tensor-core NF4 GEMMs (declared in nf4_mma.h): decide whether the
// mma.sync path supports a problem, and launch the per-dtype kernels (nf4_mma_{bf16,fp16}.cu).
//
//   launch_nf4_mma_nt:  y[M, N]  = x[M, K]  · deq(W)[N, K]ᵀ (+ scaling · u[M, r] · lora_B[N, r]ᵀ) (+ bias[N])
//   launch_nf4_mma_nn:  gx[M, K] = gy[M, N] · deq(W)[N, K]  (+ gu[M, r] · lora_A[r, K])
// All operands (a, lowrank, lowrank_w, bias, out) have params.dtype (fp16 or bf16); accumulation is fp32.
// Unsupported problems return false and launch nothing (the dispatcher then runs the SIMT kernel);
// CUDA errors of a launch that was attempted raise (C10_CUDA_CHECK). No cuBLAS, no dense W anywhere.
// Launch overhead: the device facts supported() needs are queried once per GPU (per_device.h); a launch makes
// no cudaDeviceGetAttribute / cudaFuncSetAttribute call after the first on its device.
#include "nf4_mma.h"

#include <c10/cuda/CUDAException.h>

#include <cstdint>

#include "nf4_mma_kernel.cuh"  // tile constants only; the kernels are instantiated in nf4_mma_{bf16,fp16}.cu
#include "per_device.h"

namespace lowrank_ext {
namespace mma {

// Defined in nf4_mma_bf16.cu / nf4_mma_fp16.cu (kernel template in nf4_mma_kernel.cuh).
cudaError_t run_bf16(const NF4MatmulParams& p, bool nn, cudaStream_t stream);
cudaError_t run_fp16(const NF4MatmulParams& p, bool nn, cudaStream_t stream);

namespace {

bool aligned(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Whether GPU `dev` runs the kernel: sm80+ (mma.m16n8k16 bf16, cp.async, ldmatrix) and kSmemBytes of opt-in
// dynamic shared memory per CTA. Two driver queries, made once per device (per_device.h), not per launch;
// a failed query throws and is retried by the next call.
bool device_runs_mma(int dev) {
  static PerDevice<bool> cache;
  return cache.get(dev, [](int d) {
    int major = 0, smem_optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, d));
    return major >= 8 && smem_optin >= kSmemBytes;
  });
}

// The shapes, dtypes, alignments and devices the kernel handles (see nf4_mma_kernel.cuh).
bool supported(const NF4MatmulParams& p, bool nn) {
  if (p.dtype != ActDType::kFloat16 && p.dtype != ActDType::kBFloat16) return false;
  const NF4WeightView& w = p.w;
  const int64_t red = nn ? w.N : w.K, cols = nn ? w.K : w.N;
  if (p.M < 1 || w.N < 1 || w.K < 1) return false;
  if (p.M > int64_t(kBM) * 65535) return false;  // grid.y = ceil(M / 128)
  if (w.K % 8 != 0 || red % 8 != 0) return false;  // whole 8-code words per row; whole 16-byte A chunks
  if (w.blocksize < 32 || w.blocksize > 4096 || (w.blocksize & (w.blocksize - 1)) != 0) return false;
  if (w.packed == nullptr || !aligned(w.packed, 4)) return false;
  if (w.scales.qabsmax == nullptr ? w.scales.absmax_f32 == nullptr
                                  : (w.scales.absmax2 == nullptr || w.scales.nested_map == nullptr ||
                                     w.scales.offset == nullptr))
    return false;
  if (p.a == nullptr || !aligned(p.a, 16) || p.lda % 8 != 0 || p.lda < red) return false;
  // The kernel's per-thread offsets are 32-bit: 128 rows of A (row * lda) or of W (row * K) stay below 2^31.
  if (p.lda >= (int64_t(1) << 24) || w.K >= (int64_t(1) << 24)) return false;
  if (p.out == nullptr || !aligned(p.out, 2) || p.ld_out < cols) return false;
  if (p.r < 0) return false;
  if (p.lowrank != nullptr && p.r > 0) {  // r == 0: no rank steps (the kernel's rank loop runs 0 times)
    if (p.lowrank_w == nullptr || p.ld_lowrank < p.r) return false;
    if (p.ld_lowrank_w < (nn ? w.K : int64_t(p.r))) return false;
  }
  if (nn && p.bias != nullptr) return false;  // the NN form has no bias
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));  // the runtime's per-thread current device: no driver round trip
  return device_runs_mma(dev);
}

}  // namespace

bool launch(const NF4MatmulParams& p, bool nn, cudaStream_t stream) {
  if (!supported(p, nn)) return false;
  C10_CUDA_CHECK(p.dtype == ActDType::kBFloat16 ? run_bf16(p, nn, stream) : run_fp16(p, nn, stream));
  return true;
}

}  // namespace mma

bool launch_nf4_mma_nt(const NF4MatmulParams& params, cudaStream_t stream) {
  return mma::launch(params, /*nn=*/false, stream);
}

bool launch_nf4_mma_nn(const NF4MatmulParams& params, cudaStream_t stream) {
  return mma::launch(params, /*nn=*/true, stream);
}

}  // namespace lowrank_ext
