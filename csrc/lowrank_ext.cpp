// lowrank_ext.cpp — every op schema of the package, in one place, and the Python module stub.
//
// Implementations register per backend: csrc/cpu/<family>.cpp (CPU) and csrc/cuda/<family>.cu (CUDA).
// Fake (meta) kernels and autograd are registered from Python (lowrank_ext/ops/<family>.py).
// Conventions: every size a fake kernel needs is an int argument; mutated tensors are Tensor(a!)
// and are not returned; the NF4 weight bundle always comes in the order of nf4_args.h:
//   (Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_map, Tensor? offset, int blocksize)

#include <Python.h>
#include <torch/library.h>

#include <torch/headeronly/version.h>

#include <string>

#include "cpu/cpu_isa.h"
#include "lowrank_ext/kernel_path.h"

#ifdef LRX_WITH_CUDA
#include <cuda_runtime_api.h>
namespace lowrank_ext {
bool paged_prefetch_supported(int64_t device);  // csrc/cuda/paged.cu
}  // namespace lowrank_ext
#endif

extern "C" {
// `import lowrank_ext._C` loads this shared library, which runs the static op registrations below.
// No pybind11 module is needed: the ops are reached through torch.ops.lowrank_ext.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {

// What this binary was compiled with, for lowrank_ext.build_info(): "key=value;..." pairs.
std::string build_flags() {
  std::string s = "torch=" + std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                  std::to_string(TORCH_VERSION_PATCH);
#ifdef LRX_WITH_CUDA
  s += ";cuda=" + std::to_string(CUDART_VERSION);
#else
  s += ";cuda=none";
#endif
#if defined(__AVX2__)
  s += ";avx2=1";
#else
  s += ";avx2=0";
#endif
#if defined(__FMA__)
  s += ";fma=1";
#else
  s += ";fma=0";
#endif
#if defined(_OPENMP)
  s += ";openmp=1";
#else
  s += ";openmp=0";
#endif
  return s;
}

#ifndef LRX_WITH_CUDA
bool paged_prefetch_supported_cpu_build(int64_t) { return false; }  // no CUDA kernels: nothing to prefetch
#endif

}  // namespace

