"""IA3Linear (dense base) and QIA3Linear (NF4 base): (IA)³ learned scaling vectors, PEFT's math and names.

Parameters (PEFT's names and shapes, adapter name as the dict key; fp32, initialised to ones):
    ia3_l[name] [out, 1]   output scaling (key/value projections):   y = (x · Wᵀ + bias) ⊙ l
    ia3_l[name] [1, in]    input scaling (feed-forward down proj):   y = (x ⊙ l) · Wᵀ + bias
With several active adapters their vectors multiply (PEFT). The bias is scaled with the output, exactly as
PEFT's `ia3.Linear` multiplies the base layer's full result (bias included); input scaling leaves it alone.
Dtypes follow PEFT: the scaling is applied in l's dtype (fp32) and the result cast back to x's dtype.

On the NF4 base W is never dequantized: the base is one `nf4_linear` op, and the scaling is one elementwise
multiply of its [M, out] output (or of the [M, in] input) — O(M·N) next to the op's O(M·N·K); the bench in
bench/bench_layers.py (`ia3`) measures it. Autograd reaches l (and x) only: the base is frozen.

Merging: into a dense base W ← W ⊙ l (rows for output scaling, columns for input scaling; bias ← bias ⊙ l
for output scaling), unmerge divides (PEFT: l + 1e-8, approximate). On an NF4 base `merge()` refuses unless
`requantize=True`, which replaces the NF4 weight by NF4(deq(W) ⊙ l): lossy, the adapter is folded in for
good (cannot unmerge).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_ext.nf4 import NF4Weight, quantize_nf4
from lowrank_ext.nn.linear4bit import Linear4bit, NF4WeightHolder, check_compute_dtype
from lowrank_ext.ops import nf4_linear

__all__ = ["IA3_LAYERS", "IA3Linear", "QIA3Linear"]


def _err(cls: str, arg: str, expected: str, got) -> ValueError:
    return ValueError(f"lowrank_ext::{cls}: {arg} must {expected}, got {got}")


class _IA3Layer(nn.Module):
    """IA3 bookkeeping shared by both bases; subclasses provide _base(x, bias) = x · Wᵀ + bias."""

    in_features: int
    out_features: int
    is_feedforward: bool

    def _init_ia3(self, is_feedforward: bool) -> None:
        self.is_feedforward = bool(is_feedforward)
        self.ia3_l = nn.ParameterDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    @property
    def specs(self) -> dict[str, str]:  # the adapter names this layer holds (what the model-level code asks)
        return {n: "ia3" for n in self.ia3_l}

    def vector_shape(self) -> tuple[int, int]:
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def add_adapter(self, name: str, init_ia3_weights: bool = True, dtype: torch.dtype = torch.float32) -> None:
        """Add adapter `name` (not activated): l = 1 (identity; init_ia3_weights=True, PEFT's default) or
        l ~ N(0, 1) (init_ia3_weights=False, PEFT's torch.randn)."""
        cls = type(self).__name__
        if not isinstance(name, str) or not name or "." in name:
            raise _err(cls, "name", "be a non-empty str without '.'", repr(name))
        if name in self.ia3_l:
            raise _err(cls, "name", "not be an existing adapter", repr(name))
        dev = self._device()
        vec = (torch.ones if init_ia3_weights else torch.randn)(self.vector_shape(), device=dev, dtype=dtype)
        self.ia3_l[name] = nn.Parameter(vec)

    def delete_adapter(self, name: str) -> None:
        self._need(name)
        if name in self.merged_adapters:
            raise _err(type(self).__name__, "name", "not be merged (unmerge first) to delete it", repr(name))
        del self.ia3_l[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_adapter(self, names: str | list[str]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            self._need(n)
        self.active_adapters = names
        for n, p in self.ia3_l.items():
            p.requires_grad_(n in names)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.ia3_l[name]] if name in self.ia3_l else []

    def _need(self, name: str) -> None:
        if name not in self.ia3_l:
            raise _err(type(self).__name__, "adapter name", f"be one of {sorted(self.ia3_l)}", repr(name))

    def scaling(self) -> torch.Tensor | None:
        """The product of the live adapters' vectors, flattened ([out] or [in]); None when none is live."""
        live = [] if self.disabled else [a for a in self.active_adapters if a not in self.merged_adapters]
        if not live:
            return None
        s = self.ia3_l[live[0]].flatten()
        for n in live[1:]:
            s = s * self.ia3_l[n].flatten()
        return s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled and self.merged_adapters:
            self.unmerge()
        bias = None if self.bias is None else self.bias.to(x.dtype)
        s = self.scaling()
        if s is None:
            return self._base(x, bias)
        if self.is_feedforward:
            return self._base((x.to(s.dtype) * s).to(x.dtype), bias)     # (x ⊙ l) · Wᵀ + bias
        y = self._base(x, bias)
        return (y * s).to(y.dtype)                                         # (x · Wᵀ + bias) ⊙ l

    # ---- merge --------------------------------------------------------------------------------
    def _to_merge(self, adapter_names: list[str] | None) -> list[str]:
        names = list(self.active_adapters) if adapter_names is None else list(adapter_names)
        for n in names:
            self._need(n)
        return [n for n in names if n not in self.merged_adapters]

    def _scaled(self, w: torch.Tensor, bias: torch.Tensor | None, names: list[str], safe: bool, divide: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W ⊙ l (or W / (l + 1e-8) with divide, PEFT's unmerge) for each adapter in `names`, in fp32."""
        for n in names:
            vec = self.ia3_l[n].detach().float()                           # [out, 1] or [1, in]: broadcasts
            vec = vec + 1e-8 if divide else vec
            w = w / vec if divide else w * vec
            if bias is not None and not self.is_feedforward:
                bias = bias / vec.flatten() if divide else bias * vec.flatten()
            if safe and not (torch.isfinite(w).all() and (bias is None or torch.isfinite(bias).all())):
                raise ValueError(f"lowrank_ext::{type(self).__name__}.merge: the merged weight must be finite, got "
                                 f"NaN/Inf after adapter {n!r}")
        return w, bias


class IA3Linear(_IA3Layer):
    """Dense-base IA3 layer: weight [out, in] (frozen Parameter), bias [out] or None."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, is_feedforward: bool = False) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise _err("IA3Linear", "weight", "be 2-D [out, in]", tuple(weight.shape))
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._init_ia3(is_feedforward)

    def _device(self) -> torch.device:
        return self.weight.device

    def _base(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), bias)

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False, requantize: bool = False) -> None:
        """W ← W ⊙ l (and bias ← bias ⊙ l for output scaling) for each active (or named) adapter."""
        if requantize:
            raise _err("IA3Linear.merge", "requantize", "be False on a dense base", requantize)
        names = self._to_merge(adapter_names)
        bias = None if self.bias is None else self.bias.float()
        w, bias = self._scaled(self.weight.float(), bias, names, safe_merge)
        self.weight.copy_(w.to(self.weight.dtype))
        if bias is not None:
            self.bias.copy_(bias.to(self.bias.dtype))
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W / (l + 1e-8) in reverse order (PEFT's unmerge: approximate)."""
        names = list(reversed(self.merged_adapters))
        bias = None if self.bias is None else self.bias.float()
        w, bias = self._scaled(self.weight.float(), bias, names, False, divide=True)
        self.weight.copy_(w.to(self.weight.dtype))
        if bias is not None:
            self.bias.copy_(bias.to(self.bias.dtype))
        self.merged_adapters.clear()

    def unload(self) -> nn.Linear:
        """A plain nn.Linear with the current (merged) weight and bias."""
        new = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device,
                        dtype=self.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(self.weight)
            if self.bias is not None:
                new.bias.copy_(self.bias)
        return new


class QIA3Linear(NF4WeightHolder, _IA3Layer):
    """NF4-base IA3 layer: `weight` is the frozen NF4Weight; forward is one nf4_linear op + one elementwise
    multiply (no dense W). merge() needs requantize=True (NF4(deq(W) ⊙ l), lossy, permanent).
    compute_dtype (bitsandbytes' meaning, as Linear4bit / QLoRALinear): the NF4 product runs in it; None: x's dtype."""

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None, is_feedforward: bool = False,
                 compute_dtype: torch.dtype | str | None = None) -> None:
        super().__init__()
        self.compute_dtype = check_compute_dtype("QIA3Linear", compute_dtype)
        if len(weight.shape) != 2:
            raise _err("QIA3Linear", "weight", "be a 2-D NF4Weight [out, in]", tuple(weight.shape))
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self._set_nf4_weight(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._init_ia3(is_feedforward)

    def _device(self) -> torch.device:
        return self.weight_packed.device

    def _base(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return nf4_linear(x, self.weight, bias, self.compute_dtype)

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False, requantize: bool = False) -> None:
        """Only with requantize=True: the NF4 weight becomes NF4(deq(W) ⊙ l) (bias ⊙ l for output scaling), and
        the merged adapters are deleted (folded in for good; the requantization is lossy)."""
        if not requantize:
            raise _err("QIA3Linear.merge", "requantize", "be True to merge IA3 into an NF4 weight (the product is "
                       "requantized: lossy, and it cannot be unmerged; or use merge_and_unload for a dense layer)",
                       requantize)
        names = self._to_merge(adapter_names)
        if not names:
            return
        old = self.weight
        bias = None if self.bias is None else self.bias.float()
        w, bias = self._scaled(old.dequantize(torch.float32), bias, names, safe_merge)
        self._set_nf4_weight(quantize_nf4(w.to(old.dtype), old.blocksize, old.double_quant))
        if bias is not None:
            self.bias.copy_(bias.to(self.bias.dtype))
        for n in names:
            self.delete_adapter(n)

    def unmerge(self) -> None:
        """Nothing to undo: an NF4 IA3 layer is never merged in place (merge(requantize=True) deletes the adapter)."""

    def dense_merged(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(deq(W) ⊙ l, bias ⊙ l) in fp32 for the active adapters: what merge_and_unload puts in an nn.Linear."""
        bias = None if self.bias is None else self.bias.detach().float()
        return self._scaled(self.weight.dequantize(torch.float32), bias, self._to_merge(None), False)

    def unload(self) -> Linear4bit:
        """A Linear4bit with the current NF4 weight and bias (after merge(requantize=True))."""
        return Linear4bit(self.weight, self.bias, self.compute_dtype)


IA3_LAYERS = (IA3Linear, QIA3Linear)
