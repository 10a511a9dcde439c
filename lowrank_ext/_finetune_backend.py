"""The adapter layers + optimizer the finetune command trains with, behind one small interface.

  lowrank_ext  (default) our NF4 QLoRA / LoRA / DoRA / VeRA layers (`lowrank_ext.inject`), PEFT-format
               files (`save_adapter` / `load_adapter`) and `lowrank_ext.optim.PagedAdamW`.
  peft         Hugging Face PEFT LoRA/DoRA on the dense model: the baseline to compare against
               (`--backend peft --no-quantize --optimizer adamw`), chosen explicitly, never a fallback.
The optimizer is chosen by `--optimizer` (default PagedAdamW); a missing one is an error, never replaced.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lowrank_ext.rank_alloc import match_targets

__all__ = ["AdapterSpec", "get_backend", "make_optimizer", "target_names"]


@dataclass
class AdapterSpec:
    rank: int
    alpha: float
    dropout: float
    targets: str | list[str]
    variant: str = "lora"
    quantize: bool = True
    rank_pattern: dict[str, int] | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def target_names(model: torch.nn.Module, targets: str | list[str]) -> list[str]:
    return match_targets(model, targets)


_OPTIMIZERS = {"paged-adamw": "PagedAdamW", "paged-adamw8bit": "PagedAdamW8bit", "adamw": None}


def make_optimizer(kind: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """`kind`: paged-adamw | paged-adamw8bit (lowrank_ext.optim) or adamw (torch.optim.AdamW); weight decay 0."""
    if kind not in _OPTIMIZERS:
        raise ValueError(f"lowrank_ext finetune: --optimizer must be one of {sorted(_OPTIMIZERS)}, got {kind!r}")
    if _OPTIMIZERS[kind] is None:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return getattr(_optim_module(kind), _OPTIMIZERS[kind])(params, lr=lr, weight_decay=0.0)


def _optim_module(kind: str):
    try:
        from lowrank_ext import optim
    except ImportError:
        optim = None
    if optim is None or not hasattr(optim, _OPTIMIZERS[kind]):
        raise RuntimeError(f"lowrank_ext finetune: --optimizer {kind} needs lowrank_ext.optim.{_OPTIMIZERS[kind]}, "
                           "got it missing from this build (use --optimizer adamw for torch.optim.AdamW)")
    return optim


class LowrankBackend:
    name = "lowrank_ext"

    def __init__(self, optimizer: str = "paged-adamw") -> None:
        self.optimizer_kind = optimizer

    @staticmethod
    def _api():
        import lowrank_ext

        missing = [n for n in ("LoRAConfig", "inject", "save_adapter", "load_adapter") if not hasattr(lowrank_ext, n)]
        if missing:
            raise RuntimeError("lowrank_ext finetune: the lowrank_ext backend needs lowrank_ext."
                               + ", lowrank_ext.".join(missing) + " (the layers), got them missing from this "
                               "build; use --backend peft --no-quantize for the PEFT baseline")
        return lowrank_ext

    def config(self, spec: AdapterSpec):
        lx = self._api()
        return lx.LoRAConfig(r=spec.rank, alpha=spec.alpha, dropout=spec.dropout, target_modules=spec.targets,
                             variant=spec.variant, quantize="nf4" if spec.quantize else None, double_quant=True,
                             rank_pattern=dict(spec.rank_pattern or {}))

    def inject(self, model: torch.nn.Module, spec: AdapterSpec) -> torch.nn.Module:
        return self._api().inject(model, self.config(spec))

    def optimizer(self, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        return make_optimizer(self.optimizer_kind, params, lr)

    def save(self, model: torch.nn.Module, directory: Path) -> None:
        save = self._api().save_adapter
        if "overwrite" in inspect.signature(save).parameters:  # the output dir was checked by the CLI
            save(model, str(directory), overwrite=True)
        else:
            save(model, str(directory))

    def load(self, fresh: torch.nn.Module, directory: Path, spec: AdapterSpec) -> torch.nn.Module:
        lx = self._api()
        model = lx.inject(fresh, self.config(spec))
        lx.load_adapter(model, str(directory))
        return model


class PeftBackend:
    name = "peft"

    def __init__(self, optimizer: str = "adamw") -> None:
        self.optimizer_kind = optimizer

    def inject(self, model: torch.nn.Module, spec: AdapterSpec) -> torch.nn.Module:
        import peft

        cfg = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                              target_modules=spec.targets, use_dora=spec.variant == "dora",
                              rank_pattern=dict(spec.rank_pattern or {}), task_type="CAUSAL_LM")
        return peft.get_peft_model(model, cfg)

    def optimizer(self, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        return make_optimizer(self.optimizer_kind, params, lr)

    def save(self, model: torch.nn.Module, directory: Path) -> None:
        model.save_pretrained(str(directory))

    def load(self, fresh: torch.nn.Module, directory: Path, spec: AdapterSpec) -> torch.nn.Module:
        import peft

        return peft.PeftModel.from_pretrained(fresh, str(directory))


def get_backend(name: str, optimizer: str = "paged-adamw"):
    """The backend `name` training with `optimizer`; checks both exist before any slow work."""
    if optimizer != "adamw":
        _optim_module(optimizer)
    if name == "lowrank_ext":
        backend = LowrankBackend(optimizer)
        backend._api()
        return backend
    if name == "peft":
        return PeftBackend(optimizer)
    raise ValueError(f"lowrank_ext finetune: --backend must be lowrank_ext or peft, got {name!r}")
