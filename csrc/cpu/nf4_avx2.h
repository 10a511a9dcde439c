// cpu/nf4_avx2.h — AVX2 building blocks of the NF4 CPU kernels (csrc/cpu/nf4.cpp). Host only.
//
//   load8_f32      8 inputs (fp32/fp16/bf16) -> __m256 fp32 (exact conversions)
//   nf4_encode8    8 scaled values s -> 8 int32 codes = #{midpoints m_i : m_i < s}  (same as nf4_encode)
//   nf4_pack32     32 codes (4 x int32 vectors) -> 16 bytes, byte j = code[2j] << 4 | code[2j+1]
//   nf4_unpack16   8 packed bytes -> 16 int32 codes in flat order (high nibble first)
//   nf4_lut16      code -> NF4[code] * scale through a 16-entry register LUT (two 8-lane permutes + blend)
//   store8         8 fp32 -> fp32 / fp16 / bf16 (round to nearest even, as c10's conversions)
// Everything here is compiled only when the build enables AVX2 (-mavx2 -mfma -mf16c); nf4.cpp keeps a
// scalar path for other builds.
#pragma once

#if defined(__AVX2__) && defined(__F16C__)
#define LRX_NF4_AVX2 1
#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "lowrank_ext/nf4.h"

namespace lowrank_ext {
namespace avx2 {

// ---- loads: 8 consecutive inputs as fp32 ------------------------------------------------------
inline __m256 load8_f32(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8_f32(const c10::Half* p) {  // F16C conversion is exact
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8_f32(const c10::BFloat16* p) {  // bf16 bits are the top half of the fp32 bits
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// |v| and a mask of lanes that are NaN or +-Inf (|v| > FLT_MAX, or unordered).
inline __m256 abs8(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
inline __m256 nonfinite8(__m256 abs_v) { return _mm256_cmp_ps(abs_v, _mm256_set1_ps(3.40282347e38f), _CMP_NLE_UQ); }

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// ---- encode: code = number of the 15 midpoints strictly below s -------------------------------
// mid[i] = (c[i] + c[i+1]) / 2 in fp32 (nf4_midpoint); a compare gives -1 in true lanes, so
// subtracting the 15 masks counts them. Equal to nf4_encode() for every non-NaN s.
struct Midpoints {
  __m256 m[15];
  Midpoints() {
    for (int i = 0; i < 15; ++i) m[i] = _mm256_set1_ps(nf4_midpoint(i));
  }
};

inline __m256i nf4_encode8(__m256 s, const Midpoints& mid) {
  __m256i code = _mm256_setzero_si256();
  for (int i = 0; i < 15; ++i)
    code = _mm256_sub_epi32(code, _mm256_castps_si256(_mm256_cmp_ps(mid.m[i], s, _CMP_LT_OQ)));
  return code;
}

// ---- pack: 32 codes in 4 int32 vectors (flat order c0 | c1 | c2 | c3) -> 16 bytes --------------
inline void nf4_pack32(__m256i c0, __m256i c1, __m256i c2, __m256i c3, uint8_t* dst) {
  // int32 -> uint8 with packus works per 128-bit lane: bytes come out as dwords
  // [c0 0-3, c1 0-3, c2 0-3, c3 0-3 | c0 4-7, c1 4-7, c2 4-7, c3 4-7]; permute the dwords to flat order.
  const __m256i p01 = _mm256_packus_epi32(c0, c1);
  const __m256i p23 = _mm256_packus_epi32(c2, c3);
  const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(p01, p23),
                                                    _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  // Each 16-bit word holds (odd code << 8 | even code): byte = even << 4 | odd.
  const __m256i even = _mm256_and_si256(bytes, _mm256_set1_epi16(0x00FF));
  const __m256i pair = _mm256_or_si256(_mm256_slli_epi16(even, 4), _mm256_srli_epi16(bytes, 8));
  // 16 words (values <= 255) -> 16 bytes: packus per lane, then take qwords 0 and 2.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi16(pair, pair), 0b1000);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(packed));
}

// ---- decode -----------------------------------------------------------------------------------
// 16 packed bytes -> 32 codes as 4 int32 vectors in flat order (even index = high nibble).
inline void nf4_unpack32(const uint8_t* src, __m256i idx[4]) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  const __m128i lo_mask = _mm_set1_epi8(0x0F);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), lo_mask);
  const __m128i lo = _mm_and_si128(b, lo_mask);
  const __m128i codes0 = _mm_unpacklo_epi8(hi, lo);  // codes 0..15: h0 l0 h1 l1 ...
  const __m128i codes1 = _mm_unpackhi_epi8(hi, lo);  // codes 16..31
  idx[0] = _mm256_cvtepu8_epi32(codes0);
  idx[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(codes0, 8));
  idx[2] = _mm256_cvtepu8_epi32(codes1);
  idx[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(codes1, 8));
}

// The 16 levels times one block scale, in two registers: lut_lo = NF4[0..7]*scale, lut_hi = NF4[8..15]*scale.
// (NF4[c] * scale is one fp32 multiply, exactly as the scalar path computes it.)
struct ScaledLUT {
  __m256 lo, hi;
  explicit ScaledLUT(float scale) {
    const __m256 s = _mm256_set1_ps(scale);
    lo = _mm256_mul_ps(_mm256_loadu_ps(kNF4Codebook), s);
    hi = _mm256_mul_ps(_mm256_loadu_ps(kNF4Codebook + 8), s);
  }
  // permutevar8x32 uses idx & 7; bit 3 of idx (moved to the sign bit) picks lo or hi.
  __m256 operator()(__m256i idx) const {
    const __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), sel);
  }
};

// ---- 16-bit outputs: decode straight to bf16/fp16 bits with two byte shuffles ------------------
// out[i] = T(NF4[code] * scale) takes only 16 distinct values per block, so convert those 16 once
// (the same fp32 product, rounded the same way) and look codes up in two 16-byte tables: the low
// and the high byte of each 16-bit result (vpshufb indexes a 16-byte table by a 4-bit code).
struct HalfLUT {
  __m256i lo_bytes, hi_bytes;  // the two byte tables, repeated in both 128-bit lanes
  explicit HalfLUT(__m256i bits16) {  // bits16: the 16 results, uint16, code order
    const __m256i lo = _mm256_and_si256(bits16, _mm256_set1_epi16(0x00FF));
    const __m256i hi = _mm256_srli_epi16(bits16, 8);
    // packus per lane: [lo 0-7, hi 0-7 | lo 8-15, hi 8-15] as qwords; reorder to [lo 0-15 | hi 0-15]
    const __m256i t = _mm256_permute4x64_epi64(_mm256_packus_epi16(lo, hi), 0b11011000);
    lo_bytes = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(t));
    hi_bytes = _mm256_broadcastsi128_si256(_mm256_extracti128_si256(t, 1));
  }
  // 16 packed bytes -> 32 results (two 32-byte vectors, flat order)
  void decode32(const uint8_t* src, __m256i& first, __m256i& second) const {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m128i m = _mm_set1_epi8(0x0F);
    const __m128i hi_n = _mm_and_si128(_mm_srli_epi16(b, 4), m), lo_n = _mm_and_si128(b, m);
    // lane 0: codes 0-15, lane 1: codes 16-31 (even flat index = high nibble)
    const __m256i codes = _mm256_set_m128i(_mm_unpackhi_epi8(hi_n, lo_n), _mm_unpacklo_epi8(hi_n, lo_n));
    const __m256i l = _mm256_shuffle_epi8(lo_bytes, codes), h = _mm256_shuffle_epi8(hi_bytes, codes);
    const __m256i w0 = _mm256_unpacklo_epi8(l, h);  // lane 0: values 0-7,  lane 1: values 16-23
    const __m256i w1 = _mm256_unpackhi_epi8(l, h);  // lane 0: values 8-15, lane 1: values 24-31
    first = _mm256_permute2x128_si256(w0, w1, 0x20);
    second = _mm256_permute2x128_si256(w0, w1, 0x31);
  }
};

