// cpu/nf4_linear_avx512.cpp — the NF4 GEMV rows kernel for CPUs with AVX-512 (picked at run time;
// the rest of the build targets AVX2). Same math as gemv_rows in nf4_linear_kernels.cpp:
//   per segment (one block inside one row of W): acc[m] = Σ_k NF4[code_k] · x[m, k];  tot[m] += scale · acc[m]
// What AVX-512 buys: the 16-entry codebook fits one zmm register, so decoding 16 codes is one
// vpermps on zero-extended nibbles (AVX2 needs two permutes and a blend per 8 codes).
// Only this function is compiled for AVX-512 (target pragma); nothing here runs unless
// nf4_cpu_has_avx512() said so.

#include "nf4_linear_kernels.h"

#include <algorithm>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define LRX_HAVE_AVX512_TARGET 1
#endif

namespace lowrank_ext {
namespace cpu {

#if LRX_HAVE_AVX512_TARGET

bool nf4_cpu_has_avx512() { return __builtin_cpu_supports("avx512f"); }

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace {

// 16 bytes -> 32 codes in flat order (even index = high nibble): lo16 = codes 0..15, hi16 = 16..31.
inline void codes32(__m128i bytes, __m512i& c0, __m512i& c1) {
  const __m128i nib = _mm_set1_epi8(0x0F);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib);  // high nibbles (even elements)
  const __m128i lo = _mm_and_si128(bytes, nib);                     // low nibbles (odd elements)
  c0 = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
  c1 = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo));
}

template <int MB>
void rows512(const NF4Matrix& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t K = w.K, bs = w.blocksize;
  const __m512 lut = _mm512_loadu_ps(kNF4Codebook);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t r0 = n * K, r1 = r0 + K;  // flat range of row n
    __m512 tot[MB];
    float tot_s[MB] = {};
    for (int m = 0; m < MB; ++m) tot[m] = _mm512_setzero_ps();
    for (int64_t i = r0; i < r1;) {
      const int64_t b = block_of(w, i);
      const int64_t end = std::min(r1, (b + 1) * bs);
      const float s = block_scale(w.scales, b);
      float sc[MB] = {};  // scalar head/tail of this segment
      int64_t j = i;
      if (j & 1) {
        const float c = kNF4Codebook[code_at(w.packed, j)];
        for (int m = 0; m < MB; ++m) sc[m] += c * x[m * ldx + (j - r0)];
        ++j;
      }
      __m512 a0[MB], a1[MB];
      for (int m = 0; m < MB; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
      for (; j + 32 <= end; j += 32) {  // 16 bytes, 32 codes
        __m512i c0, c1;
        // stream ahead (~2K codes): the decode step is too short for the hardware prefetcher alone
        _mm_prefetch(reinterpret_cast<const char*>(w.packed + (j >> 1)) + 1024, _MM_HINT_T0);
        codes32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.packed + (j >> 1))), c0, c1);
        const __m512 d0 = _mm512_permutexvar_ps(c0, lut), d1 = _mm512_permutexvar_ps(c1, lut);
        const float* xk = x + (j - r0);
        for (int m = 0; m < MB; ++m) {
          a0[m] = _mm512_fmadd_ps(d0, _mm512_loadu_ps(xk + m * ldx), a0[m]);
          a1[m] = _mm512_fmadd_ps(d1, _mm512_loadu_ps(xk + m * ldx + 16), a1[m]);
        }
      }
      if (j + 16 <= end) {  // 8 bytes, 16 codes
        __m512i c0, c1;
        codes32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.packed + (j >> 1))), c0, c1);
        const __m512 d0 = _mm512_permutexvar_ps(c0, lut);
        for (int m = 0; m < MB; ++m) a0[m] = _mm512_fmadd_ps(d0, _mm512_loadu_ps(x + m * ldx + (j - r0)), a0[m]);
        j += 16;
      }
      const __m512 sv = _mm512_set1_ps(s);
      for (int m = 0; m < MB; ++m) tot[m] = _mm512_fmadd_ps(_mm512_add_ps(a0[m], a1[m]), sv, tot[m]);
      for (; j < end; ++j) {
        const float c = kNF4Codebook[code_at(w.packed, j)];
        for (int m = 0; m < MB; ++m) sc[m] += c * x[m * ldx + (j - r0)];
      }
      for (int m = 0; m < MB; ++m) tot_s[m] += sc[m] * s;
      i = end;
    }
    for (int m = 0; m < MB; ++m) y[m * ldy + n] = _mm512_reduce_add_ps(tot[m]) + tot_s[m];
  }
}

}  // namespace

void nf4_gemv_rows_avx512(int MB, const NF4Matrix& w, const float* x, int64_t ldx, float* y, int64_t ldy,
                          int64_t n0, int64_t n1) {
  switch (MB) {
    case 1: rows512<1>(w, x, ldx, y, ldy, n0, n1); break;
    case 2: rows512<2>(w, x, ldx, y, ldy, n0, n1); break;
    case 3: rows512<3>(w, x, ldx, y, ldy, n0, n1); break;
    default: rows512<4>(w, x, ldx, y, ldy, n0, n1); break;
  }
}
#pragma GCC pop_options

#else  // no AVX-512 target support in this compiler: never selected

bool nf4_cpu_has_avx512() { return false; }
void nf4_gemv_rows_avx512(int, const NF4Matrix&, const float*, int64_t, float*, int64_t, int64_t, int64_t) {}

#endif

}  // namespace cpu
}  // namespace lowrank_ext
