"""NF4Weight: an immutable NF4 (+ double-quant) weight, and `quantize_nf4`.

The layout is bitsandbytes' `quant_type="nf4"` format, so `to_bnb_state_dict` / `from_bnb_state_dict`
exchange weights with bitsandbytes `Linear4bit` and Hugging Face 4-bit checkpoints without requantizing.
Packed codes and absmax are bitsandbytes' bytes; the 8-bit double-quant codes of a fresh quantization are the
exact nearest code, where bitsandbytes' lookup differs by one code in under 1% of blocks (docs/format.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import torch

import lowrank_ext._extension  # noqa: F401  (loads the compiled ops)
from lowrank_ext._reference.nf4 import NESTED_BLOCKSIZE, NF4_CODEBOOK, VALID_BLOCKSIZES, dynamic_map

# The format ops are called directly (their Python wrappers and fake kernels live in ops/nf4.py, which sits
# with ops/linear.py above this module: ops/linear.py takes NF4Weight arguments).
_lib = torch.ops.lowrank_ext

__all__ = ["BNB_QUANT_STATE_SUFFIX", "BNB_WEIGHT_SUFFIXES", "NF4Weight", "bnb_state_dict", "nf4_nbytes", "quantize_nf4"]

_FLOAT_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPE_BY_NAME = {v: k for k, v in _FLOAT_DTYPES.items()}
# The keys bitsandbytes' Linear4bit writes for its weight, relative to the layer prefix "p.": the one list that
# state-dict import/export, load_pretrained and the layers' load hooks all read.
BNB_QUANT_STATE_SUFFIX = "weight.quant_state.bitsandbytes__nf4"
BNB_WEIGHT_SUFFIXES = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                       BNB_QUANT_STATE_SUFFIX)
_QS_KEY = BNB_QUANT_STATE_SUFFIX
# bitsandbytes' quant_storage may be any of these: the packed bytes are read as they are.
_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
                   torch.float32, torch.float64)


def nf4_nbytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes an NF4 weight of `numel` elements occupies (the one place this arithmetic lives).

    packed codes: ceil(numel/2) uint8; absmax: one per block of `blocksize` — uint8 with double quant, plus the
    fp32 nested absmax per 256 blocks, the 256-entry fp32 map and the fp32 offset; fp32 without. (The 64-byte
    NF4 codebook a bitsandbytes file stores per layer, `weight.quant_map`, is not counted: it is a constant.)"""
    nblocks = -(-numel // blocksize)
    packed = (numel + 1) // 2
    if not double_quant:
        return packed + 4 * nblocks
    return packed + nblocks + 4 * -(-nblocks // NESTED_BLOCKSIZE) + 4 * 256 + 4


class NF4Weight:
    """A frozen NF4-quantized weight.

    Attributes:
        packed: uint8 [(numel+1)//2, 1], two codes per byte (even flat index in the high nibble).
        absmax: fp32 [nblocks], or uint8 [nblocks] when double-quantized.
        nested_absmax, nested_map, offset: fp32 [ceil(nblocks/256)], fp32 [256], fp32 [1] (double
            quant only, else None).
        shape, dtype: the original weight's shape and dtype (dequantize() returns these).
        blocksize: elements per absmax block.
    """

    __slots__ = ("absmax", "blocksize", "dtype", "nested_absmax", "nested_map", "offset", "packed", "shape")

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        shape: tuple[int, ...] | torch.Size,
        dtype: torch.dtype,
        blocksize: int,
        nested_absmax: torch.Tensor | None = None,
        nested_map: torch.Tensor | None = None,
        offset: torch.Tensor | None = None,
    ) -> None:
        shape = torch.Size(shape)
        numel = shape.numel()
        _check(blocksize in VALID_BLOCKSIZES, "blocksize", f"be one of {VALID_BLOCKSIZES}", blocksize)
        _check(dtype in _FLOAT_DTYPES, "dtype", "be float32, float16 or bfloat16", dtype)
        _check(numel > 0, "shape", "describe a non-empty weight", tuple(shape))
        _check(packed.dtype == torch.uint8, "packed", "have dtype uint8", packed.dtype)
        _check(packed.numel() == (numel + 1) // 2, "packed",
               f"hold (numel+1)//2 = {(numel + 1) // 2} bytes for shape {tuple(shape)}", packed.numel())
        nblocks = -(-numel // blocksize)
        _check(absmax.numel() == nblocks, "absmax", f"have ceil(numel/blocksize) = {nblocks} elements",
               absmax.numel())
        dq = absmax.dtype == torch.uint8
        _check(dq or absmax.dtype == torch.float32, "absmax", "be float32 or uint8 (double quant)", absmax.dtype)
        if dq:
            for name, t in (("nested_absmax", nested_absmax), ("nested_map", nested_map), ("offset", offset)):
                _check(t is not None, name, "be given when absmax is uint8 (double quant)", None)
                _check(t.dtype == torch.float32, name, "have dtype float32", t.dtype)
            nb2 = -(-nblocks // NESTED_BLOCKSIZE)
            _check(nested_absmax.numel() == nb2, "nested_absmax", f"have {nb2} elements", nested_absmax.numel())
            _check(nested_map.numel() == 256, "nested_map", "have 256 elements", nested_map.numel())
            _check(offset.numel() == 1, "offset", "have 1 element", offset.numel())
        else:
            nested_absmax = nested_map = offset = None
        dev = packed.device
        for name, t in (("absmax", absmax), ("nested_absmax", nested_absmax), ("nested_map", nested_map),
                        ("offset", offset)):
            _check(t is None or t.device == dev, name, f"be on packed's device {dev}", None if t is None else t.device)
        init = object.__setattr__
        init(self, "packed", packed.contiguous().view(-1, 1))
        init(self, "absmax", absmax.contiguous().view(-1))
        init(self, "nested_absmax", None if nested_absmax is None else nested_absmax.contiguous().view(-1))
        init(self, "nested_map", None if nested_map is None else nested_map.contiguous().view(-1))
        init(self, "offset", None if offset is None else offset.contiguous().view(1))
        init(self, "shape", shape)
        init(self, "dtype", dtype)
        init(self, "blocksize", int(blocksize))

    def __setattr__(self, name, value):
        raise AttributeError(f"NF4Weight is immutable (tried to set {name!r}); build a new one instead")

    def __reduce__(self):
        # copy.deepcopy / pickle rebuild through __init__ (slots + an immutable __setattr__ defeat the default).
        return (NF4Weight, (self.packed, self.absmax, tuple(self.shape), self.dtype, self.blocksize,
                            self.nested_absmax, self.nested_map, self.offset))

    # ---- properties -------------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.absmax.dtype == torch.uint8

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes of all stored tensors (packed codes + absmax data)."""
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                               torch.Tensor | None]:
        """(packed, absmax, nested_absmax, nested_map, offset): the op argument bundle, in order."""
        return self.packed, self.absmax, self.nested_absmax, self.nested_map, self.offset

    def __repr__(self) -> str:
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, device={self.device}, nbytes={self.nbytes})")

    # ---- conversion -------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight in its original shape, in `dtype` (default: the original dtype, or out's dtype).

        With `out` (a contiguous fp32/fp16/bf16 tensor of `numel` elements on this device, e.g. a buffer
        reused across calls) the result is written there and `out.view(shape)` is returned: no allocation."""
        if out is None:
            dtype = self.dtype if dtype is None else dtype
            flat = _lib.dequantize_nf4(*self.tensors(), self.blocksize, self.numel, dtype)
            return flat.view(self.shape)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"lowrank_ext.NF4Weight.dequantize: out must be a torch.Tensor, got {type(out).__name__}")
        if dtype is not None and out.dtype != dtype:
            raise TypeError(f"lowrank_ext.NF4Weight.dequantize: out must have dtype {dtype} (the dtype argument), "
                            f"got {out.dtype}")
        _lib.dequantize_nf4_out(*self.tensors(), self.blocksize, self.numel, out)
        return out.view(self.shape)

    def to(self, device: torch.device | str) -> NF4Weight:
        """A copy on `device` (self when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        moved = [None if t is None else t.to(device) for t in self.tensors()]
        return NF4Weight(moved[0], moved[1], self.shape, self.dtype, self.blocksize, *moved[2:])

    # ---- bitsandbytes / Hugging Face state dicts --------------------------------------------
    def to_bnb_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Exactly the keys and tensors bitsandbytes' Linear4bit writes for its weight."""
        return bnb_state_dict(prefix, self.packed, self.absmax, self.nested_absmax, self.nested_map, self.offset,
                              self.shape, self.dtype, self.blocksize)

    @classmethod
    def from_bnb_state_dict(cls, sd: Mapping[str, torch.Tensor], prefix: str = "") -> NF4Weight:
        """Read a weight saved by bitsandbytes' Linear4bit (or `to_bnb_state_dict`), no requantizing.

        Every inconsistency raises ValueError naming the state-dict key: a missing key, a quant state
        that is not JSON or not NF4, a quant_map that is not the NF4 codebook, a shape that does not
        match the packed size, absmax / nested tensors of the wrong size or dtype, a NaN / Inf / negative
        absmax or nested absmax, a nested map that is not finite and sorted ascending, a non-finite
        nested offset. Nothing is converted silently: what loads dequantizes to finite values."""
        qs_key = prefix + _QS_KEY

        def need(key: str) -> torch.Tensor:
            _sd_check(prefix + key in sd, prefix + key, "be present in the state dict",
                      f"keys {sorted(k for k in sd if k.startswith(prefix))}")
            t = sd[prefix + key]
            _sd_check(isinstance(t, torch.Tensor), prefix + key, "be a tensor", type(t).__name__)
            return t

        raw = need(_QS_KEY)
        try:
            meta = json.loads(bytes(raw.detach().cpu().to(torch.uint8).view(-1).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"lowrank_ext.NF4Weight.from_bnb_state_dict: {qs_key} must hold UTF-8 JSON, "
                             f"got {e}") from e
        _sd_check(isinstance(meta, dict), qs_key, "hold a JSON object", type(meta).__name__)
        for field in ("quant_type", "blocksize", "dtype", "shape"):
            _sd_check(field in meta, f"{qs_key}[{field!r}]", "be present", f"fields {sorted(meta)}")
        _sd_check(meta["quant_type"] == "nf4", f"{qs_key}['quant_type']", "be 'nf4'", repr(meta["quant_type"]))
        _sd_check(meta["dtype"] in _DTYPE_BY_NAME, f"{qs_key}['dtype']", f"be one of {sorted(_DTYPE_BY_NAME)}",
                  repr(meta["dtype"]))
        _sd_check(meta["blocksize"] in VALID_BLOCKSIZES, f"{qs_key}['blocksize']", f"be one of {VALID_BLOCKSIZES}",
                  meta["blocksize"])
        shape = meta["shape"]
        _sd_check(isinstance(shape, list) and shape
                  and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape),
                  f"{qs_key}['shape']", "be a non-empty list of positive ints", shape)
        numel = torch.Size(shape).numel()
        blocksize = int(meta["blocksize"])

        packed = need("weight")
        _sd_check(packed.dtype in _STORAGE_DTYPES, prefix + "weight",
                  "have dtype uint8 (or a bitsandbytes quant_storage int / float dtype)", packed.dtype)
        if packed.dtype != torch.uint8:  # bitsandbytes' quant_storage may be another dtype: same bytes
            packed = packed.contiguous().view(-1).view(torch.uint8)
        _sd_check(packed.numel() == (numel + 1) // 2, prefix + "weight",
                  f"hold (numel+1)//2 = {(numel + 1) // 2} bytes for shape {shape} (from {qs_key})",
                  f"{packed.numel()} bytes")
        quant_map = need("weight.quant_map")
        _sd_check(quant_map.numel() == 16 and torch.equal(quant_map.detach().cpu().float().view(-1), NF4_CODEBOOK),
                  prefix + "weight.quant_map", "equal the 16-entry NF4 codebook",
                  [round(v, 4) for v in quant_map.view(-1).tolist()[:4]] + ["..."])
        absmax = need("weight.absmax")
        nblocks = -(-numel // blocksize)
        _sd_check(absmax.numel() == nblocks, prefix + "weight.absmax",
                  f"have ceil(numel/blocksize) = {nblocks} elements", absmax.numel())
        _sd_check(absmax.dtype in (torch.uint8, torch.float32), prefix + "weight.absmax",
                  "be uint8 (double quant) or float32", absmax.dtype)
        if absmax.dtype == torch.float32:
            _sd_finite_nonneg(absmax, prefix + "weight.absmax")
        nested = (None, None, None)
        if absmax.dtype == torch.uint8:
            for field in ("nested_blocksize", "nested_offset"):
                _sd_check(field in meta, f"{qs_key}[{field!r}]", "be present with double quant", f"fields {sorted(meta)}")
            _sd_check(meta["nested_blocksize"] == NESTED_BLOCKSIZE, f"{qs_key}['nested_blocksize']",
                      f"be {NESTED_BLOCKSIZE}", meta["nested_blocksize"])
            off = meta["nested_offset"]
            _sd_check(isinstance(off, (int, float)) and not isinstance(off, bool) and math.isfinite(off),
                      f"{qs_key}['nested_offset']", "be a finite number", repr(off))
            nested_absmax = need("weight.nested_absmax")
            _sd_check(nested_absmax.dtype == torch.float32, prefix + "weight.nested_absmax", "have dtype float32",
                      nested_absmax.dtype)
            nb2 = -(-nblocks // NESTED_BLOCKSIZE)
            _sd_check(nested_absmax.numel() == nb2, prefix + "weight.nested_absmax", f"have {nb2} elements",
                      nested_absmax.numel())
            _sd_finite_nonneg(nested_absmax, prefix + "weight.nested_absmax")
            nested_map = need("weight.nested_quant_map")
            _sd_check(nested_map.dtype == torch.float32, prefix + "weight.nested_quant_map", "have dtype float32",
                      nested_map.dtype)
            _sd_check(nested_map.numel() == 256, prefix + "weight.nested_quant_map", "have 256 elements",
                      nested_map.numel())
            m = nested_map.detach().view(-1)
            _sd_check(bool(torch.isfinite(m).all()), prefix + "weight.nested_quant_map", "be finite",
                      f"{int((~torch.isfinite(m)).sum())} NaN/Inf entries")
            down = (m[1:] < m[:-1]).nonzero()  # the 8-bit absmax codes index a sorted map (nearest-code search)
            if down.numel():
                i = int(down[0])
                _sd_check(False, prefix + "weight.nested_quant_map", "be sorted ascending",
                          f"entry {i} = {m[i].item()} > entry {i + 1} = {m[i + 1].item()}")
            offset = torch.tensor([float(off)], dtype=torch.float32, device=absmax.device)
            nested = (nested_absmax, nested_map, offset)
        return cls(packed, absmax, tuple(shape), _DTYPE_BY_NAME[meta["dtype"]], blocksize, *nested)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize `w` (any shape, fp32/fp16/bf16, finite) to NF4 with optional double-quantized absmax."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"lowrank_ext.quantize_nf4: w must be a torch.Tensor, got {type(w).__name__}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"lowrank_ext.quantize_nf4: double_quant must be a bool, got {type(double_quant).__name__}")
    packed, absmax = _lib.quantize_nf4(w.detach(), blocksize)
    if not double_quant:
        return NF4Weight(packed, absmax, w.shape, w.dtype, blocksize)
    nested_map = dynamic_map(signed=True).to(w.device)
    qabsmax, nested_absmax, offset = _lib.double_quant(absmax, nested_map)
    return NF4Weight(packed, qabsmax, w.shape, w.dtype, blocksize, nested_absmax, nested_map, offset)


def bnb_state_dict(prefix: str, packed: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                   nested_map: torch.Tensor | None, offset: torch.Tensor | None, shape: tuple[int, ...] | torch.Size,
                   dtype: torch.dtype, blocksize: int) -> dict[str, torch.Tensor]:
    """bitsandbytes' Linear4bit weight keys from the NF4 bundle (NF4Weight.to_bnb_state_dict). The packed and
    absmax tensors are passed through as they are, so a layer whose bytes are sharded (FSDP2 DTensors) writes
    its shards under the same keys; the double-quant constants (replicated, tiny) are plain tensors.

    Every constant is this layer's own copy: a state dict in which two keys share storage (one codebook tensor
    for every layer) is refused by safetensors, transformers' save_pretrained and Trainer checkpoints, and
    accelerate's save_state drops the duplicates (a checkpoint its own load_state then refuses)."""
    meta = {"quant_type": "nf4", "blocksize": int(blocksize), "dtype": _FLOAT_DTYPES[dtype], "shape": tuple(shape)}
    sd = {
        prefix + "weight": packed,
        prefix + "weight.absmax": absmax,
        prefix + "weight.quant_map": NF4_CODEBOOK.to(packed.device, copy=True),  # own copy, never the global
    }
    if absmax.dtype == torch.uint8:
        sd[prefix + "weight.nested_absmax"] = nested_absmax
        sd[prefix + "weight.nested_quant_map"] = nested_map.clone()
        meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=offset.item())
    sd[prefix + _QS_KEY] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return sd


def _sd_finite_nonneg(t: torch.Tensor, key: str) -> None:
    """An absmax (a per-block max |w|) must be finite and >= 0; name the first bad element."""
    bad = (~torch.isfinite(t) | (t < 0)).view(-1).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"lowrank_ext.NF4Weight.from_bnb_state_dict: {key} must be finite and >= 0, got "
                         f"{t.view(-1)[i].item()} at index {i} ({bad.numel()} bad elements)")


def _sd_check(cond: bool, key: str, expected: str, got) -> None:
    if not cond:
        raise ValueError(f"lowrank_ext.NF4Weight.from_bnb_state_dict: {key} must {expected}, got {got}")


def _check(cond: bool, arg: str, expected: str, got) -> None:
    if not cond:
        raise ValueError(f"lowrank_ext.NF4Weight: {arg} must {expected}, got {got}")