// ---- stores: 8 fp32 values -> out dtype, rounded once (round to nearest even) ------------------
template <bool kStream>
inline void store8(float* dst, __m256 v) {
  if constexpr (kStream) _mm256_stream_ps(dst, v);
  else _mm256_storeu_ps(dst, v);
}

// 16 values (two vectors) at a time for 16-bit outputs: 32 bytes, one (streaming) store.
template <bool kStream>
inline void store16_bits(void* dst, __m256i v) {
  if constexpr (kStream) _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), v);
  else _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), v);
}

// fp32 -> bf16 bits, as c10::detail::round_to_nearest_even: (u + 0x7FFF + ((u >> 16) & 1)) >> 16,
// NaN -> 0x7FC0. Result in the low 16 bits of each int32 lane.
inline __m256i bf16_bits8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7FFF));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}

// 16 fp32 (a = values 0-7, b = 8-15) -> 16 bf16 / fp16 bit patterns in order.
inline __m256i to_bits16(c10::BFloat16*, __m256 a, __m256 b) {
  // packus_epi32 interleaves 128-bit lanes: [a0-3, b0-3, a4-7, b4-7]; permute qwords 0,2,1,3.
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits8(a), bf16_bits8(b)), 0b11011000);
}
inline __m256i to_bits16(c10::Half*, __m256 a, __m256 b) {  // F16C: IEEE round to nearest even
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return _mm256_set_m128i(_mm256_cvtps_ph(b, kRound), _mm256_cvtps_ph(a, kRound));
}

template <typename T16, bool kStream>  // T16 = c10::BFloat16 or c10::Half
inline void store16(T16* dst, __m256 a, __m256 b) {
  store16_bits<kStream>(dst, to_bits16(dst, a, b));
}

template <bool kStream>
inline void store16(float* dst, __m256 a, __m256 b) {
  store8<kStream>(dst, a);
  store8<kStream>(dst + 8, b);
}

}  // namespace avx2
}  // namespace lowrank_ext
#endif  // __AVX2__ && __F16C__
