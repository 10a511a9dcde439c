// cpu/fused_kernels_avx512_impl.h — the AVX-512 vector type (16 fp32 lanes) and the table of the fused
// model-op kernels built from it; the body of fused_kernels_avx512.cpp and fused_kernels_avx512bf16.cpp,
// which include it inside their own `#pragma GCC target` with:
//   LRX_FUSED_ISA          the inline namespace of this copy of the templates (fused_vec.h)
//   LRX_FUSED_NATIVE_BF16  1: bf16 stores by AVX512-BF16's vcvtneps2bf16; 0: by integer rounding
//   LRX_FUSED_TABLE        the name of the table function (fused_kernels.h)
// Not a standalone header: the includer has already included the standard and intrinsic headers.

#include "fused_vec.h"

namespace lowrank_ext {
namespace cpu {
inline namespace LRX_FUSED_ISA {
namespace {

struct VecAvx512 {
  using F = float;
  static constexpr int N = 16;
  __m512 v;

  static VecAvx512 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  // bf16 -> fp32 is exact: the 16 bits become the high half of the fp32
  static VecAvx512 load(const bf16* p) {
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(u, 16))};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  // fp32 -> bf16, round to nearest even (NaN stays NaN). With AVX512-BF16: one vcvtneps2bf16 (which, as
  // the instruction is defined, also flushes fp32 results below 2^-126 to ±0). Without: float_to_bf16 of
  // fused_vec.h, 16 lanes at once — eight integer ops, double-pumped on Zen 4, which made a bf16 kernel
  // slower than the fp32 one.
  void store(bf16* p) const {
#if LRX_FUSED_NATIVE_BF16
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
#else
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
    // 16 x u32 (each <= 0xFFFF) -> 16 x u16: packus per 128-bit lane, then gather the lanes' low halves
    const __m512i packed = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7),
                                                    _mm512_packus_epi32(r, r));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(packed));
#endif
  }
  static VecAvx512 set1(float x) { return {_mm512_set1_ps(x)}; }
  static VecAvx512 fma(VecAvx512 a, VecAvx512 b, VecAvx512 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static VecAvx512 min(VecAvx512 a, VecAvx512 b) { return {_mm512_min_ps(a.v, b.v)}; }
  static VecAvx512 max(VecAvx512 a, VecAvx512 b) { return {_mm512_max_ps(a.v, b.v)}; }
  VecAvx512 round() const { return {_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
  // p · 2^n for integral n (vscalefps)
  static VecAvx512 ldexp(VecAvx512 p, VecAvx512 n) { return {_mm512_scalef_ps(p.v, n.v)}; }
  VecAvx512 exp() const { return exp_f32(*this); }
  float sum() const { return _mm512_reduce_add_ps(v); }
  VecAvx512 operator+(VecAvx512 b) const { return {_mm512_add_ps(v, b.v)}; }
  VecAvx512 operator-(VecAvx512 b) const { return {_mm512_sub_ps(v, b.v)}; }
  VecAvx512 operator*(VecAvx512 b) const { return {_mm512_mul_ps(v, b.v)}; }
  VecAvx512 operator/(VecAvx512 b) const { return {_mm512_div_ps(v, b.v)}; }
};

}  // namespace
}  // namespace LRX_FUSED_ISA
}  // namespace cpu
}  // namespace lowrank_ext

#include "fused_dispatch.h"

namespace lowrank_ext {
namespace cpu {

const FusedKernels& LRX_FUSED_TABLE() {
  static const FusedKernels table = make_fused_kernels<VecAvx512>();
  return table;
}

}  // namespace cpu
}  // namespace lowrank_ext

