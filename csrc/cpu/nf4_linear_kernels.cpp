// cpu/nf4_linear_kernels.cpp — NF4 tile decode, streaming NF4 GEMV and row norms on CPU (AVX2 + FMA).
//
//   decode: out[n, k]   = NF4[code(n*K + k)] * scale(block)           (fp32 tile, caller-sized)
//   gemv:   y[m, n]     = Σ_blocks scale(b) · Σ_{k in b} NF4[code] · x[m, k]    (fp32 accumulate)
//   sqnorm: sq[n]       = Σ_k deq(W)[n, k]²
// W flat row-major [N, K], two codes per byte (even flat index in the high nibble). A row of W may
// start on an odd flat index (odd K) and blocks may straddle rows (K not a multiple of blocksize):
// every loop walks "segments" = the part of one block inside one row, with a scalar head/tail.
// Only ATen/Parallel.h from torch: this file compiles fast.

#include "nf4_linear_kernels.h"

#include <ATen/Parallel.h>

#include "cpu_isa.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LRX_CPU_AVX2 1
#endif

namespace lowrank_ext {
namespace cpu {
namespace {

#if LRX_CPU_AVX2
// The 8 codes of 4 consecutive bytes (little-endian word): element e is byte e/2, high nibble first.
inline __m256i codes8(uint32_t word) {
  const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
  const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts);
  return _mm256_and_si256(v, _mm256_set1_epi32(0x0F));
}

// 16-entry fp32 lookup held in two registers: permute by the low 3 bits, pick the half by bit 3
// (shifted into the sign bit for blendv).
inline __m256 lut16(__m256i idx, __m256 lo, __m256 hi) {
  const __m256 a = _mm256_permutevar8x32_ps(lo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}
#endif

// Decode flat elements [i0, i1) into out[0, i1 - i0).
template <typename T>
void decode_span(const NF4Matrix& w, int64_t i0, int64_t i1, T* out) {
  int64_t i = i0;
  while (i < i1) {
    const int64_t b = block_of(w, i);
    const int64_t end = std::min(i1, (b + 1) * w.blocksize);
    const float s = block_scale(w.scales, b);
    float lut[16];  // NF4[c] * scale: the exact fp32 product of the format
    for (int c = 0; c < 16; ++c) lut[c] = kNF4Codebook[c] * s;
    T* o = out + (i - i0);
    int64_t j = i;
    if (j & 1) *o++ = static_cast<T>(lut[code_at(w.packed, j++)]);
#if LRX_CPU_AVX2
    if constexpr (sizeof(T) == sizeof(float)) {
      const __m256 lo = _mm256_loadu_ps(lut), hi = _mm256_loadu_ps(lut + 8);
      for (; j + 8 <= end; j += 8, o += 8) _mm256_storeu_ps(o, lut16(codes8(load_u32(w.packed + (j >> 1))), lo, hi));
    }
#endif
    for (; j < end; ++j) *o++ = static_cast<T>(lut[code_at(w.packed, j)]);
    i = end;
  }
}

template <typename T, typename Span>
void decode_tile(const NF4Matrix& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, T* out, int64_t ld,
                 Span span) {
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, k1 - k0));
  at::parallel_for(n0, n1, grain, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) span(w, n * w.K + k0, n * w.K + k1, out + (n - n0) * ld);
  });
}

// MB rows of x (1..4) against rows [n0, n1) of W. Per segment (one block inside one row):
//   acc[m] = Σ_k NF4[code_k] · x[m, k]   (two vector accumulators per m, 16 codes per step)
//   tot[m] += scale · acc[m]             (one multiply per block instead of one per element)
constexpr int64_t kPrefetchBytes = 1024;  // ~2K codes ahead of the decode

