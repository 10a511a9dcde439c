// cpu/fused_vec.h — the vector types the fused model-op kernels (fused_*_kernel.h) are written against, and
// the bf16 storage type. Torch-free. One kernel source serves every instruction set: a kernel is a
// template over `V`, and each ISA translation unit (fused_kernels_avx2.cpp, fused_kernels_avx512.cpp)
// instantiates it with its own V, compiled for its own target.
//
// V's interface (all lanes fp32, or fp64 for the scalar float64 path):
//   V::N                lanes;  V::load(const T*) / v.store(T*) for T = float, bf16 (and double for VecF64)
//   V::set1(x), + - * /, V::fma(a, b, c) = a·b + c, v.sum() (horizontal), v.exp() (lane-wise e^x)
// bf16 loads widen exactly (bits << 16); bf16 stores round to nearest even, NaN stays NaN (as
// c10::BFloat16 rounds), so "bf16 in, fp32 math, bf16 out" rounds each output once.
//
// Everything here lives in the inline namespace LRX_FUSED_ISA: the AVX-512 translation unit defines it as
// isa_avx512 before including, so the copies it compiles for AVX-512 never merge (ODR) with the baseline
// copies the rest of the build calls.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fused_kernels.h"

#ifndef LRX_FUSED_ISA
#define LRX_FUSED_ISA isa_baseline
#endif

namespace lowrank_ext {
namespace cpu {
inline namespace LRX_FUSED_ISA {

inline float bf16_to_float(bf16 b) {
  const uint32_t u = uint32_t{b.bits} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even: add 0x7FFF plus the lowest kept bit, then truncate (NaN: the quiet NaN 0x7FC0).
inline bf16 float_to_bf16(float f) {
  if (std::isnan(f)) return bf16{0x7FC0};
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}

// The float64 path (gradcheck, the readable spec): one fp64 lane, the same kernel source.
struct VecF64 {
  using F = double;
  static constexpr int N = 1;
  double v;
  static VecF64 load(const double* p) { return {*p}; }
  void store(double* p) const { *p = v; }
  static VecF64 set1(double x) { return {x}; }
  static VecF64 fma(VecF64 a, VecF64 b, VecF64 c) { return {a.v * b.v + c.v}; }
  double sum() const { return v; }
  VecF64 exp() const { return {std::exp(v)}; }
  VecF64 operator+(VecF64 b) const { return {v + b.v}; }
  VecF64 operator-(VecF64 b) const { return {v - b.v}; }
  VecF64 operator*(VecF64 b) const { return {v * b.v}; }
  VecF64 operator/(VecF64 b) const { return {v / b.v}; }
};

// Loads/stores of the n <= V::N elements at p (a row's tail): through a zero-padded buffer, so a tail runs
// the same vector code as the body (padding lanes are 0 and never stored).
template <class V, class T>
inline V load_n(const T* p, int64_t n) {
  if constexpr (V::N == 1) {
    return V::load(p);  // n is 1
  } else {
    if (n == V::N) return V::load(p);
    T buf[V::N] = {};
    std::memcpy(buf, p, sizeof(T) * n);
    return V::load(buf);
  }
}

template <class V, class T>
inline void store_n(T* p, V v, int64_t n) {
  if constexpr (V::N == 1) {
    v.store(p);  // n is 1
  } else {
    if (n == V::N) return v.store(p);
    T buf[V::N];
    v.store(buf);
    std::memcpy(p, buf, sizeof(T) * n);
  }
}

// e^x for fp32 lanes: 2^n · e^r with n = round(x·log2 e), r = x − n·ln2 (ln2 split in two so n·ln2_hi is
// exact), e^r by Cephes' expf polynomial (|r| <= ln2/2, ~1 ulp). x is clamped to [-87, 88] so 2^n stays a
// normal float; silu and sigmoid never need e^x below e^-87 ≈ 1.6e-38.
template <class V>
inline V exp_f32(V x) {
  x = V::min(V::max(x, V::set1(-87.0f)), V::set1(88.0f));
  const V n = (x * V::set1(1.44269504088896341f)).round();
  V r = V::fma(n, V::set1(-0.693359375f), x);  // ln2_hi: 8 significant bits, n·ln2_hi exact
  r = V::fma(n, V::set1(2.12194440e-4f), r);   // ln2 = 0.693359375 − 2.12194440e-4
  V p = V::set1(1.9875691500e-4f);
  p = V::fma(p, r, V::set1(1.3981999507e-3f));
  p = V::fma(p, r, V::set1(8.3334519073e-3f));
  p = V::fma(p, r, V::set1(4.1665795894e-2f));
  p = V::fma(p, r, V::set1(1.6666665459e-1f));
  p = V::fma(p, r, V::set1(5.0000001201e-1f));
  p = V::fma(p, r * r, r + V::set1(1.0f));  // e^r = 1 + r + r²·p(r)
  return V::ldexp(p, n);
}

}  // namespace LRX_FUSED_ISA
}  // namespace cpu
}  // namespace lowrank_ext
