// cpu/nf4.cpp — NF4 quantize, double quant and dequantize on CPU (docs/format.md).
//
//   quantize_nf4:       x [n] (fp32/fp16/bf16) -> packed uint8 [(n+1)//2, 1], absmax fp32 [ceil(n/bs)]
//   double_quant:       absmax fp32 [nb] -> qabsmax uint8 [nb], nested_absmax fp32 [ceil(nb/256)], offset fp32 [1]
//   dequantize_nf4:     the bundle -> flat [numel] in fp32/fp16/bf16
//   dequantize_nf4_out: the same into a caller's buffer (no allocation, no page faults)
// Math (bit-exact with bitsandbytes 0.50.2 on CPU):
//   absmax[b] = max |x| over block b;  s = x * (1 / max(absmax, 1e-38))  (x / max(absmax, 1e-38) in a
//   partial last block);  code = #{midpoints < s};  deq = NF4[code] * absmax_hat[b] in fp32, rounded once.
//   One deliberate difference: an all-zero partial last block stores absmax 0 (bitsandbytes stores its
//   1e-38 clamp there); the codes (7) and the dequantized zeros are the same.
// Parallel over blocks (at::parallel_for); AVX2 inner loops from nf4_avx2.h with a scalar path for
// builds without AVX2 and for the ragged tail of a partial last block.
// Argument checks: lowrank_ext/nf4_args.h (check_<op>_args), shared with csrc/cuda/nf4.cu.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "lowrank_ext/huge_pages.h"
#include "lowrank_ext/kernel_path.h"
#include "lowrank_ext/nf4_args.h"
#include "nf4_avx2.h"

namespace lowrank_ext {
namespace {

// bitsandbytes clamps absmax to 1e-38 before taking the reciprocal (all-zero and subnormal blocks
// then encode to code 7 instead of inf/NaN). As an fp32 literal this is the subnormal 0x006CE3EE.
constexpr float kMinAbsmax = 1e-38f;
constexpr int64_t kMinElemsPerTask = 1 << 15;  // parallel grain: ~32K elements per task

int64_t grain_blocks(int64_t blocksize) { return std::max<int64_t>(1, kMinElemsPerTask / blocksize); }

// Calls f(T{}) with T = float, c10::Half or c10::BFloat16 (the dtypes the checks allow).
template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: TORCH_INTERNAL_ASSERT(false, "lowrank_ext: unchecked dtype ", t);
  }
}

// ================================ quantize ======================================================

// max |x[i0..i1)| as fp32, raising on NaN/Inf.
template <typename T>
float block_absmax(const T* x, int64_t i0, int64_t i1, int64_t b) {
  float m = 0.f;
  bool bad = false;
  int64_t i = i0;
#ifdef LRX_NF4_AVX2
  __m256 vm = _mm256_setzero_ps(), vbad = _mm256_setzero_ps();
  for (; i + 8 <= i1; i += 8) {
    const __m256 a = avx2::abs8(avx2::load8_f32(x + i));
    vbad = _mm256_or_ps(vbad, avx2::nonfinite8(a));
    vm = _mm256_max_ps(vm, a);
  }
  m = avx2::hmax8(vm);
  bad = _mm256_movemask_ps(vbad) != 0;
#endif
  for (; i < i1; ++i) {
    const float a = std::fabs(static_cast<float>(x[i]));
    bad |= !(a <= 3.40282347e38f);
    m = std::max(m, a);
  }
  check_quantize_nf4_finite(!bad, b, i0, i1 - 1);
  return m;
}

// Codes of x[i0..i1) into out (byte i/2 holds elements i, i+1); i0 is even because blocksize is.
template <typename T>
void encode_block(const T* x, int64_t i0, int64_t i1, float absmax, bool partial, uint8_t* out) {
  const float m = std::max(absmax, kMinAbsmax);
  const float inv = 1.0f / m;
  int64_t i = i0;
#ifdef LRX_NF4_AVX2
  if (!partial) {  // a full block has blocksize >= 32 elements: a multiple of 32
    static const avx2::Midpoints mid;
    const __m256 vinv = _mm256_set1_ps(inv);
    for (; i + 32 <= i1; i += 32) {
      __m256i c[4];
      for (int k = 0; k < 4; ++k) c[k] = avx2::nf4_encode8(_mm256_mul_ps(avx2::load8_f32(x + i + 8 * k), vinv), mid);
      avx2::nf4_pack32(c[0], c[1], c[2], c[3], out + i / 2);
    }
  }
#endif
  // Scalar: the non-AVX2 build and the partial last block, where bitsandbytes divides by absmax.
  for (; i < i1; i += 2) {
    uint8_t c[2] = {kNF4ZeroCode, kNF4ZeroCode};  // an odd last element pads with code 7
    for (int k = 0; k < 2 && i + k < i1; ++k) {
      const float v = static_cast<float>(x[i + k]);
      c[k] = nf4_encode(partial ? v / m : v * inv);
    }
    out[i / 2] = nf4_pack(c[0], c[1]);
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_nf4_cpu(const at::Tensor& x_in, int64_t blocksize) {
  check_quantize_nf4_args(x_in, blocksize);
  const at::Tensor x = x_in.contiguous().view(-1);  // non-contiguous input: one copy, then the fast path
  const int64_t n = x.numel();
  const int64_t nblocks = ceil_div(n, blocksize);
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, x.options().dtype(at::kFloat));
  uint8_t* out = packed.data_ptr<uint8_t>();
  float* amax = absmax.data_ptr<float>();
#ifdef LRX_NF4_AVX2
  record_kernel_path(KernelProduct::kQuantize, "avx2");
#else
  record_kernel_path(KernelProduct::kQuantize, "scalar");
#endif
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, nblocks, grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * blocksize, i1 = std::min(n, i0 + blocksize);
        const float m = block_absmax(src, i0, i1, b);
        amax[b] = m;
        encode_block(src, i0, i1, m, /*partial=*/i1 - i0 < blocksize, out);
      }
    });
  });
  return {packed, absmax};
}

