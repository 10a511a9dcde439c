"""inject(model, LoRAConfig) — swap adapter layers into any nn.Module by plain recursion over named children.

Targets are nn.Linear, transformers' Conv1D (weight [in, out]), bitsandbytes' Linear4bit (imported without
requantizing), our Linear4bit, and our adapter layers (which get one more adapter). Everything else is
frozen; trainable: the active adapter's parameters, biases per `config.bias`, `modules_to_save` copies.
Parameter counts follow PEFT's rule (an NF4 weight counts as its number of elements), so
`count_parameters(model)` equals PEFT's `get_nb_trainable_parameters()` for the same config.

inject = plan_inject (every check, nothing changed) + apply_inject (all or nothing: undone if a layer fails to
build); load_adapter and add_weighted_adapter validate against the plan before they change the model.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from lowrank_ext.adapters.bnb_import import is_bnb_4bit, nf4_from_bnb_linear
from lowrank_ext.adapters.config import LoRAConfig
from lowrank_ext.adapters.state import (
    AdapterState,
    InjectSummary,
    ModulesToSave,
    check_new_adapter_name,
    get_state,
    set_adapter,
)
from lowrank_ext.nf4 import quantize_nf4
from lowrank_ext.adapters.targets import is_linear_like, modules_to_save_names, select_targets
from lowrank_ext.nn import ADAPTER_LAYERS, IA3_LAYERS, Linear4bit, LoRALinear, QLoRALinear
from lowrank_ext.nn.linear4bit import NF4WeightHolder
from lowrank_ext.nn.layout import linear_in_out, linear_weight, record_base_layout

__all__ = ["InjectPlan", "apply_inject", "count_parameters", "in_out", "inject", "inject_summary", "plan_inject",
           "target_names"]


def _lora_target(m: nn.Module) -> bool:
    """What LoRA wraps: a linear-like module that is not an IA3 layer (an adapter layer gets one more adapter)."""
    return is_linear_like(m) and not isinstance(m, IA3_LAYERS)


def target_names(model: nn.Module, config: LoRAConfig) -> list[str]:
    """The modules `config` adapts in `model` (adapters/targets.py: PEFT's rule)."""
    return select_targets(model, config.target_modules, config.exclude_modules,
                          modules_to_save=config.modules_to_save, accept=_lora_target)


def _get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _vera_shared(model: nn.Module, targets: list[str], config: LoRAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA's frozen shared A [r, max_in], B [max_out, r]: kaiming-uniform (gain √2, fan_in) from a CPU
    generator seeded with config.vera_seed, A drawn first — the same stream PEFT draws from."""
    max_in = max_out = 0
    for t in targets:
        m = model.get_submodule(t)
        i, o = in_out(m)
        max_in, max_out = max(max_in, i), max(max_out, o)
    gen = torch.Generator(device="cpu").manual_seed(config.vera_seed)

    def kaiming(shape: tuple[int, int]) -> torch.Tensor:
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])  # U(-b, b), b = √3 · gain / √fan_in
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)

    a = kaiming((config.r, max_in))
    b = kaiming((max_out, config.r))
    return a, b


def in_out(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like target (Conv1D stores its weight [in, out])."""
    if isinstance(m, (*ADAPTER_LAYERS, Linear4bit)):
        return m.in_features, m.out_features
    return linear_in_out(m)


def _new_layer(m: nn.Module, config: LoRAConfig) -> nn.Module:
    """The adapter layer (no adapter yet) for module m."""
    cd = config.compute_dtype
    if is_bnb_4bit(m):  # bitsandbytes' own compute_dtype when the config sets none
        bnb_cd = getattr(m, "compute_dtype", None)
        return QLoRALinear(*nf4_from_bnb_linear(m), cd if cd is not None else bnb_cd)
    if isinstance(m, Linear4bit):
        return QLoRALinear(m.weight, m.bias, cd if cd is not None else m.compute_dtype)
    weight, bias = linear_weight(m, config.fan_in_fan_out)
    if config.quantize == "nf4":
        layer = QLoRALinear(quantize_nf4(weight, config.blocksize, config.double_quant), bias, cd)
    else:
        layer = LoRALinear(weight, bias)
    return record_base_layout(layer, m, config.fan_in_fan_out)  # materialize reads the base checkpoint's layout


@dataclasses.dataclass
class InjectPlan:
    """What inject() will do, computed and validated without changing the model (see plan_inject)."""

    adapter_name: str
    config: LoRAConfig
    targets: list[str]          # modules that get the adapter (replaced by an adapter layer unless one already)
    modules_to_save: list[str]  # modules wrapped in / added to a ModulesToSave


def plan_inject(model: nn.Module, config: LoRAConfig, adapter_name: str = "default") -> InjectPlan:
    """Validate inject(model, config, adapter_name) and say what it would replace; the model is not touched.

    Every check on the arguments happens here; apply_inject(model, plan) then changes the model, or undoes
    its changes when building a layer fails (e.g. quantizing a weight with NaN/Inf)."""
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"lowrank_ext::inject: config must be a LoRAConfig, got {type(config).__name__}")
    check_new_adapter_name(model, adapter_name)
    targets = target_names(model, config)
    if not targets:
        raise ValueError(f"lowrank_ext::inject: target_modules must match at least one linear module, got "
                         f"target_modules={config.target_modules!r}, exclude_modules={config.exclude_modules!r}")
    return InjectPlan(adapter_name, config, targets, _module_to_save_names(model, config))


def inject(model: nn.Module, config: LoRAConfig, adapter_name: str = "default") -> nn.Module:
    """Replace the modules `config` targets with adapter layers holding adapter `adapter_name`; freeze the rest.

    The first call (or the first after every adapter was deleted) activates the adapter; later calls (a
    second adapter) keep the active set, as PEFT's add_adapter does. Returns the model; `inject_summary(model)`
    says what was replaced. All or nothing: everything is validated first (plan_inject), and a layer that
    fails to build (a non-finite weight to quantize) undoes the layers already swapped in.
    """
    return apply_inject(model, plan_inject(model, config, adapter_name))


def apply_inject(model: nn.Module, plan: InjectPlan) -> nn.Module:
    """Carry out a plan from plan_inject (on the same, unchanged model)."""
    config, adapter_name = plan.config, plan.adapter_name
    state = get_state(model)
    first = state is None or not state.configs  # no adapter yet, or all deleted: this one becomes active
    if state is None:
        state = AdapterState()
    vera = _vera_shared(model, plan.targets, config) if config.variant == "vera" else None
    # One layer at a time (peak memory: one new layer), undone if a later one fails: quantizing a weight
    # with NaN/Inf, or reading a corrupt bitsandbytes layer, raises half-way through the targets.
    done: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []
    try:
        for name in plan.targets:
            parent, child_name = _get_parent(model, name)
            old = getattr(parent, child_name)
            layer = old if isinstance(old, ADAPTER_LAYERS) else _new_layer(old, config)
            layer.add_adapter(adapter_name, r=config.rank_for(name), alpha=config.alpha_for(name),
                              dropout=config.dropout, use_rslora=config.use_rslora, variant=config.variant,
                              init=config.init, vera_shared=vera, vera_d_initial=config.vera_d_initial)
            if layer is not old:
                setattr(parent, child_name, layer)
            done.append((parent, child_name, old, layer))
    except BaseException:
        for parent, child_name, old, layer in reversed(done):
            if layer is old:
                layer.delete_adapter(adapter_name)
            else:
                setattr(parent, child_name, old)
        raise
    replaced = [(name, type(old).__name__, type(layer).__name__)
                for name, (_, _, old, layer) in zip(plan.targets, done)]
    for name in plan.modules_to_save:
        parent, child_name = _get_parent(model, name)
        old = getattr(parent, child_name)
        wrapper = old if isinstance(old, ModulesToSave) else ModulesToSave(old)
        wrapper.add(adapter_name)
        setattr(parent, child_name, wrapper)
    if vera is not None:
        state.vera_shared[adapter_name] = vera
    state.configs[adapter_name] = config
    if first:
        model.lowrank_ext_state = state
        for p in model.parameters():
            p.requires_grad_(False)
        state.active = [adapter_name]
    set_adapter(model, state.active)
    trainable, total = count_parameters(model)
    state.summaries[adapter_name] = InjectSummary(adapter_name, replaced, trainable, total)
    return model


def _module_to_save_names(model: nn.Module, config: LoRAConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    names = modules_to_save_names(model, config.modules_to_save)
    if not names:
        raise ValueError(f"lowrank_ext::inject: modules_to_save must name existing modules, got "
                         f"{config.modules_to_save!r}")
    return names


def inject_summary(model: nn.Module, adapter_name: str | None = None) -> InjectSummary:
    """The summary of the last inject() (or of `adapter_name`), with the current parameter counts."""
    state = get_state(model)
    if state is None or not state.summaries:
        raise ValueError("lowrank_ext::inject_summary: model must have been injected, got a model without adapters")
    s = state.summaries[adapter_name or next(reversed(state.summaries))]
    trainable, total = count_parameters(model)
    return dataclasses.replace(s, trainable=trainable, total=total)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; an NF4 weight counts as its number of elements (PEFT's rule), not
    as the bytes of its uint8 storage parameters. Sharded (FSDP2) parameters count globally."""
    nf4 = [m for m in model.modules() if isinstance(m, NF4WeightHolder)]
    storage = {id(p) for m in nf4 for p in m.nf4_parameters()}  # uint8 bytes: counted as the weight's elements
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters() if id(p) not in storage)
    total += sum(m.nf4_numel for m in nf4)
    return trainable, total
