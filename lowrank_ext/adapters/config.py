"""LoRAConfig: what `lowrank_ext.inject` puts where, and its PEFT `adapter_config.json` form.

Names and defaults follow PEFT's `LoraConfig` where both have the field (`r=8`, `alpha=8`, `dropout=0.0`,
`bias="none"`), so a config round-trips through PEFT's JSON file. Matching of `target_modules` is PEFT's and
lives in adapters/targets.py (a string is a regex that must match the full module name, a list matches a module
whose full name equals an entry or ends with "." + entry, "all-linear" means every nn.Linear / Conv1D except the
output head).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from lowrank_ext.adapters import peft_fields
from lowrank_ext.adapters.peft_fields import BIAS_CHOICES, as_names, is_names, peft_task_type, read_peft_dict
from lowrank_ext.adapters.targets import is_all_linear, matches_spec, pattern_value
from lowrank_ext.nn.linear4bit import check_compute_dtype

__all__ = ["LoRAConfig"]

_VARIANTS = ("lora", "dora", "vera")
_BIAS = BIAS_CHOICES
_INIT = ("kaiming", "gaussian")
_QUANT = (None, "nf4")
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _err(arg: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"lowrank_ext::LoRAConfig: {arg} must {expected}, got {got!r}")


@dataclasses.dataclass
class LoRAConfig:
    """Configuration of one adapter.

    r, alpha: rank and alpha; scaling s = alpha / r (alpha / sqrt(r) with use_rslora). VeRA has no scaling.
    dropout: dropout probability on the adapter branch input only.
    target_modules: list of names / suffixes, a regex (full match), or "all-linear" (output head skipped).
    exclude_modules: same forms; matching modules are never adapted.
    rank_pattern / alpha_pattern: {pattern: value} per-module overrides (a pattern matches a module whose
        name equals it or ends with "." + it, or as a full-match regex), as in PEFT.
    variant: "lora" | "dora" | "vera"; use_dora=True means variant="dora" (a conflicting pair is an error).
    quantize: None (dense base) or "nf4" (QLoRA: the base weight is quantized with blocksize / double_quant).
    compute_dtype: the dtype NF4 base products run in (bitsandbytes' bnb_4bit_compute_dtype; torch.bfloat16,
        torch.float16, torch.float32 or a name such as "bf16"); None: the activations' dtype. Applies to every
        NF4 base the injector builds or finds (quantize="nf4", our or bitsandbytes' Linear4bit); the adapter
        branch always runs in the activations' dtype. Not part of adapter files (PEFT has no such field).
    bias: "none" | "all" (every bias in the model trains) | "lora_only" (biases of adapted layers train).
    modules_to_save: modules (same matching as target_modules lists) trained in full, as a copy per adapter.
    init: "kaiming" (A kaiming-uniform(a=sqrt 5), B = 0, PEFT's default) | "gaussian" (A ~ N(0, 1/r), B = 0).
    fan_in_fan_out: the target stores its weight as [in, out] (GPT-2's Conv1D); detected automatically too.
    vera_seed, vera_d_initial: VeRA's shared-matrix PRNG key and λ_d initial value (PEFT's
        projection_prng_key and d_initial).
    """

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    variant: str = "lora"
    quantize: str | None = None
    compute_dtype: Any = None
    blocksize: int = 64
    double_quant: bool = True
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init: str = "kaiming"
    fan_in_fan_out: bool = False
    vera_seed: int = 0
    vera_d_initial: float = 0.1

    def __post_init__(self) -> None:
        if self.use_dora and self.variant not in ("lora", "dora"):
            raise _err("use_dora", f"be False with variant={self.variant!r}", self.use_dora)
        if self.use_dora:
            self.variant = "dora"
        if self.variant not in _VARIANTS:
            raise _err("variant", f"be one of {_VARIANTS}", self.variant)
        self.use_dora = self.variant == "dora"
        if not isinstance(self.r, int) or self.r <= 0:
            raise _err("r", "be a positive int", self.r)
        if not 0.0 <= float(self.dropout) < 1.0:
            raise _err("dropout", "be in [0, 1)", self.dropout)
        if self.quantize not in _QUANT:
            raise _err("quantize", f"be one of {_QUANT}", self.quantize)
        try:
            self.compute_dtype = check_compute_dtype("LoRAConfig", self.compute_dtype)
        except TypeError as e:
            raise _err("compute_dtype", "be None, torch.float32, torch.bfloat16, torch.float16 or one of their names",
                       self.compute_dtype) from e
        if self.blocksize not in _BLOCKSIZES:
            raise _err("blocksize", f"be one of {_BLOCKSIZES}", self.blocksize)
        if self.bias not in _BIAS:
            raise _err("bias", f"be one of {_BIAS}", self.bias)
        if self.init not in _INIT:
            raise _err("init", f"be one of {_INIT}", self.init)
        if self.target_modules is None:
            raise _err("target_modules", "be a list of names, a regex or 'all-linear'", None)
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            v = getattr(self, name)
            if v is not None and not is_names(v):
                raise _err(name, "be a list of str or a str", v)
            setattr(self, name, as_names(v))
        for name in ("rank_pattern", "alpha_pattern"):
            v = getattr(self, name)
            if not isinstance(v, Mapping):
                raise _err(name, "be a dict {pattern: value}", v)
            setattr(self, name, dict(v))
        for pat, v in self.rank_pattern.items():
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise _err(f"rank_pattern[{pat!r}]", "be a positive int", v)
        for pat, v in self.alpha_pattern.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise _err(f"alpha_pattern[{pat!r}]", "be a finite number", v)

    # ---- per-module values --------------------------------------------------------------------
    def matches(self, name: str) -> bool:
        """True when module `name` is a target and not excluded, by name alone (adapters/targets.py's rule;
        "all-linear" needs the model: targets.select_targets resolves it)."""
        if self.exclude_modules and matches_spec(self.exclude_modules, name):
            return False
        return not is_all_linear(self.target_modules) and matches_spec(self.target_modules, name)

    def rank_for(self, name: str) -> int:
        return int(pattern_value(self.rank_pattern, name, self.r))

    def alpha_for(self, name: str) -> float:
        return float(pattern_value(self.alpha_pattern, name, self.alpha))

    def scaling_for(self, name: str) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA (VeRA: 1)."""
        if self.variant == "vera":
            return 1.0
        r, alpha = self.rank_for(name), self.alpha_for(name)
        return alpha / (r**0.5) if self.use_rslora else alpha / r

    # ---- PEFT adapter_config.json ---------------------------------------------------------------
    def to_peft_dict(self, base_model_name_or_path: str | None = None, model: Any = None) -> dict[str, Any]:
        """The fields PEFT reads from adapter_config.json (LoRA / DoRA: "LORA"; VeRA: "VERA"). task_type:
        "CAUSAL_LM" when `model` is a causal LM (peft_fields.peft_task_type), which AutoPeftModelForCausalLM needs."""
        common = {
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "bias": self.bias,
            "fan_in_fan_out": self.fan_in_fan_out,
            "modules_to_save": self.modules_to_save,
            "task_type": peft_task_type(model),
            "base_model_name_or_path": base_model_name_or_path,
            "inference_mode": True,
            "r": self.r,
        }
        if self.variant == "vera":
            return {**common, "peft_type": "VERA", "vera_dropout": self.dropout, "projection_prng_key": self.vera_seed,
                    "d_initial": self.vera_d_initial, "save_projection": True}
        return {
            **common,
            "peft_type": "LORA",
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "use_dora": self.variant == "dora",
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern,
            "init_lora_weights": True if self.init == "kaiming" else "gaussian",
        }

    @classmethod
    def from_peft_dict(cls, d: Mapping[str, Any], _where: str = "lowrank_ext::LoRAConfig.from_peft_dict: field",
                       **overrides: Any) -> LoRAConfig:
        """Read PEFT's adapter_config.json content (peft_type "LORA" or "VERA"; a dict or PEFT's own
        `LoraConfig.to_dict()`, whose names are sets). adapters/peft_fields.py checks every field: a ValueError
        `<_where> 'r' must be a positive int, got ...` (read_adapter_config puts the file's path in `_where`);
        fields that change the forward pass and that we do not implement are refused, naming the field."""
        return read_peft_dict(cls, d, _where, {"LORA": peft_fields.LORA, "VERA": peft_fields.VERA}, overrides)


