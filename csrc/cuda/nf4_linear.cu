// cuda/nf4_linear.cu — the fused NF4 linear / LoRA ops on CUDA: checks, launchers and the dispatcher.
//
//   nf4_linear               y = x · deq(W)ᵀ + bias                            x [..., K] -> y [..., N]
//   nf4_linear_grad_input    gx = gy · deq(W)                                  gy [..., N] -> gx [..., K]
//   nf4_lora_linear          u = x_lora · Aᵀ;  y = x · deq(W)ᵀ + s · u · Bᵀ + bias     -> (y, u)
//   nf4_lora_linear_backward gu = s·gy·B; gB = s·gyᵀ·u; gA = guᵀ·x_lora; gx = gy·deq(W) (+ gu·A)
//   nf4_row_sqnorm           sq[n] = ||deq(W)[n, :]||²
// W never exists densely: the NF4 kernels dequantize tile by tile. The small low-rank GEMMs (u, gu, gA, gB)
// go to cuBLAS through at::mm. Leading dims of x are flattened (any strides: copied when not row-major).
//
// Dispatcher (NT = forward, NN = grad input), by dtype and M = rows of x:
//   NT, fp16/bf16, M <= 16, K % 32 == 0, sm80+  -> nf4_gemv_kernel (tensor-core GEMV, split-K)
//   fp16/bf16 otherwise                          -> launch_nf4_mma_nt / _nn (tensor cores; false = unsupported)
//   anything left (fp32, or what mma refuses)    -> nf4_simt_kernel (fp32 FMA)
// LOWRANK_EXT_FORCE_KERNEL=gemv|mma|simt forces one path (tests, benchmarks); an unsupported forced path is
// an error, never a silent fallback.

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "lowrank_ext/nf4_args.h"
#include "nf4_gemv_kernel.cuh"
#include "nf4_mma.h"
#include "nf4_simt_kernel.cuh"

