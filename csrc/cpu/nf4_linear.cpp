// cpu/nf4_linear.cpp — the fused NF4 matmul + LoRA ops on CPU (DESIGN.md sections 3-4).
//
//   nf4_linear:               y  = x · deq(W)ᵀ + bias                                  [M, N]
//   nf4_linear_grad_input:    gx = gy · deq(W)                                         [M, K]
//   nf4_lora_linear:          u  = x_lora · Aᵀ ;  y = x · deq(W)ᵀ + s · u · Bᵀ + bias   -> (y, u)
//   nf4_lora_linear_backward: gB = s · gyᵀ·u ; gu = s · gy·B ; gA = guᵀ·x_lora ; gx = gy·deq(W) (+ gu·A)
//   nf4_row_sqnorm:           sq[n] = ||deq(W)[n, :]||²
// Layouts: x [M, K], W NF4 [N, K] (flat row-major), lora_A [r, K], lora_B [N, r], bias [N].
// Compute type: fp32 for fp32/fp16/bf16 inputs (converted on load, outputs rounded once), fp64 for
// float64 (the gradcheck path). Never a dense deq(W): two paths by M —
//   M <= kGemvMaxM (fp32): streaming GEMV, each packed byte decoded in registers (nf4_linear_kernels.cpp);
//   otherwise: panels of W (~2 MB, at most a quarter of W) decoded to the compute type once and
//   multiplied with at::mm (MKL) for all M rows — the NT panel is rows of W, the NN panel columns of W.
// The LoRA parts are small GEMMs (at::mm in the compute type).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "lowrank_ext/nf4_linear_args.h"
#include "nf4_linear_kernels.h"

