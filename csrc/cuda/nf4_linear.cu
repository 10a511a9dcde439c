// cuda/nf4_linear.cu — the fused NF4 linear / LoRA ops on CUDA: launchers and the kernel-path dispatcher.
//
//   nf4_linear               y = x · deq(W)ᵀ + bias                            x [M, K] -> y [M, N]
//   nf4_linear_grad_input    gx = gy · deq(W)                                  gy [M, N] -> gx [M, K]
//   nf4_lora_linear          u = x_lora · Aᵀ;  y = x · deq(W)ᵀ + s · u · Bᵀ + bias     -> (y, u)
//   nf4_lora_linear_backward gu = s·gy·B; gB = s·gyᵀ·u; gA = guᵀ·x_lora; gx = gy·deq(W) (+ gu·A)
//                            (gx, gu·A: empty [0] and not computed when compute_grad_input is false)
//   nf4_row_sqnorm           sq[n] = ||deq(W)[n, :]||²
// W never exists densely: the NF4 kernels dequantize tile by tile. The small low-rank GEMMs (u, gu, gA, gB)
// go to cuBLAS through at::mm. Activations are 2-D (any strides: copied when not row-major); the argument
// checks are lowrank_ext/nf4_linear_args.h, shared with the CPU implementation (no float64 here).
//
// Dispatcher (NT = forward, NN = grad input), by dtype and M = rows of x:
//   NT, fp16/bf16, M <= 16, K % 32 == 0, N K < 2^32, sm80+ -> nf4_gemv_kernel (tensor-core GEMV, split-K)
//   fp16/bf16 otherwise                          -> launch_nf4_mma_nt / _nn (tensor cores; false = unsupported)
//   anything left (fp32, or what mma refuses)    -> nf4_simt_kernel (fp32 FMA)
// LOWRANK_EXT_FORCE_KERNEL=gemv|mma|simt forces one path (tests, benchmarks); an unsupported forced path is
// an error, never a silent fallback. The path that ran is recorded (last_kernel_path("nt" | "nn")).
// fp16/bf16: every path multiplies the same operands — deq(W) rounded once to the activation dtype, the
// LoRA input s·u rounded once to it — with exact products and fp32 sums, so paths differ only by the fp32
// summation order (docs/kernels.md, "Results across paths"). The split-K GEMV's scratch is a persistent
// per-(device, stream) workspace (gemv_workspace.h).

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "gemv_workspace.h"
#include "lowrank_ext/kernel_path.h"
#include "lowrank_ext/nf4_linear_args.h"
#include "nf4_gemv.h"
#include "nf4_mma.h"
#include "nf4_simt_kernel.cuh"

