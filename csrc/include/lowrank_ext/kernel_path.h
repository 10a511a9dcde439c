// kernel_path.h — which kernel the last call of a product ran, per thread: the dispatchers record it,
// `torch.ops.lowrank_ext.last_kernel_path(product)` reads it (python -m lowrank_ext doctor, tests).
// Torch-free. The record is the kernel that really ran, not a mirror of the dispatch rule.
//
//   product      names recorded (CPU | CUDA)
//   nt           gemv-avx512-blocked, gemv-avx512, gemv-avx2,  | gemv, mma, simt   (x · deq(W)ᵀ)
//                gemv-scalar, panel, panel-bf16
//   nn           panel, panel-bf16                             | mma, simt         (gy · deq(W))
//   dequantize   avx2, avx2-stream, scalar                     | vec16, scalar-store
//   quantize     avx2, scalar                                  | warp-per-block
//   adamw        avx2, scalar (both steps)                     | adamw32, adamw8bit
// Thread-local: the value belongs to the thread that called the op ("" until one ran there); the
// autograd engine runs CUDA backward passes on its own threads, so read it after a direct call.
#pragma once

#include <string>

namespace lowrank_ext {

enum class KernelProduct : int { kNT = 0, kNN = 1, kDequantize = 2, kQuantize = 3, kAdamW = 4 };
constexpr int kKernelProducts = 5;

// `path` must be a string literal (the pointer is kept).
void record_kernel_path(KernelProduct product, const char* path);
const char* last_kernel_path(KernelProduct product);

// The op behind torch.ops.lowrank_ext.last_kernel_path (csrc/kernel_path.cpp; schema in lowrank_ext.cpp).
std::string last_kernel_path_op(const std::string& product);

}  // namespace lowrank_ext
