"""Optimizer ops: thin wrappers over torch.ops.lowrank_ext.{adamw_step, adamw8bit_step, paged_*} and their
fake kernels. The steps mutate their tensors in place (declared `Tensor(a!)` in the schema) and return
nothing; there is no autograd (optimizer updates are not differentiated).

AdamW step t (torch.optim.AdamW's math, decoupled weight decay):
    p <- p·(1 - lr·wd);  m <- m + (1-β1)(g - m);  v <- β2·v + (1-β2)·g²
    p <- p - lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps)
8-bit state: blocks of 256 flat elements; m = qmap1[state1]·absmax1[block] (signed dynamic map),
v = qmap2[state2]·absmax2[block] (unsigned map); after the update each block is requantized to the
nearest code of m/max|m| (v/max v).
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "OPTIM_BLOCKSIZE",
    "adamw8bit_step",
    "adamw_step",
    "optim_qmap",
    "paged_is_managed",
    "paged_last_prefetch_location",
    "paged_prefetch",
    "paged_prefetch_batch",
    "paged_prefetch_supported",
    "paged_zeros_like",
]

_lib = torch.ops.lowrank_ext
OPTIM_BLOCKSIZE = 256  # flat elements per fp32 absmax of the 8-bit state


@functools.cache
def _qmap_cpu(signed: bool) -> torch.Tensor:
    # Dettmers' dynamic 8-bit type with 7 exponent bits (bitsandbytes' create_dynamic_map(signed)): for
    # exponent e = 0..6, the midpoints of a linspace(0.1, 1) grid of 2^e (signed) or 2^(e+1) (unsigned)
    # intervals, scaled by 10^(e-6) (mirrored for signed); plus 0 and 1; padded with 0 to 256, sorted.
    # fp32 linspace and fp32 midpoints so every entry rounds as bitsandbytes' does.
    values: list[float] = []
    for e in range(7):
        intervals = 2**e if signed else 2 ** (e + 1)
        bounds = torch.linspace(0.1, 1, intervals + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += (10.0 ** (e - 6) * means).tolist()  # fp32 tensor product, as bitsandbytes rounds it
        if signed:
            values += (-(10.0 ** (e - 6)) * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def optim_qmap(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 8-bit state's code map, fp32 [256] sorted: signed for the first moment, unsigned for the second."""
    return _qmap_cpu(signed).to(device)


def adamw_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
) -> None:
    """One fused AdamW step in place. param/grad: fp32/fp16/bf16, same shape; exp_avg/exp_avg_sq: fp32
    with param's numel. All four must be contiguous (the kernel walks flat buffers; the optimizers in
    lowrank_ext.optim step a contiguous copy of a strided param and write it back). `step` is the step
    count including this update (1 for the first)."""
    _lib.adamw_step(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step)


def adamw8bit_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor,
    absmax1: torch.Tensor,
    absmax2: torch.Tensor,
    qmap1: torch.Tensor,
    qmap2: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
) -> None:
    """One fused AdamW step with 8-bit blockwise state, in place. state1/state2: uint8 [numel];
    absmax1/absmax2: fp32 [ceil(numel/256)]; qmap1/qmap2: fp32 [256], sorted ascending. Contiguous
    buffers only, as adamw_step."""
    _lib.adamw8bit_step(
        param, grad, state1, state2, absmax1, absmax2, qmap1, qmap2, lr, beta1, beta2, eps, weight_decay, step
    )


def paged_zeros_like(like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Zeros of like's shape on like's device. CUDA: backed by cudaMallocManaged (paged: can move to
    the host), freed when the tensor dies. CPU: ordinary memory."""
    return _lib.paged_zeros_like(like, dtype)


def paged_prefetch(t: torch.Tensor, device: int) -> None:
    """Move a managed tensor's pages (asynchronously, current stream) to GPU `device`, or to the host
    with device=-1. No-op for CPU tensors, on GPUs that cannot prefetch (`paged_prefetch_supported`), and
    while the current stream captures a CUDA graph (pages then migrate on demand)."""
    _lib.paged_prefetch(t, device)


def paged_prefetch_batch(tensors: list[torch.Tensor], device: int) -> None:
    """paged_prefetch for a list of tensors on one device, in one op call: one cudaMemPrefetchBatchAsync (CUDA 13+,
    a non-default stream) or one cudaMemPrefetchAsync per managed tensor, with one capture / support check and
    no pointer query for paged_zeros_like's own tensors. Tensors that are not managed are skipped; an empty
    list does nothing."""
    if tensors:
        _lib.paged_prefetch_batch(list(tensors), device)


def paged_prefetch_supported(device: int) -> bool:
    """Whether GPU `device` can prefetch managed memory (cudaDevAttrConcurrentManagedAccess). False under
    Windows WDDM, on some vGPU / container setups, and in a build without CUDA kernels."""
    return _lib.paged_prefetch_supported(device)


def paged_is_managed(t: torch.Tensor) -> bool:
    """True when t lives in CUDA managed memory."""
    return _lib.paged_is_managed(t)


def paged_last_prefetch_location(t: torch.Tensor) -> int:
    """Where t's pages were last prefetched: a device ordinal, -1 for the host, -2 never/unknown."""
    return _lib.paged_last_prefetch_location(t)


@torch.library.register_fake("lowrank_ext::adamw_step")
def _adamw_step_fake(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step) -> None:
    return None


@torch.library.register_fake("lowrank_ext::adamw8bit_step")
def _adamw8bit_step_fake(
    param, grad, state1, state2, absmax1, absmax2, qmap1, qmap2, lr, beta1, beta2, eps, weight_decay, step
) -> None:
    return None


@torch.library.register_fake("lowrank_ext::paged_zeros_like")
def _paged_zeros_like_fake(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(like.shape, dtype=dtype, device=like.device)


@torch.library.register_fake("lowrank_ext::paged_prefetch")
def _paged_prefetch_fake(t: torch.Tensor, device: int) -> None:
    return None


@torch.library.register_fake("lowrank_ext::paged_prefetch_batch")
def _paged_prefetch_batch_fake(tensors: list[torch.Tensor], device: int) -> None:
    return None
