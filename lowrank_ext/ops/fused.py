"""Fused model ops: RMSNorm (+ the residual add), rotary embedding of q and k, SwiGLU — thin wrappers over
torch.ops.lowrank_ext.{rms_norm, add_rms_norm, rope, swiglu} and their backward ops, fake kernels and autograd.

The math (csrc/cpu/fused_kernels.h has it next to the kernels):
    rms_norm       y = x · rstd · (weight_offset + weight),  rstd = 1/sqrt(mean(x², -1) + eps)
    add_rms_norm   h = x + residual;  y = rms_norm(h)          -> (y, h)
    rope           q·cos + rotate_half(q)·sin, the same for k  (transformers' apply_rotary_pos_emb)
    swiglu         silu(gate) · up
Each backward saves the least it can: the norm keeps h (x) and recomputes rstd; rope keeps only cos and
sin; swiglu keeps gate and up and recomputes σ(gate). bf16 inputs are computed in fp32 and each output is
rounded once (eager PyTorch rounds after every op). cos and sin are constants: they get no gradient.

The ops take one activation dtype; these wrappers accept what the eager code they replace accepts and give its
result dtypes, by PyTorch's type promotion: under bf16 autocast a projection's bf16 output meets the fp32
residual stream (x + residual is fp32), fp32 cos/sin (q·cos is fp32) and an fp32 norm weight (weight · n̂ is
fp32), so mixed inputs are cast up to the promoted dtype first (the cast is exact) and the results carry it.
"""

from __future__ import annotations

import torch

__all__ = ["add_rms_norm", "apply_rotary_pos_emb", "rms_norm", "rope", "swiglu"]

_lib = torch.ops.lowrank_ext


def _promoted(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype eager PyTorch computes a * b (+ c ...) of these tensors in (type promotion)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dim. weight_offset=1.0 is Gemma's (1 + weight). The result has the dtype of
    weight · x (transformers' `weight * normed.to(input_dtype)`: fp32 for an fp32 weight on bf16 x)."""
    return _as(_lib.rms_norm(x, weight, eps, weight_offset), _promoted(x, weight))


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass: a decoder layer's residual add and its next norm.
    h has the dtype of x + residual, y that of weight · h (see rms_norm)."""
    act = _promoted(x, residual)
    y, h = _lib.add_rms_norm(_as(x, act), _as(residual, act), weight, eps, weight_offset)
    return _as(y, _promoted(h, weight)), h


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, S, D], k [B, Hk, S, D], cos/sin [B or 1, S, D] -> the rotated (q, k)."""
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError(
            "lowrank_ext::rope: cos and sin must not require grad (the op treats them as constants), got "
            f"requires_grad={cos.requires_grad} (cos), {sin.requires_grad} (sin)"
        )
    dtype = _promoted(q, k, cos, sin)  # eager q·cos + rotate_half(q)·sin computes in this dtype
    return _lib.rope(_as(q, dtype), _as(k, dtype), _as(cos, dtype), _as(sin, dtype))


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Drop-in for transformers' apply_rotary_pos_emb: unsqueeze_dim=1 takes q/k as [B, H, S, D],
    unsqueeze_dim=2 as [B, S, H, D] (viewed as [B, H, S, D] without a copy, and the results viewed back)."""
    if unsqueeze_dim == 1:
        return rope(q, k, cos, sin)
    if unsqueeze_dim == 2:
        q_out, k_out = rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)
    raise ValueError(f"lowrank_ext::apply_rotary_pos_emb: unsqueeze_dim must be 1 or 2, got {unsqueeze_dim}")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up (in the promoted dtype of gate and up, as eager's act(gate) * up)."""
    dtype = _promoted(gate, up)
    return _lib.swiglu(_as(gate, dtype), _as(up, dtype))


# ---- fake kernels: the CPU/CUDA kernels' output shapes and strides ------------------------------------------


@torch.library.register_fake("lowrank_ext::rms_norm")
def _rms_norm_fake(x, weight, eps, weight_offset):
    return x.new_empty(x.shape)


@torch.library.register_fake("lowrank_ext::add_rms_norm")
def _add_rms_norm_fake(x, residual, weight, eps, weight_offset):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.register_fake("lowrank_ext::rms_norm_backward")
def _rms_norm_backward_fake(grad_y, grad_h, h, weight, eps, weight_offset):
    return h.new_empty(h.shape), weight.new_empty(weight.shape)


def _rotated_like(t: torch.Tensor) -> torch.Tensor:
    # the kernels keep an input's strides (empty_like) once its last dim is contiguous
    return torch.empty_like(t if t.stride(-1) == 1 else t.contiguous())


@torch.library.register_fake("lowrank_ext::rope")
def _rope_fake(q, k, cos, sin):
    return _rotated_like(q), _rotated_like(k)


@torch.library.register_fake("lowrank_ext::rope_backward")
def _rope_backward_fake(grad_q, grad_k, cos, sin):
    return _rotated_like(grad_q), _rotated_like(grad_k)


@torch.library.register_fake("lowrank_ext::swiglu")
def _swiglu_fake(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.register_fake("lowrank_ext::swiglu_backward")
def _swiglu_backward_fake(grad, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


# ---- autograd ------------------------------------------------------------------------------------------------


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps, weight_offset = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps, ctx.weight_offset = eps, weight_offset


def _rms_norm_backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    grad_x, grad_w = _lib.rms_norm_backward(grad_y, None, x, weight, ctx.eps, ctx.weight_offset)
    return grad_x, grad_w, None, None


def _add_rms_norm_setup(ctx, inputs, output):
    _, _, weight, eps, weight_offset = inputs
    ctx.save_for_backward(output[1], weight)  # h: the norm's input; rstd is recomputed from it
    ctx.eps, ctx.weight_offset = eps, weight_offset


def _add_rms_norm_backward(ctx, grad_y, grad_h):
    h, weight = ctx.saved_tensors
    grad_x, grad_w = _lib.rms_norm_backward(grad_y, grad_h, h, weight, ctx.eps, ctx.weight_offset)
    return grad_x, grad_x, grad_w, None, None  # ∂h/∂x = ∂h/∂residual = 1


def _rope_setup(ctx, inputs, output):
    _, _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _rope_backward(ctx, grad_q, grad_k):
    cos, sin = ctx.saved_tensors
    grad_q_in, grad_k_in = _lib.rope_backward(grad_q, grad_k, cos, sin)
    return grad_q_in, grad_k_in, None, None


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, grad):
    gate, up = ctx.saved_tensors
    return _lib.swiglu_backward(grad, gate, up)


torch.library.register_autograd("lowrank_ext::rms_norm", _rms_norm_backward, setup_context=_rms_norm_setup)
torch.library.register_autograd("lowrank_ext::add_rms_norm", _add_rms_norm_backward, setup_context=_add_rms_norm_setup)
torch.library.register_autograd("lowrank_ext::rope", _rope_backward, setup_context=_rope_setup)
torch.library.register_autograd("lowrank_ext::swiglu", _swiglu_backward, setup_context=_swiglu_setup)
