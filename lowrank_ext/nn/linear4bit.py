"""Linear4bit: an NF4 inference linear layer, and the NF4 storage shared with QLoRALinear.

Storage (NF4WeightHolder):
    weight_packed   uint8 Parameter [(numel+1)//2, 1]   the packed 4-bit codes (requires_grad=False)
    weight_absmax   uint8 Parameter [nblocks]           8-bit absmax codes (double quant), or
                    uint8 Parameter [nblocks, 4]        the bytes of the fp32 absmax (no double quant)
    weight_nested_absmax, weight_nested_map, weight_offset   fp32 buffers (double quant only): tiny, replicated
The bytes are frozen uint8 *parameters* so that FSDP2 (`fully_shard`) shards them along dim 0 like any other
parameter, DDP never synchronizes them after construction (requires_grad=False: not in its reducer), and no
dtype cast or mixed-precision policy can change them (casts and MixedPrecisionPolicy only touch floating
point parameters; the fp32 absmax is stored as bytes for exactly that reason). The small fp32 constants are
buffers: FSDP2 leaves buffers unsharded and uncast, and `_apply` below keeps their dtype under model.half().
`layer.weight` is an NF4Weight over the current tensors (views, no copy), built once and cached until one of
them changes: the cache is keyed on the identity and data pointer of each storage tensor, so a device move
(`_apply` swaps `.data`), load_state_dict / requantize (new Parameters), FSDP2's unshard / reshard (it swaps the
Parameter objects and frees or re-allocates the gathered storage) and `p.data = ...` all rebuild it; in-place
writes need nothing (the views see them). Building one costs ~15 µs of Python (its checks), ~30% of a decode
step of a small model when it ran per call. A layer whose bytes are sharded (DTensors, outside FSDP2's
forward/backward hooks) refuses to compute: the op needs the whole weight (docs/distributed.md).

`state_dict()` writes bitsandbytes' Linear4bit key layout (`weight`, `weight.absmax`, `weight.quant_map`,
`weight.nested_absmax`, `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`), and
`load_state_dict` reads that layout.

    forward:  y = x · deq(W)ᵀ + bias      (one op: lowrank_ext.ops.nf4_linear, no dense W)

`compute_dtype` (bitsandbytes' name and meaning): the matmul runs in it and the output comes back in x's dtype
(fp32 activations with compute_dtype=torch.bfloat16 take the bf16 kernels); None computes in x's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lowrank_ext.nn.layout import check_floating
from lowrank_ext.nf4 import BNB_WEIGHT_SUFFIXES, NF4Weight, bnb_state_dict, quantize_nf4
from lowrank_ext.ops import nf4_linear

__all__ = ["NF4_PARAMS", "Linear4bit", "NF4WeightHolder", "check_compute_dtype", "is_sharded"]

NF4_PARAMS = ("weight_packed", "weight_absmax")   # uint8, frozen: what FSDP2 shards
_BUFS = ("weight_nested_absmax", "weight_nested_map", "weight_offset")  # fp32 double-quant constants


_COMPUTE_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                   "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def check_compute_dtype(where: str, compute_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """compute_dtype as a torch.dtype (None, torch.float32/bfloat16/float16, or their names "bf16", "bfloat16"...)."""
    if compute_dtype is None or compute_dtype in _COMPUTE_DTYPES.values():
        return compute_dtype
    if isinstance(compute_dtype, str) and compute_dtype in _COMPUTE_DTYPES:
        return _COMPUTE_DTYPES[compute_dtype]
    raise TypeError(f"lowrank_ext::{where}: compute_dtype must be None, torch.float32, torch.bfloat16 or torch.float16 "
                    f"(or one of {sorted(_COMPUTE_DTYPES)}), got {compute_dtype!r}")


def is_sharded(t: torch.Tensor | None) -> bool:
    """True for a DTensor (e.g. an FSDP2-sharded parameter between its all-gathers)."""
    if t is None or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class NF4WeightHolder(nn.Module):
    """Mixin: keeps an NF4Weight as frozen uint8 parameters + fp32 buffers, exposes it as `self.weight`,
    (de)serializes it in bitsandbytes' layout."""

    def _set_nf4_weight(self, w: NF4Weight) -> None:
        if not isinstance(w, NF4Weight):
            raise TypeError(f"lowrank_ext::{type(self).__name__}: weight must be an NF4Weight, got {type(w).__name__}")
        packed, absmax, *consts = w.tensors()
        if not w.double_quant:
            absmax = absmax.view(torch.uint8).view(-1, 4)  # the fp32 absmax as bytes: no cast can reach it
        self.weight_packed = nn.Parameter(packed, requires_grad=False)
        self.weight_absmax = nn.Parameter(absmax, requires_grad=False)
        for name, t in zip(_BUFS, consts):
            self.register_buffer(name, t, persistent=False)
        self._nf4_meta = (w.shape, w.dtype, w.blocksize, w.double_quant)
        self._nf4_derived: dict[str, torch.Tensor] = {}  # values computed from the weight: stale once it changes
        self._nf4_cache: tuple[tuple, NF4Weight] | None = None  # (_nf4_key(), the NF4Weight over those tensors)

    def nf4_derived(self, name: str, compute: Callable[[NF4Weight], torch.Tensor]) -> torch.Tensor:
        """compute(self.weight), cached until the NF4 weight changes (load_state_dict, requantize, a move to
        another device): e.g. DoRA's row norms of deq(W). The one place such a cache is invalidated."""
        t = self._nf4_derived.get(name)
        if t is None or t.device != self.weight_packed.device:
            t = self._nf4_derived[name] = compute(self.weight)
        return t

    def nf4_parameters(self) -> tuple[nn.Parameter, nn.Parameter]:
        """The frozen uint8 storage parameters (packed codes, absmax bytes)."""
        return self.weight_packed, self.weight_absmax

    @property
    def nf4_numel(self) -> int:
        """Elements of the quantized weight (what PEFT counts for a 4-bit weight)."""
        return self._nf4_meta[0].numel()

    @property
    def nf4_sharded(self) -> bool:
        """True while the NF4 bytes are sharded across ranks (FSDP2, outside its forward/backward)."""
        return is_sharded(self._parameters["weight_packed"])

    def _nf4_sources(self) -> tuple:
        """The tensors an NF4Weight is built from (the uint8 parameters, then the double-quant buffers)."""
        p, b = self._parameters, self._buffers
        return p["weight_packed"], p["weight_absmax"], b.get(_BUFS[0]), b.get(_BUFS[1]), b.get(_BUFS[2])

    @property
    def weight(self) -> NF4Weight:
        """The frozen NF4 weight over the current tensors: cached, rebuilt only when one of them changed."""
        if torch.compiler.is_compiling():  # traced once into the graph: no cache (dynamo cannot compare data_ptrs)
            return self._build_weight()
        cache = self.__dict__.get("_nf4_cache")  # (a layer unpickled from before the cache: none yet)
        if cache is not None:
            key, w = cache
            sources = self._nf4_sources()
            # same tensor objects holding the same storage (data_ptr: `.data =` swaps and FSDP2's re-allocation)
            if all(t is k for t, k in zip(sources, key)) and sources[0].data_ptr() == key[5] \
                    and sources[1].data_ptr() == key[6]:
                return w
        w = self._build_weight()
        sources = self._nf4_sources()
        self._nf4_cache = ((*sources, sources[0].data_ptr(), sources[1].data_ptr()), w)
        return w

    def _build_weight(self) -> NF4Weight:
        packed, absmax = self._parameters["weight_packed"], self._parameters["weight_absmax"]
        if is_sharded(packed):
            raise ValueError(
                f"lowrank_ext::{type(self).__name__}: weight_packed must be the whole (unsharded) NF4 weight to "
                f"compute with it, got a DTensor shard {tuple(packed.to_local().shape)} of "
                f"{tuple(packed.shape)} placed {tuple(packed.placements)} (call the fully_shard-ed module that owns "
                f"this layer, whose hooks gather the bytes, or unshard() it first)")
        shape, dtype, blocksize, dq = self._nf4_meta
        if not dq:
            absmax = absmax.view(torch.float32).view(-1)
        consts = (getattr(self, n) for n in _BUFS) if dq else ()
        return NF4Weight(packed, absmax, shape, dtype, blocksize, *consts)

    def _apply(self, fn, recurse=True):
        # Move the NF4 tensors to fn's device but never change their dtypes (model.half() / .type() must not
        # touch them); meta tensors (a model built on the meta device) are allocated on the target device.
        saved = {n: self._parameters.pop(n) for n in NF4_PARAMS if n in self._parameters}
        saved_bufs = {n: self._buffers.pop(n) for n in _BUFS if n in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            device = fn(torch.empty(0)).device

            def move(t: torch.Tensor) -> torch.Tensor:
                if t.device == device:
                    return t
                return torch.empty_like(t, device=device) if t.is_meta else t.to(device)

            for n, p in saved.items():
                moved = move(p.data)
                if moved is not p.data:  # in place like nn.Module._apply, a new Parameter across tensor types
                    if torch._has_compatible_shallow_copy_type(p.data, moved):
                        p.data = moved
                    else:
                        p = nn.Parameter(moved, requires_grad=False)
                self._parameters[n] = p
            for n, t in saved_bufs.items():
                self._buffers[n] = None if t is None else move(t)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for n in NF4_PARAMS:  # written below in bitsandbytes' layout instead
            destination.pop(prefix + n, None)
        packed, absmax = self._parameters["weight_packed"], self._parameters["weight_absmax"]
        shape, dtype, blocksize, dq = self._nf4_meta
        if not keep_vars:
            packed, absmax = packed.detach(), absmax.detach()
        if not dq:
            absmax = _fp32_view(absmax)
        consts = [getattr(self, n) for n in _BUFS] if dq else [None] * 3
        destination.update(bnb_state_dict(prefix, packed, absmax, *consts, shape, dtype, blocksize))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mine = {prefix + s for s in BNB_WEIGHT_SUFFIXES}
        if self.nf4_sharded and prefix + "weight" in state_dict:
            error_msgs.append(f"lowrank_ext::{type(self).__name__}: {prefix}weight must be loaded before the model "
                              f"is sharded (or through lowrank_ext.distributed.materialize), got a sharded layer")
        elif prefix + "weight" in state_dict:
            try:
                w = NF4Weight.from_bnb_state_dict(state_dict, prefix)
            except (KeyError, ValueError) as e:
                error_msgs.append(str(e))
            else:
                if tuple(w.shape) != tuple(self._nf4_meta[0]):
                    error_msgs.append(f"lowrank_ext::{type(self).__name__}: {prefix}weight must have shape "
                                      f"{tuple(self._nf4_meta[0])}, got {tuple(w.shape)}")
                else:
                    self._set_nf4_weight(w.to(self.weight_packed.device))
        else:
            missing_keys.append(prefix + "weight")
        rest = {k: v for k, v in state_dict.items() if k not in mine}
        hidden = {n: self._parameters.pop(n) for n in NF4_PARAMS}  # read above, not as `weight_packed` keys
        try:
            super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        finally:
            self._parameters.update(hidden)


def _fp32_view(absmax: torch.Tensor) -> torch.Tensor:
    """The fp32 absmax [nblocks] from its bytes [nblocks, 4] (a DTensor shard stays a DTensor: rows split the same way)."""
    if not is_sharded(absmax):
        return absmax.view(torch.float32).view(-1)
    from torch.distributed.tensor import DTensor

    local = absmax.to_local().view(torch.float32).view(-1)
    return DTensor.from_local(local, absmax.device_mesh, absmax.placements, run_check=False,
                              shape=torch.Size([absmax.shape[0]]), stride=(1,))


class Linear4bit(NF4WeightHolder):
    """NF4 inference layer: y = x · deq(W)ᵀ + bias, one fused op, W never dequantized to memory."""

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | str | None = None) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"lowrank_ext::Linear4bit: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        self.compute_dtype = check_compute_dtype("Linear4bit", compute_dtype)
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self._set_nf4_weight(weight)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"lowrank_ext::Linear4bit: bias must have shape ({self.out_features},), "
                             f"got {tuple(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | str | None = None) -> Linear4bit:
        """Quantize an nn.Linear's weight to NF4 (bitsandbytes' format); the bias stays dense."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"lowrank_ext::Linear4bit: linear must be an nn.Linear, got {type(linear).__name__}")
        check_floating("from_linear", "linear.weight", linear.weight)  # the one rule for a base tensor (layout.py)
        return cls(quantize_nf4(linear.weight.detach(), blocksize, double_quant), linear.bias, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return nf4_linear(x, self.weight, bias, self.compute_dtype)

    def extra_repr(self) -> str:
        _, _, blocksize, dq = self._nf4_meta  # not self.weight: a sharded layer prints too
        cd = "" if self.compute_dtype is None else f", compute_dtype={self.compute_dtype}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={blocksize}, double_quant={dq}{cd}")
