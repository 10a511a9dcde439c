"""Model-level adapter management: functions taking the model (so nothing clashes with the methods
transformers models already have under these names).

    add_adapter / set_adapter / delete_adapter / disable_adapters (context manager)
    add_weighted_adapter(model, adapters, weights, name, combination_type="linear" | "cat" | "svd")
    mixed_batch(model, adapter_names)  (context manager: row b of the batch uses adapter_names[b])
    merge_adapter / unmerge_adapter / merge_and_unload
    loraplus_param_groups(model, lr, ratio=16)

Combinations (w_i = weights, s_i = scalings; the new adapter has scaling 1):
    cat     A = [w_1 s_1 A_1; ...; w_k s_k A_k]  B = [B_1 ... B_k]   ⇒ B A = Σ w_i s_i B_i A_i  (exact)
    svd     Δ = Σ w_i s_i B_i A_i = U S Vᵀ, keep rank ρ: B = U_ρ S_ρ, A = V_ρᵀ  (exact when ρ ≥ rank Δ)
    linear  A = Σ √(w_i s_i) A_i,  B = Σ √(w_i s_i) B_i  (PEFT's "linear": needs equal ranks; not Σ Δ_i)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lowrank_ext.adapters.bitfit import BitFitConfig
from lowrank_ext.adapters.config import LoRAConfig
from lowrank_ext.adapters.injector import apply_inject, inject, plan_inject
from lowrank_ext.adapters.prompt_tuning import PromptTuningModel
from lowrank_ext.adapters.state import ModulesToSave, adapter_layers, require_state, set_adapter
from lowrank_ext.nf4 import quantize_nf4
from lowrank_ext.nn import ADAPTER_LAYERS, IA3_LAYERS, Linear4bit, QIA3Linear, QLoRALinear
from lowrank_ext.nn.lora import merge_warning

__all__ = [
    "add_adapter",
    "add_weighted_adapter",
    "delete_adapter",
    "disable_adapters",
    "loraplus_param_groups",
    "merge_adapter",
    "merge_and_unload",
    "mixed_batch",
    "set_adapter",
    "unmerge_adapter",
]

BASE = "__base__"  # in mixed_batch: this row uses no adapter


def _ia3(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, IA3_LAYERS)]


def _all_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """LoRA-family and IA3 layers: what delete / unmerge walk."""
    return [*adapter_layers(model), *_ia3(model)]


def add_adapter(model: nn.Module, name: str, config: LoRAConfig) -> nn.Module:
    """Add adapter `name` (not activated; PEFT's behaviour). The model must already have adapters."""
    require_state(model, "add_adapter")
    return inject(model, config, name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter `name` from every layer, ModulesToSave wrapper and the model's state.

    The active set follows PEFT (0.21.2, BaseTunerLayer.delete_adapter): other active adapters stay active;
    when `name` was the only active adapter, the first remaining adapter in sorted name order becomes active,
    with a UserWarning (never silently the base model); with no adapter left, none is active. PEFT makes
    that choice layer by layer (so adapters with different target modules may activate different adapters
    in different layers); here it is made once for the whole model. A merged adapter cannot be deleted
    (unmerge_adapter first), as in PEFT; that is checked before anything is deleted.
    """
    state = require_state(model, "delete_adapter")
    if name not in state.configs:
        raise ValueError(f"lowrank_ext::delete_adapter: name must be an existing adapter {sorted(state.configs)}, "
                         f"got {name!r}")
    if isinstance(state.configs[name], BitFitConfig):
        raise ValueError(f"lowrank_ext::delete_adapter: name must not be a BitFit adapter (its biases are the model's "  # noqa: TRY004
                         f"own parameters; load the base model again instead), got {name!r}")
    merged_in = [n for n, layer in _all_layers(model) if name in layer.merged_adapters]
    if merged_in:
        raise ValueError(f"lowrank_ext::delete_adapter: name must not be merged (call unmerge_adapter first), got "
                         f"{name!r} merged in {len(merged_in)} layers ({merged_in[0]}, ...)")
    for _, layer in _all_layers(model):
        if name in layer.specs:
            layer.delete_adapter(name)
    if isinstance(model, PromptTuningModel):
        del model.prompt_embeddings[name]
    for m in model.modules():
        if isinstance(m, ModulesToSave) and name in m.modules_to_save:
            del m.modules_to_save[name]
    del state.configs[name]
    state.vera_shared.pop(name, None)
    state.summaries.pop(name, None)
    active = [a for a in state.active if a != name]
    if name in state.active and not active and state.configs:
        active = [min(state.configs)]
        warnings.warn(f"lowrank_ext::delete_adapter: adapter {name!r} was active and is now deleted; the active "
                      f"adapter is now {active[0]!r} (PEFT's rule: the first remaining adapter by name)",
                      UserWarning, stacklevel=2)
    set_adapter(model, active)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes with its base weights only."""
    state = require_state(model, "disable_adapters")
    if any(isinstance(c, BitFitConfig) for c in state.configs.values()):
        raise ValueError("lowrank_ext::disable_adapters: model must not hold a BitFit adapter (its trained biases "
                         "are the model's own parameters: there is no base to fall back to), got one")
    mods = [m for m in model.modules() if isinstance(m, (*ADAPTER_LAYERS, *IA3_LAYERS, ModulesToSave,
                                                         PromptTuningModel))]
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.disabled = b


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Within the block, row b of every batch uses adapter adapter_names[b] ("__base__": none).

    Each layer stacks the named adapters once per forward and applies them to all rows with one gather and
    two batched matmuls (lowrank_ext.nn.functional.mixed_lora_delta): no Python loop over rows.

    A mixed batch applies no dropout, so in training mode an adapter with dropout > 0 is refused (on entry,
    and in forward if the model is switched to training inside the block). PEFT refuses `adapter_names` in
    training mode altogether; adapters without dropout compute the same function in both modes and run.
    """
    state = require_state(model, "mixed_batch")
    uniq = list(dict.fromkeys(adapter_names))
    for n in uniq:
        if n != BASE and n not in state.configs:
            raise ValueError(f"lowrank_ext::mixed_batch: adapter_names must name existing adapters "
                             f"{sorted(state.configs)} or {BASE!r}, got {n!r}")
    ids = torch.tensor([uniq.index(n) for n in adapter_names], dtype=torch.long)
    layers = [m for _, m in adapter_layers(model)]
    for m in layers:
        m.check_mixed_training(uniq)
    for m in layers:
        m._mixed = (uniq, ids)
    try:
        yield model
    finally:
        for m in layers:
            m._mixed = None
            m._mixed_cache = None


# ---- combination ----------------------------------------------------------------------------------------
@torch.no_grad()
def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None) -> None:
    """Create adapter `adapter_name` = weighted combination of LoRA `adapters` (see the module docstring).

    The new adapter adapts every module that holds at least one of `adapters`, and combines in each module
    the adapters that module holds. Its rank is set per module (rank_pattern, alpha = rank so scaling is 1):
        cat     the sum of the ranks of the adapters in that module (PEFT pads every module to the global
                sum of the configs' ranks: the same B A, with zero rows)
        linear  their common rank in that module (different ranks in one module are refused)
        svd     svd_rank, default the largest rank of any adapter (PEFT's rule)
    All or nothing: everything is checked and every new factor computed before the model is changed.
    """
    state = require_state(model, "add_weighted_adapter")
    if combination_type not in ("linear", "cat", "svd"):
        raise ValueError(f"lowrank_ext::add_weighted_adapter: combination_type must be 'linear', 'cat' or 'svd', "
                         f"got {combination_type!r}")
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(f"lowrank_ext::add_weighted_adapter: weights must have one entry per adapter "
                         f"({len(adapters)}), got {len(weights)}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(f"lowrank_ext::add_weighted_adapter: svd_rank must be a positive int or None, "
                         f"got {svd_rank!r}")
    cfgs = []
    for a in adapters:
        if a not in state.configs:
            raise ValueError(f"lowrank_ext::add_weighted_adapter: adapters must be existing adapters "
                             f"{sorted(state.configs)}, got {a!r}")
        if state.configs[a].variant != "lora":
            raise ValueError(f"lowrank_ext::add_weighted_adapter: adapters must be plain LoRA adapters, got {a!r} "
                             f"with variant={state.configs[a].variant!r}")
        cfgs.append(state.configs[a])
    layers = {n: layer for n, layer in adapter_layers(model) if any(a in layer.specs for a in adapters)}
    ranks: dict[str, int] = {}
    for name, layer in layers.items():
        here = [layer.specs[a].r for a in adapters if a in layer.specs]
        if combination_type == "linear" and len(set(here)) > 1:
            raise ValueError(f"lowrank_ext::add_weighted_adapter: adapters must have equal ranks for 'linear' in "
                             f"every module, got ranks {here} in {name}")
        ranks[name] = {"cat": sum(here), "linear": here[0],
                       "svd": svd_rank or max(max([c.r, *c.rank_pattern.values()]) for c in cfgs)}[combination_type]
    # longest names first: a pattern equal to one module's name may also be a "."-suffix of a longer name
    names = sorted(layers, key=lambda n: (-len(n), n))
    top = max(ranks.values())
    config = LoRAConfig(r=top, alpha=top, target_modules=names, dropout=cfgs[0].dropout,
                        rank_pattern={n: ranks[n] for n in names}, alpha_pattern={n: ranks[n] for n in names})
    plan = plan_inject(model, config, adapter_name)  # checks the name, changes nothing
    new = {name: _combine(layer, adapters, weights, combination_type, ranks[name]) for name, layer in layers.items()}
    apply_inject(model, plan)
    for name, (new_a, new_b) in new.items():
        layer = model.get_submodule(name)
        layer.lora_A[adapter_name].copy_(new_a)
        layer.lora_B[adapter_name].copy_(new_b)


def _combine(layer: nn.Module, adapters: Sequence[str], weights: Sequence[float], combination_type: str,
             rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [rank, in], B [out, rank]) of the combination in one layer, fp32 (see the module docstring)."""
    pairs = [(layer.factors(a, torch.float32), w * layer.specs[a].scaling)
             for a, w in zip(adapters, weights) if a in layer.specs]
    if combination_type == "cat":
        return torch.cat([ws * a for (a, _), ws in pairs], dim=0), torch.cat([b for (_, b), _ in pairs], dim=1)
    if combination_type == "linear":
        # √(w s) is imaginary for w s < 0: take √|w s| and carry the sign on A only
        new_a = sum((1.0 if ws >= 0 else -1.0) * abs(ws) ** 0.5 * a for (a, _), ws in pairs)
        new_b = sum(abs(ws) ** 0.5 * b for (_, b), ws in pairs)
        return new_a, new_b
    delta = sum(ws * (b @ a) for (a, b), ws in pairs)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    rho = min(rank, s.numel())
    new_b = delta.new_zeros(layer.out_features, rank)
    new_a = delta.new_zeros(rank, layer.in_features)
    new_b[:, :rho] = u[:, :rho] * s[:rho]
    new_a[:rho] = vh[:rho]
    return new_a, new_b


# ---- merging --------------------------------------------------------------------------------------------
def merge_adapter(model: nn.Module, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
    """Merge the active (or named) adapters into every layer (QLoRA layers: into a dense copy, see QLoRALinear).

    Adapters already merged are skipped with one UserWarning, as PEFT warns ("already merged, nothing to do" /
    "now additionally merging"); PEFT warns once per layer, here once per call."""
    state = require_state(model, "merge_adapter")
    ia3 = _ia3(model)
    nf4 = [n for n, layer in ia3 if isinstance(layer, QIA3Linear)]
    if nf4:  # checked before any layer merges: all or nothing
        # Merging IA3 into an NF4 weight requantizes it (lossy, permanent: the adapter is folded in for good);
        # only merge_and_unload offers that, opt-in, as for LoRA. This function has no such argument.
        raise ValueError(f"lowrank_ext::merge_adapter: model must have dense IA3 bases to merge in place (merging "
                         f"into an NF4 weight requantizes it: lossy and permanent; use "
                         f"merge_and_unload(model, requantize=True) for NF4 layers holding NF4(deq(W) * l), or "
                         f"merge_and_unload(model) for dense layers), got {len(nf4)} NF4 IA3 layers, e.g. {nf4[0]!r}")
    for _, layer in ia3:  # IA3: W ⊙ l in place (dense bases)
        layer.merge(None if adapter_names is None else [n for n in adapter_names if n in layer.specs],
                    safe_merge=safe_merge)
    layers = [layer for _, layer in adapter_layers(model)]
    merged = sorted({n for layer in layers for n in layer.merged_adapters})
    if merged:
        wanted = list(state.active) if adapter_names is None else list(adapter_names)
        todo = [n for n in wanted if n not in merged]
        warnings.warn(merge_warning("merge_adapter", merged, todo), UserWarning, stacklevel=2)
    for layer in layers:
        names = None if adapter_names is None else [n for n in adapter_names if n in layer.specs]
        layer.merge(names, safe_merge=safe_merge, warn=False)


def unmerge_adapter(model: nn.Module) -> None:
    require_state(model, "unmerge_adapter")
    for _, layer in _all_layers(model):
        layer.unmerge()


@torch.no_grad()
def merge_and_unload(model: nn.Module, safe_merge: bool = False, requantize: bool = False) -> nn.Module:
    """Merge the active adapters and put plain layers back: nn.Linear (dense; the default for NF4 bases too),
    or lowrank_ext.nn.Linear4bit holding NF4(merged) for NF4 bases when requantize=True (lossy, opt-in)."""
    require_state(model, "merge_and_unload")
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, IA3_LAYERS)]:
        # IA3: W ⊙ l into an nn.Linear (NF4 bases: into deq(W), or NF4(deq(W) ⊙ l) with requantize=True)
        if isinstance(layer, QIA3Linear) and not requantize:
            w, bias = layer.dense_merged()
            new = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device=w.device,
                            dtype=layer.weight.dtype)
            new.weight.copy_(w.to(new.weight.dtype))
            if bias is not None:
                new.bias.copy_(bias.to(new.bias.dtype))
        else:
            layer.merge(safe_merge=safe_merge, requantize=requantize and isinstance(layer, QIA3Linear))
            new = layer.unload()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    for name, layer in list(adapter_layers(model)):
        layer.merge(safe_merge=safe_merge, warn=False)  # merging what is left is the point: no warning
        w = layer.dense_weight()
        dtype = layer.weight.dtype
        if isinstance(layer, QLoRALinear) and requantize:
            old = layer.weight
            new: nn.Module = Linear4bit(quantize_nf4(w.to(dtype), old.blocksize, old.double_quant), layer.bias)
        else:
            new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                            device=w.device, dtype=dtype)
            new.weight.copy_(w.to(dtype))
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    for name, m in list(model.named_modules()):
        if isinstance(m, ModulesToSave):
            keep = m.modules_to_save[m.active] if m.active is not None else m.original_module
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, keep)
    del model.lowrank_ext_state
    return model


# ---- LoRA+ ----------------------------------------------------------------------------------------------
def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16) -> list[dict]:
    """Optimizer param groups for LoRA+: B matrices (and VeRA's λ_b) at lr·ratio, all other trainable
    parameters at lr. Pass the result to any torch optimizer."""
    if ratio <= 0:
        raise ValueError(f"lowrank_ext::loraplus_param_groups: ratio must be > 0, got {ratio}")
    fast, slow = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (fast if (".lora_B." in name or ".vera_lambda_b." in name) else slow).append(p)
    if not fast:
        raise ValueError("lowrank_ext::loraplus_param_groups: model must have trainable lora_B parameters, got none")
    return [{"params": slow, "lr": lr}, {"params": fast, "lr": lr * ratio}]
