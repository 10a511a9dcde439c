// cpu/cpu_isa.h — which family of CPU kernels runs: the best one this CPU supports (detected once), or a
// lower one forced with LOWRANK_EXT_CPU_ISA (read on every call, so tests can run each path in one process).
//
//   isa          NT/NN panels (M > kGemvMaxM)              GEMV (M <= kGemvMaxM)
//   amx          bf16 activations: bf16 panels -> oneDNN  AVX-512
//                (AMX tiles), fp32 accumulation
//   avx512bf16   bf16 activations: bf16 panels -> oneDNN  AVX-512
//                (vdpbf16ps), fp32 accumulation
//   avx512       fp32 panels -> MKL (bf16 via fp32)        AVX-512
//   avx2         fp32 panels -> MKL (bf16 via fp32)        AVX2 (gemv-scalar in a build without AVX2)
// amx and avx512bf16 run the same code: oneDNN picks the AMX or AVX512-BF16 micro-kernel itself
// (tests/test_cpu_isa.py reads ONEDNN_VERBOSE to check which one it took). Without native bf16 matmul,
// PyTorch's own bf16 GEMM is pathologically slow, so bf16 is computed through fp32 panels there.
#pragma once

#include <string>

namespace lowrank_ext {
namespace cpu {

enum class CpuIsa : int { kAvx2 = 0, kAvx512 = 1, kAvx512Bf16 = 2, kAmx = 3 };

// The best family this CPU supports (cpuid, cached).
CpuIsa detected_cpu_isa();

// detected_cpu_isa(), or the family LOWRANK_EXT_CPU_ISA names ("auto", "avx2", "avx512", "avx512bf16",
// "amx"). Raises ValueError for an unknown name or a family this CPU cannot run (never a silent fallback).
CpuIsa cpu_isa();

const char* cpu_isa_name(CpuIsa isa);

// bf16 GEMMs run on bf16 hardware (AVX512-BF16 dot products or AMX tiles).
inline bool native_bf16_matmul(CpuIsa isa) { return isa >= CpuIsa::kAvx512Bf16; }

// The op cpu_isa(bool detected=False) -> str: cpu_isa()'s name, or detected_cpu_isa()'s.
std::string cpu_isa_op(bool detected);

}  // namespace cpu
}  // namespace lowrank_ext
