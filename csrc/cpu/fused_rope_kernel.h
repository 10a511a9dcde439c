// cpu/fused_rope_kernel.h — rotary embedding row kernel (forward and its transpose for backward); the math
// is in fused_kernels.h (RopeRows). V: vector type (fused_vec.h), T: storage (float, bf16, double).
// The backward is the forward with (sin[:half], sin[half:]) replaced by (−sin[half:], −sin[:half]):
//   out[:half] = g[:half]·c[:half] − g[half:]·(−s[half:]),  out[half:] = g[half:]·c[half:] + g[:half]·(−s[:half]).
#pragma once

#include "fused_vec.h"

namespace lowrank_ext {
namespace cpu {
inline namespace LRX_FUSED_ISA {

template <class V, class T>
void rope_rows(const RopeRows& a, int64_t r0, int64_t r1) {
  const int64_t half = a.dim / 2;
  const V zero = V::set1(0);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t s = r % a.seq, bh = r / a.seq, hd = bh % a.heads, b = bh / a.heads;
    const T* in = static_cast<const T*>(a.in) + b * a.in_sb + hd * a.in_sh + s * a.in_ss;
    T* out = static_cast<T*>(a.out) + b * a.out_sb + hd * a.out_sh + s * a.out_ss;
    const T* cs = static_cast<const T*>(a.cos) + b * a.cs_sb + s * a.cs_ss;
    const T* sn = static_cast<const T*>(a.sin) + b * a.cs_sb + s * a.cs_ss;
    for (int64_t j = 0; j < half; j += V::N) {
      const int64_t n = half - j < V::N ? half - j : V::N;
      const V lo = load_n<V>(in + j, n), hi = load_n<V>(in + half + j, n);
      V s_lo = load_n<V>(sn + j, n), s_hi = load_n<V>(sn + half + j, n);
      if (a.backward) {
        const V t = s_lo;
        s_lo = zero - s_hi;
        s_hi = zero - t;
      }
      store_n(out + j, lo * load_n<V>(cs + j, n) - hi * s_lo, n);
      store_n(out + half + j, hi * load_n<V>(cs + half + j, n) + lo * s_hi, n);
    }
  }
}

}  // namespace LRX_FUSED_ISA
}  // namespace cpu
}  // namespace lowrank_ext
