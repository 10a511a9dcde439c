// cpu/nf4_linear.cpp — the fused NF4 matmul + LoRA ops on CPU (docs/kernels.md: the math, CPU kernels).
//
//   nf4_linear:               y  = x · deq(W)ᵀ + bias                                  [M, N]
//   nf4_linear_grad_input:    gx = gy · deq(W)                                         [M, K]
//   nf4_lora_linear:          u  = x_lora · Aᵀ ;  y = x · deq(W)ᵀ + s · u · Bᵀ + bias   -> (y, u)
//   nf4_lora_linear_backward: gB = s · gyᵀ·u ; gu = s · gy·B ; gA = guᵀ·x_lora ; gx = gy·deq(W) (+ gu·A)
//                             (gx and gu·A skipped, returned as empty [0], when compute_grad_input is false)
//   nf4_row_sqnorm:           sq[n] = ||deq(W)[n, :]||²
// Layouts: x [M, K], W NF4 [N, K] (flat row-major), lora_A [r, K], lora_B [N, r], bias [N].
// Argument checks: lowrank_ext/nf4_linear_args.h, shared with the CUDA implementation.
// Compute type (compute_type below), always with fp32 (or fp64) accumulation:
//   bf16 activations on a CPU with native bf16 matmul (cpu_isa() >= avx512bf16, csrc/cpu/cpu_isa.h), M > kGemvMaxM:
//     bf16 — W decoded to bf16 panels (each fp32 value rounded once), x, A, B as given, oneDNN's bf16 GEMM
//     (AMX tiles or vdpbf16ps, fp32 accumulation, one rounding of each GEMM's output): PyTorch's own bf16 numerics;
//   float64: fp64 (the gradcheck path); everything else: fp32 (fp16/bf16 converted on load, outputs rounded once).
// Never a dense deq(W): two paths by M —
//   M <= kGemvMaxM: streaming GEMV in fp32, each packed byte decoded in registers (nf4_linear_kernels.cpp);
//   otherwise: panels of W (~8 MB; those alive at once hold at most a quarter of W) decoded to the
//   compute type once and multiplied with at::mm (MKL / oneDNN) for all M rows — the NT panel is rows of W,
//   the NN panel columns of W; threads split the panels.
// The LoRA parts are small GEMMs (at::mm in the compute type).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "lowrank_ext/kernel_path.h"
#include "lowrank_ext/nf4_linear_args.h"
#include "nf4_linear_kernels.h"

namespace lowrank_ext {
namespace {

using cpu::NF4Matrix;

// Target bytes of one decoded panel. MKL re-packs x (NT) or grad_y (NN) once per panel, so panels
// are large (fewer re-reads of the activation); each thread owns one panel at a time.
constexpr int64_t kPanelBytes = int64_t{8} << 20;

// The CPU takes float64 too: the simple path that gradcheck runs (the checks: nf4_linear_args.h).
constexpr bool kAllowDouble = true;

NF4Matrix nf4_matrix(const at::Tensor& packed, const NF4LinearArgs& a, int64_t blocksize) {
  return NF4Matrix{packed.const_data_ptr<uint8_t>(), a.scales, blocksize, a.N, a.K};
}

// References to the tensors an NF4Matrix points into, for the GEMV's helper threads, which may still read W
// after the op returned (cpu::nf4_gemv_nt).
std::shared_ptr<const void> weight_owner(const at::Tensor& packed, const at::Tensor& absmax,
                                         const c10::optional<at::Tensor>& nested_absmax,
                                         const c10::optional<at::Tensor>& nested_map,
                                         const c10::optional<at::Tensor>& offset) {
  auto held = std::make_shared<std::vector<at::Tensor>>(std::vector<at::Tensor>{packed, absmax});
  for (const auto* t : {&nested_absmax, &nested_map, &offset})
    if (t->has_value()) held->push_back(**t);
  return held;
}

// The type the products of an op run in, fixed by its activation `act` (x, or grad_y in the backward):
// bf16 panels where the CPU multiplies bf16 natively and the GEMV does not take the product; fp64 for
// float64; fp32 otherwise.
// Reads LOWRANK_EXT_CPU_ISA on every call, so a bad value raises from any op, not only a bf16 one.
at::ScalarType compute_type(const at::Tensor& act) {
  const cpu::CpuIsa isa = cpu::cpu_isa();
  if (act.scalar_type() == at::kDouble) return at::kDouble;
  if (act.scalar_type() == at::kBFloat16 && act.size(0) > cpu::kGemvMaxM && cpu::native_bf16_matmul(isa))
    return at::kBFloat16;
  return at::kFloat;
}

// t in the compute type, contiguous (a no-op when it already is).
at::Tensor to_compute(const at::Tensor& t, at::ScalarType ct) { return t.to(ct).contiguous(); }

// deq(W)[n0:n1, k0:k1] into a panel of T (bf16: c10::BFloat16 has the bit layout the decoder writes).
template <typename T>
void decode_panel(const NF4Matrix& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, T* out, int64_t ld) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    cpu::nf4_decode_tile(w, n0, n1, k0, k1, reinterpret_cast<uint16_t*>(out), ld);
  } else {
    cpu::nf4_decode_tile(w, n0, n1, k0, k1, out, ld);
  }
}

