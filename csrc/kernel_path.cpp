// kernel_path.cpp — the per-thread record of the last kernel each product ran (kernel_path.h), and the
// op that reads it: last_kernel_path(str product) -> str, product in {"nt", "nn", "dequantize", "quantize", "adamw"}.

#include "lowrank_ext/kernel_path.h"

#include <string>

#include "lowrank_ext/check.h"

namespace lowrank_ext {
namespace {
thread_local const char* g_last[kKernelProducts] = {"", "", "", "", ""};
}  // namespace

void record_kernel_path(KernelProduct product, const char* path) { g_last[static_cast<int>(product)] = path; }

const char* last_kernel_path(KernelProduct product) { return g_last[static_cast<int>(product)]; }

std::string last_kernel_path_op(const std::string& product) {
  if (product == "nt") return last_kernel_path(KernelProduct::kNT);
  if (product == "nn") return last_kernel_path(KernelProduct::kNN);
  if (product == "dequantize") return last_kernel_path(KernelProduct::kDequantize);
  if (product == "quantize") return last_kernel_path(KernelProduct::kQuantize);
  if (product == "adamw") return last_kernel_path(KernelProduct::kAdamW);
  LRX_CHECK(false, "last_kernel_path", "product", "be nt, nn, dequantize, quantize or adamw", product);
  return "";
}

}  // namespace lowrank_ext
