// cpu/adamw.cpp — fused AdamW steps on CPU (fp32 state and 8-bit blockwise state) and the CPU side of the
// paged-memory ops (ordinary memory: nothing to page).
//
//   adamw_step:     p, g [n] (fp32/fp16/bf16, contiguous); exp_avg, exp_avg_sq fp32 [n]; all updated in place
//   adamw8bit_step: p, g [n]; state1, state2 uint8 [n] (codes into qmap1 / qmap2, 256 fp32 each, sorted);
//                   absmax1, absmax2 fp32 [ceil(n/256)]
// Math (torch.optim.AdamW, decoupled weight decay), step t:
//   p <- p·(1 - lr·wd);  m <- lerp(m, g, 1-β1);  v <- β2·v + (1-β2)·g·g   (lerp as torch's: MomentLerp)
//   p <- p - lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps)
// The 8-bit step runs per 256-element block: decode m = qmap1[c1]·absmax1, v = qmap2[c2]·absmax2, update in
// fp32 (the param update uses the unrounded m, v), absmax' = max|m| (NaN propagates), code = nearest qmap
// entry to m/absmax' (= number of the 255 midpoints strictly below it: a tie goes to the lower code).
// Parallel over chunks/blocks with at::parallel_for; the inner loop is at::vec::Vectorized<float>.

// at::vec::Vectorized<float> is a scalar fallback unless CPU_CAPABILITY_AVX2 is defined (ATen builds its
// own kernels once per capability and defines it there); this file is compiled with -mavx2 -mfma.
#if defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>

#include "lowrank_ext/adamw_args.h"
#include "lowrank_ext/kernel_path.h"

namespace lowrank_ext {
namespace {

using Vec = at::vec::Vectorized<float>;

// The first moment as torch's lerp(m, g, w), w = 1 - β1 (ATen's vectorized lerp, FMA and all):
//   w < 0.5:  m + w·(g - m)            w >= 0.5:  g + (w - 1)·(g - m)
// The second form anchors at g: with β1 = 0 the moment is exactly g. (m + w·(g - m) alone rounds at
// |m|, and with β1 small and |g| << |m| that error reached the whole update.)
struct MomentLerp {
  float coeff;    // w, or w - 1 (exact: w in [0.5, 1])
  bool from_end;  // w >= 0.5: start from g
  explicit MomentLerp(float w) : coeff(w < 0.5f ? w : w - 1.0f), from_end(!(w < 0.5f)) {}
  inline float operator()(float m, float g) const { return std::fma(coeff, g - m, from_end ? g : m); }
  inline Vec operator()(const Vec& m, const Vec& g) const {
    return at::vec::fmadd(Vec(coeff), g - m, from_end ? g : m);
  }
};

#if defined(CPU_CAPABILITY_AVX2)
constexpr const char* kPath = "avx2";  // Vectorized<float> is 8 AVX2 lanes
#else
constexpr const char* kPath = "scalar";  // Vectorized<float>'s scalar fallback
#endif

// One AdamW update of n fp32 elements, in place (the formula above, in torch's operation order:
// lerp for m, mul+addcmul for v, (sqrt(v)/bc2_sqrt)+eps, p + (-step_size)·(m/denom)).
inline void adamw_update_f32(float* p, const float* g, float* m, float* v, int64_t n, const AdamWScalars& s,
                             float bc2_sqrt) {
  const Vec decay(s.decay), b2(s.beta2), w2(s.one_minus_beta2), eps(s.eps), neg_step(-s.step_size),
      bc2(bc2_sqrt);
  const MomentLerp lerp(s.one_minus_beta1);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec gv = Vec::loadu(g + i);
    Vec pv = Vec::loadu(p + i) * decay;
    const Vec mv = lerp(Vec::loadu(m + i), gv);
    const Vec vv = Vec::loadu(v + i) * b2 + w2 * (gv * gv);
    const Vec denom = vv.sqrt() / bc2 + eps;
    pv = pv + neg_step * (mv / denom);
    pv.store(p + i);
    mv.store(m + i);
    vv.store(v + i);
  }
  for (; i < n; ++i) {
    const float gi = g[i];
    float pi = p[i] * s.decay;
    const float mi = lerp(m[i], gi);
    const float vi = v[i] * s.beta2 + s.one_minus_beta2 * (gi * gi);
    pi = pi + (-s.step_size) * (mi / (std::sqrt(vi) / bc2_sqrt + s.eps));
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
  }
}

constexpr int64_t kChunk = 1024;  // elements per conversion chunk for fp16/bf16 params (fits L1 as fp32)

void adamw_step_cpu(const at::Tensor& param, const at::Tensor& grad_in, const at::Tensor& exp_avg,
                    const at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps, double wd,
                    int64_t step) {
  check_adamw_args(param, grad_in, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, wd, step);
  record_kernel_path(KernelProduct::kAdamW, kPath);
  const AdamWScalars s = adamw_scalars(lr, beta1, beta2, eps, wd, step);
  const float bc2_sqrt = 1.0f / s.inv_bc2_sqrt;
  const at::Tensor grad = grad_in.contiguous();
  const int64_t n = param.numel();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "adamw_step_cpu", [&] {
    scalar_t* p = param.data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    at::parallel_for(0, ceil_div(n, kChunk), 16, [&](int64_t c0, int64_t c1) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        const int64_t i0 = c0 * kChunk, i1 = std::min(n, c1 * kChunk);
        // (reinterpret_cast: this branch is only instantiated for float, but is compiled for all)
        adamw_update_f32(reinterpret_cast<float*>(p) + i0, reinterpret_cast<const float*>(g) + i0, m + i0, v + i0,
                         i1 - i0, s, bc2_sqrt);
      } else {
        float pf[kChunk], gf[kChunk];  // params in fp32 for the update, rounded once on the way back
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t i0 = c * kChunk, len = std::min(n - i0, kChunk);
          at::vec::convert(p + i0, pf, len);
          at::vec::convert(g + i0, gf, len);
          adamw_update_f32(pf, gf, m + i0, v + i0, len, s, bc2_sqrt);
          at::vec::convert(pf, p + i0, len);
        }
      }
    });
  });
}

