// cpu/nf4_linear_kernels.h — torch-free CPU kernels behind the fused NF4 matmul ops (csrc/cpu/nf4_linear.cpp).
//
// W is an NF4 [N, K] weight: flat row-major index i = n*K + k, block b = i / blocksize,
//   deq(W)[n, k] = NF4[code(i)] * scale(b)        (fp32, the value every kernel computes with)
// Nothing here materializes deq(W) beyond the tile a caller asks for.
#pragma once

#include <cstdint>

#include "lowrank_ext/nf4.h"

namespace lowrank_ext {
namespace cpu {

struct NF4Matrix {
  const uint8_t* packed;  // ceil(N*K/2) bytes, even flat index in the high nibble
  NF4Scales scales;       // per-block absmax (plain fp32 or double-quantized)
  int64_t blocksize;
  int64_t N, K;           // out_features, in_features
};

// Largest M that takes the streaming GEMV path (decode each packed byte once per 4 rows of x).
constexpr int64_t kGemvMaxM = 8;

// out[(n - n0) * ld + (k - k0)] = deq(W)[n, k] for n in [n0, n1), k in [k0, k1). Parallel over rows.
// The double version rounds the fp32 value exactly once more (to double: exact), for the gradcheck path.
void nf4_decode_tile(const NF4Matrix& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* out, int64_t ld);
void nf4_decode_tile(const NF4Matrix& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, double* out, int64_t ld);

// y[m * ldy + n] = Σ_k x[m * ldx + k] · deq(W)[n, k]   for m < M (M small), all n. fp32 accumulate.
// Streams the packed bytes once per 4 rows of x; parallel over rows of W.
void nf4_gemv_nt(const NF4Matrix& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy);

// out[n] = Σ_k deq(W)[n, k]²   (accumulated in double, stored as fp32)
void nf4_row_sqnorm(const NF4Matrix& w, float* out);

}  // namespace cpu
}  // namespace lowrank_ext
