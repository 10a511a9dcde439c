// sim_probe.cpp — entry points that exercise the simulator itself (tests/test_simulated_kernels.py checks them
// against tables written out from the PTX ISA, and checks that broken kernels fail loudly).
#include "sim_common.h"

using lowrank_ext::dev::ldmatrix_x4;
using lowrank_ext::dev::mma_m16n8k16;

// One warp runs one mma.m16n8k16: lane t passes a[t][4], b[t][2], c[t][4] (raw fragment registers) and gets d[t][4].
LRX_SIM_API const char* lrx_sim_probe_mma(int bf16, const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  return lrx_sim::result(lrx_sim::launch(dim3(1), dim3(32), 0, 0, {}, [&] {
    const int t = threadIdx.x;
    const uint32_t ra[4] = {a[4 * t], a[4 * t + 1], a[4 * t + 2], a[4 * t + 3]}, rb[2] = {b[2 * t], b[2 * t + 1]};
    float acc[4] = {c[4 * t], c[4 * t + 1], c[4 * t + 2], c[4 * t + 3]};
    if (bf16) mma_m16n8k16<__nv_bfloat16>(acc, ra, rb);
    else mma_m16n8k16<__half>(acc, ra, rb);
    for (int i = 0; i < 4; ++i) d[4 * t + i] = acc[i];
  }));
}

// One warp runs one ldmatrix.x4 (trans or not) over `n16` b16 words copied into dynamic shared memory; lane t
// passes the address smem + offset[t] (in b16 elements) and gets r[t][4].
LRX_SIM_API const char* lrx_sim_probe_ldmatrix(int trans, const uint16_t* smem_init, int n16, const int* offset,
                                               uint32_t* r) {
  return lrx_sim::result(lrx_sim::launch(dim3(1), dim3(32), size_t(n16) * 2, 0, {}, [&] {
    LRX_DYNAMIC_SMEM(smem);
    const int t = threadIdx.x;
    for (int i = t; i < n16; i += 32) std::memcpy(smem + 2 * i, smem_init + i, 2);
    __syncthreads();
    uint32_t out[4];
    if (trans) ldmatrix_x4<true>(out, smem + 2 * offset[t]);
    else ldmatrix_x4<false>(out, smem + 2 * offset[t]);
    for (int i = 0; i < 4; ++i) r[4 * t + i] = out[i];
  }));
}

// fp32 -> fp16 / bf16 (RN) and back, elementwise over n values.
LRX_SIM_API void lrx_sim_probe_convert(const float* x, int64_t n, uint16_t* f16, uint16_t* bf16, float* f16_back,
                                       float* bf16_back) {
  for (int64_t i = 0; i < n; ++i) {
    const __half h = __float2half_rn(x[i]);
    const __nv_bfloat16 b = __float2bfloat16_rn(x[i]);
    f16[i] = h.x, bf16[i] = b.x;
    f16_back[i] = __half2float(h), bf16_back[i] = __bfloat162float(b);
  }
}

// Kernels with a defect the simulator must report (an error string), one per `which`:
//   0 a __syncthreads only half the block reaches (the rest wait at another one)   -> divergent barrier
//   1 a shuffle some lanes of the warp never reach (they exit)                        -> deadlock
//   2 shared memory read after cp.async without cp.async.wait_group                  -> poisoned (NaN) data
//   3 the same with the wait                                                           -> no error (control)
//   4 a warp where lanes call two different collectives                               -> warp divergence
//   5 __trap()
LRX_SIM_API const char* lrx_sim_probe_defect(int which, float* out) {
  static float src[64];
  for (int i = 0; i < 64; ++i) src[i] = float(i);
  const std::vector<lrx_sim::Buffer> g{{src, sizeof src}, {out, 64 * sizeof(float)}};
  return lrx_sim::result(lrx_sim::launch(dim3(2), dim3(64), 64 * sizeof(float), 7, g, [&] {
    LRX_DYNAMIC_SMEM(smem);
    float* s = reinterpret_cast<float*>(smem);
    const int t = threadIdx.x;
    switch (which) {
      case 0:
        if (t < 32) __syncthreads();
        else __syncthreads();
        break;
      case 1:
        if (t % 32 < 16) return;
        out[t] = __shfl_sync(0xffffffffu, 1.0f, 0);
        break;
      case 2:
      case 3:
        if (t < 16) lowrank_ext::dev::cp_async16(s + 4 * t, src + 4 * t, true);
        lowrank_ext::dev::cp_async_commit();
        if (which == 3) lowrank_ext::dev::cp_async_wait<0>();
        __syncthreads();
        out[t] = s[63 - t];
        if (std::isnan(out[t])) __trap();  // the value never landed: what a missing wait reads here
        break;
      case 4:
        if (t % 2) out[t] = __shfl_sync(0xffffffffu, 1.0f, 0);
        else out[t] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
        break;
      default:
        __trap();
    }
  }));
}

// One warp runs the shuffles, votes and __byte_perm with fixed arguments; lane t writes out[t][0..7]
// (tests/test_simulated_kernels.py spells out what CUDA defines for each).
LRX_SIM_API const char* lrx_sim_probe_warp(int* out) {
  return lrx_sim::result(lrx_sim::launch(dim3(1), dim3(32), 0, 0, {}, [&] {
    const int t = threadIdx.x, v = 100 + t;
    int* o = out + 8 * t;
    o[0] = __shfl_sync(0xffffffffu, v, (t * 7) % 32);
    o[1] = __shfl_sync(0xffffffffu, v, 3, 8);
    o[2] = __shfl_xor_sync(0xffffffffu, v, 5);
    o[3] = __shfl_down_sync(0xffffffffu, v, 3, 16);
    o[4] = __shfl_up_sync(0xffffffffu, v, 2);
    __syncwarp();
    o[5] = static_cast<int>(__ballot_sync(0xffffffffu, t % 3 == 0));
    o[6] = __all_sync(0xffffffffu, t < 40) + 2 * __any_sync(0xffffffffu, t == 17) + 4 * __all_sync(0xffffffffu, t != 5);
    o[7] = static_cast<int>(__byte_perm(0x33221100u + t, 0x77665544u, 0x3715u + t % 4));
  }));
}

// The pair helpers: out[0..5] = bits of __float22half2_rn, __float22bfloat162_rn, __halves2half2(b, a) and
// their round trips (a, b) -> low, high floats.
LRX_SIM_API void lrx_sim_probe_pairs(float a, float b, uint32_t* bits, float* back) {
  const __half2 h = __float22half2_rn(make_float2(a, b));
  const __nv_bfloat162 bf = __float22bfloat162_rn(make_float2(a, b));
  const __half2 sw = __halves2half2(h.y, h.x);
  const __nv_bfloat162 bsw = __halves2bfloat162(bf.y, bf.x);
  std::memcpy(bits + 0, &h, 4), std::memcpy(bits + 1, &bf, 4), std::memcpy(bits + 2, &sw, 4);
  std::memcpy(bits + 3, &bsw, 4);
  const float2 hf = __half22float2(h), bff = __bfloat1622float2(bf);
  back[0] = __low2float(h), back[1] = __high2float(h), back[2] = __low2float(bf), back[3] = __high2float(bf);
  back[4] = hf.x, back[5] = hf.y, back[6] = bff.x, back[7] = bff.y;
}
