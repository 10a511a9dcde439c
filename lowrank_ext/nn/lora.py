"""LoRALinear (dense base) and QLoRALinear (NF4 base): one layer class per base, any number of named
adapters per layer, each "lora", "dora" or "vera" (math: lowrank_ext/nn/functional.py).

Parameters (PEFT's names and shapes, adapter name as the dict key):
    lora_A[name] [r, in], lora_B[name] [out, r]             LoRA and DoRA
    lora_magnitude_vector[name] [out]                        DoRA (initialised to the row norms of W)
    vera_lambda_d[name] [r], vera_lambda_b[name] [out]       VeRA (shared frozen A/B: buffers vera_A_<name>,
                                                             vera_B_<name>, already sliced to this layer)
Adapter parameters are fp32 by default (PEFT's autocast_adapter_dtype) and cast to x's dtype in forward.

Forward with one active LoRA/VeRA adapter is ONE op: `nf4_lora_linear` (QLoRA) or `lora_linear` (dense).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_ext.nf4 import NF4Weight, quantize_nf4
from lowrank_ext.nn import functional as LF
from lowrank_ext.nn.layout import linear_weight, record_base_layout
from lowrank_ext.nn.linear4bit import Linear4bit, NF4WeightHolder, check_compute_dtype
from lowrank_ext.ops import nf4_linear, nf4_lora_linear, nf4_row_sqnorm

__all__ = ["AdapterSpec", "LoRALinear", "QLoRALinear", "merge_warning"]


@dataclass(frozen=True)
class AdapterSpec:
    """Per-layer settings of one adapter."""

    r: int
    alpha: float
    scaling: float
    dropout: float
    variant: str  # "lora" | "dora" | "vera"


def merge_warning(op: str, merged: list[str], todo: list[str]) -> str:
    """PEFT's two merge warnings (tuners_utils.check_adapters_to_merge), in our words."""
    if todo:
        return f"lowrank_ext::{op}: adapters {list(merged)} are already merged; now also merging {list(todo)}"
    return f"lowrank_ext::{op}: all adapters are already merged ({list(merged)}), nothing to do"


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; t itself when it already is (skips `.to`'s ~1 µs of dispatch per call on the forward path)."""
    return t if t.dtype == dtype else t.to(dtype)


def _err(cls: str, arg: str, expected: str, got) -> ValueError:
    return ValueError(f"lowrank_ext::{cls}: {arg} must {expected}, got {got}")


class _AdapterLayer(nn.Module):
    """Adapter bookkeeping shared by both bases. Subclasses provide the base computations:
    _base(x) = x Wᵀ (no bias), _fused(x, A, B, s, p) = x Wᵀ + s (dropout_p(x) Aᵀ) Bᵀ + bias,
    _dense_weight() (fp32 [out, in]), _dora_norm(A, B, s, dtype)."""

    in_features: int
    out_features: int
    # the base checkpoint stores this weight [in, out] (a Conv1D); the layer's own weight is always [out, in]
    # (nn/layout.py record_base_layout: set where the layer is built from its base module)
    base_transposed: bool = False

    def _init_adapters(self) -> None:
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_lambda_b = nn.ParameterDict()
        self.specs: dict[str, AdapterSpec] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._mixed: tuple[list[str], torch.Tensor] | None = None
        self._mixed_cache = None

    # ---- adapters -----------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int = 8, alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False,
                    variant: str = "lora", init: str = "kaiming",
                    vera_shared: tuple[torch.Tensor, torch.Tensor] | None = None, vera_d_initial: float = 0.1,
                    dtype: torch.dtype = torch.float32) -> None:
        """Add adapter `name` (does not activate it; see set_adapter)."""
        cls = type(self).__name__
        if name in self.specs:
            raise _err(cls, "name", "not be an existing adapter", repr(name))
        if not name or "." in name:
            raise _err(cls, "name", "be a non-empty str without '.'", repr(name))
        if not isinstance(r, int) or r <= 0:
            raise _err(cls, "r", "be a positive int", r)
        dev = self._device()
        if variant == "vera":
            if vera_shared is None:
                raise _err(cls, "vera_shared", "be the shared (A, B) pair for a VeRA adapter", None)
            va, vb = vera_shared
            if va.shape[0] < r or va.shape[1] < self.in_features or vb.shape[0] < self.out_features:
                raise _err(cls, "vera_shared", f"cover r={r}, in={self.in_features}, out={self.out_features}",
                           (tuple(va.shape), tuple(vb.shape)))
            self.register_buffer(f"vera_A_{name}", va[:r, : self.in_features].to(dev, dtype).clone(), persistent=False)
            self.register_buffer(f"vera_B_{name}", vb[: self.out_features, :r].to(dev, dtype).clone(), persistent=False)
            self.vera_lambda_d[name] = nn.Parameter(torch.full((r,), vera_d_initial, device=dev, dtype=dtype))
            self.vera_lambda_b[name] = nn.Parameter(torch.zeros(self.out_features, device=dev, dtype=dtype))
            scaling = 1.0
        elif variant in ("lora", "dora"):
            a = torch.empty(r, self.in_features, device=dev, dtype=dtype)
            if init == "gaussian":
                nn.init.normal_(a, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's default init of A
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=dtype))
            scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        else:
            raise _err(cls, "variant", "be 'lora', 'dora' or 'vera'", repr(variant))
        self.specs[name] = AdapterSpec(r, float(alpha), float(scaling), float(dropout), variant)
        if variant == "dora":
            self.lora_magnitude_vector[name] = nn.Parameter(self._dora_norm(name, torch.float32).to(dtype))

    def delete_adapter(self, name: str) -> None:
        self._need(name)
        if name in self.merged_adapters:
            raise _err(type(self).__name__, "name", "not be merged (unmerge first) to delete it", repr(name))
        for d in (self.lora_A, self.lora_B, self.lora_magnitude_vector, self.vera_lambda_d, self.vera_lambda_b):
            if name in d:
                del d[name]
        for buf in (f"vera_A_{name}", f"vera_B_{name}"):
            self._buffers.pop(buf, None)
        del self.specs[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_adapter(self, names: str | list[str]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            self._need(n)
        self.active_adapters = names
        for n in self.specs:
            for p in self.adapter_parameters(n):
                p.requires_grad_(n in names)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [d[name] for d in (self.lora_A, self.lora_B, self.lora_magnitude_vector, self.vera_lambda_d,
                                  self.vera_lambda_b) if name in d]

    def _need(self, name: str) -> None:
        if name not in self.specs:
            raise _err(type(self).__name__, "adapter name", f"be one of {sorted(self.specs)}", repr(name))

    def factors(self, name: str, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B [out, r]) of adapter `name` as LoRA factors (VeRA: diag(λ_d) A, diag(λ_b) B)."""
        if self.specs[name].variant == "vera":
            a, b = LF.vera_factors(self.vera_lambda_d[name], self.vera_lambda_b[name],
                                   getattr(self, f"vera_A_{name}"), getattr(self, f"vera_B_{name}"))
        else:  # the ParameterDicts' own storage: d[name] costs ~1.5 µs a lookup, on every forward
            a, b = self.lora_A._parameters[name], self.lora_B._parameters[name]
        return (a, b) if dtype is None else (_cast(a, dtype), _cast(b, dtype))

    @torch.no_grad()
    def delta_weight(self, name: str) -> torch.Tensor:
        """s · B A in fp32 [out, in] (without DoRA's magnitude rescaling)."""
        a, b = self.factors(name, torch.float32)
        return self.specs[name].scaling * (b @ a)

    def _dora_norm(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        a, b = self.factors(name)
        return self._dora_norm_of(a.detach(), b.detach(), self.specs[name].scaling, dtype)

    # ---- forward ------------------------------------------------------------------------------
    def _live(self) -> list[str]:
        return [] if self.disabled else [a for a in self.active_adapters if a not in self.merged_adapters]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled and self.merged_adapters:
            self.unmerge()
        live = self._live()
        bias = self.bias
        if bias is not None:
            bias = _cast(bias, x.dtype)
        if self._mixed is not None and not self.disabled:
            return self._forward_mixed(x, bias)
        if not live:
            return self._base_plus_bias(x, bias)
        if len(live) == 1:
            name = live[0]
            spec = self.specs[name]
            p = spec.dropout if self.training else 0.0
            if spec.variant == "dora":
                return self._forward_dora(x, name, bias, p)
            a, b = self.factors(name, x.dtype)
            return self._fused(x, a, b, spec.scaling, bias, p)            # ONE op
        y = self._base_plus_bias(x, bias)                                   # several active adapters: sum them
        for name in live:
            spec = self.specs[name]
            p = spec.dropout if self.training else 0.0
            if spec.variant == "dora":
                y = y + self._forward_dora(x, name, None, p) - self._base(x)
            else:
                a, b = self.factors(name, x.dtype)
                x_d = F.dropout(x, p) if p > 0 else x
                y = y + spec.scaling * F.linear(F.linear(x_d, a), b)
        return y

    def _forward_dora(self, x: torch.Tensor, name: str, bias: torch.Tensor | None, p: float) -> torch.Tensor:
        spec = self.specs[name]
        a, b = self.factors(name, x.dtype)
        norm = self._dora_norm(name, x.dtype).detach()                      # ||W + s B A||_row, no gradient
        g = (self.lora_magnitude_vector[name].to(x.dtype) / norm)           # m / n  [out]
        if p == 0.0:
            y = g * self._fused(x, a, b, spec.scaling, None, 0.0)           # g ⊙ (x Wᵀ + s x Aᵀ Bᵀ)
        else:                                                               # PEFT: base on x, g-1 on dropout(x)
            x_d = F.dropout(x, p)
            y = self._base(x) + (g - 1) * self._base(x_d) + g * (spec.scaling * F.linear(F.linear(x_d, a), b))
        return y if bias is None else y + bias

    def check_mixed_training(self, names: list[str]) -> None:
        """A mixed batch has no dropout: refuse it in training mode when one of `names` has dropout > 0
        (running without it would silently change the math). PEFT refuses `adapter_names` in training mode
        altogether; with dropout 0 the training-mode forward is the same function, so it runs here."""
        if not self.training:
            return
        for n in names:
            if n in self.specs and self.specs[n].dropout > 0:
                raise ValueError(f"lowrank_ext::mixed_batch: model must be in eval mode (model.eval()) when a mixed "
                                 f"adapter has dropout > 0, got training mode with adapter {n!r} "
                                 f"(dropout={self.specs[n].dropout})")

    def _forward_mixed(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        names, ids = self._mixed
        self.check_mixed_training(names)
        if ids.numel() != x.shape[0]:
            raise _err(type(self).__name__, "adapter_names", f"have one entry per batch row ({x.shape[0]})",
                       ids.numel())
        if self.merged_adapters:
            raise _err(type(self).__name__, "merged_adapters", "be empty in a mixed batch (unmerge first)",
                       self.merged_adapters)
        factors = self._stacked(names, x.dtype, x.device)
        delta = (LF.mixed_lora_delta_cat(x, ids.to(x.device), *factors) if len(factors) == 3
                 else LF.mixed_lora_delta(x, ids.to(x.device), *factors))
        return self._base_plus_bias(x, bias) + delta

    def _stacked(self, names: list[str], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The adapters of a mixed batch, scaling folded into B, nothing for "__base__":
        Σr ≤ 256: (A_cat [Σr, in], B_cat [out, Σr], owner [Σr]); else (A_all [n, r_max, in], B_all [n, out, r_max]).
        Cached for the mixed_batch block when no gradient is needed (inference), rebuilt every call otherwise."""
        key = (tuple(names), dtype, device)
        if not torch.is_grad_enabled() and self._mixed_cache is not None and self._mixed_cache[0] == key:
            return self._mixed_cache[1]
        used = []
        for i, n in enumerate(names):  # loop over the (few) adapters to stack them; rows of the batch are never looped
            if n not in self.specs or n in self.merged_adapters:
                continue  # "__base__" / not in this layer: no factors
            if self.specs[n].variant == "dora":
                raise _err(type(self).__name__, "adapter_names", "name LoRA or VeRA adapters (DoRA is not "
                           "supported in mixed batches)", repr(n))
            a, b = self.factors(n, dtype)
            used.append((i, a, self.specs[n].scaling * b))
        total_r = sum(a.shape[0] for _, a, _ in used)
        if total_r <= 256:
            a_cat = torch.cat([a for _, a, _ in used]) if used else torch.zeros(1, self.in_features, dtype=dtype,
                                                                              device=device)
            b_cat = torch.cat([b for _, _, b in used], dim=1) if used else a_cat.new_zeros(self.out_features, 1)
            owner = torch.tensor([i for i, a, _ in used for _ in range(a.shape[0])] or [-1], device=device)
            out: tuple[torch.Tensor, ...] = (a_cat, b_cat, owner)
        else:
            rmax = max(a.shape[0] for _, a, _ in used)
            a_all = [torch.zeros(rmax, self.in_features, dtype=dtype, device=device)] * len(names)
            b_all = [torch.zeros(self.out_features, rmax, dtype=dtype, device=device)] * len(names)
            for i, a, b in used:
                a_all[i] = F.pad(a, (0, 0, 0, rmax - a.shape[0]))                     # [r_max, in]
                b_all[i] = F.pad(b, (0, rmax - b.shape[1]))                           # [out, r_max]
            out = (torch.stack(a_all), torch.stack(b_all))
        if not torch.is_grad_enabled():
            self._mixed_cache = (key, out)
        return out

    # ---- merge --------------------------------------------------------------------------------
    @torch.no_grad()
    def _merged_weight(self, w: torch.Tensor, names: list[str], safe: bool) -> tuple[torch.Tensor, dict]:
        """Apply adapters `names` in order to fp32 weight w; returns the new weight and DoRA norms used."""
        norms = {}
        for n in names:
            delta = self.delta_weight(n)
            if self.specs[n].variant == "dora":
                norm = torch.linalg.norm(w + delta, dim=1)
                norms[n] = norm
                w = (self.lora_magnitude_vector[n].float() / norm)[:, None] * (w + delta)
            else:
                w = w + delta
            if safe and not torch.isfinite(w).all():
                raise ValueError(f"lowrank_ext::{type(self).__name__}.merge: the merged weight must be finite, "
                                 f"got NaN/Inf after adapter {n!r}")
        return w, norms

    def _to_merge(self, adapter_names: list[str] | None, warn: bool = True) -> list[str]:
        """The adapters still to merge; warns as PEFT does (check_adapters_to_merge) when some are merged."""
        names = list(self.active_adapters) if adapter_names is None else list(adapter_names)
        for n in names:
            self._need(n)
        todo = [n for n in names if n not in self.merged_adapters]
        if warn and self.merged_adapters:
            warnings.warn(merge_warning(f"{type(self).__name__}.merge", self.merged_adapters, todo), UserWarning,
                          stacklevel=3)
        return todo


class LoRALinear(_AdapterLayer):
    """Dense-base adapter layer: weight [out, in] (frozen Parameter), bias [out] or None."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise _err("LoRALinear", "weight", "be 2-D [out, in]", tuple(weight.shape))
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._init_adapters()
        self._dora_norms: dict[str, torch.Tensor] = {}

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                    use_rslora: bool = False, variant: str = "lora", fan_in_fan_out: bool | None = None,
                    adapter_name: str = "default", **kw) -> LoRALinear:
        """Wrap an nn.Linear (or transformers' Conv1D, weight [in, out]) and add one active adapter."""
        weight, bias = linear_weight(linear, fan_in_fan_out)
        layer = record_base_layout(cls(weight, bias), linear, fan_in_fan_out)
        layer.add_adapter(adapter_name, r, alpha, dropout, use_rslora, variant, **kw)
        layer.set_adapter(adapter_name)
        return layer

    def _device(self) -> torch.device:
        return self.weight.device

    def _base(self, x):
        return F.linear(x, self.weight.to(x.dtype))

    def _base_plus_bias(self, x, bias):
        return F.linear(x, self.weight.to(x.dtype), bias)

    def _fused(self, x, a, b, scaling, bias, p):
        return LF.lora_linear(x, self.weight.to(x.dtype), a, b, scaling, bias, p)

    def _dora_norm_of(self, a, b, scaling, dtype):
        return LF.dora_norm_dense(self.weight, a, b, scaling, dtype)

    def dense_weight(self) -> torch.Tensor:
        return self.weight.detach().float()

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False, warn: bool = True) -> None:
        """W ← W + s B A for each adapter (DoRA: W ← (m / ||W + s B A||) ⊙ (W + s B A)), in order.
        Adapters already merged are skipped, with a UserWarning (PEFT's) unless warn=False."""
        names = self._to_merge(adapter_names, warn)
        w, norms = self._merged_weight(self.weight.float(), names, safe_merge)
        self.weight.copy_(w.to(self.weight.dtype))
        self._dora_norms.update(norms)
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge() in reverse order (W ← W − s B A; DoRA: W ← W ⊙ n / m − s B A)."""
        w = self.weight.float()
        while self.merged_adapters:
            n = self.merged_adapters.pop()
            delta = self.delta_weight(n)
            if self.specs[n].variant == "dora":
                w = w * (self._dora_norms.pop(n) / self.lora_magnitude_vector[n].float())[:, None]
            w = w - delta
        self.weight.copy_(w.to(self.weight.dtype))


class QLoRALinear(NF4WeightHolder, _AdapterLayer):
    """NF4-base adapter layer: `weight` is the frozen NF4Weight; forward with one adapter is one fused op.

    merge() keeps the NF4 weight and adds a dense merged copy used by forward (the default: no silent
    requantization); merge(requantize=True) replaces the NF4 weight by NF4(merged) — lossy, cannot unmerge.
    compute_dtype (bitsandbytes' meaning): the NF4 base product runs in it (fp32 x with torch.bfloat16: the
    bf16 kernels, result back in fp32); the adapter branch stays in x's dtype, as PEFT runs it on a
    bitsandbytes layer. None: everything in x's dtype (one fused op).
    """

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | str | None = None) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise _err("QLoRALinear", "weight", "be a 2-D NF4Weight [out, in]", tuple(weight.shape))
        self.compute_dtype = check_compute_dtype("QLoRALinear", compute_dtype)
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self._set_nf4_weight(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_buffer("merged_weight", None, persistent=False)
        self._init_adapters()

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0, blocksize: int = 64,
                    double_quant: bool = True, use_rslora: bool = False, variant: str = "lora",
                    fan_in_fan_out: bool | None = None, adapter_name: str = "default",
                    compute_dtype: torch.dtype | str | None = None, **kw) -> QLoRALinear:
        """Quantize an nn.Linear / Conv1D (or take a Linear4bit's NF4 weight as is) and add one active adapter.
        compute_dtype: None keeps a Linear4bit's own (x's dtype otherwise)."""
        if isinstance(linear, Linear4bit):
            weight, bias = linear.weight, linear.bias
            compute_dtype = linear.compute_dtype if compute_dtype is None else compute_dtype
        else:
            dense, bias = linear_weight(linear, fan_in_fan_out)
            weight = quantize_nf4(dense, blocksize, double_quant)
        layer = cls(weight, bias, compute_dtype)
        if not isinstance(linear, Linear4bit):
            record_base_layout(layer, linear, fan_in_fan_out)
        layer.add_adapter(adapter_name, r, alpha, dropout, use_rslora, variant, **kw)
        layer.set_adapter(adapter_name)
        return layer

    def _device(self) -> torch.device:
        return self.weight_packed.device

    def _base(self, x):
        if self.merged_weight is not None:
            return F.linear(x, self.merged_weight.to(x.dtype))
        return nf4_linear(x, self.weight, None, self.compute_dtype)

    def _base_plus_bias(self, x, bias):
        if self.merged_weight is not None:
            return F.linear(x, self.merged_weight.to(x.dtype), bias)
        return nf4_linear(x, self.weight, bias, self.compute_dtype)

    def _fused(self, x, a, b, scaling, bias, p):
        # compute_dtype: the NF4 base product in it, the LoRA branch in x's dtype (ops.nf4_lora_linear)
        return nf4_lora_linear(x, self.weight, a, b, scaling, bias, p, self.compute_dtype)

    def _dora_norm_of(self, a, b, scaling, dtype):
        row_sqnorm = self.nf4_derived("row_sqnorm", nf4_row_sqnorm)  # ||w_i||² of deq(W), until W changes
        return LF.dora_norm_nf4(self.weight, row_sqnorm, a, b, scaling).to(dtype)

    def dense_weight(self) -> torch.Tensor:
        return self.weight.dequantize(torch.float32) if self.merged_weight is None else self.merged_weight.float()

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False,
              requantize: bool = False, warn: bool = True) -> None:
        """Merge adapters into a dense copy of deq(W) (default) or, with requantize=True, into a new NF4 weight.
        Adapters already merged are skipped, with a UserWarning (PEFT's) unless warn=False."""
        names = self._to_merge(adapter_names, warn)
        if not names:
            return
        w, _ = self._merged_weight(self.dense_weight(), names, safe_merge)
        if requantize:
            old = self.weight
            self._set_nf4_weight(quantize_nf4(w.to(old.dtype), old.blocksize, old.double_quant))
            self.merged_weight = None
            for n in names:  # folded into the NF4 weight for good: the adapters are gone
                self.delete_adapter(n)
            return
        self.merged_weight = w.to(self.weight.dtype)
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Drop the dense merged copy: the NF4 weight was never modified, so this is exact."""
        self.merged_weight = None
        self.merged_adapters.clear()