const char* panel_path(at::ScalarType ct) { return ct == at::kBFloat16 ? "panel-bf16" : "panel"; }

// Panel length along `dim_len` (a multiple of 8) when the other panel dimension is `other`: about
// kPanelBytes, at least 8 panels (one panel <= 1/8 of W in fp32, i.e. < N·K bytes) and at least 4 per
// thread, so the panels alive at once (one per thread) hold at most a quarter of W: never a dense W.
int64_t panel_len(int64_t dim_len, int64_t other, int64_t elem_size) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t panels = std::max({int64_t{8}, 4 * threads, ceil_div(dim_len * other * elem_size, kPanelBytes)});
  const int64_t len = (ceil_div(dim_len, panels) + 7) / 8 * 8;
  return std::min(len, dim_len);
}

// The ATen calls that at::parallel_for workers make (mm_out into a strip of the output) must run in the
// caller's mode: worker threads do not inherit its thread-local state, so they start outside inference mode
// and with autograd on. An output allocated under torch.inference_mode() is an inference tensor, and an
// in-place write to it outside inference mode raises ("Inplace update to inference tensor outside
// InferenceMode") — on the workers only, so only with 2+ threads and a GEMM big enough to split. Only the
// one flag is copied (never the whole at::ThreadLocalState: it holds Python objects that a worker without
// the GIL must not reference-count).
struct WorkerModeGuard {
  explicit WorkerModeGuard(bool inference) : inference_mode(inference) {}
  const c10::InferenceMode inference_mode;    // enabled=false: ordinary mode, as a fresh worker already has
  const at::AutoDispatchBelowAutograd no_autograd;  // inner ATen calls: plain kernels, no graph
};

// y[M, N] = xa[M, K] · deq(W)ᵀ, xa in the compute type, contiguous.
// Below this many multiply-adds a GEMM runs on one thread (an OpenMP region costs more than it saves,
// and far more when the cores are shared).
constexpr int64_t kSerialMacs = int64_t{1} << 22;

// at::parallel_for grain over `panels` panels: all of them (serial) for a small GEMM, else 1.
int64_t panel_grain(int64_t panels, int64_t macs) { return macs < kSerialMacs ? panels : 1; }

// One parallel region: each task decodes its row panels of W and runs a single-threaded MKL GEMM
// into the matching columns of y (alternating our parallel regions with MKL's stalls badly when
// the 2 cores are shared with other processes).
at::Tensor matmul_nt(const at::Tensor& xa, const NF4Matrix& w, std::shared_ptr<const void> w_owner) {
  const int64_t M = xa.size(0), N = w.N, K = w.K;
  at::Tensor y = at::empty({M, N}, xa.options());
  if (M == 0) return y;
  if (xa.scalar_type() == at::kFloat && M <= cpu::kGemvMaxM) {
    const char* path = cpu::nf4_gemv_nt(w, xa.const_data_ptr<float>(), M, K, y.data_ptr<float>(), N,
                                        std::move(w_owner));
    record_kernel_path(KernelProduct::kNT, path);
    return y;
  }
  record_kernel_path(KernelProduct::kNT, panel_path(xa.scalar_type()));
  const bool inference = c10::InferenceMode::is_enabled();  // y is an inference tensor when this is true
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, xa.scalar_type(), "nf4_matmul_nt_cpu", [&] {
    const int64_t nb = panel_len(N, K, sizeof(scalar_t));
    const int64_t panels = ceil_div(N, nb);
    at::parallel_for(0, panels, panel_grain(panels, M * N * K), [&](int64_t p0, int64_t p1) {
      const WorkerModeGuard caller_mode(inference);  // the caller's inference mode, autograd off
      at::Tensor panel = at::empty({nb, K}, xa.options());  // rows n0..n0+len of deq(W)
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * nb, len = std::min(nb, N - n0);
        decode_panel(w, n0, n0 + len, 0, K, panel.data_ptr<scalar_t>(), K);
        at::Tensor out = y.narrow(1, n0, len);  // strided view, ld = N: MKL writes it in place
        at::mm_out(out, xa, panel.narrow(0, 0, len).t());
      }
    });
  });
  return y;
}

