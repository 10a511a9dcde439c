"""The adapter layers + optimizer the finetune command trains with, behind one small interface.

  lowrank_ext  (default) our NF4 QLoRA / LoRA / DoRA / VeRA layers (`lowrank_ext.inject`), PEFT-format
               files (`save_adapter` / `load_adapter`) and `lowrank_ext.optim.PagedAdamW`.
  peft         Hugging Face PEFT LoRA/DoRA on the dense model with torch.optim.AdamW: the baseline to
               compare against (`--backend peft --no-quantize`), chosen explicitly, never a fallback.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lowrank_ext.rank_alloc import match_targets

__all__ = ["AdapterSpec", "get_backend", "target_names"]


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


class LowrankBackend:
    name = "lowrank_ext"

    @staticmethod
    def _api():
        import lowrank_ext

        missing = [n for n in ("LoRAConfig", "inject", "save_adapter", "load_adapter") if not hasattr(lowrank_ext, n)]
        try:
            import lowrank_ext.optim as optim

            if not hasattr(optim, "PagedAdamW"):
                missing.append("optim.PagedAdamW")
        except ImportError:
            missing.append("optim.PagedAdamW")
        if missing:
            raise RuntimeError("lowrank_ext finetune: the lowrank_ext backend needs lowrank_ext."
                               + ", lowrank_ext.".join(missing) + " (layers/optimizer), got them missing from this "
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
        from lowrank_ext.optim import PagedAdamW

        return PagedAdamW(params, lr=lr, weight_decay=0.0)

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

    def inject(self, model: torch.nn.Module, spec: AdapterSpec) -> torch.nn.Module:
        import peft

        cfg = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                              target_modules=spec.targets, use_dora=spec.variant == "dora",
                              rank_pattern=dict(spec.rank_pattern or {}), task_type="CAUSAL_LM")
        return peft.get_peft_model(model, cfg)

    def optimizer(self, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def save(self, model: torch.nn.Module, directory: Path) -> None:
        model.save_pretrained(str(directory))

    def load(self, fresh: torch.nn.Module, directory: Path, spec: AdapterSpec) -> torch.nn.Module:
        import peft

        return peft.PeftModel.from_pretrained(fresh, str(directory))


def get_backend(name: str):
    if name == "lowrank_ext":
        backend = LowrankBackend()
        backend._api()  # fail before loading the model
        return backend
    if name == "peft":
        return PeftBackend()
    raise ValueError(f"lowrank_ext finetune: --backend must be lowrank_ext or peft, got {name!r}")