template <int MB>
void gemv_rows(const NF4Matrix& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t K = w.K, bs = w.blocksize;
#if LRX_CPU_AVX2
  const __m256 lo = _mm256_loadu_ps(kNF4Codebook), hi = _mm256_loadu_ps(kNF4Codebook + 8);
#endif
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t r0 = n * K, r1 = r0 + K;  // flat range of row n
    float tot_s[MB] = {};
#if LRX_CPU_AVX2
    __m256 tot[MB];
    for (int m = 0; m < MB; ++m) tot[m] = _mm256_setzero_ps();
#endif
    for (int64_t i = r0; i < r1;) {
      const int64_t b = block_of(w, i);
      const int64_t end = std::min(r1, (b + 1) * bs);
      const float s = block_scale(w.scales, b);
      float sc[MB] = {};  // scalar head/tail part of this segment
      int64_t j = i;
      if (j & 1) {
        const float c = kNF4Codebook[code_at(w.packed, j)];
        for (int m = 0; m < MB; ++m) sc[m] += c * x[m * ldx + (j - r0)];
        ++j;
      }
#if LRX_CPU_AVX2
      __m256 a0[MB], a1[MB];
      for (int m = 0; m < MB; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
      for (; j + 16 <= end; j += 16) {
        const uint8_t* p = w.packed + (j >> 1);
        // stream ahead: a decode step is short enough that the hardware prefetcher alone lags DRAM
        _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T0);
        const __m256 d0 = lut16(codes8(load_u32(p)), lo, hi);
        const __m256 d1 = lut16(codes8(load_u32(p + 4)), lo, hi);
        const float* xk = x + (j - r0);
        for (int m = 0; m < MB; ++m) {
          a0[m] = _mm256_fmadd_ps(d0, _mm256_loadu_ps(xk + m * ldx), a0[m]);
          a1[m] = _mm256_fmadd_ps(d1, _mm256_loadu_ps(xk + m * ldx + 8), a1[m]);
        }
      }
      for (; j + 8 <= end; j += 8) {
        const __m256 d0 = lut16(codes8(load_u32(w.packed + (j >> 1))), lo, hi);
        for (int m = 0; m < MB; ++m) a0[m] = _mm256_fmadd_ps(d0, _mm256_loadu_ps(x + m * ldx + (j - r0)), a0[m]);
      }
      const __m256 sv = _mm256_set1_ps(s);
      for (int m = 0; m < MB; ++m) tot[m] = _mm256_fmadd_ps(_mm256_add_ps(a0[m], a1[m]), sv, tot[m]);
#endif
      for (; j < end; ++j) {
        const float c = kNF4Codebook[code_at(w.packed, j)];
        for (int m = 0; m < MB; ++m) sc[m] += c * x[m * ldx + (j - r0)];
      }
      for (int m = 0; m < MB; ++m) tot_s[m] += sc[m] * s;
      i = end;
    }
    for (int m = 0; m < MB; ++m) {
#if LRX_CPU_AVX2
      y[m * ldy + n] = hsum(tot[m]) + tot_s[m];
#else
      y[m * ldy + n] = tot_s[m];
#endif
    }
  }
}

}  // namespace

void nf4_decode_tile(const NF4Matrix& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* out, int64_t ld) {
  decode_tile(w, n0, n1, k0, k1, out, ld, decode_span<float>);
}

void nf4_decode_tile(const NF4Matrix& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, double* out, int64_t ld) {
  decode_tile(w, n0, n1, k0, k1, out, ld, decode_span<double>);
}

// bf16 panels are only taken where cpu_isa() >= avx512bf16 (nf4_linear.cpp), so the AVX-512 decoder is the only one.
void nf4_decode_tile(const NF4Matrix& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, uint16_t* out, int64_t ld) {
  decode_tile(w, n0, n1, k0, k1, out, ld, nf4_decode_span_bf16_avx512);
}

const char* nf4_gemv_nt(const NF4Matrix& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy) {
  // Rows of W are independent: split them over threads (at least ~64K weights per task: below
  // that an OpenMP region costs more than it saves).
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, w.K));
  const bool avx512 = cpu_isa() >= CpuIsa::kAvx512;
  if (avx512 && w.K % w.blocksize == 0) {  // every row starts on a block: the blocked kernel
    std::vector<float> xp(static_cast<size_t>(M * w.K));
    nf4_deinterleave_x(x, M, ldx, w.K, xp.data());
    at::parallel_for(0, w.N, grain, [&](int64_t n0, int64_t n1) {
      for (int64_t m0 = 0; m0 < M; m0 += 4)
        nf4_gemv_rows_blocked_avx512(static_cast<int>(std::min<int64_t>(4, M - m0)), w, xp.data() + m0 * w.K,
                                     y + m0 * ldy, ldy, n0, n1);
    });
    return "gemv-avx512-blocked";
  }
  at::parallel_for(0, w.N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      if (avx512) {
        nf4_gemv_rows_avx512(static_cast<int>(std::min<int64_t>(4, M - m0)), w, x + m0 * ldx, ldx, y + m0 * ldy,
                             ldy, n0, n1);
        continue;
      }
      const float* xm = x + m0 * ldx;
      float* ym = y + m0 * ldy;
      switch (std::min<int64_t>(4, M - m0)) {
        case 1: gemv_rows<1>(w, xm, ldx, ym, ldy, n0, n1); break;
        case 2: gemv_rows<2>(w, xm, ldx, ym, ldy, n0, n1); break;
        case 3: gemv_rows<3>(w, xm, ldx, ym, ldy, n0, n1); break;
        default: gemv_rows<4>(w, xm, ldx, ym, ldy, n0, n1); break;
      }
    }
  });
#if LRX_CPU_AVX2
  return avx512 ? "gemv-avx512" : "gemv-avx2";
#else
  return avx512 ? "gemv-avx512" : "gemv-scalar";
#endif
}

void nf4_row_sqnorm(const NF4Matrix& w, float* out) {
  at::parallel_for(0, w.N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      double acc = 0.0;
      for (int64_t i = n * w.K, r1 = i + w.K; i < r1;) {
        const int64_t b = block_of(w, i);
        const int64_t end = std::min(r1, (b + 1) * w.blocksize);
        const float s = block_scale(w.scales, b);
        for (; i < end; ++i) {
          const double v = static_cast<double>(kNF4Codebook[code_at(w.packed, i)] * s);  // fp32 deq value
          acc += v * v;
        }
      }
      out[n] = static_cast<float>(acc);
    }
  });
}

}  // namespace cpu
}  // namespace lowrank_ext
