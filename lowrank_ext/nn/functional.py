"""The math of the adapter layers, as functions (the layers own parameters and call these).

Notation: x [..., K], W [N, K] (dense or NF4), A [r, K], B [N, r], scale s, bias [N], p = dropout.

    LoRA      y = x Wᵀ + s · (x_d Aᵀ) Bᵀ + bias                      x_d = dropout(x)
    VeRA      A' = diag(λ_d) A_shared[:, :K],  B' = diag(λ_b) B_shared[:N, :],  s = 1, then LoRA
    DoRA      n = ||W + s B A||_row (detached),  g = m / n
              no dropout:  y = g ⊙ (x Wᵀ + s (x Aᵀ) Bᵀ) + bias
              dropout:     y = x Wᵀ + (g - 1) ⊙ (x_d Wᵀ) + g ⊙ s (x_d Aᵀ) Bᵀ + bias      (PEFT's form)
    DoRA norm on NF4 without a dense W (w_i = row i of deq(W)):
              n_i² = ||w_i||² + 2 s B_i · (A w_i) + s² ||(B A)_i||²,  A w_i for all i = (deq(W) Aᵀ)_i
                   = nf4_linear(A, W)ᵀ,  ||(B A)_i||² = (B (A Aᵀ))_i · B_i
    Mixed batch: row b of a batch uses adapter ids[b]; stacks A_all [n, r_max, K] and
              B_all [n, N, r_max] (s folded in, ranks zero-padded): y_b += (x_b A_all[ids[b]]ᵀ) B_all[ids[b]]ᵀ
              — one gather and two batched matmuls for the whole batch; or, when the adapters' ranks
              add up to little (Σr ≤ 256), rank-concatenated A_cat [Σr, K], B_cat [N, Σr] and a row mask:
              y_b += ((x_b A_catᵀ) ⊙ [owner = ids[b]]) B_catᵀ — two plain GEMMs for the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowrank_ext.nf4 import NF4Weight
from lowrank_ext.ops import nf4_linear

__all__ = [
    "dora_norm_dense",
    "dora_norm_nf4",
    "lora_linear",
    "mixed_lora_delta",
    "mixed_lora_delta_cat",
    "vera_factors",
]


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                scaling: float, bias: torch.Tensor | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Dense-base LoRA: y = x Wᵀ + s · (dropout(x) Aᵀ) Bᵀ + bias."""
    x_d = F.dropout(x, dropout) if dropout > 0 else x
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x_d, lora_A), lora_B)


def vera_factors(lambda_d: torch.Tensor, lambda_b: torch.Tensor, vera_A: torch.Tensor,
                 vera_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA as LoRA factors: A' = diag(λ_d) A_shared [r, K], B' = diag(λ_b) B_shared [N, r] (differentiable in λ)."""
    return lambda_d[:, None] * vera_A, lambda_b[:, None] * vera_B


@torch.no_grad()
def dora_norm_dense(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                    dtype: torch.dtype) -> torch.Tensor:
    """n = ||W + s B A||₂ per output row [N], computed in `dtype` (PEFT computes it in x's dtype); detached."""
    w = weight.to(dtype) + scaling * (lora_B.to(dtype) @ lora_A.to(dtype))
    return torch.linalg.norm(w, dim=1).to(dtype)


@torch.no_grad()
def dora_norm_nf4(weight: NF4Weight, w_sqnorm: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    """n_i = sqrt(||w_i||² + 2 s B_i·(A w_i) + s² ||(BA)_i||²) in fp32 [N], with no dense N×K tensor.

    w_sqnorm = ||w_i||² (fp32 [N], fixed: the base is frozen); A w_i for all rows is one fused NF4 GEMM.
    """
    a = lora_A.float()
    b = lora_B.float()
    aw = nf4_linear(a, weight).t()                      # [N, r] = deq(W) Aᵀ, row i = A w_i
    cross = (b * aw).sum(dim=1)                         # B_i · (A w_i)
    ba_sq = ((b @ (a @ a.t())) * b).sum(dim=1)          # ||(BA)_i||² = B_i (A Aᵀ) B_iᵀ
    sq = w_sqnorm + 2.0 * scaling * cross + (scaling * scaling) * ba_sq
    return sq.clamp_min(0.0).sqrt()


def mixed_lora_delta(x: torch.Tensor, ids: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor) -> torch.Tensor:
    """Σ-free mixed batch: row b of x ([batch, ..., K]) gets (x_b A_all[ids[b]]ᵀ) B_all[ids[b]]ᵀ.

    a_all [n, r, K], b_all [n, N, r] (scaling folded into b_all; an all-zero entry means "no adapter").
    Returns [batch, ..., N]. One gather + two bmm, no Python loop over rows or adapters.
    """
    batch, k = x.shape[0], x.shape[-1]
    x3 = x.reshape(batch, -1, k)                        # [b, L, K]
    a_sel = a_all.index_select(0, ids)                  # [b, r, K]
    b_sel = b_all.index_select(0, ids)                  # [b, N, r]
    u = torch.bmm(x3, a_sel.transpose(1, 2))            # [b, L, r]
    y = torch.bmm(u, b_sel.transpose(1, 2))             # [b, L, N]
    return y.reshape(*x.shape[:-1], b_all.shape[1])


def mixed_lora_delta_cat(x: torch.Tensor, ids: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor,
                         owner: torch.Tensor) -> torch.Tensor:
    """Mixed batch with the adapters concatenated along the rank: a_cat [Σr, K], b_cat [N, Σr] (scaling folded
    in), owner [Σr] = the adapter index of each rank slot. Row b keeps only the slots of adapter ids[b]:
    y_b = ((x_b A_catᵀ) ⊙ m_b) B_catᵀ, m_b = [owner == ids[b]]. Two GEMMs for the whole batch."""
    u = F.linear(x, a_cat)                                              # [b, ..., Σr]
    mask = (ids[:, None] == owner[None, :]).to(u.dtype)                 # [b, Σr]
    u = u * mask.view(x.shape[0], *([1] * (x.dim() - 2)), owner.numel())
    return F.linear(u, b_cat)                                           # [b, ..., N]
