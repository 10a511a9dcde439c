"""(IA)³ through the injector and PEFT's files: IA3Config, injection, the adapter file's keys.

    IA3Config(target_modules=None, feedforward_modules=None, init_ia3_weights=True, quantize=None, ...)
        target_modules / feedforward_modules None: PEFT's defaults for the model type (llama: k_proj, v_proj,
        down_proj; feed-forward down_proj). Feed-forward targets scale their input, the others their output.
    inject_ia3(model, config, adapter_name)  every target becomes an IA3Linear (dense) or QIA3Linear (NF4:
        quantize="nf4", or an NF4 / bitsandbytes 4-bit base); all or nothing; everything else frozen.
    File keys (PEFT's, adapter name stripped): base_model.model.<module>.ia3_l  [out, 1] or [1, in] (feed-forward);
    adapter_config.json: peft_type "IA3", target_modules, feedforward_modules, init_ia3_weights, fan_in_fan_out.

Matching is PEFT's: target_modules / exclude_modules by adapters/targets.py (a str is a full-match regex, a list
entry matches a module named that or ending in "." + entry); feedforward_modules by PEFT's own IA3 rule
(is_feedforward_target: a list entry is a plain string suffix). feedforward_modules given as lists must be a
subset of target_modules (PEFT's check).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from lowrank_ext.adapters.bnb_import import is_bnb_4bit, nf4_from_bnb_linear
from lowrank_ext.adapters import peft_fields
from lowrank_ext.adapters.config import _BLOCKSIZES, _QUANT
from lowrank_ext.adapters.injector import _get_parent, count_parameters, in_out
from lowrank_ext.adapters.peft_fields import as_names, is_names, peft_task_type, read_peft_dict
from lowrank_ext.adapters.targets import is_linear_like, select_targets
from lowrank_ext.adapters.state import AdapterState, InjectSummary, check_new_adapter_name, get_state, set_adapter
from lowrank_ext.nf4 import quantize_nf4
from lowrank_ext.nn import ADAPTER_LAYERS, IA3_LAYERS, IA3Linear, Linear4bit, QIA3Linear
from lowrank_ext.nn.linear4bit import check_compute_dtype
from lowrank_ext.nn.layout import linear_weight, record_base_layout

__all__ = ["IA3Config", "IA3Plan", "apply_ia3", "ia3_layers", "ia3_planned_shapes", "ia3_state_dict", "plan_ia3"]

PREFIX = "base_model.model."

# PEFT 0.21.2 utils/constants.py: TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING (a subset)
DEFAULT_TARGETS = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
}


def _err(arg: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"lowrank_ext::IA3Config: {arg} must {expected}, got {got!r}")


@dataclasses.dataclass
class IA3Config:
    """One (IA)³ adapter. Names and defaults follow PEFT's IA3Config.

    target_modules: modules that get a scaling vector (list of names / suffixes, a regex, or "all-linear");
        None: PEFT's default for the model type (DEFAULT_TARGETS).
    feedforward_modules: the targets whose *input* is scaled (PEFT's is_feedforward); None with default
        targets: PEFT's default; None with explicit targets: none (all output scaling).
    init_ia3_weights: True: l = 1 (the adapter starts as the identity, PEFT's default); False: N(0, 1).
    quantize: None (dense base) or "nf4" (the base weights are quantized, blocksize / double_quant).
    compute_dtype: the dtype NF4 base products run in (LoRAConfig's field, bitsandbytes' bnb_4bit_compute_dtype);
        None: the activations' dtype (a bitsandbytes base keeps its own). Not part of adapter files.
    """

    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    init_ia3_weights: bool = True
    exclude_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    quantize: str | None = None
    compute_dtype: Any = None
    blocksize: int = 64
    double_quant: bool = True

    peft_type = "IA3"

    def __post_init__(self) -> None:
        for name in ("target_modules", "feedforward_modules", "exclude_modules"):
            v = getattr(self, name)
            if v is not None and not is_names(v):
                raise _err(name, "be None, a list of str or a str", v)
            setattr(self, name, as_names(v))
        if not isinstance(self.init_ia3_weights, bool):
            raise _err("init_ia3_weights", "be True or False", self.init_ia3_weights)
        if self.quantize not in _QUANT:
            raise _err("quantize", f"be one of {_QUANT}", self.quantize)
        try:
            self.compute_dtype = check_compute_dtype("IA3Config", self.compute_dtype)
        except TypeError as e:
            raise _err("compute_dtype", "be None, torch.float32, torch.bfloat16, torch.float16 or one of their names",
                       self.compute_dtype) from e
        if self.blocksize not in _BLOCKSIZES:
            raise _err("blocksize", f"be one of {_BLOCKSIZES}", self.blocksize)
        if self.feedforward_modules is not None and self.target_modules is None:
            raise _err("target_modules", "be given when feedforward_modules is", None)
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise _err("feedforward_modules", f"be a subset of target_modules {self.target_modules}", extra)

    def resolved(self, model: nn.Module) -> tuple[list[str] | str, list[str] | str]:
        """(target_modules, feedforward_modules) with PEFT's per-model-type defaults filled in."""
        if self.target_modules is not None:
            return self.target_modules, self.feedforward_modules or []
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(f"lowrank_ext::inject: IA3Config.target_modules must be given for model type "
                             f"{model_type!r} (defaults exist for {sorted(DEFAULT_TARGETS)}), got None")
        return DEFAULT_TARGETS[model_type]

    # ---- PEFT adapter_config.json ---------------------------------------------------------------
    def to_peft_dict(self, base_model_name_or_path: str | None = None, model: nn.Module | None = None
                     ) -> dict[str, Any]:
        targets, ff = self.resolved(model) if model is not None else (self.target_modules, self.feedforward_modules)
        return {"peft_type": "IA3", "target_modules": targets, "feedforward_modules": ff,
                "exclude_modules": self.exclude_modules, "init_ia3_weights": self.init_ia3_weights,
                "fan_in_fan_out": self.fan_in_fan_out, "modules_to_save": None, "task_type": peft_task_type(model),
                "base_model_name_or_path": base_model_name_or_path, "inference_mode": True}

    @classmethod
    def from_peft_dict(cls, d: Mapping[str, Any], _where: str = "lowrank_ext::IA3Config.from_peft_dict: field",
                       **overrides: Any) -> IA3Config:
        """Read PEFT's IA3 adapter_config.json content; every field is checked (adapters/peft_fields.py)."""
        return read_peft_dict(cls, d, _where, peft_fields.IA3, overrides)


def is_feedforward_target(ff_spec: list[str] | str, name: str) -> bool:
    """PEFT's rule for feedforward_modules (tuners/ia3/model.py `_check_target_module_feedforward`), which is NOT
    the target rule: a str must match the whole name as a regex; a list entry matches any name that ends with
    it — a plain string suffix, without the "." boundary of target_modules (["proj"] selects "down_proj")."""
    if isinstance(ff_spec, str):
        return re.fullmatch(ff_spec, name) is not None
    return any(name.endswith(entry) for entry in ff_spec)


def _ia3_target(m: nn.Module) -> bool:
    """What IA3 wraps: a linear-like module that is not a LoRA layer (an IA3 layer gets one more adapter)."""
    return is_linear_like(m) and not isinstance(m, ADAPTER_LAYERS)


def ia3_layers(model: nn.Module):
    """(name, layer) for every IA3 layer in the model."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, IA3_LAYERS))


@dataclasses.dataclass
class IA3Plan:
    adapter_name: str
    config: IA3Config
    targets: list[str]
    feedforward: dict[str, bool]  # target -> scales its input


def plan_ia3(model: nn.Module, config: IA3Config, adapter_name: str = "default") -> IA3Plan:
    """Validate inject(model, IA3Config) and resolve its targets; the model is not touched."""
    check_new_adapter_name(model, adapter_name)
    targets_spec, ff_spec = config.resolved(model)
    targets = select_targets(model, targets_spec, config.exclude_modules, accept=_ia3_target)
    if not targets:
        raise ValueError(f"lowrank_ext::inject: IA3Config.target_modules must match at least one linear module, got "
                         f"target_modules={targets_spec!r}, exclude_modules={config.exclude_modules!r}")
    ff = {t: bool(ff_spec) and is_feedforward_target(ff_spec, t) for t in targets}
    for t in targets:
        m = model.get_submodule(t)
        if isinstance(m, IA3_LAYERS) and m.is_feedforward != ff[t]:
            raise ValueError(f"lowrank_ext::inject: IA3Config.feedforward_modules must treat {t!r} as the model's "
                             f"other IA3 adapters do (is_feedforward={m.is_feedforward}), got {ff[t]}")
    return IA3Plan(adapter_name, config, targets, ff)


def _new_layer(m: nn.Module, config: IA3Config, is_ff: bool) -> nn.Module:
    cd = config.compute_dtype
    if is_bnb_4bit(m):  # bitsandbytes' own compute_dtype when the config sets none
        bnb_cd = getattr(m, "compute_dtype", None)
        return QIA3Linear(*nf4_from_bnb_linear(m), is_feedforward=is_ff, compute_dtype=cd if cd is not None else bnb_cd)
    if isinstance(m, Linear4bit):
        return QIA3Linear(m.weight, m.bias, is_feedforward=is_ff, compute_dtype=cd if cd is not None else m.compute_dtype)
    weight, bias = linear_weight(m, config.fan_in_fan_out)
    if config.quantize == "nf4":
        layer = QIA3Linear(quantize_nf4(weight, config.blocksize, config.double_quant), bias, is_feedforward=is_ff,
                           compute_dtype=cd)
    else:
        layer = IA3Linear(weight, bias, is_feedforward=is_ff)
    return record_base_layout(layer, m, config.fan_in_fan_out)  # materialize reads the base checkpoint's layout


def apply_ia3(model: nn.Module, plan: IA3Plan) -> nn.Module:
    """Carry out a plan from plan_ia3: all or nothing (a layer that fails to build undoes the others)."""
    state = get_state(model)
    first = state is None or not state.configs
    if state is None:
        state = AdapterState()
    done: list[tuple[nn.Module, str, nn.Module, nn.Module]] = []
    try:
        for name in plan.targets:
            parent, child = _get_parent(model, name)
            old = getattr(parent, child)
            layer = old if isinstance(old, IA3_LAYERS) else _new_layer(old, plan.config, plan.feedforward[name])
            layer.add_adapter(plan.adapter_name, init_ia3_weights=plan.config.init_ia3_weights)
            if layer is not old:
                setattr(parent, child, layer)
            done.append((parent, child, old, layer))
    except BaseException:
        for parent, child, old, layer in reversed(done):
            if layer is old:
                layer.delete_adapter(plan.adapter_name)
            else:
                setattr(parent, child, old)
        raise
    state.configs[plan.adapter_name] = plan.config
    if first:
        model.lowrank_ext_state = state
        for p in model.parameters():
            p.requires_grad_(False)
        state.active = [plan.adapter_name]
    set_adapter(model, state.active)
    trainable, total = count_parameters(model)
    replaced = [(n, type(old).__name__, type(layer).__name__) for n, (_, _, old, layer) in zip(plan.targets, done)]
    state.summaries[plan.adapter_name] = InjectSummary(plan.adapter_name, replaced, trainable, total)
    return model


def ia3_state_dict(model: nn.Module, adapter_name: str) -> dict:
    """{file key: live tensor} of IA3 adapter `adapter_name` (PEFT's keys)."""
    return {PREFIX + n + ".ia3_l": m.ia3_l[adapter_name] for n, m in ia3_layers(model) if adapter_name in m.ia3_l}


def ia3_planned_shapes(model: nn.Module, plan: IA3Plan) -> dict[str, tuple]:
    out = {}
    for t in plan.targets:
        i, o = in_out(model.get_submodule(t))
        out[PREFIX + t + ".ia3_l"] = (1, i) if plan.feedforward[t] else (o, 1)
    return out
