"""Linear4bit: an NF4 inference linear layer, and the NF4-buffer plumbing shared with QLoRALinear.

The NF4 tensors live in buffers (so `model.to(device)` moves them) but `state_dict()` writes them in
bitsandbytes' Linear4bit key layout (`weight`, `weight.absmax`, `weight.quant_map`, `weight.nested_absmax`,
`weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`), and `load_state_dict` reads that layout.
`model.to(dtype)` never casts them: the fp32 absmax data must stay fp32 (it is part of the format).

    forward:  y = x · deq(W)ᵀ + bias      (one op: lowrank_ext.ops.nf4_linear, no dense W)
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_ext.nf4 import NF4Weight, quantize_nf4
from lowrank_ext.ops import nf4_linear

__all__ = ["Linear4bit", "NF4WeightHolder"]

_BUFS = ("weight_packed", "weight_absmax", "weight_nested_absmax", "weight_nested_map", "weight_offset")
_BNB_SUFFIXES = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                 "weight.quant_state.bitsandbytes__nf4")


class NF4WeightHolder(nn.Module):
    """Mixin: keeps an NF4Weight as non-persistent buffers, exposes it as `self.weight`, (de)serializes it
    in bitsandbytes' layout."""

    def _set_nf4_weight(self, w: NF4Weight) -> None:
        if not isinstance(w, NF4Weight):
            raise TypeError(f"lowrank_ext::{type(self).__name__}: weight must be an NF4Weight, got {type(w).__name__}")
        for name, t in zip(_BUFS, w.tensors()):
            self.register_buffer(name, t, persistent=False)
        self._nf4_meta = (w.shape, w.dtype, w.blocksize)
        self._nf4_cache = (w.tensors(), w)

    @property
    def weight(self) -> NF4Weight:
        """The frozen NF4 weight (rebuilt only when the buffers were moved, e.g. by .to())."""
        ts = tuple(getattr(self, n) for n in _BUFS)
        cached_ts, w = self._nf4_cache or ((None,) * len(_BUFS), None)
        if w is None or any(a is not b for a, b in zip(ts, cached_ts)):
            shape, dtype, blocksize = self._nf4_meta
            w = NF4Weight(ts[0], ts[1], shape, dtype, blocksize, *ts[2:])
            self._nf4_cache = (w.tensors(), w)
        return w

    def __getstate__(self):
        # NF4Weight itself is immutable (not copyable field by field): copies rebuild it from the buffers
        return {**super().__getstate__(), "_nf4_cache": None}

    def _apply(self, fn, recurse=True):
        # Move the NF4 buffers to fn's device but never change their dtypes (model.half() must not touch them).
        saved = {n: self._buffers.pop(n) for n in _BUFS}
        try:
            super()._apply(fn, recurse)
        finally:
            device = fn(torch.empty(0)).device
            for n, t in saved.items():
                self._buffers[n] = None if t is None else t.to(device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.update(self.weight.to_bnb_state_dict(prefix))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mine = {prefix + s for s in _BNB_SUFFIXES}
        if prefix + "weight" in state_dict:
            try:
                w = NF4Weight.from_bnb_state_dict(state_dict, prefix)
            except (KeyError, ValueError) as e:
                error_msgs.append(str(e))
            else:
                if tuple(w.shape) != tuple(self._nf4_meta[0]):
                    error_msgs.append(f"lowrank_ext::{type(self).__name__}: {prefix}weight must have shape "
                                      f"{tuple(self._nf4_meta[0])}, got {tuple(w.shape)}")
                else:
                    self._set_nf4_weight(w.to(self.weight.device))
        else:
            missing_keys.append(prefix + "weight")
        rest = {k: v for k, v in state_dict.items() if k not in mine}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class Linear4bit(NF4WeightHolder):
    """NF4 inference layer: y = x · deq(W)ᵀ + bias, one fused op, W never dequantized to memory."""

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"lowrank_ext::Linear4bit: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self._set_nf4_weight(weight)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"lowrank_ext::Linear4bit: bias must have shape ({self.out_features},), "
                             f"got {tuple(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> Linear4bit:
        """Quantize an nn.Linear's weight to NF4 (bitsandbytes' format); the bias stays dense."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"lowrank_ext::Linear4bit: linear must be an nn.Linear, got {type(linear).__name__}")
        return cls(quantize_nf4(linear.weight.detach(), blocksize, double_quant), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nf4_linear(x, self.weight, bias)

    def extra_repr(self) -> str:
        w = self.weight
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={w.blocksize}, double_quant={w.double_quant}")
