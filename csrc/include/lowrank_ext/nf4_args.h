// nf4_args.h — the NF4 weight "bundle" as ops receive it, and its checks (host only, ATen).
//
// Every op taking an NF4 weight takes these arguments in this order:
//   Tensor packed          uint8, ceil(numel/2) bytes (any shape; bitsandbytes stores [(n+1)//2, 1])
//   Tensor absmax          fp32 [nblocks]  or, double-quantized, uint8 [nblocks]
//   Tensor? nested_absmax  fp32 [ceil(nblocks/256)]  (double quant only)
//   Tensor? nested_map     fp32 [256] signed dynamic map (double quant only)
//   Tensor? offset         fp32 [1] or [] (double quant only)
//   int blocksize
// with nblocks = ceil(numel / blocksize). numel comes from the op's own size arguments.
// Also here: the argument checks of the format ops (quantize_nf4, double_quant, dequantize_nf4[_out]),
// one check_<op>_args per op, called by both csrc/cpu/nf4.cpp and csrc/cuda/nf4.cu.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "lowrank_ext/check.h"
#include "lowrank_ext/nf4.h"

namespace lowrank_ext {

inline bool valid_blocksize(int64_t bs) {
  return bs == 32 || bs == 64 || bs == 128 || bs == 256 || bs == 512 || bs == 1024 || bs == 2048 || bs == 4096;
}

inline void check_blocksize(int64_t blocksize, const char* op) {
  LRX_CHECK(valid_blocksize(blocksize), op, "blocksize", "be one of 32, 64, 128, 256, 512, 1024, 2048, 4096",
            blocksize);
}

// Checks the bundle against `numel` weight elements and returns raw pointers for the kernels.
// All tensors must live on packed's device; they must be contiguous.
inline NF4Scales check_nf4_weight(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                                  const c10::optional<at::Tensor>& nested_absmax,
                                  const c10::optional<at::Tensor>& nested_map,
                                  const c10::optional<at::Tensor>& offset, int64_t blocksize, int64_t numel) {
  check_blocksize(blocksize, op);
  LRX_CHECK(numel > 0, op, "numel (the weight's element count)", "be positive", numel);
  check_dtype(packed, at::kByte, op, "packed");
  check_numel(packed, ceil_div(numel, 2), op, "packed");
  LRX_CHECK(packed.is_contiguous(), op, "packed", "be contiguous", "strides ", packed.strides());
  const int64_t nblocks = ceil_div(numel, blocksize);
  check_same_device(absmax, packed, op, "absmax", "packed");
  check_numel(absmax, nblocks, op, "absmax");
  LRX_CHECK(absmax.is_contiguous(), op, "absmax", "be contiguous", "strides ", absmax.strides());
  NF4Scales s;
  if (absmax.scalar_type() == at::kFloat) {
    s.absmax_f32 = absmax.const_data_ptr<float>();
    return s;
  }
  LRX_CHECK_TYPE(absmax.scalar_type() == at::kByte, op, "absmax",
                 "be float32 (plain) or uint8 (double-quantized)", absmax.scalar_type());
  LRX_CHECK(nested_absmax.has_value() && nested_map.has_value() && offset.has_value(), op,
            "nested_absmax/nested_map/offset", "all be given when absmax is uint8 (double quant)",
            nested_absmax.has_value() ? "" : "no nested_absmax ", nested_map.has_value() ? "" : "no nested_map ",
            offset.has_value() ? "" : "no offset");
  const at::Tensor& a2 = *nested_absmax;
  const at::Tensor& map = *nested_map;
  const at::Tensor& off = *offset;
  check_dtype(a2, at::kFloat, op, "nested_absmax");
  check_dtype(map, at::kFloat, op, "nested_map");
  check_dtype(off, at::kFloat, op, "offset");
  check_numel(a2, ceil_div(nblocks, kNestedBlocksize), op, "nested_absmax");
  check_numel(map, 256, op, "nested_map");
  check_numel(off, 1, op, "offset");
  for (const at::Tensor* t : {&a2, &map, &off}) {
    check_same_device(*t, packed, op, "nested tensors", "packed");
    LRX_CHECK(t->is_contiguous(), op, "nested tensors", "be contiguous", "strides ", t->strides());
  }
  s.qabsmax = absmax.const_data_ptr<uint8_t>();
  s.absmax2 = a2.const_data_ptr<float>();
  s.nested_map = map.const_data_ptr<float>();
  s.offset = off.const_data_ptr<float>();
  return s;
}

// quantize_nf4: x (any shape, flattened) fp32/fp16/bf16, non-empty; a valid blocksize.
inline void check_quantize_nf4_args(const at::Tensor& x, int64_t blocksize) {
  constexpr const char* op = "quantize_nf4";
  check_blocksize(blocksize, op);
  check_float_input(x, op, "x");
  LRX_CHECK(x.numel() > 0, op, "x", "be non-empty", "shape ", x.sizes());
}

// quantize_nf4's finite-values check: the kernels find a NaN/Inf while they scan block `block`
// (flat elements first..last); each backend computes `ok` its own way, the message is this one.
inline void check_quantize_nf4_finite(bool ok, int64_t block, int64_t first, int64_t last) {
  LRX_CHECK(ok, "quantize_nf4", "x", "contain only finite values", "NaN/Inf in block ", block, " (elements ", first,
            "..", last, ")");
}

// double_quant: absmax fp32 non-empty (any shape, flattened); nested_map fp32 [256] on absmax's device,
// sorted ascending (the nearest-code search relies on it). The map is read on the host: a CUDA map is
// copied there first (256 floats, one small sync; double quant is a one-off per weight).
inline void check_double_quant_args(const at::Tensor& absmax, const at::Tensor& nested_map) {
  constexpr const char* op = "double_quant";
  check_dtype(absmax, at::kFloat, op, "absmax");
  check_dtype(nested_map, at::kFloat, op, "nested_map");
  check_numel(nested_map, 256, op, "nested_map");
  LRX_CHECK(absmax.numel() > 0, op, "absmax", "be non-empty", "shape ", absmax.sizes());
  check_same_device(nested_map, absmax, op, "nested_map", "absmax");
  const at::Tensor host = nested_map.is_cpu() ? nested_map.contiguous() : nested_map.cpu().contiguous();
  const float* map = host.const_data_ptr<float>();
  for (int k = 1; k < 256; ++k)
    LRX_CHECK(map[k - 1] <= map[k], op, "nested_map", "be sorted ascending", "map[", k - 1, "] = ", map[k - 1],
              " > map[", k, "] = ", map[k]);
}

// dequantize_nf4: the bundle of `numel` elements and an output dtype fp32/fp16/bf16.
inline NF4Scales check_dequantize_nf4_args(const at::Tensor& packed, const at::Tensor& absmax,
                                           const c10::optional<at::Tensor>& nested_absmax,
                                           const c10::optional<at::Tensor>& nested_map,
                                           const c10::optional<at::Tensor>& offset, int64_t blocksize, int64_t numel,
                                           at::ScalarType dtype) {
  constexpr const char* op = "dequantize_nf4";
  const NF4Scales s = check_nf4_weight(op, packed, absmax, nested_absmax, nested_map, offset, blocksize, numel);
  LRX_CHECK_TYPE(is_float_dtype(dtype), op, "dtype", "be float32, float16 or bfloat16", dtype);
  return s;
}

// dequantize_nf4_out: the bundle, and the caller's buffer: float dtype, numel elements, contiguous, on
// packed's device.
inline NF4Scales check_dequantize_nf4_out_args(const at::Tensor& packed, const at::Tensor& absmax,
                                               const c10::optional<at::Tensor>& nested_absmax,
                                               const c10::optional<at::Tensor>& nested_map,
                                               const c10::optional<at::Tensor>& offset, int64_t blocksize,
                                               int64_t numel, const at::Tensor& out) {
  constexpr const char* op = "dequantize_nf4_out";
  const NF4Scales s = check_nf4_weight(op, packed, absmax, nested_absmax, nested_map, offset, blocksize, numel);
  LRX_CHECK_TYPE(is_float_dtype(out.scalar_type()), op, "out", "be float32, float16 or bfloat16",
                 out.scalar_type());
  check_numel(out, numel, op, "out");
  LRX_CHECK(out.is_contiguous(), op, "out", "be contiguous", "strides ", out.strides());
  check_same_device(out, packed, op, "out", "packed");
  return s;
}

}  // namespace lowrank_ext
