"""BitFit: only biases train (Ben Zaken et al., 2022); everything else is frozen.

    BitFitConfig(bias_patterns=None, add_bias_to=None)
        bias_patterns: which biases train, matched against the name of the module owning the bias (PEFT's rule:
            a str is a full-match regex, a list entry matches a module named that or ending in "." + entry);
            None: every bias in the model.
        add_bias_to: None, "all-linear" (every linear layer but the output head) or a list of module
            names (adapters/targets.py's rule): those linear modules without a bias get a zero-initialised one first (the output is unchanged
            until it trains). Models without biases (Llama, SmolLM2) need it: without it inject refuses, saying so.
    inject_bitfit(model, config): the biases' requires_grad is the only change (plus the added zero biases).

File (ours; PEFT has no BitFit): adapter_model.safetensors with metadata {"format": "pt"} and one key per trained
bias, `base_model.model.<module>.bias` [out] (the same prefix as PEFT's files); adapter_config.json:
    {"peft_type": "BITFIT", "bias_patterns": ..., "add_bias_to": ..., "added_biases": [modules that got a
     zero bias], "base_model_name_or_path": ..., "format_version": 1}
load_adapter adds the zero biases the file lists, checks every key and shape, then copies (all or nothing).
PEFT refuses the file (unknown peft_type "BITFIT"): loud, never a silent half-load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lowrank_ext.adapters import peft_fields
from lowrank_ext.adapters.injector import count_parameters
from lowrank_ext.adapters.peft_fields import as_names, is_names, read_peft_dict
from lowrank_ext.adapters.state import AdapterState, InjectSummary, check_adapter_name, get_state
from lowrank_ext.adapters.targets import is_linear_like, matches_spec, select_targets
from lowrank_ext.nn import ADAPTER_LAYERS, IA3_LAYERS, Linear4bit
from lowrank_ext.nn.layout import check_floating

__all__ = ["BitFitConfig", "BitFitPlan", "apply_bitfit", "bitfit_planned_shapes", "bitfit_state_dict", "plan_bitfit"]

PREFIX = "base_model.model."


@dataclasses.dataclass
class BitFitConfig:
    bias_patterns: list[str] | str | None = None
    add_bias_to: list[str] | str | None = None
    added_biases: list[str] = dataclasses.field(default_factory=list)  # filled in by inject (saved in the file)

    peft_type = "BITFIT"

    def __post_init__(self) -> None:
        for name in ("bias_patterns", "add_bias_to"):
            v = getattr(self, name)
            if v is not None and not is_names(v):
                raise ValueError(f"lowrank_ext::BitFitConfig: {name} must be None, a list of str or a str, got {v!r}")
            setattr(self, name, as_names(v))

    def to_peft_dict(self, base_model_name_or_path: str | None = None, model: nn.Module | None = None
                     ) -> dict[str, Any]:
        return {"peft_type": "BITFIT", "bias_patterns": self.bias_patterns, "add_bias_to": self.add_bias_to,
                "added_biases": list(self.added_biases), "base_model_name_or_path": base_model_name_or_path,
                "format_version": 1}

    @classmethod
    def from_peft_dict(cls, d: Mapping[str, Any],
                       _where: str = "lowrank_ext::BitFitConfig.from_peft_dict: field") -> BitFitConfig:
        """Read our BitFit adapter_config.json content; every field is checked (adapters/peft_fields.py)."""
        return read_peft_dict(cls, d, _where, peft_fields.BITFIT)


@dataclasses.dataclass
class BitFitPlan:
    adapter_name: str
    config: BitFitConfig
    add: list[str]      # linear modules that get a zero bias
    train: list[str]    # modules whose bias trains (after adding)


def _bias_target(m: nn.Module) -> bool:
    """What add_bias_to may give a zero bias: a linear-like module that is not an adapter layer (plan_bitfit
    refuses a model with adapters; a Conv1D always has its bias, so it never gets one)."""
    return is_linear_like(m) and not isinstance(m, (*ADAPTER_LAYERS, *IA3_LAYERS))


def plan_bitfit(model: nn.Module, config: BitFitConfig, adapter_name: str = "default",
                add: list[str] | None = None) -> BitFitPlan:
    """Validate inject(model, BitFitConfig); `add` (load_adapter: the file's added_biases) overrides add_bias_to."""
    state = get_state(model)
    if state is not None and state.configs:
        raise ValueError(f"lowrank_ext::inject: model must have no other adapters for BitFit (it trains the model's "
                         f"own biases), got adapters {sorted(state.configs)}")
    check_adapter_name(adapter_name)
    if add is None:
        add = []
        if config.add_bias_to is not None:  # adapters/targets.py: the targets rule, "all-linear" included
            picked = select_targets(model, config.add_bias_to, accept=_bias_target)
            if not picked:
                raise ValueError(f"lowrank_ext::inject: BitFitConfig.add_bias_to must match at least one linear "
                                 f"module, got {config.add_bias_to!r}")
            add = [n for n in picked if model.get_submodule(n).bias is None]
    else:
        linears = {n for n, m in model.named_modules() if n and _bias_target(m)}
        for n in add:
            m = model.get_submodule(n) if n in linears else None
            if m is None or m.bias is not None:
                what = "no such linear module" if m is None else "it already has a bias"
                raise ValueError(f"lowrank_ext::load_adapter: added_biases must name linear modules without a bias, "
                                 f"got {n!r} ({what})")
    added = set(add)
    owners = [n for n, m in model.named_modules()
              if n in added or isinstance(getattr(m, "bias", None), nn.Parameter)]
    train = [n for n in owners if config.bias_patterns is None or matches_spec(config.bias_patterns, n)]
    if not train:
        if not owners:
            raise ValueError("lowrank_ext::inject: the model must have bias parameters for BitFit, got none (e.g. Llama "
                             "has no biases); pass BitFitConfig(add_bias_to='all-linear') to add zero-initialised "
                             "biases and train those")
        raise ValueError(f"lowrank_ext::inject: BitFitConfig.bias_patterns must match a module with a bias, got "
                         f"{config.bias_patterns!r} ({len(owners)} modules have biases, e.g. {owners[0]!r})")
    for n in train:  # before anything changes (an int bias would fail half-way, in requires_grad_)
        if n not in added:
            check_floating("inject", f"{n}.bias (a bias BitFit trains)", model.get_submodule(n).bias)
    return BitFitPlan(adapter_name, config, add, train)


def apply_bitfit(model: nn.Module, plan: BitFitPlan) -> nn.Module:
    for n in plan.add:
        m = model.get_submodule(n)
        ref = m.weight_packed if isinstance(m, Linear4bit) else m.weight
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        m.bias = nn.Parameter(torch.zeros(m.out_features, device=ref.device, dtype=dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    for n in plan.train:
        model.get_submodule(n).bias.requires_grad_(True)
    config = dataclasses.replace(plan.config, added_biases=list(plan.add))
    state = AdapterState(configs={plan.adapter_name: config}, active=[plan.adapter_name])
    model.lowrank_ext_state = state
    trainable, total = count_parameters(model)
    replaced = [(n, "no bias", "zero bias") for n in plan.add]
    state.summaries[plan.adapter_name] = InjectSummary(plan.adapter_name, replaced, trainable, total)
    return model


def bitfit_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """{file key: live bias} of the biases BitFit trains (the config's bias_patterns, resolved again)."""
    patterns = get_state(model).configs[adapter_name].bias_patterns
    return {PREFIX + n + ".bias": m.bias for n, m in model.named_modules()
            if isinstance(getattr(m, "bias", None), nn.Parameter) and (patterns is None or matches_spec(patterns, n))}


def bitfit_planned_shapes(model: nn.Module, plan: BitFitPlan) -> dict[str, tuple]:
    out = {}
    for n in plan.train:
        m = model.get_submodule(n)
        out[PREFIX + n + ".bias"] = (m.out_features,) if n in plan.add else tuple(m.bias.shape)
    return out
