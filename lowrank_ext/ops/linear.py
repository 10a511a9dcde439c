"""Fused NF4 matmul + LoRA ops: thin wrappers, fake (meta) kernels and autograd.

Math (docs/kernels.md, "The math"), x [M, K], W NF4 [N, K], A [r, K], B [N, r], s = scaling:

    nf4_linear:       y = x · deq(W)ᵀ + bias
    nf4_lora_linear:  x_d = dropout(x);  u = x_d · Aᵀ;  y = x · deq(W)ᵀ + s · u · Bᵀ + bias
    backward:         gB = s · gyᵀ · u;  gu = s · gy · B;  gA = guᵀ · x_d
                      gx = gy · deq(W) + dropout_backward(gu · A);  gbias = Σ_rows gy
                      (gx skipped, with its NF4 GEMM, when x needs no gradient: the first layer, frozen inputs)

W is frozen (no gradient) and never materialized: the kernels dequantize tile by tile, and autograd
saves only x_d, u, the LoRA matrices and the NF4 tensors. Dropout stays out of the custom op: it is
`F.dropout` on the LoRA branch input here, so the op is deterministic; without dropout x itself is the
LoRA input and the backward adds gu · A into gx inside one op.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F

from lowrank_ext.nf4 import NF4Weight

__all__ = ["nf4_linear", "nf4_lora_linear", "nf4_row_sqnorm"]

_lib = torch.ops.lowrank_ext
# The overloads themselves: calling the packet (`_lib.nf4_linear`) resolves the overload on every call (~2 µs).
_NF4_LINEAR = _lib.nf4_linear.default
_NF4_LORA_LINEAR = _lib.nf4_lora_linear.default
_BELOW_AUTOGRAD = torch._C._AutoDispatchBelowAutograd


def _call(op, *args):
    """op(*args). With gradients off (generate runs under torch.no_grad) the call goes below the Autograd key:
    there the op's autograd kernel (register_autograd, Python) would only redispatch, for ~6 µs a call at M = 1.
    Autocast still applies (its keys sit above Autograd). Not while torch.compile traces (it sees the plain
    call), nor inside a forward-AD dual level (which grad mode does not switch off: the Autograd key must see it)."""
    if (torch.compiler.is_compiling()  # first: dynamo cannot trace is_inference_mode_enabled
            or torch.is_grad_enabled() or torch.is_inference_mode_enabled()  # inference mode: already below Autograd
            or _forward_ad._current_level >= 0):
        return op(*args)
    with _BELOW_AUTOGRAD():
        return op(*args)


def _check_weight(op: str, weight: object) -> tuple[int, int]:
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"lowrank_ext::{op}: weight must be an NF4Weight, got {type(weight).__name__}")
    if len(weight.shape) != 2:
        raise ValueError(f"lowrank_ext::{op}: weight must be 2-D [out_features, in_features], "
                         f"got shape {tuple(weight.shape)}")
    return weight.shape[0], weight.shape[1]


def _flatten_x(op: str, x: torch.Tensor, in_features: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"lowrank_ext::{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"lowrank_ext::{op}: x must have in_features = {in_features} elements in its last "
                         f"dimension, got shape {tuple(x.shape)}")
    return x if x.dim() == 2 else x.reshape(-1, in_features)  # leading dims flattened (a view when the strides allow)


_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_compute_dtype(op: str, compute_dtype: object) -> None:
    if compute_dtype is not None and compute_dtype not in _COMPUTE_DTYPES:
        raise TypeError(f"lowrank_ext::{op}: compute_dtype must be None, torch.float32, torch.bfloat16 or "
                        f"torch.float16, got {compute_dtype!r}")


def nf4_linear(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None,
               compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = x · deq(weight)ᵀ + bias.

    x: [..., K] fp32/fp16/bf16 (float64 on CPU), any strides; weight: NF4Weight [N, K];
    bias: [N] or None, x's dtype. Returns [..., N] in x's dtype (fp32 accumulation).
    compute_dtype (bitsandbytes' meaning): the matmul runs on x and bias cast to it and the result comes
    back in x's dtype — e.g. fp32 activations with compute_dtype=torch.bfloat16 take the bf16 kernels.
    None: x's dtype. Differentiable in x and bias.
    """
    n, k = _check_weight("nf4_linear", weight)
    _check_compute_dtype("nf4_linear", compute_dtype)
    x2 = _flatten_x("nf4_linear", x, k)
    if compute_dtype is not None and compute_dtype != x.dtype:
        cast_bias = None if bias is None else bias.to(compute_dtype)
        y = _call(_NF4_LINEAR, x2.to(compute_dtype), *weight.tensors(), weight.blocksize, n, cast_bias).to(x.dtype)
    else:
        y = _call(_NF4_LINEAR, x2, *weight.tensors(), weight.blocksize, n, bias)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


