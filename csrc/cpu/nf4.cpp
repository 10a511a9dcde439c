// cpu/nf4.cpp — NF4 quantize, double quant and dequantize on CPU (DESIGN.md section 2).
//
//   quantize_nf4:   x [n] (fp32/fp16/bf16) -> packed uint8 [(n+1)//2, 1], absmax fp32 [ceil(n/bs)]
//   double_quant:   absmax fp32 [nb] -> qabsmax uint8 [nb], nested_absmax fp32 [ceil(nb/256)], offset fp32 [1]
//   dequantize_nf4: the bundle -> flat [numel] in fp32/fp16/bf16
// Parallel over blocks with at::parallel_for.
// TODO(nf4-cpu): vectorize (AVX2 LUT decode, streaming stores) — this is the straightforward version.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "lowrank_ext/nf4_args.h"

namespace lowrank_ext {
namespace {

constexpr const char* kQuantOp = "quantize_nf4";
constexpr const char* kDQOp = "double_quant";
constexpr const char* kDequantOp = "dequantize_nf4";

std::tuple<at::Tensor, at::Tensor> quantize_nf4_cpu(const at::Tensor& x_in, int64_t blocksize) {
  check_blocksize(blocksize, kQuantOp);
  check_float_input(x_in, kQuantOp, "x");
  LRX_CHECK(x_in.numel() > 0, kQuantOp, "x", "be non-empty", "shape ", x_in.sizes());
  const at::Tensor x = x_in.contiguous().view(-1);
  const int64_t n = x.numel();
  const int64_t nblocks = ceil_div(n, blocksize);
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, x.options().dtype(at::kFloat));
  uint8_t* out = packed.data_ptr<uint8_t>();
  float* amax = absmax.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_nf4_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, nblocks, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * blocksize, i1 = std::min(n, i0 + blocksize);
        float m = 0.f;
        for (int64_t i = i0; i < i1; ++i) m = std::max(m, std::fabs(static_cast<float>(src[i])));
        LRX_CHECK(std::isfinite(m), kQuantOp, "x", "contain only finite values", "NaN/Inf in block ", b,
                  " (elements ", i0, "..", i1 - 1, ")");
        amax[b] = m;
        const bool partial = (i1 - i0) < blocksize;
        const float inv = 1.0f / m;
        // Blocks start at even indices (blocksize is even), so a byte never spans two blocks.
        for (int64_t i = i0; i < i1; i += 2) {
          uint8_t c[2] = {kNF4ZeroCode, kNF4ZeroCode};
          for (int k = 0; k < 2 && i + k < i1; ++k) {
            const float v = static_cast<float>(src[i + k]);
            if (m == 0.f) continue;  // all-zero block: code 7 (exact 0), as bitsandbytes' CPU path
            // bitsandbytes divides in a partial last block and multiplies by the reciprocal elsewhere.
            c[k] = nf4_encode(partial ? v / m : v * inv);
          }
          out[i / 2] = nf4_pack(c[0], c[1]);
        }
      }
    });
  });
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> double_quant_cpu(const at::Tensor& absmax_in,
                                                                const at::Tensor& nested_map) {
  check_dtype(absmax_in, at::kFloat, kDQOp, "absmax");
  check_dtype(nested_map, at::kFloat, kDQOp, "nested_map");
  check_numel(nested_map, 256, kDQOp, "nested_map");
  LRX_CHECK(absmax_in.numel() > 0, kDQOp, "absmax", "be non-empty", "shape ", absmax_in.sizes());
  const at::Tensor absmax = absmax_in.contiguous().view(-1);
  const int64_t nb = absmax.numel();
  const int64_t nb2 = ceil_div(nb, kNestedBlocksize);
  // offset = mean(absmax) computed by torch's own reduction (what bitsandbytes does).
  at::Tensor offset = absmax.mean().reshape({1});
  at::Tensor qabsmax = at::empty({nb}, absmax.options().dtype(at::kByte));
  at::Tensor absmax2 = at::empty({nb2}, absmax.options());
  const float off = offset.item<float>();
  const float* a = absmax.const_data_ptr<float>();
  const at::Tensor map_c = nested_map.contiguous();
  const float* map = map_c.const_data_ptr<float>();
  uint8_t* q = qabsmax.data_ptr<uint8_t>();
  float* a2 = absmax2.data_ptr<float>();
  at::parallel_for(0, nb2, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t b0 = j * kNestedBlocksize, b1 = std::min(nb, b0 + kNestedBlocksize);
      float m = 0.f;
      for (int64_t b = b0; b < b1; ++b) m = std::max(m, std::fabs(a[b] - off));
      a2[j] = m;
      const float inv = 1.0f / m;
      for (int64_t b = b0; b < b1; ++b) {
        const float s = (a[b] - off) * inv;
        // nearest map entry: smallest fp32 distance, ties to the lower code (map is sorted)
        int best = 0;
        float best_d = std::fabs(map[0] - s);
        for (int c = 1; c < 256; ++c) {
          const float d = std::fabs(map[c] - s);
          if (d < best_d) best_d = d, best = c;
        }
        q[b] = static_cast<uint8_t>(best);
      }
    }
  });
  return {qabsmax, absmax2, offset};
}

at::Tensor dequantize_nf4_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                              const c10::optional<at::Tensor>& nested_absmax,
                              const c10::optional<at::Tensor>& nested_map, const c10::optional<at::Tensor>& offset,
                              int64_t blocksize, int64_t numel, at::ScalarType dtype) {
  const NF4Scales scales =
      check_nf4_weight(kDequantOp, packed, absmax, nested_absmax, nested_map, offset, blocksize, numel);
  LRX_CHECK_TYPE(is_float_dtype(dtype), kDequantOp, "dtype", "be float32, float16 or bfloat16", dtype);
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  const uint8_t* src = packed.const_data_ptr<uint8_t>();
  const int64_t nblocks = ceil_div(numel, blocksize);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequantize_nf4_cpu", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, nblocks, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const float scale = scales.block_scale(b);
        const int64_t i0 = b * blocksize, i1 = std::min(numel, i0 + blocksize);
        for (int64_t i = i0; i < i1; ++i) {
          const uint8_t byte = src[i / 2];
          const uint8_t code = (i % 2 == 0) ? nf4_high(byte) : nf4_low(byte);
          dst[i] = static_cast<scalar_t>(kNF4Codebook[code] * scale);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  m.impl("quantize_nf4", &quantize_nf4_cpu);
  m.impl("double_quant", &double_quant_cpu);
  m.impl("dequantize_nf4", &dequantize_nf4_cpu);
}

}  // namespace lowrank_ext