TORCH_LIBRARY(lowrank_ext, m) {
  m.def("build_flags() -> str", &build_flags);
  // The kernel the last call of `product` ran on this thread (csrc/include/lowrank_ext/kernel_path.h):
  // "nt" (x · deq(W)ᵀ), "nn" (gy · deq(W)), "dequantize", "quantize" or "adamw"; "" before any call on this
  // thread. For python -m lowrank_ext doctor and the tests.
  m.def("last_kernel_path(str product) -> str", &lowrank_ext::last_kernel_path_op);
  // The CPU kernel family the NF4 matmuls take (csrc/cpu/cpu_isa.h): "avx2", "avx512", "avx512bf16" or "amx";
  // LOWRANK_EXT_CPU_ISA may force a lower one. detected=True: the best this CPU supports.
  m.def("cpu_isa(bool detected=False) -> str", &lowrank_ext::cpu::cpu_isa_op);

  // ---------------------------------------------------------------------------------------------
  // NF4 format (csrc/cpu/nf4.cpp, csrc/cuda/nf4.cu; Python: lowrank_ext/ops/nf4.py)
  // ---------------------------------------------------------------------------------------------
  // x: any shape, fp32/fp16/bf16, numel n > 0. packed: uint8 [(n+1)//2, 1]; absmax: fp32 [ceil(n/blocksize)].
  m.def("quantize_nf4(Tensor x, int blocksize) -> (Tensor packed, Tensor absmax)");
  // absmax: fp32 [nb]; nested_map: fp32 [256] (signed dynamic map).
  // -> qabsmax uint8 [nb], nested_absmax fp32 [ceil(nb/256)], offset fp32 [1] (= mean(absmax)).
  m.def("double_quant(Tensor absmax, Tensor nested_map) -> (Tensor qabsmax, Tensor nested_absmax, Tensor offset)");
  // -> flat [numel] tensor of `dtype` (fp32/fp16/bf16): NF4[code] * absmax_hat, rounded once.
  m.def(
      "dequantize_nf4(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_map, Tensor? offset, "
      "int blocksize, int numel, ScalarType dtype) -> Tensor");
  // Same into a caller's buffer: out is contiguous fp32/fp16/bf16 with numel elements (any shape).
  // Reusing a buffer skips the allocation + first-touch page faults that dominate a fresh dequantize.
  m.def(
      "dequantize_nf4_out(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_map, "
      "Tensor? offset, int blocksize, int numel, Tensor(a!) out) -> ()");

  // ---------------------------------------------------------------------------------------------
  // Fused NF4 matmul + LoRA (csrc/cpu/nf4_linear.cpp, csrc/cuda/nf4_linear*.cu; lowrank_ext/ops/linear.py)
  // ---------------------------------------------------------------------------------------------
  // W is the NF4 bundle of a [N, K] weight (N = out_features, K = in_features); deq(W) is never
  // materialized: kernels dequantize tile by tile. x, lora_A, lora_B, bias share one dtype
  // (fp32/fp16/bf16; float64 on CPU for the simple gradcheck path); outputs have that dtype;
  // accumulation is fp32 (fp64 for float64).
  //   y = x · deq(W)ᵀ + bias                                     x [M, K] -> y [M, N]
  m.def(
      "nf4_linear(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_map, "
      "Tensor? offset, int blocksize, int out_features, Tensor? bias) -> Tensor");
  //   grad_x = grad_y · deq(W)                                   grad_y [M, N] -> [M, K]
  m.def(
      "nf4_linear_grad_input(Tensor grad_y, Tensor packed, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? nested_map, Tensor? offset, int blocksize, int in_features) -> Tensor");
  //   u = x_lora · Aᵀ                                             [M, r]   (x_lora = dropout(x), or x)
  //   y = x · deq(W)ᵀ + scaling · u · Bᵀ + bias                   [M, N]
  // lora_A [r, K], lora_B [N, r]. Returns (y, u); u is saved for backward.
  m.def(
      "nf4_lora_linear(Tensor x, Tensor x_lora, Tensor packed, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? nested_map, Tensor? offset, int blocksize, int out_features, Tensor lora_A, Tensor lora_B, "
      "float scaling, Tensor? bias) -> (Tensor y, Tensor u)");
  //   gB = s · gyᵀ · u    [N, r]        gu = s · gy · B   [M, r]        gA = guᵀ · x_lora   [r, K]
  //   grad_x = gy · deq(W) (+ gu · A when lora_grad_into_x, i.e. x_lora is x: one fused NN GEMM)
  //   grad_x_lora = gu · A when not lora_grad_into_x (the caller applies the dropout mask), else empty [0]
  //   compute_grad_input=False (x needs no gradient: the first layer, frozen inputs): grad_x and grad_x_lora are
  //   empty [0] and neither the NF4 product gy · deq(W) nor gu · A runs; grad_A, grad_B are unchanged.
  m.def(
      "nf4_lora_linear_backward(Tensor grad_y, Tensor x_lora, Tensor u, Tensor packed, Tensor absmax, "
      "Tensor? nested_absmax, Tensor? nested_map, Tensor? offset, int blocksize, int in_features, "
      "Tensor lora_A, Tensor lora_B, float scaling, bool lora_grad_into_x, bool compute_grad_input=True) "
      "-> (Tensor grad_x, Tensor grad_A, Tensor grad_B, Tensor grad_x_lora)");
  //   sq[n] = ||deq(W)[n, :]||²  (fp32 [N]; DoRA's weight norm without a dense W)
  m.def(
      "nf4_row_sqnorm(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_map, "
      "Tensor? offset, int blocksize, int out_features, int in_features) -> Tensor");


  // ---------------------------------------------------------------------------------------------
  // Fused model ops (csrc/cpu/fused_{rmsnorm,rope,swiglu}.cpp, csrc/cuda/fused_ops.cu;
  // lowrank_ext/ops/fused.py; the math: csrc/cpu/fused_kernels.h). Activations fp32 or bf16 (fp32 math,
  // one rounding per output; float64 on CPU for gradcheck). Backward ops recompute what is cheap.
  // ---------------------------------------------------------------------------------------------
  //   y = x · rstd · (weight_offset + weight),  rstd = 1/sqrt(mean(x², -1) + eps)   x [..., D], weight [D]
  //   (weight_offset 0: Llama/Qwen2/Mistral; 1: Gemma's (1 + weight))
  m.def("rms_norm(Tensor x, Tensor weight, float eps, float weight_offset) -> Tensor");
  //   h = x + residual;  y = rms_norm(h)      (h is the decoder layer's next residual stream)
  m.def(
      "add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, float weight_offset) "
      "-> (Tensor y, Tensor h)");
  //   from the saved h (x for rms_norm) alone: grad_x (+ grad_h when given), grad_weight (weight's dtype)
  m.def(
      "rms_norm_backward(Tensor grad_y, Tensor? grad_h, Tensor h, Tensor weight, float eps, float weight_offset) "
      "-> (Tensor grad_x, Tensor grad_weight)");
  //   q·cos + rotate_half(q)·sin and the same for k;  q [B, Hq, S, D], k [B, Hk, S, D], cos/sin [B or 1, S, D]
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor q_out, Tensor k_out)");
  //   the transposed rotation of the gradients (cos and sin get none)
  m.def("rope_backward(Tensor grad_q, Tensor grad_k, Tensor cos, Tensor sin) -> (Tensor grad_q_in, Tensor grad_k_in)");
  //   silu(gate) · up, and its backward (σ(gate) recomputed)
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor grad_gate, Tensor grad_up)");

  // ---------------------------------------------------------------------------------------------
  // Optimizers (csrc/cpu/adamw.cpp, csrc/cuda/adamw.cu, csrc/cuda/paged.cu; lowrank_ext/ops/optim.py)
  // ---------------------------------------------------------------------------------------------
  // One fused AdamW step per parameter tensor (torch.optim.AdamW's math, decoupled weight decay):
  //   p <- p·(1 - lr·wd);  m <- m + (1-β1)(g - m);  v <- β2·v + (1-β2)·g²
  //   p <- p - lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps)
  // param, grad: same shape/dtype (fp32/fp16/bf16, contiguous); exp_avg, exp_avg_sq: fp32, numel of param.
  m.def(
      "adamw_step(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, float lr, "
      "float beta1, float beta2, float eps, float weight_decay, int step) -> ()");
  // Same update with 8-bit blockwise state (blocks of 256 flat elements): state1/state2 uint8 codes
  // (numel of param) into qmap1 (signed dynamic map, first moment) / qmap2 (unsigned, second moment),
  // absmax1/absmax2 fp32 [ceil(n/256)]. Per block: dequantize -> update in fp32 -> new absmax ->
  // requantize (nearest code), all in one pass; the param update uses the fp32 (unrounded) moments.
  m.def(
      "adamw8bit_step(Tensor(a!) param, Tensor grad, Tensor(b!) state1, Tensor(c!) state2, Tensor(d!) absmax1, "
      "Tensor(e!) absmax2, Tensor qmap1, Tensor qmap2, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, int step) -> ()");
  // Paged (CUDA managed) memory, csrc/cuda/paged.cu. A zero-filled tensor with like's shape/device and
  // `dtype`, backed by cudaMallocManaged and freed (cudaFree) when its storage dies.
  m.def("paged_zeros_like(Tensor like, ScalarType dtype) -> Tensor");
  // Prefetch a managed tensor's pages on the current stream: device >= 0 -> that GPU, -1 -> host.
  // Values do not change; `t` is marked mutated so compilers keep the call in program order.
  m.def("paged_prefetch(Tensor(a!) t, int device) -> ()");
  // The same for a list of tensors on one GPU, in one call (the paged optimizer's prefetch of a step):
  // cudaMemPrefetchBatchAsync where the runtime (CUDA 13+) and the stream allow, else one
  // cudaMemPrefetchAsync per managed tensor; tensors paged_zeros_like did not allocate are checked with one
  // pointer query each, the others need none. An empty list is a no-op (the Python wrapper skips the call).
  m.def("paged_prefetch_batch(Tensor(a!)[] tensors, int device) -> ()");
  // Whether t's memory is CUDA managed memory (cudaPointerGetAttributes type == cudaMemoryTypeManaged).
  m.def("paged_is_managed(Tensor t) -> bool");
  // Where the pages were last prefetched: device ordinal, -1 host, -2 never prefetched / unknown.
  m.def("paged_last_prefetch_location(Tensor t) -> int");
  // Whether GPU `device` can prefetch managed memory (cudaDevAttrConcurrentManagedAccess; absent under
  // WDDM and on some vGPU / container setups, where paged_prefetch is a no-op). False without CUDA kernels.
#ifdef LRX_WITH_CUDA
  m.def("paged_prefetch_supported(int device) -> bool", &lowrank_ext::paged_prefetch_supported);
#else
  m.def("paged_prefetch_supported(int device) -> bool", &paged_prefetch_supported_cpu_build);
#endif


}
