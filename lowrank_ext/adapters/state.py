"""The adapter state a model carries, and which adapters are active.

    model.lowrank_ext_state   an AdapterState (a plain attribute, not a submodule): the configs by adapter
                              name, the active names, VeRA's shared matrices, inject() summaries
    ModulesToSave             a module trained in full: the frozen original + one trainable copy per adapter
    set_adapter(model, names) activation: only the active adapters' parameters (and biases per config) train

This is the bottom of the adapters layer: injector.py, management.py and files.py build on it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lowrank_ext.nn import ADAPTER_LAYERS, IA3_LAYERS

__all__ = ["AdapterState", "InjectSummary", "ModulesToSave", "adapter_layers", "get_state", "require_state",
           "set_adapter"]


@dataclasses.dataclass
class InjectSummary:
    """What inject() replaced, and the parameter counts after it."""

    adapter_name: str
    replaced: list[tuple[str, str, str]]  # (module name, old type, new type)
    trainable: int
    total: int

    def __str__(self) -> str:
        lines = [f"adapter {self.adapter_name!r}: {len(self.replaced)} modules adapted"]
        lines += [f"  {name}: {old} -> {new}" for name, old, new in self.replaced]
        pct = 100.0 * self.trainable / max(self.total, 1)
        lines.append(f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {pct:.4f}")
        return "\n".join(lines)


@dataclasses.dataclass
class AdapterState:
    """Kept on the model as `model.lowrank_ext_state` (a plain attribute, not a submodule)."""

    configs: dict[str, Any] = dataclasses.field(default_factory=dict)  # LoRAConfig / IA3Config / BitFitConfig / ...
    active: list[str] = dataclasses.field(default_factory=list)
    vera_shared: dict[str, tuple[torch.Tensor, torch.Tensor]] = dataclasses.field(default_factory=dict)
    summaries: dict[str, InjectSummary] = dataclasses.field(default_factory=dict)


class ModulesToSave(nn.Module):
    """A module trained in full: the frozen original plus one trainable copy per adapter (PEFT's layout)."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)

    def forward(self, *args, **kwargs):
        if self.disabled or self.active not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active](*args, **kwargs)


def get_state(model: nn.Module) -> AdapterState | None:
    return getattr(model, "lowrank_ext_state", None)


def check_adapter_name(adapter_name: object, op: str = "lowrank_ext::inject") -> None:
    """inject's rule for an adapter name, every method: a non-empty str without '.' (it becomes a key part)."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"{op}: adapter_name must be a non-empty str without '.', got {adapter_name!r}")


def check_new_adapter_name(model: nn.Module, adapter_name: object) -> None:
    """check_adapter_name, and not a name the model already has."""
    check_adapter_name(adapter_name)
    state = get_state(model)
    if state is not None and adapter_name in state.configs:
        raise ValueError(f"lowrank_ext::inject: adapter_name must be a new adapter name, got {adapter_name!r} "
                         f"(existing: {sorted(state.configs)})")


def require_state(model: nn.Module, op: str) -> AdapterState:
    """The model's AdapterState, or a ValueError naming `op` when the model has no adapters."""
    state = get_state(model)
    if state is None:
        raise ValueError(f"lowrank_ext::{op}: model must have adapters (call lowrank_ext.inject first), got none")
    return state


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) for every adapter layer (LoRALinear / QLoRALinear) in the model."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, ADAPTER_LAYERS))


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make `names` the active adapters; only their parameters (and biases per config) are trainable."""
    state = require_state(model, "set_adapter")
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        if n not in state.configs:
            raise ValueError(f"lowrank_ext::set_adapter: names must be existing adapters {sorted(state.configs)}, "
                             f"got {n!r}")
    state.active = names
    for _, layer in adapter_layers(model):
        layer.set_adapter([n for n in names if n in layer.specs])
    for m in model.modules():
        if isinstance(m, IA3_LAYERS):
            m.set_adapter([n for n in names if n in m.ia3_l])
        elif isinstance(m, ModulesToSave):
            m.active = next((n for n in names if n in m.modules_to_save), None)
            for n, copy_ in m.modules_to_save.items():
                copy_.requires_grad_(n == m.active)
    biases = {getattr(state.configs[n], "bias", "none") for n in names}  # IA3 / prompt tuning: none
    if "all" in biases:
        for pname, p in model.named_parameters():
            if pname.endswith("bias") and ".modules_to_save." not in pname and "original_module" not in pname:
                p.requires_grad_(True)
    elif "lora_only" in biases:
        for _, layer in adapter_layers(model):
            if layer.bias is not None:
                layer.bias.requires_grad_(True)