namespace lowrank_ext {
namespace {

constexpr bool kAllowDouble = false;  // CUDA kernels: fp32, fp16, bf16

// The kernels' view of a checked [N, K] weight.
NF4WeightView weight_view(const at::Tensor& packed, const NF4LinearArgs& a, int64_t blocksize) {
  return NF4WeightView{packed.const_data_ptr<uint8_t>(), a.scales, static_cast<int>(blocksize), a.N, a.K};
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
         reinterpret_cast<uintptr_t>(p.w.packed) % 16 == 0 && prop->major >= 8 &&
         p.w.N * p.w.K < (int64_t{1} << 32);  // the kernel's 32-bit weight offsets
}

void launch_gemv(NF4MatmulParams p, const at::Tensor& like, cudaStream_t stream) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();  // cached by torch: no driver call
  at::Tensor x_aligned;  // the kernel stages x with 16-byte copies: a misaligned x (rare: a view) is copied
  if (reinterpret_cast<uintptr_t>(p.a) % 16 != 0 || p.lda % 8 != 0) {
    x_aligned = at::empty({p.M, p.w.K}, like.options());
    const size_t elem = 2;  // fp16 / bf16
    C10_CUDA_CHECK(cudaMemcpy2DAsync(x_aligned.data_ptr(), p.w.K * elem, p.a, p.lda * elem, p.w.K * elem, p.M,
                                     cudaMemcpyDeviceToDevice, stream));
    p.a = x_aligned.const_data_ptr();
    p.lda = p.w.K;
  }
  const cuda::GemvPlan plan = cuda::plan_gemv(
      p.w.N, p.w.K, prop->multiProcessorCount, p.M,
      cuda::gemv_ctas_per_sm(prop->sharedMemPerMultiprocessor, prop->reservedSharedMemPerBlock));
  cuda::GemvArgs args{p, plan.kslice, plan.splits, nullptr, nullptr};
  const dim3 grid(static_cast<unsigned>(plan.row_groups), static_cast<unsigned>(plan.splits));
  auto launch = [&] {
    C10_CUDA_CHECK(p.dtype == ActDType::kBFloat16 ? cuda::launch_nf4_gemv_bf16(args, grid, stream)
                                                  : cuda::launch_nf4_gemv_fp16(args, grid, stream));
  };
  if (plan.splits == 1) return launch();
  // Split-K scratch from the persistent per-(device, stream) workspace (gemv_workspace.h): no allocation
  // or memset per call. The lease's lock is held until the kernel is launched.
  const GemvWorkspaceLease ws(plan.row_groups, int64_t(plan.splits) * p.M * p.w.N, like.device(), stream);
  args.partial = ws.partial();
  args.counters = ws.counters();
  launch();
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
              "be used with fp16/bf16, M <= 16, K % 32 == 0, an aligned weight, N * K < 2^32 and sm80+", "M = ", p.M,
              ", N = ", p.w.N, ", K = ", p.w.K);
    launch_gemv(p, like, stream);
    record_kernel_path(KernelProduct::kNT, "gemv");
    return;
  }
  if (path == Path::kMma || (path == Path::kAuto && half)) {
    if (launch_nf4_mma_nt(p, stream)) return record_kernel_path(KernelProduct::kNT, "mma");
    LRX_CHECK(path != Path::kMma, "nf4_linear", "LOWRANK_EXT_FORCE_KERNEL=mma", "be used with a supported shape",
              "M = ", p.M, ", N = ", p.w.N, ", K = ", p.w.K);
  }
  launch_simt<false>(p, stream);
  record_kernel_path(KernelProduct::kNT, "simt");
}

