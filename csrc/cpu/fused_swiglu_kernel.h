// cpu/fused_swiglu_kernel.h — SwiGLU elementwise kernels, forward and backward; the math is in
// fused_kernels.h (SwiGluSpan). V: vector type (fused_vec.h), T: storage (float, bf16, double).
// σ(g) = 1 / (1 + e^−g) is recomputed in backward (nothing but gate and up is saved).
#pragma once

#include "fused_vec.h"

namespace lowrank_ext {
namespace cpu {
inline namespace LRX_FUSED_ISA {

template <class V>
inline V sigmoid(V g) {
  const V one = V::set1(1);
  return one / (one + (V::set1(0) - g).exp());
}

template <class V, class T>
void swiglu_forward_span(const SwiGluSpan& a, int64_t i0, int64_t i1) {
  const T* gate = static_cast<const T*>(a.gate);
  const T* up = static_cast<const T*>(a.up);
  T* out = static_cast<T*>(a.out);
  for (int64_t i = i0; i < i1; i += V::N) {
    const int64_t n = i1 - i < V::N ? i1 - i : V::N;
    const V g = load_n<V>(gate + i, n);
    store_n(out + i, g * sigmoid(g) * load_n<V>(up + i, n), n);
  }
}

template <class V, class T>
void swiglu_backward_span(const SwiGluSpan& a, int64_t i0, int64_t i1) {
  const T* gate = static_cast<const T*>(a.gate);
  const T* up = static_cast<const T*>(a.up);
  const T* grad = static_cast<const T*>(a.grad);
  T* grad_gate = static_cast<T*>(a.grad_gate);
  T* grad_up = static_cast<T*>(a.grad_up);
  const V one = V::set1(1);
  for (int64_t i = i0; i < i1; i += V::N) {
    const int64_t n = i1 - i < V::N ? i1 - i : V::N;
    const V g = load_n<V>(gate + i, n), gy = load_n<V>(grad + i, n);
    const V sg = sigmoid(g);
    // d silu / dg = σ + g·σ·(1 − σ) = σ·(1 + g·(1 − σ))
    store_n(grad_gate + i, gy * load_n<V>(up + i, n) * sg * V::fma(g, one - sg, one), n);
    store_n(grad_up + i, gy * g * sg, n);
  }
}

}  // namespace LRX_FUSED_ISA
}  // namespace cpu
}  // namespace lowrank_ext