// ================================ double quant ==================================================

// Index of the map entry nearest to s: smallest fp32 distance, ties to the lower code. The map is
// sorted, so only the two neighbours of s can be nearest: a binary search for
//   k = #{entries < s}  (the first index with map[k] >= s),
// then compare (s - map[k-1]) with (map[k] - s). Entries further out are at least one map spacing
// (>= 5e-7) farther, more than the fp32 rounding of a distance <= 2, so this equals a linear scan.
// A NaN s (a nested block whose absmax - offset values are all 0: 0 * inf) gets code 0, as the scan.
// Branch-free (the comparisons are data-dependent coin flips), kNQ searches interleaved for ILP.
constexpr int kNQ = 8;

inline void nearest_codes(const float* map, const float* s, uint8_t* q, int count) {
  int k[kNQ];
  for (int j = 0; j < count; ++j) k[j] = 0;
  for (int step = 128; step >= 1; step >>= 1)  // 256 = 2^8 entries: 8 halvings, k <= 255
    for (int j = 0; j < count; ++j) k[j] += (map[k[j] + step - 1] < s[j]) ? step : 0;
  for (int j = 0; j < count; ++j) {
    int kk = k[j] + ((k[j] == 255 && map[255] < s[j]) ? 1 : 0);  // s above every entry
    uint8_t code;
    if (std::isnan(s[j]) || kk == 0) code = 0;
    else if (kk == 256) code = 255;
    else code = static_cast<uint8_t>((s[j] - map[kk - 1] <= map[kk] - s[j]) ? kk - 1 : kk);
    q[j] = code;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> double_quant_cpu(const at::Tensor& absmax_in,
                                                                const at::Tensor& nested_map) {
  check_double_quant_args(absmax_in, nested_map);
  const at::Tensor absmax = absmax_in.contiguous().view(-1);
  const at::Tensor map_c = nested_map.contiguous().view(-1);
  const float* map = map_c.const_data_ptr<float>();
  const int64_t nb = absmax.numel();
  const int64_t nb2 = ceil_div(nb, kNestedBlocksize);
  // offset = mean(absmax) by torch's own reduction (what bitsandbytes does, so the bits agree).
  at::Tensor offset = absmax.mean().reshape({1});
  at::Tensor qabsmax = at::empty({nb}, absmax.options().dtype(at::kByte));
  at::Tensor absmax2 = at::empty({nb2}, absmax.options());
  const float off = offset.item<float>();
  const float* a = absmax.const_data_ptr<float>();
  uint8_t* q = qabsmax.data_ptr<uint8_t>();
  float* a2 = absmax2.data_ptr<float>();
  at::parallel_for(0, nb2, 64, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      // c[b] = absmax[b] - offset;  absmax2[j] = max |c| over nested block j;  q = nearest(c * (1/absmax2))
      const int64_t b0 = j * kNestedBlocksize, b1 = std::min(nb, b0 + kNestedBlocksize);
      float m = 0.f;
      for (int64_t b = b0; b < b1; ++b) m = std::max(m, std::fabs(a[b] - off));
      a2[j] = m;
      const float inv = 1.0f / m;
      for (int64_t b = b0; b < b1; b += kNQ) {
        const int count = static_cast<int>(std::min<int64_t>(kNQ, b1 - b));
        float sv[kNQ];
        for (int j = 0; j < count; ++j) sv[j] = (a[b + j] - off) * inv;
        nearest_codes(map, sv, q + b, count);
      }
    }
  });
  return {qabsmax, absmax2, offset};
}

// ================================ dequantize ====================================================