namespace lowrank_ext {
namespace {

// ---------------------------------------------------------------------------------------------------
// Checks (message form of check.h)
// ---------------------------------------------------------------------------------------------------

struct Weight {
  const at::Tensor& packed;
  const at::Tensor& absmax;
  const c10::optional<at::Tensor>& nested_absmax;
  const c10::optional<at::Tensor>& nested_map;
  const c10::optional<at::Tensor>& offset;
  int64_t blocksize;
};

// Checks the bundle for an [N, K] weight living on `ref`'s device and returns the kernels' view of it.
NF4WeightView check_weight(const char* op, const Weight& w, int64_t N, int64_t K, const at::Tensor& ref,
                           const char* ref_arg) {
  LRX_CHECK(N > 0, op, "out_features", "be positive", N);
  LRX_CHECK(K > 0, op, "in_features", "be positive", K);
  check_same_device(w.packed, ref, op, "packed", ref_arg);
  LRX_CHECK(w.packed.numel() == ceil_div(N * K, 2), op, "packed",
            "hold ceil(out_features * in_features / 2) = " + std::to_string(ceil_div(N * K, 2)) + " bytes for [" +
                std::to_string(N) + ", " + std::to_string(K) + "]",
            w.packed.numel());
  const NF4Scales s = check_nf4_weight(op, w.packed, w.absmax, w.nested_absmax, w.nested_map, w.offset, w.blocksize,
                                       N * K);
  return NF4WeightView{w.packed.const_data_ptr<uint8_t>(), s, static_cast<int>(w.blocksize), N, K};
}

// An activation-like tensor: float dtype (no float64 on CUDA), on ref's device, same dtype as ref.
void check_act(const char* op, const at::Tensor& t, const char* arg, const at::Tensor& ref, const char* ref_arg) {
  check_float_input(t, op, arg);
  check_same_device(t, ref, op, arg, ref_arg);
  LRX_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, arg,
                 std::string("have the dtype of ") + ref_arg + " (" + c10::toString(ref.scalar_type()) + ")",
                 t.scalar_type());
}

std::string shape_str_of(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

void check_shape(const char* op, const at::Tensor& t, const char* arg, std::vector<int64_t> want) {
  LRX_CHECK(t.sizes() == at::IntArrayRef(want), op, arg, "have shape " + shape_str_of(want), t.sizes());
}

void check_bias(const char* op, const c10::optional<at::Tensor>& bias, int64_t N, const at::Tensor& x) {
  if (!bias.has_value()) return;
  check_act(op, *bias, "bias", x, "x");
  LRX_CHECK(bias->dim() == 1 && bias->size(0) == N, op, "bias", "have shape [out_features] = [" + std::to_string(N) + "]",
            bias->sizes());
}

// x [..., K] with K = x.size(-1) > 0, as a row-major 2-D [M, K] view (copied if needed).
at::Tensor rows_of(const char* op, const at::Tensor& x, const char* arg) {
  LRX_CHECK(x.dim() >= 1, op, arg, "have at least 1 dimension", x.dim());
  return x.reshape({-1, x.size(-1)}).contiguous();
}

std::vector<int64_t> with_last(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = last;
  return s;
}

// ---------------------------------------------------------------------------------------------------
// Dispatcher
// ---------------------------------------------------------------------------------------------------

enum class Path { kAuto, kGemv, kMma, kSimt };

Path forced_path() {
  const char* env = std::getenv("LOWRANK_EXT_FORCE_KERNEL");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return Path::kAuto;
  if (std::strcmp(env, "gemv") == 0) return Path::kGemv;
  if (std::strcmp(env, "mma") == 0) return Path::kMma;
  if (std::strcmp(env, "simt") == 0) return Path::kSimt;
  LRX_CHECK(false, "nf4_linear", "LOWRANK_EXT_FORCE_KERNEL", "be auto, gemv, mma or simt", env);
  return Path::kAuto;
}

ActDType act_dtype(at::ScalarType st) {
  return st == at::kFloat ? ActDType::kFloat32 : st == at::kHalf ? ActDType::kFloat16 : ActDType::kBFloat16;
}

template <typename F>
void dispatch_float(ActDType dt, F&& f) {
  switch (dt) {
    case ActDType::kFloat32: f(float{}); break;
    case ActDType::kFloat16: f(__half{}); break;
    case ActDType::kBFloat16: f(__nv_bfloat16{}); break;
  }
}

bool gemv_supported(const NF4MatmulParams& p) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return p.dtype != ActDType::kFloat32 && p.M >= 1 && p.M <= cuda::kGemvMaxM && p.w.K % 32 == 0 &&
         reinterpret_cast<uintptr_t>(p.w.packed) % 16 == 0 && prop->major >= 8;
}

void launch_gemv(const NF4MatmulParams& p, const at::Tensor& like, cudaStream_t stream) {
  const int64_t row_groups = ceil_div(p.w.N, cuda::kGemvRows);
  // Split K until the grid has ~4 CTAs per SM: N is often too small to fill the GPU at M <= 16.
  const int64_t target = 4 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  const int64_t want_splits = std::max<int64_t>(1, ceil_div(target, row_groups));
  int64_t kslice = ceil_div(ceil_div(p.w.K, want_splits), cuda::kGemvChunk) * cuda::kGemvChunk;
  kslice = std::min<int64_t>(std::max<int64_t>(kslice, cuda::kGemvChunk), cuda::kGemvMaxKSlice);
  const int64_t splits = ceil_div(p.w.K, kslice);
  cuda::GemvArgs args{p, static_cast<int>(kslice), static_cast<int>(splits), nullptr, nullptr};
  at::Tensor partial, counters;
  if (splits > 1) {
    partial = at::empty({splits, p.M, p.w.N}, like.options().dtype(at::kFloat));
    counters = at::zeros({row_groups}, like.options().dtype(at::kInt));
    args.partial = partial.mutable_data_ptr<float>();
    args.counters = counters.mutable_data_ptr<int>();
  }
  const dim3 grid(static_cast<unsigned>(row_groups), static_cast<unsigned>(splits));
  dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {
      cuda::nf4_gemv_kernel<T><<<grid, cuda::kGemvThreads, 0, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

template <bool kNN>
void launch_simt(const NF4MatmulParams& p, cudaStream_t stream) {
  const int64_t cols = kNN ? p.w.K : p.w.N;
  const dim3 grid(static_cast<unsigned>(ceil_div(cols, cuda::kSimtTileP)),
                  static_cast<unsigned>(ceil_div(p.M, cuda::kSimtTileM)));
  TORCH_CHECK(grid.y <= 65535, "lowrank_ext: M = ", p.M, " too large for the SIMT kernel's grid");
  dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    cuda::nf4_simt_kernel<T, kNN><<<grid, cuda::kSimtThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// y = x · deq(W)ᵀ (+ low rank) (+ bias) into p.out.
void run_nt(const NF4MatmulParams& p, const at::Tensor& like) {
  if (p.M == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Path path = forced_path();
  const bool half = p.dtype != ActDType::kFloat32;
  if (path == Path::kGemv || (path == Path::kAuto && gemv_supported(p))) {
    LRX_CHECK(gemv_supported(p), "nf4_linear", "LOWRANK_EXT_FORCE_KERNEL=gemv",
              "be used with fp16/bf16, M <= 16, K % 32 == 0, an aligned weight and sm80+", "M = ", p.M,
              ", K = ", p.w.K);
    launch_gemv(p, like, stream);
    return;
  }
  if (path == Path::kMma || (path == Path::kAuto && half)) {
    if (launch_nf4_mma_nt(p, stream)) return;
    LRX_CHECK(path != Path::kMma, "nf4_linear", "LOWRANK_EXT_FORCE_KERNEL=mma", "be used with a supported shape",
              "M = ", p.M, ", N = ", p.w.N, ", K = ", p.w.K);
  }
  launch_simt<false>(p, stream);
}

// gx = gy · deq(W) (+ gu · lora_A) into p.out.
void run_nn(const NF4MatmulParams& p) {
  if (p.M == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Path path = forced_path();
  LRX_CHECK(path != Path::kGemv, "nf4_linear_grad_input", "LOWRANK_EXT_FORCE_KERNEL",
            "not be gemv for the grad-input (NN) product", "gemv");
  if (path == Path::kMma || (path == Path::kAuto && p.dtype != ActDType::kFloat32)) {
    if (launch_nf4_mma_nn(p, stream)) return;
    LRX_CHECK(path != Path::kMma, "nf4_linear_grad_input", "LOWRANK_EXT_FORCE_KERNEL=mma",
              "be used with a supported shape", "M = ", p.M, ", N = ", p.w.N, ", K = ", p.w.K);
  }
  launch_simt<true>(p, stream);
}

NF4MatmulParams make_params(const NF4WeightView& w, const at::Tensor& a2d, at::Tensor& out2d) {
  NF4MatmulParams p{};
  p.dtype = act_dtype(a2d.scalar_type());
  p.M = a2d.size(0);
  p.w = w;
  p.a = a2d.const_data_ptr();
  p.lda = a2d.stride(0);
  p.out = out2d.mutable_data_ptr();
  p.ld_out = out2d.stride(0);
  return p;
}

// ---------------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------------

at::Tensor nf4_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_map,
                           const c10::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features,
                           const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "nf4_linear";
  check_float_input(x, op, "x");
  LRX_CHECK(x.dim() >= 1, op, "x", "have at least 1 dimension", x.dim());
  const c10::cuda::CUDAGuard guard(x.device());
  const NF4WeightView w = check_weight(op, {packed, absmax, nested_absmax, nested_map, offset, blocksize},
                                       out_features, x.size(-1), x, "x");
  check_bias(op, bias, out_features, x);
  const at::Tensor x2 = rows_of(op, x, "x");
  at::Tensor y = at::empty({x2.size(0), out_features}, x.options());
  NF4MatmulParams p = make_params(w, x2, y);
  at::Tensor b;
  if (bias.has_value()) b = bias->contiguous(), p.bias = b.const_data_ptr();
  run_nt(p, x);
  return y.view(with_last(x, out_features));
}

at::Tensor nf4_linear_grad_input_cuda(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                                      const c10::optional<at::Tensor>& nested_absmax,
                                      const c10::optional<at::Tensor>& nested_map,
                                      const c10::optional<at::Tensor>& offset, int64_t blocksize,
                                      int64_t in_features) {
  constexpr const char* op = "nf4_linear_grad_input";
  check_float_input(grad_y, op, "grad_y");
  LRX_CHECK(grad_y.dim() >= 1, op, "grad_y", "have at least 1 dimension", grad_y.dim());
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const NF4WeightView w = check_weight(op, {packed, absmax, nested_absmax, nested_map, offset, blocksize},
                                       grad_y.size(-1), in_features, grad_y, "grad_y");
  const at::Tensor gy = rows_of(op, grad_y, "grad_y");
  at::Tensor gx = at::empty({gy.size(0), in_features}, grad_y.options());
  run_nn(make_params(w, gy, gx));
  return gx.view(with_last(grad_y, in_features));
}

// lora_A [r, K], lora_B [N, r]: same dtype and device as x.
int64_t check_lora(const char* op, const at::Tensor& lora_A, const at::Tensor& lora_B, int64_t N, int64_t K,
                   const at::Tensor& x, const char* x_arg) {
  check_act(op, lora_A, "lora_A", x, x_arg);
  check_act(op, lora_B, "lora_B", x, x_arg);
  LRX_CHECK(lora_A.dim() == 2 && lora_A.size(1) == K && lora_A.size(0) > 0, op, "lora_A",
            "have shape [r, in_features] = [r, " + std::to_string(K) + "] with r > 0", lora_A.sizes());
  const int64_t r = lora_A.size(0);
  check_shape(op, lora_B, "lora_B", {N, r});
  return r;
}

std::tuple<at::Tensor, at::Tensor> nf4_lora_linear_cuda(
    const at::Tensor& x, const at::Tensor& x_lora, const at::Tensor& packed, const at::Tensor& absmax,
    const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_map,
    const c10::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling, const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "nf4_lora_linear";
  check_float_input(x, op, "x");
  LRX_CHECK(x.dim() >= 1, op, "x", "have at least 1 dimension", x.dim());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = out_features, K = x.size(-1);
  const NF4WeightView w = check_weight(op, {packed, absmax, nested_absmax, nested_map, offset, blocksize}, N, K, x, "x");
  check_act(op, x_lora, "x_lora", x, "x");
  LRX_CHECK(x_lora.sizes() == x.sizes(), op, "x_lora", "have the shape of x " + shape_str(x), x_lora.sizes());
  const int64_t r = check_lora(op, lora_A, lora_B, N, K, x, "x");
  check_bias(op, bias, N, x);
  const at::Tensor x2 = rows_of(op, x, "x");
  const at::Tensor u = at::mm(rows_of(op, x_lora, "x_lora"), lora_A.t());  // [M, r], cuBLAS
  const at::Tensor B = lora_B.contiguous();
  at::Tensor y = at::empty({x2.size(0), N}, x.options());
  NF4MatmulParams p = make_params(w, x2, y);
  p.lowrank = u.const_data_ptr();
  p.ld_lowrank = u.stride(0);
  p.lowrank_w = B.const_data_ptr();
  p.ld_lowrank_w = B.stride(0);
  p.r = static_cast<int>(r);
  p.scaling = static_cast<float>(scaling);
  at::Tensor b;
  if (bias.has_value()) b = bias->contiguous(), p.bias = b.const_data_ptr();
  run_nt(p, x);
  return {y.view(with_last(x, N)), u.view(with_last(x, r))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nf4_lora_linear_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_lora, const at::Tensor& u, const at::Tensor& packed,
    const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
    const c10::optional<at::Tensor>& nested_map, const c10::optional<at::Tensor>& offset, int64_t blocksize,
    int64_t in_features, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, bool lora_grad_into_x) {
  constexpr const char* op = "nf4_lora_linear_backward";
  check_float_input(grad_y, op, "grad_y");
  LRX_CHECK(grad_y.dim() >= 1, op, "grad_y", "have at least 1 dimension", grad_y.dim());
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const int64_t N = grad_y.size(-1), K = in_features;
  const NF4WeightView w =
      check_weight(op, {packed, absmax, nested_absmax, nested_map, offset, blocksize}, N, K, grad_y, "grad_y");
  const int64_t r = check_lora(op, lora_A, lora_B, N, K, grad_y, "grad_y");
  check_act(op, x_lora, "x_lora", grad_y, "grad_y");
  check_act(op, u, "u", grad_y, "grad_y");
  const int64_t M = grad_y.numel() / N;
  LRX_CHECK(x_lora.numel() == M * K && x_lora.size(-1) == K, op, "x_lora",
            "have " + std::to_string(M) + " rows of in_features = " + std::to_string(K), x_lora.sizes());
  LRX_CHECK(u.numel() == M * r && u.size(-1) == r, op, "u", "have " + std::to_string(M) + " rows of r = " + std::to_string(r),
            u.sizes());
  const at::Tensor gy = rows_of(op, grad_y, "grad_y");
  const at::Tensor xl = rows_of(op, x_lora, "x_lora");
  const at::Tensor u2 = rows_of(op, u, "u");
  const at::Tensor A = lora_A.contiguous();
  const at::Tensor gu = at::mm(gy, lora_B).mul_(scaling);         // [M, r]  gu = s · gy · B
  at::Tensor grad_B = at::mm(gy.t(), u2).mul_(scaling);           // [N, r]  gB = s · gyᵀ · u
  at::Tensor grad_A = at::mm(gu.t(), xl);                         // [r, K]  gA = guᵀ · x_lora
  at::Tensor gx = at::empty({M, K}, grad_y.options());
  NF4MatmulParams p = make_params(w, gy, gx);
  at::Tensor grad_x_lora;
  if (lora_grad_into_x) {  // gx = gy · deq(W) + gu · A in one NN pass (r extra reduction steps)
    p.lowrank = gu.const_data_ptr();
    p.ld_lowrank = gu.stride(0);
    p.lowrank_w = A.const_data_ptr();
    p.ld_lowrank_w = A.stride(0);
    p.r = static_cast<int>(r);
    p.scaling = 1.0f;
    grad_x_lora = at::empty({0}, grad_y.options());
  } else {  // dropout: the caller masks gu · A before adding it to gx
    grad_x_lora = at::mm(gu, A).view(x_lora.sizes());
  }
  run_nn(p);
  return {gx.view(with_last(grad_y, K)), grad_A, grad_B, grad_x_lora};
}

at::Tensor nf4_row_sqnorm_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                               const c10::optional<at::Tensor>& nested_absmax,
                               const c10::optional<at::Tensor>& nested_map, const c10::optional<at::Tensor>& offset,
                               int64_t blocksize, int64_t out_features, int64_t in_features) {
  constexpr const char* op = "nf4_row_sqnorm";
  const c10::cuda::CUDAGuard guard(packed.device());
  const NF4WeightView w = check_weight(op, {packed, absmax, nested_absmax, nested_map, offset, blocksize},
                                       out_features, in_features, packed, "packed");
  at::Tensor sq = at::empty({out_features}, packed.options().dtype(at::kFloat));
  constexpr int kThreads = 256;  // 8 rows (warps) per CTA
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cuda::nf4_row_sqnorm_kernel<<<static_cast<unsigned>(ceil_div(out_features, kThreads / 32)), kThreads, 0, stream>>>(
      w, sq.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return sq;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, CUDA, m) {
  m.impl("nf4_linear", &nf4_linear_cuda);
  m.impl("nf4_linear_grad_input", &nf4_linear_grad_input_cuda);
  m.impl("nf4_lora_linear", &nf4_lora_linear_cuda);
  m.impl("nf4_lora_linear_backward", &nf4_lora_linear_backward_cuda);
  m.impl("nf4_row_sqnorm", &nf4_row_sqnorm_cuda);
}

}  // namespace lowrank_ext