// mid[k] = (map[k] + map[k+1]) / 2 for k < 255; mid[255] = +inf (a sentinel: no finite x passes it).
void midpoints(const float* map, float* mid) {
  for (int k = 0; k < 255; ++k) mid[k] = (map[k] + map[k + 1]) * 0.5f;
  mid[255] = std::numeric_limits<float>::infinity();
}

// Nearest code of x in a sorted 256-entry map = number of midpoints strictly below x (8 branch-free
// halvings; NaN compares false everywhere and lands on code 0).
inline uint8_t nearest_code_search(const float* mid, float x) {
  int c = 0;
  for (int step = 128; step >= 1; step >>= 1) c += (mid[c + step - 1] < x) ? step : 0;
  return static_cast<uint8_t>(c);
}

// Fast nearest code: a table over the top 16 bits of x's float encoding (sign, exponent, 7 mantissa bits)
// gives lo = the code of the smallest value with those bits; codes are monotone in x, so the answer is
// lo plus the midpoints between that value and x: for the dynamic maps at most 1 (buckets are <= 1/128
// of a binade wide, narrower than the map's spacing), for any sorted map still exact (the loop runs on).
struct CodeTable {
  float mid[256];
  uint8_t lo[1 << 16];

  void build(const float* map) {
    midpoints(map, mid);
    for (uint32_t key = 0; key < (1u << 16); ++key) {
      // smallest value of the bucket: the bucket's start for x >= 0, its end (largest magnitude) for x < 0
      const uint32_t bits = (key << 16) | ((key & 0x8000u) ? 0xFFFFu : 0u);
      float v;
      std::memcpy(&v, &bits, sizeof(v));
      lo[key] = nearest_code_search(mid, v);
    }
  }
  inline uint8_t code(float x) const {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    int c = lo[bits >> 16];
    while (mid[c] < x) ++c;  // stops at 255 at the latest (mid[255] = +inf); NaN: no step
    return static_cast<uint8_t>(c);
  }
};

// Tables for the maps of the last call, per thread (rebuilt only when a map's contents change).
const CodeTable& code_table(const float* map, int which) {
  struct Cached {
    float map[256];
    bool valid = false;
    CodeTable table;
  };
  thread_local std::unique_ptr<Cached> cache[2];
  if (!cache[which]) cache[which] = std::make_unique<Cached>();
  Cached& c = *cache[which];
  if (!c.valid || std::memcmp(c.map, map, sizeof(c.map)) != 0) {
    std::memcpy(c.map, map, sizeof(c.map));
    c.table.build(map);
    c.valid = true;
  }
  return c.table;
}

