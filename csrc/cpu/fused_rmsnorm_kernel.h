// cpu/fused_rmsnorm_kernel.h — RMSNorm (+ residual add) row kernels, forward and backward; the math is in
// fused_kernels.h (RmsNormRows). One source for every ISA: V is the vector type (fused_vec.h), T the
// activation storage (float, bf16, double). Rows are row-major [rows, dim]; each row is walked in V::N
// lanes with a zero-padded tail. Sums are lane-parallel in the lane type (fp32, or fp64 for double).
#pragma once

#include "fused_vec.h"

namespace lowrank_ext {
namespace cpu {
inline namespace LRX_FUSED_ISA {

template <class V, class T>
void rmsnorm_forward_rows(const RmsNormRows& a, int64_t r0, int64_t r1) {
  using F = typename V::F;
  const int64_t D = a.dim;
  const F* w = static_cast<const F*>(a.weight);
  const V offset = V::set1(static_cast<F>(a.weight_offset));
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * D;
    T* y = static_cast<T*>(a.y) + r * D;
    const T* src = x;  // the normalized stream: h when there is a residual, else x
    V ss = V::set1(0);
    if (a.residual != nullptr) {
      const T* res = static_cast<const T*>(a.residual) + r * D;
      T* h = static_cast<T*>(a.h) + r * D;
      for (int64_t j = 0; j < D; j += V::N) {
        const int64_t n = D - j < V::N ? D - j : V::N;
        store_n(h + j, load_n<V>(x + j, n) + load_n<V>(res + j, n), n);
        const V hv = load_n<V>(h + j, n);  // re-read: the norm sees h as stored (rounded to bf16 in bf16)
        ss = V::fma(hv, hv, ss);
      }
      src = h;
    } else {
      for (int64_t j = 0; j < D; j += V::N) {
        const V xv = load_n<V>(x + j, D - j < V::N ? D - j : V::N);
        ss = V::fma(xv, xv, ss);
      }
    }
    const V rstd = V::set1(F(1) / std::sqrt(ss.sum() / static_cast<F>(D) + static_cast<F>(a.eps)));
    for (int64_t j = 0; j < D; j += V::N) {
      const int64_t n = D - j < V::N ? D - j : V::N;
      store_n(y + j, load_n<V>(src + j, n) * rstd * (offset + load_n<V>(w + j, n)), n);
    }
  }
}

template <class V, class T>
void rmsnorm_backward_rows(const RmsNormRows& a, int64_t r0, int64_t r1) {
  using F = typename V::F;
  const int64_t D = a.dim;
  const F* w = static_cast<const F*>(a.weight);
  F* gw = static_cast<F*>(a.grad_w_acc);
  const V offset = V::set1(static_cast<F>(a.weight_offset));
  for (int64_t r = r0; r < r1; ++r) {
    const T* h = static_cast<const T*>(a.h) + r * D;
    const T* gy = static_cast<const T*>(a.grad_y) + r * D;
    const T* gh = a.grad_h != nullptr ? static_cast<const T*>(a.grad_h) + r * D : nullptr;
    T* gx = static_cast<T*>(a.grad_x) + r * D;
    // pass 1: Σh² (for rstd) and Σ g·h with g = grad_y · (offset + w)
    V ss = V::set1(0), gdot = V::set1(0);
    for (int64_t j = 0; j < D; j += V::N) {
      const int64_t n = D - j < V::N ? D - j : V::N;
      const V hv = load_n<V>(h + j, n);
      ss = V::fma(hv, hv, ss);
      gdot = V::fma(load_n<V>(gy + j, n) * (offset + load_n<V>(w + j, n)), hv, gdot);
    }
    const F rstd_s = F(1) / std::sqrt(ss.sum() / static_cast<F>(D) + static_cast<F>(a.eps));
    const V rstd = V::set1(rstd_s);
    const V c = V::set1(rstd_s * rstd_s * rstd_s * gdot.sum() / static_cast<F>(D));
    // pass 2: grad_x = rstd·g − c·h (+ grad_h);  grad_w += grad_y · h · rstd
    for (int64_t j = 0; j < D; j += V::N) {
      const int64_t n = D - j < V::N ? D - j : V::N;
      const V hv = load_n<V>(h + j, n);
      const V gyv = load_n<V>(gy + j, n);
      V gxv = rstd * gyv * (offset + load_n<V>(w + j, n)) - c * hv;
      if (gh != nullptr) gxv = gxv + load_n<V>(gh + j, n);
      store_n(gx + j, gxv, n);
      store_n(gw + j, V::fma(gyv * hv, rstd, load_n<V>(gw + j, n)), n);
    }
  }
}

}  // namespace LRX_FUSED_ISA
}  // namespace cpu
}  // namespace lowrank_ext
