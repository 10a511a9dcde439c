// check.h — argument checks shared by the CPU and CUDA implementations of every op.
//
// Message form (docs/architecture.md, "How to add an op"): "lowrank_ext::<op>: <arg> must <expected>, got <actual>".
// Each op writes its checks once in a `check_<op>_args(...)` function that both backends call.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace lowrank_ext {

// LRX_CHECK(cond, op, arg, expected, actual...) raises c10::ValueError (Python ValueError).
#define LRX_CHECK(cond, op, arg, expected, ...)                                                  \
  TORCH_CHECK_VALUE(cond, "lowrank_ext::", op, ": ", arg, " must ", expected, ", got ", __VA_ARGS__)

// Same, raising c10::TypeError (Python TypeError) — for wrong dtypes.
#define LRX_CHECK_TYPE(cond, op, arg, expected, ...)                                             \
  TORCH_CHECK_TYPE(cond, "lowrank_ext::", op, ": ", arg, " must ", expected, ", got ", __VA_ARGS__)

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

inline bool is_float_dtype(c10::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// fp32, fp16 or bf16 (and float64 where `allow_double`, for the simple/gradcheck path).
inline void check_float_input(const at::Tensor& t, const char* op, const char* arg, bool allow_double = false) {
  const auto st = t.scalar_type();
  LRX_CHECK_TYPE(is_float_dtype(st) || (allow_double && st == at::kDouble), op, arg,
                 allow_double ? "be float32, float16, bfloat16 or float64" : "be float32, float16 or bfloat16",
                 st);
}

inline void check_dtype(const at::Tensor& t, c10::ScalarType want, const char* op, const char* arg) {
  LRX_CHECK_TYPE(t.scalar_type() == want, op, arg, std::string("have dtype ") + c10::toString(want),
                 t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* arg,
                              const char* ref_arg) {
  LRX_CHECK(t.device() == ref.device(), op, arg,
            std::string("be on the same device as ") + ref_arg + " (" + ref.device().str() + ")",
            t.device());
}

inline void check_numel(const at::Tensor& t, int64_t want, const char* op, const char* arg) {
  LRX_CHECK(t.numel() == want, op, arg, "have " + std::to_string(want) + " elements", t.numel(),
            " (shape ", t.sizes(), ")");
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace lowrank_ext
