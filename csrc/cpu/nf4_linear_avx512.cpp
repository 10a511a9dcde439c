// cpu/nf4_linear_avx512.cpp — the NF4 GEMV rows kernel for CPUs with AVX-512 (picked at run time;
// the rest of the build targets AVX2). Same math as gemv_rows in nf4_linear_kernels.cpp:
//   per segment (one block inside one row of W): acc[m] = Σ_k NF4[code_k] · x[m, k];  tot[m] += scale · acc[m]
// What AVX-512 buys: the 16-entry codebook fits one zmm register, so decoding 16 codes is one
// vpermps on zero-extended nibbles (AVX2 needs two permutes and a blend per 8 codes).
// The bf16 decode: a per-block 16-entry bf16 LUT (the fp32 products NF4[c]·scale rounded to nearest even)
// in one zmm, 32 codes looked up per vpermw (AVX512-BW).
// Only these functions are compiled for AVX-512 (target pragma); nothing here runs unless
// cpu_isa() >= avx512 (csrc/cpu/cpu_isa.h).

#include "nf4_linear_kernels.h"

#include <algorithm>

#include "avx512_intrinsics.h"  // <immintrin.h>, and GCC 12's false warning in it silenced

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define LRX_HAVE_AVX512_TARGET 1
#endif

namespace lowrank_ext {
namespace cpu {

#if LRX_HAVE_AVX512_TARGET

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")
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
    for (int m = 0; m < MB; ++m) y[m * ldy + (n - n0)] = _mm512_reduce_add_ps(tot[m]) + tot_s[m];
  }
}

// The blocked GEMV: every row of W starts on a block boundary (K % blocksize == 0; blocksize % 32 == 0 always).
// x comes de-interleaved per 32-element group g (nf4_deinterleave_x): xp[32g + e] = x[32g + 2e] and
// xp[32g + 16 + e] = x[32g + 2e + 1], e < 16 — so the 16 bytes of a group need no interleave: byte e holds
// element 2e (high nibble) and 2e + 1 (low nibble). vpermps reads only the low 4 bits of each index, so the
// zero-extended bytes index the low nibbles directly and (bytes >> 4) the high ones:
//   per group:  acc += NF4[byte >> 4] · xp[even half] + NF4[byte & 15] · xp[odd half]
//   per block:  tot += scale(b) · acc      (two tot chains, even and odd blocks, so the FMA latency overlaps)
// One block of the blocked GEMV for MB rows of x: G groups of 32 codes (G = blocksize / 32; a template
// constant for the common blocksizes, so the group loop unrolls; 0: read at run time).
//   acc_e/acc_o: even / odd halves of each group (two FMA chains);  tot[m] += scale · (acc_e + acc_o)
template <int MB, int G>
inline void block512(const uint8_t* p, const float* xb, int64_t K, int64_t groups, __m512 lut, float scale,
                     __m512* tot) {
  __m512 acc_e[MB], acc_o[MB];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) acc_e[m] = acc_o[m] = _mm512_setzero_ps();
  const int64_t ng = G > 0 ? G : groups;
#pragma GCC unroll 8
  for (int64_t g = 0; g < ng; ++g) {
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * g)));
    const __m512 d_odd = _mm512_permutexvar_ps(idx, lut);                         // low nibbles
    const __m512 d_even = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), lut);  // high nibbles
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      acc_e[m] = _mm512_fmadd_ps(d_even, _mm512_loadu_ps(xb + m * K + 32 * g), acc_e[m]);
      acc_o[m] = _mm512_fmadd_ps(d_odd, _mm512_loadu_ps(xb + m * K + 32 * g + 16), acc_o[m]);
    }
  }
  const __m512 sv = _mm512_set1_ps(scale);
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) tot[m] = _mm512_fmadd_ps(_mm512_add_ps(acc_e[m], acc_o[m]), sv, tot[m]);
}