def nf4_lora_linear(
    x: torch.Tensor,
    weight: NF4Weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout: float = 0.0,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y = x · deq(weight)ᵀ + scaling · (dropout(x) · lora_Aᵀ) · lora_Bᵀ + bias.

    x: [..., K]; weight: NF4Weight [N, K]; lora_A: [r, K]; lora_B: [N, r]; bias: [N] or None; all in
    x's dtype. `dropout` is the probability p of F.dropout on the LoRA branch input (always applied
    when p > 0: pass 0.0 in eval mode). Returns [..., N]. Differentiable in x, lora_A, lora_B, bias.
    compute_dtype (None: x's dtype): the base product x · deq(W)ᵀ (+ bias) runs in it, as nf4_linear's
    compute_dtype; the LoRA branch stays in x's dtype (PEFT on a bitsandbytes layer: the adapter runs in
    its own dtype, the 4-bit base in compute_dtype). Then it is two ops (the base, the LoRA GEMMs), not one.
    """
    n, k = _check_weight("nf4_lora_linear", weight)
    _check_compute_dtype("nf4_lora_linear", compute_dtype)
    p = float(dropout)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"lowrank_ext::nf4_lora_linear: dropout must be in [0, 1), got {dropout}")
    x2 = _flatten_x("nf4_lora_linear", x, k)
    x_lora = F.dropout(x2, p=p, training=True) if p > 0 else x2
    if compute_dtype is not None and compute_dtype != x.dtype:
        y = nf4_linear(x2, weight, bias, compute_dtype) + float(scaling) * F.linear(F.linear(x_lora, lora_A), lora_B)
    else:
        y, _ = _call(_NF4_LORA_LINEAR, x2, x_lora, *weight.tensors(), weight.blocksize, n, lora_A, lora_B,
                     float(scaling), bias)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


def nf4_row_sqnorm(weight: NF4Weight) -> torch.Tensor:
    """sq[n] = ||deq(weight)[n, :]||², fp32 [N] (DoRA's weight norm without a dense W)."""
    n, k = _check_weight("nf4_row_sqnorm", weight)
    return _lib.nf4_row_sqnorm(*weight.tensors(), weight.blocksize, n, k)


# ---- fake kernels: shapes and dtypes only ------------------------------------------------------
# The ops take 2-D activations (the wrappers above flatten leading dims). The fakes refuse other ranks
# with the real ops' message (csrc/include/lowrank_ext/nf4_linear_args.h); sizes and dtypes are left to
# the real ops' checks.
def _fake_2d(op: str, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dim() != 2:
            raise ValueError(f"lowrank_ext::{op}: {name} must be 2-D, "
                             f"got {t.dim()}-D tensor of shape {list(t.shape)}")


@torch.library.register_fake("lowrank_ext::nf4_linear")
def _nf4_linear_fake(x, packed, absmax, nested_absmax, nested_map, offset, blocksize, out_features, bias):
    _fake_2d("nf4_linear", x=x)
    return x.new_empty((x.shape[0], out_features))


@torch.library.register_fake("lowrank_ext::nf4_linear_grad_input")
def _nf4_linear_grad_input_fake(grad_y, packed, absmax, nested_absmax, nested_map, offset, blocksize,
                                in_features):
    _fake_2d("nf4_linear_grad_input", grad_y=grad_y)
    return grad_y.new_empty((grad_y.shape[0], in_features))


@torch.library.register_fake("lowrank_ext::nf4_lora_linear")
def _nf4_lora_linear_fake(x, x_lora, packed, absmax, nested_absmax, nested_map, offset, blocksize, out_features,
                          lora_A, lora_B, scaling, bias):
    _fake_2d("nf4_lora_linear", x=x, lora_A=lora_A)
    return x.new_empty((x.shape[0], out_features)), x.new_empty((x.shape[0], lora_A.shape[0]))


@torch.library.register_fake("lowrank_ext::nf4_lora_linear_backward")
def _nf4_lora_linear_backward_fake(grad_y, x_lora, u, packed, absmax, nested_absmax, nested_map, offset,
                                   blocksize, in_features, lora_A, lora_B, scaling, lora_grad_into_x,
                                   compute_grad_input=True):
    _fake_2d("nf4_lora_linear_backward", grad_y=grad_y, lora_A=lora_A)
    m, r = grad_y.shape[0], lora_A.shape[0]
    grad_x = grad_y.new_empty((m, in_features) if compute_grad_input else (0,))
    grad_x_lora = grad_y.new_empty((m, in_features) if compute_grad_input and not lora_grad_into_x else (0,))
    return grad_x, grad_y.new_empty((r, in_features)), grad_y.new_empty((grad_y.shape[1], r)), grad_x_lora


@torch.library.register_fake("lowrank_ext::nf4_row_sqnorm")
def _nf4_row_sqnorm_fake(packed, absmax, nested_absmax, nested_map, offset, blocksize, out_features, in_features):
    return packed.new_empty((out_features,), dtype=torch.float32)


# ---- autograd -----------------------------------------------------------------------------------
def _nf4_linear_setup(ctx, inputs, output) -> None:
    x, packed, absmax, nested_absmax, nested_map, offset, blocksize, _, bias = inputs
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_map, offset)  # the NF4 tensors only
    ctx.blocksize, ctx.in_features, ctx.has_bias = blocksize, x.shape[1], bias is not None


def _nf4_linear_backward(ctx, grad_y):
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = _lib.nf4_linear_grad_input(grad_y, *ctx.saved_tensors, ctx.blocksize, ctx.in_features)
    if ctx.has_bias and ctx.needs_input_grad[8]:
        grad_bias = grad_y.sum(0)
    return grad_x, None, None, None, None, None, None, None, grad_bias


def _nf4_lora_setup(ctx, inputs, output) -> None:
    x, x_lora, packed, absmax, nested_absmax, nested_map, offset, blocksize, _, lora_A, lora_B, scaling, bias = inputs
    u = output[1]
    ctx.mark_non_differentiable(u)
    ctx.save_for_backward(x_lora, u, lora_A, lora_B, packed, absmax, nested_absmax, nested_map, offset)
    # x_lora is x (no dropout): the backward adds gu · A into grad_x itself. When the identity is
    # lost (e.g. under tracing) the grads are returned separately and autograd sums them: same result.
    ctx.into_x = x_lora is x
    ctx.blocksize, ctx.in_features, ctx.scaling, ctx.has_bias = blocksize, x.shape[1], scaling, bias is not None


def _nf4_lora_backward(ctx, grad_y, _grad_u):
    x_lora, u, lora_A, lora_B, *nf4 = ctx.saved_tensors
    # x needs no gradient (the first layer, frozen inputs: then neither does x_lora = dropout(x)): the op
    # skips the grad-input NF4 GEMM gy · deq(W) and gu · A, the largest part of the backward.
    need_x, need_x_lora = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    compute_grad_input = need_x or need_x_lora
    grad_x, grad_A, grad_B, grad_x_lora = _lib.nf4_lora_linear_backward(
        grad_y, x_lora, u, *nf4, ctx.blocksize, ctx.in_features, lora_A, lora_B, ctx.scaling, ctx.into_x,
        compute_grad_input)
    grad_bias = grad_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[12] else None
    return (grad_x if need_x else None, grad_x_lora if need_x_lora and not ctx.into_x else None,
            None, None, None, None, None, None, None, grad_A, grad_B, None, grad_bias)


torch.library.register_autograd("lowrank_ext::nf4_linear", _nf4_linear_backward, setup_context=_nf4_linear_setup)
torch.library.register_autograd("lowrank_ext::nf4_lora_linear", _nf4_lora_backward, setup_context=_nf4_lora_setup)
