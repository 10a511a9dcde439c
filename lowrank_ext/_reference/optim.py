"""Reference AdamW updates in plain PyTorch (fp32 and 8-bit blockwise state). Slow and readable: the spec
of lowrank_ext.ops.adamw_step / adamw8bit_step in code, used by tests."""

from __future__ import annotations

import math

import torch

from lowrank_ext.ops.optim import optim_qmap

__all__ = ["adamw8bit_step_ref", "adamw_step_ref", "nearest_code_ref", "optim_maps"]

BLOCK = 256


def optim_maps() -> tuple[torch.Tensor, torch.Tensor]:
    """(signed dynamic map for the first moment, unsigned dynamic map for the second), fp32 [256] each."""
    return optim_qmap(True), optim_qmap(False)


def adamw_step_ref(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """In place, in the state's dtype: fp32 math for fp32 state (p may be fp16/bf16, rounded once at the
    end), float64 math when m and v are float64 (the doctor's oracle)."""
    bc1 = 1 - beta1**step
    bc2_sqrt = math.sqrt(1 - beta2**step)
    pf = p.to(m.dtype) * (1 - lr * weight_decay)
    gf = g.to(m.dtype)
    m.lerp_(gf, 1 - beta1)
    v.mul_(beta2).addcmul_(gf, gf, value=1 - beta2)
    pf.addcdiv_(m, v.sqrt() / bc2_sqrt + eps, value=-lr / bc1)
    p.copy_(pf)


def nearest_code_ref(x: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """Index of the nearest qmap entry (qmap sorted): the number of fp32 midpoints strictly below x."""
    mids = (qmap[:-1] + qmap[1:]) * 0.5
    return torch.searchsorted(mids, x.contiguous(), right=False).to(torch.uint8)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    n = x.numel()
    nb = -(-n // BLOCK)
    out = x.new_zeros(nb * BLOCK)
    out[:n] = x.reshape(-1)
    return out.view(nb, BLOCK)


def adamw8bit_step_ref(
    p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, *, lr, beta1, beta2, eps, weight_decay, step
) -> None:
    """In place: decode the 8-bit moments, update in fp32, requantize blockwise (blocks of 256)."""
    n = p.numel()
    per_block1 = absmax1.repeat_interleave(BLOCK)[:n]
    per_block2 = absmax2.repeat_interleave(BLOCK)[:n]
    m = qmap1[state1.reshape(-1).long()] * per_block1
    v = qmap2[state2.reshape(-1).long()] * per_block2
    pf = p.reshape(-1).clone()
    adamw_step_ref(
        pf,
        g.reshape(-1),
        m,
        v,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        step=step,
    )
    p.copy_(pf.view_as(p))
    for x, qmap, codes, absmax in ((m, qmap1, state1, absmax1), (v, qmap2, state2, absmax2)):
        amax = _blocks(x).abs().amax(dim=1)
        inv = torch.where(amax > 0, 1.0 / amax, torch.zeros_like(amax))
        scaled = x * inv.repeat_interleave(BLOCK)[:n]
        codes.copy_(nearest_code_ref(scaled, qmap).view_as(codes))
        absmax.copy_(amax)