// Rows [n0, n1) of W against MB rows of the de-interleaved x. Blocks go two at a time into two tot
// accumulators (t0, t1), so consecutive blocks' FMA chains overlap.
template <int MB, int G>
void rows512_blocked(const NF4Matrix& w, const float* xp, int64_t K, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t bs = w.blocksize, groups = bs / 32, nblk = K / bs, half = bs / 2;
  const __m512 lut = _mm512_loadu_ps(kNF4Codebook);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* p = w.packed + (n * K >> 1);
    const float* xb = xp;
    int64_t b = n * nblk;  // first block of row n
    __m512 t0[MB], t1[MB];
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) t0[m] = t1[m] = _mm512_setzero_ps();
    int64_t kb = 0;
    for (; kb + 2 <= nblk; kb += 2, b += 2, p += 2 * half, xb += 2 * bs) {
      _mm_prefetch(reinterpret_cast<const char*>(p) + 1024, _MM_HINT_T0);  // stream ahead of the decode
      block512<MB, G>(p, xb, K, groups, lut, block_scale(w.scales, b), t0);
      block512<MB, G>(p + half, xb + bs, K, groups, lut, block_scale(w.scales, b + 1), t1);
    }
    if (kb < nblk) block512<MB, G>(p, xb, K, groups, lut, block_scale(w.scales, b), t0);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) y[m * ldy + (n - n0)] = _mm512_reduce_add_ps(_mm512_add_ps(t0[m], t1[m]));
  }
}

template <int MB>
void rows512_blocked_bs(const NF4Matrix& w, const float* xp, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  switch (w.blocksize) {
    case 32: rows512_blocked<MB, 1>(w, xp, w.K, y, ldy, n0, n1); break;
    case 64: rows512_blocked<MB, 2>(w, xp, w.K, y, ldy, n0, n1); break;
    case 128: rows512_blocked<MB, 4>(w, xp, w.K, y, ldy, n0, n1); break;
    default: rows512_blocked<MB, 0>(w, xp, w.K, y, ldy, n0, n1); break;
  }
}

// The 16 bf16 values RNE(NF4[c] · s) (c10::BFloat16's rounding, NaN -> 0x7FC0) in the low 256 bits.
inline __m512i bf16_lut(__m512 book, float s) {
  const __m512 prod = _mm512_mul_ps(book, _mm512_set1_ps(s));  // the same fp32 products as the scalar path
  const __m512i u = _mm512_castps_si512(prod);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(prod, prod, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_zextsi256_si512(_mm512_cvtepi32_epi16(r));
}

}  // namespace

void nf4_decode_span_bf16_avx512(const NF4Matrix& w, int64_t i0, int64_t i1, uint16_t* out) {
  const __m512 book = _mm512_loadu_ps(kNF4Codebook);
  const __m128i nib = _mm_set1_epi8(0x0F);
  for (int64_t i = i0; i < i1;) {
    const int64_t b = block_of(w, i);
    const int64_t end = std::min(i1, (b + 1) * w.blocksize);
    const __m512i lut = bf16_lut(book, block_scale(w.scales, b));
    alignas(64) uint16_t lut_s[32];
    _mm512_store_si512(lut_s, lut);
    uint16_t* o = out + (i - i0);
    int64_t j = i;
    if (j & 1) *o++ = lut_s[code_at(w.packed, j++)];
    for (; j + 32 <= end; j += 32, o += 32) {  // 16 bytes -> 32 codes in flat order -> 32 bf16
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.packed + (j >> 1)));
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib);  // even elements
      const __m128i lo = _mm_and_si128(bytes, nib);                     // odd elements
      const __m256i codes = _mm256_set_m128i(_mm_unpackhi_epi8(hi, lo), _mm_unpacklo_epi8(hi, lo));
      _mm512_storeu_si512(o, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(codes), lut));
    }
    for (; j < end; ++j) *o++ = lut_s[code_at(w.packed, j)];
    i = end;
  }
}

void nf4_gemv_rows_blocked_avx512(int MB, const NF4Matrix& w, const float* xp, float* y, int64_t ldy, int64_t n0,
                                  int64_t n1) {
  switch (MB) {
    case 1: rows512_blocked_bs<1>(w, xp, y, ldy, n0, n1); break;
    case 2: rows512_blocked_bs<2>(w, xp, y, ldy, n0, n1); break;
    case 3: rows512_blocked_bs<3>(w, xp, y, ldy, n0, n1); break;
    default: rows512_blocked_bs<4>(w, xp, y, ldy, n0, n1); break;
  }
}

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

void nf4_gemv_rows_avx512(int, const NF4Matrix&, const float*, int64_t, float*, int64_t, int64_t, int64_t) {}
void nf4_decode_span_bf16_avx512(const NF4Matrix&, int64_t, int64_t, uint16_t*) {}
void nf4_gemv_rows_blocked_avx512(int, const NF4Matrix&, const float*, float*, int64_t, int64_t, int64_t) {}

#endif

}  // namespace cpu
}  // namespace lowrank_ext
