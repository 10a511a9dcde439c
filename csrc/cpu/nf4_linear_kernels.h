// cpu/nf4_linear_kernels.h — torch-free CPU kernels behind the fused NF4 matmul ops (csrc/cpu/nf4_linear.cpp).
//
// W is an NF4 [N, K] weight: flat row-major index i = n*K + k, block b = i / blocksize,
//   deq(W)[n, k] = NF4[code(i)] * scale(b)        (fp32, the value every kernel computes with)
// Nothing here materializes deq(W) beyond the tile a caller asks for.
#pragma once

#include <cstdint>
#include <memory>

#include "lowrank_ext/nf4.h"

namespace lowrank_ext {
namespace cpu {

struct NF4Matrix {
  const uint8_t* packed;  // ceil(N*K/2) bytes, even flat index in the high nibble
  NF4Scales scales;       // per-block absmax (plain fp32 or double-quantized)
  int64_t blocksize;
  int64_t N, K;           // out_features, in_features
};

// Per-TU helpers (anonymous namespace: files compiled for different ISAs must not share one copy).
namespace {

// Code of flat element i: high nibble of byte i/2 for even i, low nibble for odd i.
inline int code_at(const uint8_t* packed, int64_t i) {
  const uint8_t byte = packed[i >> 1];
  return (i & 1) ? (byte & 0x0F) : (byte >> 4);
}

// absmax_hat[b] = map[qabsmax[b]] * absmax2[b / 256] + offset with TWO roundings, as bitsandbytes
// computes it (two tensor ops). GCC contracts a*b+c into one FMA in C++ unless built with
// -ffp-contract=off; the empty asm forces the product to be rounded to fp32 first.
inline float block_scale(const NF4Scales& s, int64_t b) {
  if (s.qabsmax == nullptr) return s.absmax_f32[b];  // (not s.double_quant(): no shared inline symbol)
  float prod = s.nested_map[s.qabsmax[b]] * s.absmax2[b / kNestedBlocksize];
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm volatile("" : "+x"(prod));
#else
  volatile float rounded = prod;
  prod = rounded;
#endif
  return prod + *s.offset;
}

// Block of flat index i. blocksize is a power of two: a shift, not a 64-bit division (~40 cycles
// per block of 64 elements would cost more than decoding them).
inline int64_t block_of(const NF4Matrix& w, int64_t i) { return i >> __builtin_ctzll(static_cast<uint64_t>(w.blocksize)); }

}  // namespace

// Largest M that takes the streaming GEMV path (decode each packed byte once per 4 rows of x).
constexpr int64_t kGemvMaxM = 8;

// out[(n - n0) * ld + (k - k0)] = deq(W)[n, k] for n in [n0, n1), k in [k0, k1). Parallel over rows.
// The double version rounds the fp32 value exactly once more (to double: exact), for the gradcheck path.
void nf4_decode_tile(const NF4Matrix& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* out, int64_t ld);
void nf4_decode_tile(const NF4Matrix& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, double* out, int64_t ld);
// bf16 tile (the bits of c10::BFloat16): each fp32 value deq(W)[n, k] rounded to bf16 once (nearest even).
// AVX-512 only: call it only where cpu_isa() >= avx512 (the bf16 panels need avx512bf16).
void nf4_decode_tile(const NF4Matrix& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, uint16_t* out, int64_t ld);

// y[m * ldy + n] = Σ_k x[m * ldx + k] · deq(W)[n, k]   for m < M (M small), all n. fp32 accumulate.
// Streams the packed bytes once per 4 rows of x; parallel over rows of W. Returns the rows kernel that ran
// ("gemv-avx512", "gemv-avx512-blocked", "gemv-avx2" or "gemv-scalar": kernel_path.h).
// Threads: the calling one and helpers from torch's inter-op pool; the call never waits for a helper that is not
// running (nf4_linear_kernels.cpp, split_rows), so a helper may still read W after it returned: `owner` must keep
// the memory W's pointers point into alive (the tensors; nullptr only where W outlives every thread).
const char* nf4_gemv_nt(const NF4Matrix& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy,
                        std::shared_ptr<const void> owner);

// The AVX-512 kernels (csrc/cpu/nf4_linear_avx512.cpp; run only where cpu_isa() >= avx512): the GEMV rows
// kernel (MB = 1..4 rows of x), and the bf16 decode of flat elements [i0, i1) into out[0, i1 - i0).
// The GEMV rows kernels write rows [n0, n1) of W's outputs from y on: y[m * ldy + (n - n0)].
void nf4_gemv_rows_avx512(int MB, const NF4Matrix& w, const float* x, int64_t ldx, float* y, int64_t ldy,
                          int64_t n0, int64_t n1);
void nf4_decode_span_bf16_avx512(const NF4Matrix& w, int64_t i0, int64_t i1, uint16_t* out);
// The blocked GEMV rows kernel (rows of W start on block boundaries: K % blocksize == 0), x de-interleaved
// by nf4_deinterleave_x (MB rows of K floats, ld K).
void nf4_gemv_rows_blocked_avx512(int MB, const NF4Matrix& w, const float* xp, float* y, int64_t ldy, int64_t n0,
                                  int64_t n1);

// xp[m*K + 32g + e] = x[m*ldx + 32g + 2e], xp[m*K + 32g + 16 + e] = x[m*ldx + 32g + 2e + 1] (K % 32 == 0).
inline void nf4_deinterleave_x(const float* x, int64_t M, int64_t ldx, int64_t K, float* xp) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < K; g += 32)
      for (int e = 0; e < 16; ++e) {
        xp[m * K + g + e] = x[m * ldx + g + 2 * e];
        xp[m * K + g + 16 + e] = x[m * ldx + g + 2 * e + 1];
      }
}

// out[n] = Σ_k deq(W)[n, k]²   (accumulated in double, stored as fp32)
void nf4_row_sqnorm(const NF4Matrix& w, float* out);

}  // namespace cpu
}  // namespace lowrank_ext
