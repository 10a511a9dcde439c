"""inject(model, config): one entry point for every method family, chosen by the config's type.

    LoRAConfig          LoRA / DoRA / VeRA layers (injector.py)            returns the model
    IA3Config           (IA)³ scaling vectors (ia3.py)                     returns the model
    BitFitConfig        only biases train (bitfit.py)                      returns the model
    PromptTuningConfig  virtual tokens (prompt_tuning.py)                  returns a PromptTuningModel wrapper
Always use what inject returns. A model holds adapters of one method family at a time.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from lowrank_ext.adapters import injector
from lowrank_ext.adapters.bitfit import BitFitConfig, apply_bitfit, plan_bitfit
from lowrank_ext.adapters.config import LoRAConfig
from lowrank_ext.adapters.ia3 import IA3Config, apply_ia3, plan_ia3
from lowrank_ext.adapters.prompt_tuning import PromptTuningConfig, check_prompt_tuning, inject_prompt_tuning
from lowrank_ext.adapters.state import get_state

__all__ = ["CONFIG_TYPES", "PLAN_APPLY", "check_family", "inject", "method_of"]

CONFIG_TYPES = (LoRAConfig, IA3Config, PromptTuningConfig, BitFitConfig)


@dataclasses.dataclass
class _PromptPlan:
    config: PromptTuningConfig
    adapter_name: str


def _plan_prompt(model: nn.Module, config: PromptTuningConfig, adapter_name: str = "default") -> _PromptPlan:
    check_prompt_tuning(model, config, adapter_name)
    return _PromptPlan(config, adapter_name)


def _apply_prompt(model: nn.Module, plan: _PromptPlan) -> nn.Module:
    return inject_prompt_tuning(model, plan.config, plan.adapter_name)


# config class -> (plan(model, config, adapter_name): every check, the model untouched; apply(model, plan): the
# change, returns the model to use). inject runs both on one model; load_pretrained plans on the meta model and
# applies to the loaded one.
PLAN_APPLY = {
    LoRAConfig: (injector.plan_inject, injector.apply_inject),
    IA3Config: (plan_ia3, apply_ia3),
    BitFitConfig: (plan_bitfit, apply_bitfit),
    PromptTuningConfig: (_plan_prompt, _apply_prompt),
}


def method_of(config: object, op: str = "lowrank_ext::inject") -> type:
    """The config class of `config`'s method family (a TypeError naming `op` for anything else)."""
    for cls in CONFIG_TYPES:
        if isinstance(config, cls):
            return cls
    raise TypeError(f"{op}: config must be a LoRAConfig, IA3Config, PromptTuningConfig or BitFitConfig, "
                    f"got {type(config).__name__}")


def check_family(model: nn.Module, cls: type) -> None:
    """Refuse a config of another method family than the model's adapters (prompt tuning checks on its own)."""
    state = get_state(model)
    if state is not None and state.configs and cls is not PromptTuningConfig:
        have = {type(c).__name__ for c in state.configs.values()}
        if have != {cls.__name__}:
            raise ValueError(f"lowrank_ext::inject: config must be of the method the model's adapters use "
                             f"({', '.join(sorted(have))}), got {cls.__name__} (one method family per model)")


def inject(model: nn.Module, config, adapter_name: str = "default") -> nn.Module:
    """Add adapter `adapter_name` described by `config` to `model`; returns the model to use (prompt tuning
    wraps it). All or nothing: every check runs before the model changes."""
    cls = method_of(config)
    check_family(model, cls)
    plan, apply = PLAN_APPLY[cls]
    return apply(model, plan(model, config, adapter_name))
