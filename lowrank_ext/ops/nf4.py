"""NF4 format ops: thin wrappers over torch.ops.lowrank_ext.{quantize_nf4, double_quant, dequantize_nf4}
with their fake (meta) kernels. No autograd: quantization is not differentiable (the weight is frozen).

Format (docs/format.md; bitsandbytes' quant_type="nf4" layout):
    absmax[b]  = max |x| over block b of `blocksize` flat elements
    code[i]    = nearest NF4 level to x[i] / absmax[b]  (via the 15 midpoints, ties to the lower code)
    packed[j]  = code[2j] << 4 | code[2j+1]
Double quant: offset = mean(absmax); qabsmax = nearest dynamic-map code of (absmax - offset) / absmax2.
"""

from __future__ import annotations

import torch

from lowrank_ext._reference.nf4 import NESTED_BLOCKSIZE, VALID_BLOCKSIZES  # noqa: F401  (re-exported)

__all__ = ["dequantize_nf4", "dequantize_nf4_out", "double_quant", "quantize_nf4_raw"]

_lib = torch.ops.lowrank_ext


def quantize_nf4_raw(x: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape; fp32/fp16/bf16) -> (packed uint8 [(n+1)//2, 1], absmax fp32 [ceil(n/blocksize)])."""
    return _lib.quantize_nf4(x, blocksize)


def double_quant(absmax: torch.Tensor, nested_map: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """absmax fp32 [nb] -> (qabsmax uint8 [nb], nested_absmax fp32 [ceil(nb/256)], offset fp32 [1])."""
    return _lib.double_quant(absmax, nested_map)


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_map: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    numel: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The NF4 bundle -> flat [numel] weight in `dtype`, nested absmax decoded inline (one pass)."""
    return _lib.dequantize_nf4(packed, absmax, nested_absmax, nested_map, offset, blocksize, numel, dtype)


def dequantize_nf4_out(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_map: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    numel: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Dequantize into `out` (contiguous fp32/fp16/bf16, `numel` elements, any shape); returns `out`.

    Reusing one buffer avoids the allocation and first-touch page faults of a fresh 4096x4096 fp32
    result, which cost more than the dequantization itself on CPU (docs/kernels.md)."""
    _lib.dequantize_nf4_out(packed, absmax, nested_absmax, nested_map, offset, blocksize, numel, out)
    return out


@torch.library.register_fake("lowrank_ext::quantize_nf4")
def _quantize_nf4_fake(x: torch.Tensor, blocksize: int):
    n = x.numel()
    packed = x.new_empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = x.new_empty((-(-n // blocksize),), dtype=torch.float32)
    return packed, absmax


@torch.library.register_fake("lowrank_ext::double_quant")
def _double_quant_fake(absmax: torch.Tensor, nested_map: torch.Tensor):
    nb = absmax.numel()
    return (
        absmax.new_empty((nb,), dtype=torch.uint8),
        absmax.new_empty((-(-nb // NESTED_BLOCKSIZE),), dtype=torch.float32),
        absmax.new_empty((1,), dtype=torch.float32),
    )


@torch.library.register_fake("lowrank_ext::dequantize_nf4")
def _dequantize_nf4_fake(packed, absmax, nested_absmax, nested_map, offset, blocksize, numel, dtype):
    return packed.new_empty((numel,), dtype=dtype)


@torch.library.register_fake("lowrank_ext::dequantize_nf4_out")
def _dequantize_nf4_out_fake(packed, absmax, nested_absmax, nested_map, offset, blocksize, numel, out):
    return None