// gx[M, K] = g[M, N] · deq(W), g in the compute type, contiguous. Column panels of W: each output
// column block is written once (no accumulation pass over gx).
at::Tensor matmul_nn(const at::Tensor& g, const NF4Matrix& w) {
  const int64_t M = g.size(0), N = w.N, K = w.K;
  at::Tensor gx = at::empty({M, K}, g.options());
  if (M == 0) return gx;
  record_kernel_path(KernelProduct::kNN, panel_path(g.scalar_type()));
  const bool inference = c10::InferenceMode::is_enabled();  // gx is an inference tensor when this is true
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "nf4_matmul_nn_cpu", [&] {
    const int64_t kb = panel_len(K, N, sizeof(scalar_t));
    const int64_t panels = ceil_div(K, kb);
    at::parallel_for(0, panels, panel_grain(panels, M * N * K), [&](int64_t p0, int64_t p1) {
      const WorkerModeGuard caller_mode(inference);  // the caller's inference mode, autograd off
      at::Tensor panel = at::empty({N, kb}, g.options());  // columns k0..k0+len of deq(W)
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t k0 = p * kb, len = std::min(kb, K - k0);
        decode_panel(w, 0, N, k0, k0 + len, panel.data_ptr<scalar_t>(), kb);
        at::Tensor out = gx.narrow(1, k0, len);
        at::mm_out(out, g, panel.narrow(1, 0, len));
      }
    });
  });
  return gx;
}

at::Tensor nf4_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_map,
                          const c10::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features,
                          const c10::optional<at::Tensor>& bias) {
  const at::AutoDispatchBelowAutograd no_autograd;  // inner ATen calls: plain kernels, no graph
  const NF4LinearArgs a = check_nf4_linear_args(x, packed, absmax, nested_absmax, nested_map, offset, blocksize,
                                                out_features, bias, kAllowDouble);
  const auto ct = compute_type(x);
  at::Tensor y = matmul_nt(to_compute(x, ct), nf4_matrix(packed, a, blocksize),
                           weight_owner(packed, absmax, nested_absmax, nested_map, offset));
  if (bias.has_value()) y.add_(to_compute(*bias, ct));
  return y.to(x.scalar_type());
}