// gx = gy · deq(W) (+ gu · lora_A) into p.out.
void run_nn(const NF4MatmulParams& p) {
  if (p.M == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Path path = forced_path();
  LRX_CHECK(path != Path::kGemv, "nf4_linear_grad_input", "LOWRANK_EXT_FORCE_KERNEL",
            "not be gemv for the grad-input (NN) product", "gemv");
  if (path == Path::kMma || (path == Path::kAuto && p.dtype != ActDType::kFloat32)) {
    if (launch_nf4_mma_nn(p, stream)) return record_kernel_path(KernelProduct::kNN, "mma");
    LRX_CHECK(path != Path::kMma, "nf4_linear_grad_input", "LOWRANK_EXT_FORCE_KERNEL=mma",
              "be used with a supported shape", "M = ", p.M, ", N = ", p.w.N, ", K = ", p.w.K);
  }
  launch_simt<true>(p, stream);
  record_kernel_path(KernelProduct::kNN, "simt");
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
  const NF4LinearArgs a = check_nf4_linear_args(x, packed, absmax, nested_absmax, nested_map, offset, blocksize,
                                                out_features, bias, kAllowDouble);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = x.contiguous();
  at::Tensor y = at::empty({a.M, a.N}, x.options());
  NF4MatmulParams p = make_params(weight_view(packed, a, blocksize), x2, y);
  at::Tensor b;
  if (bias.has_value()) b = bias->contiguous(), p.bias = b.const_data_ptr();
  run_nt(p, x);
  return y;
}

at::Tensor nf4_linear_grad_input_cuda(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                                      const c10::optional<at::Tensor>& nested_absmax,
                                      const c10::optional<at::Tensor>& nested_map,
                                      const c10::optional<at::Tensor>& offset, int64_t blocksize,
                                      int64_t in_features) {
  const NF4LinearArgs a = check_nf4_linear_grad_input_args(grad_y, packed, absmax, nested_absmax, nested_map, offset,
                                                           blocksize, in_features, kAllowDouble);
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const at::Tensor gy = grad_y.contiguous();
  at::Tensor gx = at::empty({a.M, a.K}, grad_y.options());
  run_nn(make_params(weight_view(packed, a, blocksize), gy, gx));
  return gx;
}

std::tuple<at::Tensor, at::Tensor> nf4_lora_linear_cuda(
    const at::Tensor& x, const at::Tensor& x_lora, const at::Tensor& packed, const at::Tensor& absmax,
    const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_map,
    const c10::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling, const c10::optional<at::Tensor>& bias) {
  const NF4LinearArgs a = check_nf4_lora_linear_args(x, x_lora, packed, absmax, nested_absmax, nested_map, offset,
                                                     blocksize, out_features, lora_A, lora_B, scaling, bias,
                                                     kAllowDouble);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = x.contiguous();
  const at::Tensor u = at::mm(x_lora, lora_A.t());  // [M, r], cuBLAS (a fresh row-major tensor)
  const at::Tensor B = lora_B.contiguous();
  at::Tensor y = at::empty({a.M, a.N}, x.options());
  NF4MatmulParams p = make_params(weight_view(packed, a, blocksize), x2, y);
  p.lowrank = u.const_data_ptr();
  p.ld_lowrank = u.stride(0);
  p.lowrank_w = B.const_data_ptr();
  p.ld_lowrank_w = B.stride(0);
  p.r = static_cast<int>(a.r);
  p.scaling = static_cast<float>(scaling);
  at::Tensor b;
  if (bias.has_value()) b = bias->contiguous(), p.bias = b.const_data_ptr();
  run_nt(p, x);
  return {y, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nf4_lora_linear_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_lora, const at::Tensor& u, const at::Tensor& packed,
    const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
    const c10::optional<at::Tensor>& nested_map, const c10::optional<at::Tensor>& offset, int64_t blocksize,
    int64_t in_features, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, bool lora_grad_into_x,
    bool compute_grad_input) {
  const NF4LinearArgs a =
      check_nf4_lora_linear_backward_args(grad_y, x_lora, u, packed, absmax, nested_absmax, nested_map, offset,
                                          blocksize, in_features, lora_A, lora_B, scaling, kAllowDouble);
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const at::Tensor gy = grad_y.contiguous();
  const at::Tensor A = lora_A.contiguous();
  const at::Tensor gu = at::mm(gy, lora_B).mul_(scaling);     // [M, r]  gu = s · gy · B
  at::Tensor grad_B = at::mm(gy.t(), u).mul_(scaling);        // [N, r]  gB = s · gyᵀ · u
  at::Tensor grad_A = at::mm(gu.t(), x_lora);                 // [r, K]  gA = guᵀ · x_lora
  if (!compute_grad_input)  // x (and x_lora) need no gradient: no NF4 NN launch, no gu · A
    return {at::empty({0}, grad_y.options()), grad_A, grad_B, at::empty({0}, grad_y.options())};
  at::Tensor gx = at::empty({a.M, a.K}, grad_y.options());
  NF4MatmulParams p = make_params(weight_view(packed, a, blocksize), gy, gx);
  at::Tensor grad_x_lora;
  if (lora_grad_into_x) {  // gx = gy · deq(W) + gu · A in one NN pass (r extra reduction steps)
    p.lowrank = gu.const_data_ptr();
    p.ld_lowrank = gu.stride(0);
    p.lowrank_w = A.const_data_ptr();
    p.ld_lowrank_w = A.stride(0);
    p.r = static_cast<int>(a.r);
    p.scaling = 1.0f;
    grad_x_lora = at::empty({0}, grad_y.options());
  } else {  // dropout: the caller masks gu · A before adding it to gx
    grad_x_lora = at::mm(gu, A);
  }
  run_nn(p);
  return {gx, grad_A, grad_B, grad_x_lora};
}

at::Tensor nf4_row_sqnorm_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                               const c10::optional<at::Tensor>& nested_absmax,
                               const c10::optional<at::Tensor>& nested_map, const c10::optional<at::Tensor>& offset,
                               int64_t blocksize, int64_t out_features, int64_t in_features) {
  const NF4LinearArgs a = check_nf4_row_sqnorm_args(packed, absmax, nested_absmax, nested_map, offset, blocksize,
                                                    out_features, in_features);
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor sq = at::empty({a.N}, packed.options().dtype(at::kFloat));
  constexpr int kThreads = 256;  // 8 rows (warps) per CTA
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cuda::nf4_row_sqnorm_kernel<<<static_cast<unsigned>(ceil_div(a.N, kThreads / 32)), kThreads, 0, stream>>>(
      weight_view(packed, a, blocksize), sq.mutable_data_ptr<float>());
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
