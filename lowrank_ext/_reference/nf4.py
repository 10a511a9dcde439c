"""Reference NF4 math in plain PyTorch (docs/format.md). Slow and readable: the spec in code."""

from __future__ import annotations

import functools

import torch

__all__ = [
    "NESTED_BLOCKSIZE",
    "NF4_CODEBOOK",
    "VALID_BLOCKSIZES",
    "dequantize_nf4_ref",
    "dynamic_map",
    "quantize_nf4_ref",
]

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # blocksizes bitsandbytes accepts for NF4
NESTED_BLOCKSIZE = 256  # double quant: absmax values per nested (second-level) block

NF4_CODEBOOK = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip


@functools.cache
def _dynamic_map_cached(signed: bool, max_exponent_bits: int, total_bits: int) -> torch.Tensor:
    # The "dynamic" 8-bit type of Dettmers (arXiv:1511.04561) as bitsandbytes builds it: for each
    # exponent e = 0..6 a linear fraction grid of 2^e (signed) points in (0.1, 1), scaled by
    # 10^(e-6), mirrored for the sign; plus 0 and 1.0, sorted. Built with fp32 linspace so every
    # entry rounds exactly as bitsandbytes' map does.
    values: list[float] = []
    non_sign_bits = total_bits - 1  # bitsandbytes uses this for both; unsigned gets 2x fraction points
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else (
            2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        bounds = torch.linspace(0.1, 1, int(items), dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        values += (scale * means).tolist()
        if signed:
            values += (-scale * means).tolist()
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if extra > 0:
        bounds = torch.linspace(0.1, 1, extra + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)
        values += (scale * means).tolist()
        if signed:
            values += (-scale * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' `create_dynamic_map`: 256 sorted fp32 values (a fresh copy)."""
    return _dynamic_map_cached(signed, max_exponent_bits, total_bits).clone()


def quantize_nf4_ref(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [(n+1)//2, 1], absmax fp32 [nb]) — same bytes as the kernels."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // blocksize)
    padded = torch.zeros(nb * blocksize, dtype=torch.float32)
    padded[:n] = flat
    blocks = padded.view(nb, blocksize)
    absmax = blocks.abs().amax(dim=1)
    m = absmax.clamp_min(1e-38)  # bitsandbytes' clamp before the reciprocal (subnormal blocks); absmax is stored as is
    scaled = blocks * (1.0 / m)[:, None]
    if n % blocksize:  # bitsandbytes divides in the partial last block
        scaled[-1] = blocks[-1] / m[-1]
    mids = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2
    codes = (scaled.unsqueeze(-1) > mids).sum(-1).to(torch.uint8)
    codes[absmax == 0] = 7
    codes = codes.view(-1)[:n]
    if n % 2:
        codes = torch.cat([codes, torch.tensor([7], dtype=torch.uint8)])
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.view(-1, 1), absmax


def dequantize_nf4_ref(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_map: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    numel: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Flat [numel] dequantized weight: NF4[code] * absmax_hat, in fp32, rounded once to dtype."""
    p = packed.reshape(-1).cpu()
    codes = torch.stack([p >> 4, p & 15], dim=1).view(-1)[:numel].long()
    if absmax.dtype == torch.uint8:
        nb = absmax.numel()
        scale = nested_map.cpu()[absmax.cpu().long()] * nested_absmax.cpu().repeat_interleave(256)[:nb]
        scale = scale + offset.cpu().reshape(())
    else:
        scale = absmax.cpu().float()
    per_elem = scale.repeat_interleave(blocksize)[:numel]
    return (NF4_CODEBOOK[codes] * per_elem).to(dtype)
