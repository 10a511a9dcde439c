"""PEFT's LoRA on lowrank_ext's NF4 layers: `peft.get_peft_model` builds `NF4LoraLinear` for every targeted
`lowrank_ext.nn.Linear4bit`, a real PEFT `LoraLayer` (adapter names, set_adapter, disable_adapter, several adapters,
merge / unmerge, PEFT's state-dict keys) whose forward is ONE `torch.ops.lowrank_ext.nf4_lora_linear` per layer.

    enable_peft()        idempotent; hooks PEFT's LoRA dispatch so every LoraConfig (made before or after) builds
                         NF4LoraLinear on a Linear4bit, and makes target_modules="all-linear" see Linear4bit.
    register(config)     the per-config alternative: PEFT's own LoraConfig._register_custom_module.
    merge_and_unload(peft_model, requantize=False)   PeftModel.merge_and_unload with the NF4 choice made explicit.

Math (x [M, K], W NF4 [N, K], A [r, K], B [N, r], s = alpha / r, or alpha / sqrt(r) with rslora):
    LoRA:  y = x · deq(W)ᵀ + s · (dropout(x) · Aᵀ) · Bᵀ + bias                        one fused op
    DoRA (PEFT's, peft/tuners/lora/dora.py):  g = m / ||deq(W) + s B A||_row  (detached norm)
           y = x·deq(W)ᵀ + bias + (g - 1) ⊙ (x_d · deq(W)ᵀ) + g ⊙ s · (x_d Aᵀ) Bᵀ,  x_d = dropout(x)
           no dropout (or eval): y = g ⊙ (x·deq(W)ᵀ + s (x Aᵀ) Bᵀ) + bias                one fused op
           dropout in training: x and x_d need separate base products (two NF4 matmuls, as PEFT).
    The row norms come from lowrank_ext.nn.functional.dora_norm_nf4 (no dense N×K tensor).

Merging (PEFT's bitsandbytes Linear4bit requantizes W + ΔW to 4 bit, lossy, with a warning). Here:
    default            the base becomes a dense nn.Linear holding deq(W) + ΔW (exact; unmerge restores the
                       untouched NF4 layer), so merge_and_unload returns a dequantized dense model;
    requantize=True    PEFT's bnb behaviour: W ← NF4(deq(W) + ΔW) (lossy; unmerge subtracts and requantizes again).
    Choose it per layer with `layer.requantize_on_merge = True` or for a model with merge_and_unload(...,
    requantize=True).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners import tuners_utils
from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS, LoraVariant
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from lowrank_ext.nf4 import quantize_nf4
from lowrank_ext.nn import functional as LF
from lowrank_ext.nn.linear4bit import Linear4bit
from lowrank_ext.ops import nf4_linear, nf4_lora_linear, nf4_row_sqnorm

__all__ = ["NF4LoraLinear", "enable_peft", "merge_and_unload", "register"]

# init_lora_weights values PEFT computes from the base weight (SVD, LoftQ, ...): they need a dense W.
_PLAIN_INITS = (True, False, "gaussian")


def _err(arg: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"lowrank_ext::NF4LoraLinear: {arg} must {expected}, got {got}")


class _NF4DoraVariant(LoraVariant):
    """PEFT's DoRA (DoraLinearVariant) on an NF4 base: the magnitude lives in PEFT's DoraLinearLayer (same
    state-dict key `lora_magnitude_vector.<name>.weight`), the row norms are computed without a dense weight."""

    @staticmethod
    def init(module: NF4LoraLinear, adapter_name: str, **kwargs: Any) -> None:
        if not module.lora_magnitude_vector:  # PEFT: the first DoRA adapter makes the magnitude trainable
            module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
        layer = DoraLinearLayer(fan_in_fan_out=False)
        a = module.lora_A[adapter_name].weight
        layer.weight = nn.Parameter(module.dora_norm(adapter_name, a.dtype).detach().to(a.device), requires_grad=True)
        module.lora_magnitude_vector[adapter_name] = layer

    @staticmethod
    def forward(module: NF4LoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        """PEFT's DoraLinearVariant.forward: result + (g - 1) ⊙ base_result + g ⊙ s · lora(x_d), where
        base_result is `result` less the bias (no dropout / eval) or x_d · deq(W)ᵀ (dropout in training)."""
        dropout = module.lora_dropout[active_adapter]
        if isinstance(dropout, nn.Identity) or not module.training:
            base = result if module.base_bias() is None else result - module.base_bias().to(result.dtype)
        else:
            x = dropout(x)
            base = module.base_product(x)
        a, b = module.factors(active_adapter, x.dtype)
        g = module.dora_scale(active_adapter, x.dtype)
        return result + (g - 1) * base + g * (module.scaling[active_adapter] * F.linear(F.linear(x, a), b))


class NF4LoraLinear(nn.Module, LoraLayer):
    """PEFT LoRA layer around a lowrank_ext Linear4bit (PEFT's custom-module signature: base, name, config, r,
    lora_alpha). Forward with one active LoRA (or dropout-free DoRA) adapter is one fused NF4 op.

    dtypes: the adapter parameters stay fp32 (PEFT's autocast_adapter_dtype); the fused op takes one dtype, so the
    factors are cast to x's dtype (gradients reach the fp32 parameters) where PEFT casts x to the adapter's dtype
    for its separate LoRA branch: the same in fp32, the LoRA product rounded in x's dtype for bf16/fp16
    activations. The base's compute_dtype (bitsandbytes' meaning) is honoured as in ops.nf4_lora_linear."""

    requantize_on_merge: bool = False  # merge into a new NF4 weight (PEFT bnb) instead of a dense dequantized copy

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._nf4_unmerged: list[Linear4bit] = []  # the untouched NF4 base while merged densely (not a submodule)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    # ---- PEFT hooks ----------------------------------------------------------------------------
    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        if isinstance(base_layer, Linear4bit):  # uint8 storage: the adapters keep their own dtype (fp32)
            return base_layer.weight_packed.device, base_layer.compute_dtype
        return super()._get_base_layer_device_and_dtype(base_layer)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        if config.init_lora_weights not in _PLAIN_INITS:
            raise _err("init_lora_weights", f"be one of {_PLAIN_INITS} on an NF4 base (the others read a dense "
                       "weight)", repr(config.init_lora_weights))
        if config.lora_bias:
            raise _err("lora_bias", "be False on an NF4 base (the fused op has no LoRA bias)", config.lora_bias)
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any) -> LoraVariant | None:
        others = {"alora_invocation_tokens": config.alora_invocation_tokens,
                  "arrow_config": config.arrow_config, "velora_config": getattr(config, "velora_config", None)}
        used = [k for k, v in others.items() if v is not None]
        if used:
            raise _err("LoraConfig", "not use " + ", ".join(used) + " (supported: LoRA, rslora, DoRA)", used)
        return _NF4DoraVariant() if config.use_dora else None

    # ---- pieces --------------------------------------------------------------------------------
    def _nf4(self) -> Linear4bit:
        """The NF4 base: the current one, or the untouched one kept while merged densely."""
        base = self._nf4_unmerged[0] if self._nf4_unmerged else self.get_base_layer()
        if not isinstance(base, Linear4bit):
            raise _err("base_layer", "be a lowrank_ext Linear4bit (not merged densely)", type(base).__name__)
        return base

    def base_bias(self) -> torch.Tensor | None:
        return self.get_base_layer().bias

    def base_product(self, x: torch.Tensor) -> torch.Tensor:
        """x · deq(W)ᵀ without bias (one NF4 op; only unmerged layers run adapters)."""
        base = self._nf4()
        return nf4_linear(x, base.weight, None, base.compute_dtype)

    def factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, K], B [N, r]) in `dtype` (the fused op takes one dtype; gradients reach the fp32 parameters)."""
        return self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype)

    def dora_norm(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """||deq(W) + s B A||_row [N] (detached), from the NF4 weight: no dense N×K tensor."""
        base = self._nf4()
        sq = base.nf4_derived("row_sqnorm", nf4_row_sqnorm)  # ||w_i||², cached until W changes
        a, b = self.lora_A[name].weight.detach(), self.lora_B[name].weight.detach()
        return LF.dora_norm_nf4(base.weight, sq, a, b, self.scaling[name]).to(dtype)

    def dora_scale(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """g = m / ||W + s B A||_row in `dtype` (the norm detached, as PEFT: DoRA paper §4.3)."""
        return self.lora_magnitude_vector[name].weight.to(dtype) / self.dora_norm(name, dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """s · B A [N, K] (PEFT's name; only merging calls it)."""
        return self.scaling[adapter] * (self.lora_B[adapter].weight @ self.lora_A[adapter].weight)

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        variant_kwargs = {k: kwargs.pop(k, None) for k in VARIANT_KWARG_KEYS}
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **variant_kwargs, **kwargs)
        live = [a for a in self.active_adapters if a in self.lora_A]
        if self.merged or not live:
            return self.base_layer(x, *args, **kwargs)
        if len(live) == 1:
            return self._forward_one(x, live[0])
        # several adapters: PEFT's sum in PEFT's order (a DoRA adapter sees the running result as its base
        # output, as in PEFT); a plain LoRA adapter first is fused with the base product
        first_fused = live[0] not in self.lora_variant
        result = self._forward_one(x, live[0]) if first_fused else self.base_layer(x, *args, **kwargs)
        for name in live[first_fused:]:
            if name in self.lora_variant:
                result = self.lora_variant[name].forward(self, active_adapter=name, x=x, result=result)
            else:
                a, b = self.factors(name, x.dtype)
                result = result + self.scaling[name] * F.linear(F.linear(self.lora_dropout[name](x), a), b)
        return result

    def _forward_one(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self._nf4()
        dropout = self.lora_dropout[name]
        p = dropout.p if self.training and isinstance(dropout, nn.Dropout) else 0.0
        a, b = self.factors(name, x.dtype)
        bias = None if base.bias is None else base.bias.to(x.dtype)
        s = self.scaling[name]
        if name not in self.lora_variant:
            return nf4_lora_linear(x, base.weight, a, b, s, bias, p, base.compute_dtype)       # ONE op
        if p > 0.0:
            return self.lora_variant[name].forward(self, active_adapter=name, x=x, result=base(x))
        y = self.dora_scale(name, x.dtype) * nf4_lora_linear(x, base.weight, a, b, s, None, 0.0, base.compute_dtype)
        return y if bias is None else y + bias                                                  # ONE op

    # ---- merge ---------------------------------------------------------------------------------
    @torch.no_grad()
    def merged_dense(self, w: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Adapters `names` applied in order to the fp32 weight w, as PEFT merges: LoRA w + ΔW; DoRA
        (m / ||deq(W) + ΔW||) ⊙ (w + ΔW), the norm taken on the unmerged base (PEFT's merge_safe)."""
        for n in names:
            delta = self.get_delta_weight(n).float()
            if n in self.lora_variant:
                norm = self.dora_norm(n, torch.float32)
                w = (self.lora_magnitude_vector[n].weight.float() / norm)[:, None] * (w + delta)
            else:
                w = w + delta
        return w

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None,
              requantize: bool | None = None) -> None:
        """Merge adapters: into a dense nn.Linear holding deq(W) + ΔW (default, exact), or with requantize=True
        (default: self.requantize_on_merge) into a new NF4 weight as PEFT's bitsandbytes layer does (lossy)."""
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.lora_A]
        if not names:
            return
        requantize = self.requantize_on_merge if requantize is None else requantize
        dense_now = bool(self._nf4_unmerged)
        if self.merged and requantize == dense_now:
            raise _err("requantize", f"match how the merged adapters {self.merged_adapters} were merged "
                       f"({'dense' if dense_now else 'requantized'}); unmerge first", requantize)
        nf4 = self._nf4_unmerged[0] if dense_now else self._nf4()
        w = self.merged_dense(nf4.weight.dequantize(torch.float32) if not dense_now
                              else self.get_base_layer().weight.float(), names)
        if safe_merge and not torch.isfinite(w).all():
            raise _err("merged weight", "be finite", f"NaN/Inf after merging {names}")
        if requantize:
            warnings.warn("lowrank_ext::NF4LoraLinear.merge: requantizing the merged weight to NF4 is lossy "
                          "(PEFT's 4-bit merge); outputs change by the rounding", UserWarning, stacklevel=2)
            self._set_base(self._requantized(nf4, w))
        else:
            if not dense_now:
                self._nf4_unmerged.append(nf4)
            dense = nn.Linear(nf4.in_features, nf4.out_features, bias=nf4.bias is not None,
                              device=w.device, dtype=nf4.weight.dtype)
            dense.weight.data.copy_(w)
            dense.weight.requires_grad_(False)
            if nf4.bias is not None:
                dense.bias.data.copy_(nf4.bias)
                dense.bias.requires_grad_(False)
            self._set_base(dense)
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Dense merge: restore the untouched NF4 layer (exact). Requantized merge: W ← NF4(deq(W) − ΔW) in
        reverse order (DoRA: deq(W) / g − ΔW with the merge-time norm), lossy as PEFT's bitsandbytes unmerge."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", UserWarning, stacklevel=2)
            return
        if self._nf4_unmerged:
            self._set_base(self._nf4_unmerged.pop())
            self.merged_adapters.clear()
            return
        base = self._nf4()
        w = base.weight.dequantize(torch.float32)
        while self.merged_adapters:
            n = self.merged_adapters.pop()
            if n in self.lora_variant:
                raise _err("merged adapters", "not include a DoRA adapter merged with requantize=True to unmerge "
                           "(its norm is lost in the rounding)", repr(n))
            w = w - self.get_delta_weight(n).float()
        self._set_base(self._requantized(base, w))

    @staticmethod
    def _requantized(nf4: Linear4bit, w: torch.Tensor) -> Linear4bit:
        _, dtype, blocksize, dq = nf4._nf4_meta
        return Linear4bit(quantize_nf4(w.to(dtype), blocksize, dq), nf4.bias, nf4.compute_dtype)

    def _set_base(self, module: nn.Module) -> None:
        self.base_layer = module

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for nf4 in self._nf4_unmerged:  # the NF4 layer kept aside while merged densely moves with the model
            nf4._apply(fn, recurse)
        return self


# ---- enabling it in PEFT ----------------------------------------------------------------------------
def register(config: LoraConfig) -> LoraConfig:
    """PEFT's per-config mechanism: config builds NF4LoraLinear on every Linear4bit it targets. Returns config."""
    config._register_custom_module({Linear4bit: NF4LoraLinear})
    return config


def _is_ours(target: nn.Module) -> bool:
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    return isinstance(base, Linear4bit)


def _with_linear4bit(original):
    """_maybe_include_all_linear_layers that also counts Linear4bit as a linear layer for "all-linear"
    (PEFT looks for nn.Linear / Conv1D classes only), excluding the output head and adapter internals as PEFT does."""

    def include(peft_config, model):
        asked_all = (isinstance(getattr(peft_config, "target_modules", None), str)
                     and peft_config.target_modules.lower() == tuners_utils.INCLUDE_LINEAR_LAYERS_SHORTHAND)
        peft_config = original(peft_config, model)
        if not asked_all:
            return peft_config
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        inside_adapters = {f"{p}.{s}" for p, m in model.named_modules() if isinstance(m, BaseTunerLayer)
                           for s, _ in m.named_modules() if s}
        ours = {n for n, m in model.named_modules() if isinstance(m, Linear4bit) and m is not head}
        peft_config.target_modules = set(peft_config.target_modules) | (ours - inside_adapters)
        return peft_config

    include._lowrank_ext = True
    include.original = original
    return include


def enable_peft() -> None:
    """Make PEFT build NF4LoraLinear for lowrank_ext's Linear4bit with any LoraConfig (idempotent).

    Hooks two PEFT functions: LoraModel._create_new_module (our layer comes before PEFT's dispatchers for a
    Linear4bit base; everything else is PEFT's) and tuners_utils._maybe_include_all_linear_layers (Linear4bit counts
    for target_modules="all-linear")."""
    create = LoraModel.__dict__["_create_new_module"].__func__
    if not getattr(create, "_lowrank_ext", False):
        def _create_new_module(lora_config, adapter_name, target, **kwargs):
            if _is_ours(target):
                return NF4LoraLinear(target, adapter_name, config=lora_config, **kwargs)
            return create(lora_config, adapter_name, target, **kwargs)

        _create_new_module._lowrank_ext = True
        _create_new_module.original = create  # PEFT's own, for callers (and tests) that need it
        LoraModel._create_new_module = staticmethod(_create_new_module)
    if not getattr(tuners_utils._maybe_include_all_linear_layers, "_lowrank_ext", False):
        tuners_utils._maybe_include_all_linear_layers = _with_linear4bit(tuners_utils._maybe_include_all_linear_layers)


def merge_and_unload(model: nn.Module, *, requantize: bool = False, **kwargs: Any) -> nn.Module:
    """PeftModel.merge_and_unload(**kwargs) with the NF4 choice explicit: requantize=False gives dense
    nn.Linear layers holding deq(W) + ΔW (exact); True gives Linear4bit layers with NF4(deq(W) + ΔW) (lossy,
    PEFT's bitsandbytes merge)."""
    for m in model.modules():
        if isinstance(m, NF4LoraLinear):
            m.requantize_on_merge = requantize
    return model.merge_and_unload(**kwargs)
