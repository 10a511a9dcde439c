"""Eager PyTorch oracles of the fused model ops (lowrank_ext/ops/fused.py): the formulas transformers'
Llama/Gemma modules compute, written with plain torch ops so they differentiate with autograd and run in
float64. The benchmark times them as "eager" too (what patch_model replaces)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["add_rms_norm_ref", "rms_norm_ref", "rope_ref", "swiglu_ref"]


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0) -> torch.Tensor:
    """x · rsqrt(mean(x², -1) + eps) · (weight_offset + weight), in x's dtype (LlamaRMSNorm for offset 0 in
    fp32/fp64; GemmaRMSNorm for offset 1)."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(variance + eps) * (weight_offset + weight)


def add_rms_norm_ref(x, residual, weight, eps, weight_offset=0.0):
    h = x + residual
    return rms_norm_ref(h, weight, eps, weight_offset), h


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_ref(q, k, cos, sin, unsqueeze_dim: int = 1):
    """transformers' apply_rotary_pos_emb: q·cos + rotate_half(q)·sin (cos/sin unsqueezed over heads)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
