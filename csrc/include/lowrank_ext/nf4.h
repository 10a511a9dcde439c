// nf4.h — the NF4 format, shared by host and device code. No torch headers (usable in .cuh kernels).
//
// Format (bitsandbytes' quant_type="nf4" layout, docs/format.md):
//   flat index i of the row-major weight, block b = i / blocksize
//   absmax[b]   = max |x| over block b (fp32)
//   code[i]     = #{ midpoints (c[j]+c[j+1])/2 strictly below x * (1/absmax[b]) }   (ties -> lower code)
//   byte j      = (code[2j] << 4) | code[2j+1]          (even flat index in the HIGH nibble)
//   deq(x_i)    = NF4[code[i]] * absmax_hat[b]          (fp32, rounded once to the output dtype)
// Double quant of absmax (nested blocks of 256):
//   offset = mean(absmax); c = absmax - offset; absmax2[j] = max |c| over nested block j
//   qabsmax[b] = nearest entry of the signed dynamic map to c[b] * (1/absmax2[b/256])
//   absmax_hat[b] = map[qabsmax[b]] * absmax2[b/256] + offset
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LRX_HOST_DEVICE __host__ __device__ __forceinline__
#define LRX_UNROLL _Pragma("unroll")
#else
#define LRX_HOST_DEVICE inline
#define LRX_UNROLL
#endif

namespace lowrank_ext {

constexpr int kNestedBlocksize = 256;  // double-quant block size, fixed by the bitsandbytes format
constexpr uint8_t kNF4ZeroCode = 7;    // code of exact 0.0; pads the odd last nibble

// The 16 NF4 levels (quantiles of N(0,1) normalised to [-1, 1]), code 0..15.
#define LRX_NF4_CODEBOOK                                                                              \
  {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f, \
   -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,  \
   0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,           \
   0.7229568362236023f, 1.0f}

constexpr float kNF4Codebook[16] = LRX_NF4_CODEBOOK;

// Midpoints between consecutive levels, computed in fp32 exactly as (c[i] + c[i+1]) / 2.
LRX_HOST_DEVICE float nf4_midpoint(int i) {
  constexpr float c[16] = LRX_NF4_CODEBOOK;
  return (c[i] + c[i + 1]) * 0.5f;
}

// Encode a scaled value s (x / absmax, nominally in [-1, 1]): number of midpoints strictly below s.
// Branch-free binary search over the 15 sorted midpoints: 4 comparisons.
LRX_HOST_DEVICE uint8_t nf4_encode(float s) {
  constexpr float c[16] = LRX_NF4_CODEBOOK;
  // mid(i) = (c[i] + c[i+1]) / 2; code = #{i : mid(i) < s}
  int code = 0;
  LRX_UNROLL
  for (int step = 8; step >= 1; step >>= 1) {
    const int probe = code + step - 1;  // candidate midpoint index
    if (probe < 15 && (c[probe] + c[probe + 1]) * 0.5f < s) code += step;
  }
  return static_cast<uint8_t>(code);
}

// The two codes of a packed byte: even flat index in the high nibble.
LRX_HOST_DEVICE uint8_t nf4_high(uint8_t byte) { return byte >> 4; }
LRX_HOST_DEVICE uint8_t nf4_low(uint8_t byte) { return byte & 0x0F; }
LRX_HOST_DEVICE uint8_t nf4_pack(uint8_t even_code, uint8_t odd_code) {
  return static_cast<uint8_t>((even_code << 4) | odd_code);
}

// fp32 multiply and add with round-to-nearest and no FMA contraction (nvcc contracts a*b+c by
// default, and so does g++ for C++ even in -std=c++20 mode with -mfma: -ffp-contract=fast is its C++
// default; bitsandbytes computes the nested absmax as two separately rounded operations).
LRX_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  volatile float p = a * b;  // a rounded fp32 product the compiler cannot fuse into a following add
  return p;
#endif
}
LRX_HOST_DEVICE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// Decoded absmax of block b: plain fp32 absmax, or the double-quantized form.
//   nested == nullptr  ->  absmax_f32[b]
//   else               ->  map[qabsmax[b]] * absmax2[b / 256] + offset
struct NF4Scales {
  const float* absmax_f32 = nullptr;     // [nblocks] when not double-quantized
  const uint8_t* qabsmax = nullptr;      // [nblocks] when double-quantized
  const float* absmax2 = nullptr;        // [ceil(nblocks / 256)]
  const float* nested_map = nullptr;     // [256] signed dynamic map
  const float* offset = nullptr;         // [1] mean of the original absmax (a pointer: no host sync)

  LRX_HOST_DEVICE bool double_quant() const { return qabsmax != nullptr; }
  LRX_HOST_DEVICE float block_scale(int64_t b) const {
    if (qabsmax == nullptr) return absmax_f32[b];
    return add_rn(mul_rn(nested_map[qabsmax[b]], absmax2[b / kNestedBlocksize]), *offset);
  }
};

}  // namespace lowrank_ext