// out[i0..i1) = NF4[code[i]] * scale, rounded once to T; i0 is even (a block start).
template <typename T, bool kStream>
void decode_block(const uint8_t* src, int64_t i0, int64_t i1, float scale, T* dst) {
  int64_t i = i0;
#ifdef LRX_NF4_AVX2
  const avx2::ScaledLUT lut(scale);  // NF4[c] * scale, c = 0..15, fp32
  if constexpr (sizeof(T) == 2) {    // bf16/fp16: round the 16 values once, then byte-shuffle lookups
    const avx2::HalfLUT half(avx2::to_bits16(static_cast<T*>(nullptr), lut.lo, lut.hi));
    for (; i + 32 <= i1; i += 32) {  // 16 bytes -> 32 values
      __m256i a, b;
      half.decode32(src + i / 2, a, b);
      avx2::store16_bits<kStream>(dst + i, a);
      avx2::store16_bits<kStream>(dst + i + 16, b);
    }
  } else {  // fp32: register LUT (two 8-lane permutes + blend)
    for (; i + 32 <= i1; i += 32) {
      __m256i idx[4];
      avx2::nf4_unpack32(src + i / 2, idx);
      avx2::store16<kStream>(dst + i, lut(idx[0]), lut(idx[1]));
      avx2::store16<kStream>(dst + i + 16, lut(idx[2]), lut(idx[3]));
    }
  }
#endif
  for (; i < i1; ++i) {
    const uint8_t byte = src[i / 2];
    const uint8_t code = (i % 2 == 0) ? nf4_high(byte) : nf4_low(byte);
    dst[i] = static_cast<T>(kNF4Codebook[code] * scale);
  }
}

// Non-temporal stores skip the read-for-ownership of output cache lines: worth it for a large,
// 32-byte aligned caller buffer (block starts then are aligned too: blocksize * sizeof(T) >= 64
// bytes). Not for a fresh allocation: the kernel has just zeroed each page on first touch, so its
// lines sit dirty in cache and a streaming store would write them back twice (measured slower).
constexpr int64_t kStreamMinBytes = int64_t{8} << 20;

void dequantize_into(const NF4Scales& scales, const at::Tensor& packed, int64_t blocksize, int64_t numel,
                     at::Tensor& out, bool allow_stream) {
  const uint8_t* src = packed.const_data_ptr<uint8_t>();
  const int64_t nblocks = ceil_div(numel, blocksize);
  dispatch_float(out.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* dst = out.data_ptr<scalar_t>();
    const bool stream = allow_stream && numel * int64_t(sizeof(scalar_t)) >= kStreamMinBytes &&
                        reinterpret_cast<uintptr_t>(dst) % 32 == 0;
#ifdef LRX_NF4_AVX2
    record_kernel_path(KernelProduct::kDequantize, stream ? "avx2-stream" : "avx2");
#else
    record_kernel_path(KernelProduct::kDequantize, "scalar");
#endif
    at::parallel_for(0, nblocks, grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * blocksize, i1 = std::min(numel, i0 + blocksize);
        if (stream) decode_block<scalar_t, true>(src, i0, i1, scales.block_scale(b), dst);
        else decode_block<scalar_t, false>(src, i0, i1, scales.block_scale(b), dst);
      }
#ifdef LRX_NF4_AVX2
      if (stream) _mm_sfence();  // order the streaming stores before the task returns
#endif
    });
  });
}

// advise_huge_pages: lowrank_ext/huge_pages.h (shared with the fused model ops).

at::Tensor dequantize_nf4_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                              const c10::optional<at::Tensor>& nested_absmax,
                              const c10::optional<at::Tensor>& nested_map, const c10::optional<at::Tensor>& offset,
                              int64_t blocksize, int64_t numel, at::ScalarType dtype) {
  const NF4Scales scales =
      check_dequantize_nf4_args(packed, absmax, nested_absmax, nested_map, offset, blocksize, numel, dtype);
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  if (out.nbytes() >= (size_t{4} << 20)) advise_huge_pages(out);
  dequantize_into(scales, packed, blocksize, numel, out, /*allow_stream=*/false);
  return out;
}

void dequantize_nf4_out_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                            const c10::optional<at::Tensor>& nested_absmax,
                            const c10::optional<at::Tensor>& nested_map, const c10::optional<at::Tensor>& offset,
                            int64_t blocksize, int64_t numel, at::Tensor out) {
  const NF4Scales scales =
      check_dequantize_nf4_out_args(packed, absmax, nested_absmax, nested_map, offset, blocksize, numel, out);
  dequantize_into(scales, packed, blocksize, numel, out, /*allow_stream=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  m.impl("quantize_nf4", &quantize_nf4_cpu);
  m.impl("double_quant", &double_quant_cpu);
  m.impl("dequantize_nf4", &dequantize_nf4_cpu);
  m.impl("dequantize_nf4_out", &dequantize_nf4_out_cpu);
}

}  // namespace lowrank_ext