// max |x| over n values; a NaN anywhere makes the result NaN (so a NaN state stays visible, as in torch).
inline float absmax_nan(const float* x, int64_t n) {
  float m = 0.f;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    m = std::max(m, std::fabs(x[i]));
    nan |= std::isnan(x[i]);
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

// Encode n values of one block into codes; returns the block's new absmax.
inline float requantize(const float* x, int64_t n, const CodeTable& table, uint8_t* codes) {
  const float amax = absmax_nan(x, n);
  const float inv = amax > 0.f ? 1.0f / amax : 0.f;  // all-zero (or NaN) block: every code encodes 0·inv
  for (int64_t i = 0; i < n; ++i) codes[i] = table.code(x[i] * inv);
  return amax;
}

void adamw8bit_step_cpu(const at::Tensor& param, const at::Tensor& grad_in, const at::Tensor& state1,
                        const at::Tensor& state2, const at::Tensor& absmax1, const at::Tensor& absmax2,
                        const at::Tensor& qmap1, const at::Tensor& qmap2, double lr, double beta1, double beta2,
                        double eps, double wd, int64_t step) {
  check_adamw8bit_args(param, grad_in, state1, state2, absmax1, absmax2, qmap1, qmap2, lr, beta1, beta2, eps, wd,
                       step);
  record_kernel_path(KernelProduct::kAdamW, kPath);
  const AdamWScalars s = adamw_scalars(lr, beta1, beta2, eps, wd, step);
  const float bc2_sqrt = 1.0f / s.inv_bc2_sqrt;
  const at::Tensor grad = grad_in.contiguous();
  const int64_t n = param.numel(), nb = ceil_div(n, kOptimBlocksize);
  const float* map1 = qmap1.const_data_ptr<float>();
  const float* map2 = qmap2.const_data_ptr<float>();
  // built on the calling thread, read by the at::parallel_for workers below
  const CodeTable& table1 = code_table(map1, 0);
  const CodeTable& table2 = code_table(map2, 1);
  uint8_t* c1 = state1.data_ptr<uint8_t>();
  uint8_t* c2 = state2.data_ptr<uint8_t>();
  float* a1 = absmax1.data_ptr<float>();
  float* a2 = absmax2.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "adamw8bit_step_cpu", [&] {
    scalar_t* p = param.data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    at::parallel_for(0, nb, 32, [&](int64_t b0, int64_t b1) {
      float pf[kOptimBlocksize], gf[kOptimBlocksize], m[kOptimBlocksize], v[kOptimBlocksize];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kOptimBlocksize, len = std::min(n - i0, kOptimBlocksize);
        // decode: m = qmap1[c1]·absmax1[b], v = qmap2[c2]·absmax2[b]
        const float s1 = a1[b], s2 = a2[b];
        for (int64_t i = 0; i < len; ++i) {
          m[i] = map1[c1[i0 + i]] * s1;
          v[i] = map2[c2[i0 + i]] * s2;
        }
        at::vec::convert(p + i0, pf, len);
        at::vec::convert(g + i0, gf, len);
        adamw_update_f32(pf, gf, m, v, len, s, bc2_sqrt);
        at::vec::convert(pf, p + i0, len);
        a1[b] = requantize(m, len, table1, c1 + i0);
        a2[b] = requantize(v, len, table2, c2 + i0);
      }
    });
  });
}

// ---- paged memory on CPU: ordinary memory, nothing to page ----

at::Tensor paged_zeros_like_cpu(const at::Tensor& like, at::ScalarType dtype) {
  return at::zeros(like.sizes(), like.options().dtype(dtype));
}

void paged_prefetch_cpu(const at::Tensor&, int64_t device) {
  check_paged_prefetch_args(device);
}

void paged_prefetch_batch_cpu(at::TensorList, int64_t device) {
  check_paged_prefetch_args(device, "paged_prefetch_batch");
}

bool paged_is_managed_cpu(const at::Tensor&) { return false; }

int64_t paged_last_prefetch_location_cpu(const at::Tensor&) { return -2; }

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  m.impl("adamw_step", &adamw_step_cpu);
  m.impl("adamw8bit_step", &adamw8bit_step_cpu);
  m.impl("paged_zeros_like", &paged_zeros_like_cpu);
  m.impl("paged_prefetch", &paged_prefetch_cpu);
  m.impl("paged_prefetch_batch", &paged_prefetch_batch_cpu);
  m.impl("paged_is_managed", &paged_is_managed_cpu);
  m.impl("paged_last_prefetch_location", &paged_last_prefetch_location_cpu);
}

}  // namespace lowrank_ext
