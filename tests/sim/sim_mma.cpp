// sim_mma.cpp — the tensor-core NF4 GEMM (csrc/cuda/nf4_mma_kernel.cuh) on the simulator, launched with the
// launcher's geometry (nf4_mma_launch.cuh: grid_of, kThreads, kSmemBytes, log2_blocksize).
#include "nf4_mma_kernel.cuh"
#include "sim_common.h"

namespace {

using namespace lowrank_ext;

template <typename T, bool kNN>
std::string run(const NF4MatmulParams& p, std::vector<lrx_sim::Buffer> globals, uint64_t seed, uint64_t* stats) {
  const int log2_bs = mma::log2_blocksize(p);
  lrx_sim::LaunchStats st;
  std::string err = lrx_sim::launch(mma::grid_of<kNN>(p), dim3(mma::kThreads), mma::kSmemBytes, seed,
                                    std::move(globals), [&] { mma::nf4_mma_kernel<T, kNN>(p, log2_bs); }, &st);
  lrx_sim::put_stats(stats, st);
  return err;
}

}  // namespace

// nn = 0: y = x · deq(W)ᵀ (+ s·u·lora_Bᵀ) (+ bias);  nn = 1: gx = gy · deq(W) (+ gu · lora_A).
// The requirements nf4_mma.cu checks before it launches (the kernel assumes them) are errors here.
LRX_SIM_API const char* lrx_sim_nf4_mma(int nn, LRX_SIM_MATMUL_ARGS) {
  LRX_SIM_MATMUL_PARAMS(nn != 0, p, globals);
  const int64_t red = nn ? N : K;
  if (dtype != 1 && dtype != 2) return lrx_sim::result("lrx_sim_nf4_mma: dtype must be 1 (fp16) or 2 (bf16)");
  if (K % 8 != 0 || red % 8 != 0) return lrx_sim::result("lrx_sim_nf4_mma: K (and N for NN) must be multiples of 8");
  if (blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) != 0)
    return lrx_sim::result("lrx_sim_nf4_mma: blocksize must be a power of two in [32, 4096]");
  if (reinterpret_cast<uintptr_t>(a) % 16 != 0 || lda % 8 != 0 || reinterpret_cast<uintptr_t>(packed) % 4 != 0)
    return lrx_sim::result("lrx_sim_nf4_mma: a must be 16-byte aligned with lda % 8 == 0, packed 4-byte aligned");
  if (nn && bias != nullptr) return lrx_sim::result("lrx_sim_nf4_mma: the NN form has no bias");
  std::string err;
  if (dtype == 2) {
    err = nn ? run<__nv_bfloat16, true>(p, globals, seed, stats) : run<__nv_bfloat16, false>(p, globals, seed, stats);
  } else {
    err = nn ? run<__half, true>(p, globals, seed, stats) : run<__half, false>(p, globals, seed, stats);
  }
  return lrx_sim::result(err);
}
