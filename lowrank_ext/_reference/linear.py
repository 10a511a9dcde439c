"""Reference fused NF4 linear / LoRA math in plain float64 PyTorch (docs/kernels.md, "The math").

Slow and readable: dequantizes the whole weight (which the kernels never do) and computes in float64,
so tests can hold the kernels to "PyTorch's own error at the working precision".
"""

from __future__ import annotations

import torch

from lowrank_ext._reference.nf4 import dequantize_nf4_ref

__all__ = ["dequantize_weight_f64", "nf4_linear_ref", "nf4_lora_linear_ref"]


def dequantize_weight_f64(weight) -> torch.Tensor:
    """deq(W) [N, K] in float64 (exact: the fp32 product NF4[code] * absmax_hat, widened)."""
    flat = dequantize_nf4_ref(*weight.tensors(), weight.blocksize, weight.numel, torch.float32)
    return flat.to(torch.float64).view(weight.shape)


def nf4_linear_ref(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · deq(W)ᵀ + bias, float64, x of any leading shape (differentiable in x and bias)."""
    w = dequantize_weight_f64(weight).to(x.device)
    y = x.double() @ w.t()
    return y if bias is None else y + bias.double()


def nf4_lora_linear_ref(
    x: torch.Tensor,
    weight,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x · deq(W)ᵀ + scaling · (x_lora · Aᵀ) · Bᵀ + bias in float64; x_lora defaults to x
    (pass the dropped-out input to check dropout)."""
    x_lora = x if x_lora is None else x_lora
    u = x_lora.double() @ lora_A.double().t()
    return nf4_linear_ref(x, weight, bias) + scaling * (u @ lora_B.double().t())
