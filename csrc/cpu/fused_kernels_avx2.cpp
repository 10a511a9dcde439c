// cpu/fused_kernels_avx2.cpp — the fused model-op kernels (fused_*_kernel.h) on AVX2 + FMA, 8 fp32 lanes
// (the build's baseline, setup.py: -mavx2 -mfma), and the fp64 path. Picked when cpu_isa() is avx2 (or
// LOWRANK_EXT_CPU_ISA=avx2 forces it); fused_kernels_avx512.cpp serves AVX-512 CPUs.

#include <immintrin.h>

#include "fused_vec.h"

namespace lowrank_ext {
namespace cpu {
inline namespace LRX_FUSED_ISA {
namespace {

struct VecAvx2 {
  using F = float;
  static constexpr int N = 8;
  __m256 v;

  static VecAvx2 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  // bf16 -> fp32 is exact: the 16 bits become the high half of the fp32
  static VecAvx2 load(const bf16* p) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(u, 16))};
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  // fp32 -> bf16, round to nearest even (float_to_bf16 in fused_vec.h, 8 lanes at once; NaN -> 0x7FC0)
  void store(bf16* p) const {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    // pack 8 x u32 (each <= 0xFFFF) to 8 x u16: packus works per 128-bit lane, permute joins the halves
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static VecAvx2 set1(float x) { return {_mm256_set1_ps(x)}; }
  static VecAvx2 fma(VecAvx2 a, VecAvx2 b, VecAvx2 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static VecAvx2 min(VecAvx2 a, VecAvx2 b) { return {_mm256_min_ps(a.v, b.v)}; }
  static VecAvx2 max(VecAvx2 a, VecAvx2 b) { return {_mm256_max_ps(a.v, b.v)}; }
  VecAvx2 round() const { return {_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
  // p · 2^n for integral n in [-127, 127]: add n to the exponent field
  static VecAvx2 ldexp(VecAvx2 p, VecAvx2 n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
    return {_mm256_mul_ps(p.v, _mm256_castsi256_ps(e))};
  }
  VecAvx2 exp() const { return exp_f32(*this); }
  float sum() const {
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
  }
  VecAvx2 operator+(VecAvx2 b) const { return {_mm256_add_ps(v, b.v)}; }
  VecAvx2 operator-(VecAvx2 b) const { return {_mm256_sub_ps(v, b.v)}; }
  VecAvx2 operator*(VecAvx2 b) const { return {_mm256_mul_ps(v, b.v)}; }
  VecAvx2 operator/(VecAvx2 b) const { return {_mm256_div_ps(v, b.v)}; }
};

}  // namespace
}  // namespace LRX_FUSED_ISA
}  // namespace cpu
}  // namespace lowrank_ext

#include "fused_dispatch.h"

namespace lowrank_ext {
namespace cpu {

const FusedKernels& fused_kernels_avx2() {
  static const FusedKernels table = make_fused_kernels<VecAvx2>();
  return table;
}

}  // namespace cpu
}  // namespace lowrank_ext