namespace lowrank_ext {
namespace {

using cpu::NF4Matrix;

constexpr const char* kLinearOp = "nf4_linear";
constexpr const char* kGradInputOp = "nf4_linear_grad_input";
constexpr const char* kLoraOp = "nf4_lora_linear";
constexpr const char* kLoraBwdOp = "nf4_lora_linear_backward";
constexpr const char* kSqnormOp = "nf4_row_sqnorm";

// Bytes of one decoded panel: about half of this CPU's 4 MB L2, so the panel stays cached while
// MKL packs it, and large enough that x is re-read only N·K·4 / kPanelBytes times.
constexpr int64_t kPanelBytes = int64_t{2} << 20;

NF4Matrix nf4_matrix(const char* op, const at::Tensor& packed, const at::Tensor& absmax,
                     const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_map,
                     const c10::optional<at::Tensor>& offset, int64_t blocksize, int64_t N, int64_t K) {
  check_out_features(N, op, "out_features");
  LRX_CHECK(K > 0, op, "in_features", "be positive", K);
  const NF4Scales s = check_nf4_weight(op, packed, absmax, nested_absmax, nested_map, offset, blocksize, N * K);
  return NF4Matrix{packed.const_data_ptr<uint8_t>(), s, blocksize, N, K};
}

// fp32 for fp32/fp16/bf16, fp64 for float64; contiguous (a no-op when it already is).
at::Tensor to_compute(const at::Tensor& t) {
  const auto ct = t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return t.to(ct).contiguous();
}

// Panel length along `dim_len` (a multiple of 8) when the other panel dimension is `other`:
// ~kPanelBytes, and at most a quarter of W (so no call ever holds a dense copy of W).
int64_t panel_len(int64_t dim_len, int64_t other, int64_t elem_size) {
  int64_t len = std::max<int64_t>(8, kPanelBytes / (other * elem_size) / 8 * 8);
  len = std::min(len, (ceil_div(dim_len, 4) + 7) / 8 * 8);
  return std::min(len, dim_len);
}

// y[M, N] = xa[M, K] · deq(W)ᵀ, xa in the compute type, contiguous.
at::Tensor matmul_nt(const at::Tensor& xa, const NF4Matrix& w) {
  const int64_t M = xa.size(0), N = w.N, K = w.K;
  at::Tensor y = at::empty({M, N}, xa.options());
  if (M == 0) return y;
  if (xa.scalar_type() == at::kFloat && M <= cpu::kGemvMaxM) {
    cpu::nf4_gemv_nt(w, xa.const_data_ptr<float>(), M, K, y.data_ptr<float>(), N);
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES(xa.scalar_type(), "nf4_matmul_nt_cpu", [&] {
    const int64_t nb_max = panel_len(N, K, sizeof(scalar_t));
    at::Tensor panel = at::empty({nb_max, K}, xa.options());  // rows n0..n0+nb of deq(W)
    for (int64_t n0 = 0; n0 < N; n0 += nb_max) {
      const int64_t nb = std::min(nb_max, N - n0);
      cpu::nf4_decode_tile(w, n0, n0 + nb, 0, K, panel.data_ptr<scalar_t>(), K);
      at::Tensor out = y.narrow(1, n0, nb);  // strided view, ld = N: MKL writes it in place
      at::mm_out(out, xa, panel.narrow(0, 0, nb).t());
    }
  });
  return y;
}

// gx[M, K] = g[M, N] · deq(W), g in the compute type, contiguous. Column panels of W: each output
// column block is written once (no accumulation pass over gx).
at::Tensor matmul_nn(const at::Tensor& g, const NF4Matrix& w) {
  const int64_t M = g.size(0), N = w.N, K = w.K;
  at::Tensor gx = at::empty({M, K}, g.options());
  if (M == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "nf4_matmul_nn_cpu", [&] {
    const int64_t kb_max = panel_len(K, N, sizeof(scalar_t));
    at::Tensor panel = at::empty({N, kb_max}, g.options());  // columns k0..k0+kb of deq(W)
    for (int64_t k0 = 0; k0 < K; k0 += kb_max) {
      const int64_t kb = std::min(kb_max, K - k0);
      cpu::nf4_decode_tile(w, 0, N, k0, k0 + kb, panel.data_ptr<scalar_t>(), kb_max);
      at::Tensor out = gx.narrow(1, k0, kb);
      at::mm_out(out, g, panel.narrow(1, 0, kb));
    }
  });
  return gx;
}

at::Tensor nf4_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_map,
                          const c10::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features,
                          const c10::optional<at::Tensor>& bias) {
  check_activation(x, packed, kLinearOp, "x", /*allow_double=*/true);
  const NF4Matrix w =
      nf4_matrix(kLinearOp, packed, absmax, nested_absmax, nested_map, offset, blocksize, out_features, x.size(1));
  check_bias(bias, x, out_features, kLinearOp);
  at::Tensor y = matmul_nt(to_compute(x), w);
  if (bias.has_value()) y.add_(to_compute(*bias));
  return y.to(x.scalar_type());
}

at::Tensor nf4_linear_grad_input_cpu(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                                     const c10::optional<at::Tensor>& nested_absmax,
                                     const c10::optional<at::Tensor>& nested_map,
                                     const c10::optional<at::Tensor>& offset, int64_t blocksize,
                                     int64_t in_features) {
  check_activation(grad_y, packed, kGradInputOp, "grad_y", true);
  const NF4Matrix w = nf4_matrix(kGradInputOp, packed, absmax, nested_absmax, nested_map, offset, blocksize,
                                 grad_y.size(1), in_features);
  return matmul_nn(to_compute(grad_y), w).to(grad_y.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> nf4_lora_linear_cpu(
    const at::Tensor& x, const at::Tensor& x_lora, const at::Tensor& packed, const at::Tensor& absmax,
    const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_map,
    const c10::optional<at::Tensor>& offset, int64_t blocksize, int64_t out_features, const at::Tensor& lora_A,
    const at::Tensor& lora_B, double scaling, const c10::optional<at::Tensor>& bias) {
  check_activation(x, packed, kLoraOp, "x", true);
  const int64_t K = x.size(1);
  const NF4Matrix w =
      nf4_matrix(kLoraOp, packed, absmax, nested_absmax, nested_map, offset, blocksize, out_features, K);
  check_shape2(x_lora, x.size(0), K, kLoraOp, "x_lora", "(x's shape)");
  check_like(x_lora, x, "x", kLoraOp, "x_lora");
  check_lora(lora_A, lora_B, x, "x", out_features, K, kLoraOp);
  check_bias(bias, x, out_features, kLoraOp);
  check_scaling(scaling, kLoraOp);

  const at::Tensor xa = to_compute(x);
  const at::Tensor xl = x_lora.is_same(x) ? xa : to_compute(x_lora);
  at::Tensor y = matmul_nt(xa, w);                                   // x · deq(W)ᵀ
  const at::Tensor u = at::mm(xl, to_compute(lora_A).t());            // u = x_lora · Aᵀ   [M, r]
  y.addmm_(u, to_compute(lora_B).t(), /*beta=*/1, /*alpha=*/scaling);  // + s · u · Bᵀ
  if (bias.has_value()) y.add_(to_compute(*bias));
  return {y.to(x.scalar_type()), u.to(x.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nf4_lora_linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_lora, const at::Tensor& u, const at::Tensor& packed,
    const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
    const c10::optional<at::Tensor>& nested_map, const c10::optional<at::Tensor>& offset, int64_t blocksize,
    int64_t in_features, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
    bool lora_grad_into_x) {
  check_activation(grad_y, packed, kLoraBwdOp, "grad_y", true);
  const int64_t M = grad_y.size(0), N = grad_y.size(1), K = in_features;
  const NF4Matrix w = nf4_matrix(kLoraBwdOp, packed, absmax, nested_absmax, nested_map, offset, blocksize, N, K);
  const int64_t r = check_lora(lora_A, lora_B, grad_y, "grad_y", N, K, kLoraBwdOp);
  check_shape2(x_lora, M, K, kLoraBwdOp, "x_lora", "(grad_y.shape[0], in_features)");
  check_like(x_lora, grad_y, "grad_y", kLoraBwdOp, "x_lora");
  check_shape2(u, M, r, kLoraBwdOp, "u", "(grad_y.shape[0], r)");
  check_like(u, grad_y, "grad_y", kLoraBwdOp, "u");
  check_scaling(scaling, kLoraBwdOp);

  const auto dt = grad_y.scalar_type();
  const at::Tensor g = to_compute(grad_y);
  const at::Tensor A = to_compute(lora_A);
  const at::Tensor gB = at::mm(g.t(), to_compute(u)).mul_(scaling);  // gB = s · gyᵀ · u      [N, r]
  const at::Tensor gu = at::mm(g, to_compute(lora_B)).mul_(scaling);  // gu = s · gy · B       [M, r]
  const at::Tensor gA = at::mm(gu.t(), to_compute(x_lora));           // gA = guᵀ · x_lora     [r, K]
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
  const NF4Matrix w = nf4_matrix(kSqnormOp, packed, absmax, nested_absmax, nested_map, offset, blocksize,
                                 out_features, in_features);
  at::Tensor out = at::empty({out_features}, packed.options().dtype(at::kFloat));
  cpu::nf4_row_sqnorm(w, out.data_ptr<float>());
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