at::Tensor nf4_linear_grad_input_cpu(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                                     const c10::optional<at::Tensor>& nested_absmax,
                                     const c10::optional<at::Tensor>& nested_map,
                                     const c10::optional<at::Tensor>& offset, int64_t blocksize,
                                     int64_t in_features) {
  const at::AutoDispatchBelowAutograd no_autograd;  // inner ATen calls: plain kernels, no graph
  const NF4LinearArgs a = check_nf4_linear_grad_input_args(grad_y, packed, absmax, nested_absmax, nested_map, offset,
                                                           blocksize, in_features, kAllowDouble);
  return matmul_nn(to_compute(grad_y, compute_type(grad_y)), nf4_matrix(packed, a, blocksize)).to(grad_y.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> nf4_lora_linear_cpu(
    const at::Tensor& x, const at::Tensor& x_lora, const at::Tensor& packed, const at::Tensor& absmax,
    const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_map,
    const c10::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling, const c10::optional<at::Tensor>& bias) {
  const at::AutoDispatchBelowAutograd no_autograd;  // inner ATen calls: plain kernels, no graph
  const NF4LinearArgs a = check_nf4_lora_linear_args(x, x_lora, packed, absmax, nested_absmax, nested_map, offset,
                                                     blocksize, out_features, lora_A, lora_B, scaling, bias,
                                                     kAllowDouble);
  const NF4Matrix w = nf4_matrix(packed, a, blocksize);

  const auto ct = compute_type(x);
  const at::Tensor xa = to_compute(x, ct);
  const at::Tensor xl = x_lora.is_same(x) ? xa : to_compute(x_lora, ct);
  at::Tensor y = matmul_nt(xa, w, weight_owner(packed, absmax, nested_absmax, nested_map, offset));  // x · deq(W)ᵀ
  const at::Tensor u = at::mm(xl, to_compute(lora_A, ct).t());            // u = x_lora · Aᵀ   [M, r]
  y.addmm_(u, to_compute(lora_B, ct).t(), /*beta=*/1, /*alpha=*/scaling);  // + s · u · Bᵀ
  if (bias.has_value()) y.add_(to_compute(*bias, ct));
  return {y.to(x.scalar_type()), u.to(x.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nf4_lora_linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_lora, const at::Tensor& u, const at::Tensor& packed,
    const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
    const c10::optional<at::Tensor>& nested_map, const c10::optional<at::Tensor>& offset, int64_t blocksize,
    int64_t in_features, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
    bool lora_grad_into_x, bool compute_grad_input) {
  const at::AutoDispatchBelowAutograd no_autograd;  // inner ATen calls: plain kernels, no graph
  const NF4LinearArgs a =
      check_nf4_lora_linear_backward_args(grad_y, x_lora, u, packed, absmax, nested_absmax, nested_map, offset,
                                          blocksize, in_features, lora_A, lora_B, scaling, kAllowDouble);
  const NF4Matrix w = nf4_matrix(packed, a, blocksize);

  const auto dt = grad_y.scalar_type();
  const auto ct = compute_type(grad_y);
  const at::Tensor g = to_compute(grad_y, ct);
  const at::Tensor A = to_compute(lora_A, ct);
  const at::Tensor gB = at::mm(g.t(), to_compute(u, ct)).mul_(scaling);  // gB = s · gyᵀ · u      [N, r]
  const at::Tensor gu = at::mm(g, to_compute(lora_B, ct)).mul_(scaling);  // gu = s · gy · B       [M, r]
  const at::Tensor gA = at::mm(gu.t(), to_compute(x_lora, ct));           // gA = guᵀ · x_lora     [r, K]
  if (!compute_grad_input) {  // x (and x_lora) need no gradient: no NF4 product, no gu · A
    return {at::empty({0}, grad_y.options()), gA.to(dt), gB.to(dt), at::empty({0}, grad_y.options())};
  }
  at::Tensor gx = matmul_nn(g, w);                                     // gx = gy · deq(W)      [M, K]
  at::Tensor gxl;
  if (lora_grad_into_x) {
    gx.addmm_(gu, A);  // x_lora is x: + gu · A in place
    gxl = at::empty({0}, grad_y.options());
  } else {
    gxl = at::mm(gu, A).to(dt);  // the caller multiplies by the dropout mask
  }
  return {gx.to(dt), gA.to(dt), gB.to(dt), gxl};
}

at::Tensor nf4_row_sqnorm_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                              const c10::optional<at::Tensor>& nested_absmax,
                              const c10::optional<at::Tensor>& nested_map, const c10::optional<at::Tensor>& offset,
                              int64_t blocksize, int64_t out_features, int64_t in_features) {
  const at::AutoDispatchBelowAutograd no_autograd;  // inner ATen calls: plain kernels, no graph
  const NF4LinearArgs a = check_nf4_row_sqnorm_args(packed, absmax, nested_absmax, nested_map, offset, blocksize,
                                                    out_features, in_features);
  at::Tensor out = at::empty({out_features}, packed.options().dtype(at::kFloat));
  cpu::nf4_row_sqnorm(nf4_matrix(packed, a, blocksize), out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_ext, CPU, m) {
  m.impl("nf4_linear", &nf4_linear_cpu);
  m.impl("nf4_linear_grad_input", &nf4_linear_grad_input_cpu);
  m.impl("nf4_lora_linear", &nf4_lora_linear_cpu);
  m.impl("nf4_lora_linear_backward", &nf4_lora_linear_backward_cpu);
  m.impl("nf4_row_sqnorm", &nf4_row_sqnorm_cpu);
}

}  // namespace lowrank_ext
