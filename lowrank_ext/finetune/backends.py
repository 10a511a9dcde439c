"""The adapter layers + optimizer the finetune command trains with, behind one small interface.

  lowrank_ext  (default) our NF4 QLoRA / LoRA / DoRA / VeRA layers (`lowrank_ext.inject`), PEFT-format
               files (`save_adapter` / `load_adapter`) and `lowrank_ext.optim.PagedAdamW`.
  peft         Hugging Face PEFT LoRA/DoRA on the dense model: the baseline to compare against
               (`--backend peft --no-quantize --optimizer adamw`), chosen explicitly, never a fallback.
The optimizer is chosen by `--optimizer` (default PagedAdamW); a missing one is an error, never replaced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lowrank_ext import optim
from lowrank_ext.adapters import (
    BitFitConfig,
    IA3Config,
    LoRAConfig,
    PromptTuningConfig,
    delete_adapter,
    get_state,
    inject,
    load_adapter,
    load_pretrained,
    save_adapter,
)
from lowrank_ext.finetune.rank_allocation import match_targets

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
    num_virtual_tokens: int | None = None  # --variant prompt
    init_text: str | None = None           # --variant prompt

    def as_dict(self) -> dict:
        d = asdict(self)
        for k in ("num_virtual_tokens", "init_text"):  # unset: left out, so older checkpoints' fingerprints match
            if d[k] is None:
                del d[k]
        return d


def target_names(model: torch.nn.Module, targets: str | list[str]) -> list[str]:
    return match_targets(model, targets)


def method_note(model: torch.nn.Module, spec: AdapterSpec) -> str:
    """One line for the summary: what the method trains (BitFit: which zero biases it added)."""
    if spec.variant == "bitfit":
        added = get_state(model).configs["default"].added_biases
        return (f"bitfit: only biases train; zero-initialised biases added to {len(added)} linear layers "
                f"(the model has none of its own)" if added else "bitfit: only the model's biases train")
    if spec.variant == "prompt":
        return f"prompt tuning: {spec.num_virtual_tokens} virtual tokens, initialised from {spec.init_text!r}"
    if spec.variant == "ia3":
        n = sum(1 for _, m in model.named_modules() if hasattr(m, "ia3_l"))
        return f"ia3: scaling vectors on {n} layers (k/v: output, down_proj: input)"
    return f"{spec.variant}: r={spec.rank}, alpha={spec.alpha}"


_OPTIMIZERS = {"paged-adamw": "PagedAdamW", "paged-adamw8bit": "PagedAdamW8bit", "adamw": None}


def make_optimizer(kind: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """`kind`: paged-adamw | paged-adamw8bit (lowrank_ext.optim) or adamw (torch.optim.AdamW); weight decay 0."""
    if kind not in _OPTIMIZERS:
        raise ValueError(f"lowrank_ext finetune: --optimizer must be one of {sorted(_OPTIMIZERS)}, got {kind!r}")
    if _OPTIMIZERS[kind] is None:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return getattr(optim, _OPTIMIZERS[kind])(params, lr=lr, weight_decay=0.0)


class LowrankBackend:
    name = "lowrank_ext"

    def __init__(self, optimizer: str = "paged-adamw") -> None:
        self.optimizer_kind = optimizer

    def config(self, spec: AdapterSpec, tokenizer=None):
        if spec.variant == "ia3":
            targets = spec.targets
            return IA3Config(target_modules=targets, feedforward_modules=None if targets is None else [
                t for t in ([targets] if isinstance(targets, str) else targets) if t.endswith("down_proj")] or None,
                quantize="nf4" if spec.quantize else None)
        if spec.variant == "prompt":
            return PromptTuningConfig(spec.num_virtual_tokens, init_text=spec.init_text, tokenizer=tokenizer)
        if spec.variant == "bitfit":
            return BitFitConfig(add_bias_to=spec.targets)
        return LoRAConfig(r=spec.rank, alpha=spec.alpha, dropout=spec.dropout, target_modules=spec.targets,
                             variant=spec.variant, quantize="nf4" if spec.quantize else None, double_quant=True,
                             rank_pattern=dict(spec.rank_pattern or {}))

    def inject(self, model: torch.nn.Module, spec: AdapterSpec, tokenizer=None) -> torch.nn.Module:
        return inject(model, self.config(spec, tokenizer))

    def load_pretrained(self, source: Path, spec: AdapterSpec, device: torch.device) -> torch.nn.Module:
        """The model in `source` with the adapters injected, NF4 quantized as the shards stream in (equal to
        inject(load_causal_lm(source).model.to(device), config))."""
        return load_pretrained(source, self.config(spec), device=device)

    def load_streamed(self, source: Path, directory: Path, spec: AdapterSpec, device: torch.device) -> torch.nn.Module:
        """A fresh load_pretrained model with the adapter in `directory` loaded into it. IA3 adapters are never
        loaded over an existing one: its NF4 layers are streamed in under a placeholder adapter, deleted first."""
        if spec.variant == "ia3":
            model = load_pretrained(source, self.config(spec), device=device, adapter_name="streamed_base")
            delete_adapter(model, "streamed_base")
            return load_adapter(model, str(directory))
        model = self.load_pretrained(source, spec, device)
        load_adapter(model, str(directory))
        return model

    def optimizer(self, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        return make_optimizer(self.optimizer_kind, params, lr)

    def save(self, model: torch.nn.Module, directory: Path) -> None:
        save_adapter(model, str(directory), overwrite=True)  # the output dir was checked by the CLI

    def load(self, fresh: torch.nn.Module, directory: Path, spec: AdapterSpec) -> torch.nn.Module:
        if spec.variant in ("ia3", "prompt", "bitfit"):  # the file's config decides (prompt: a wrapper comes back)
            return load_adapter(fresh, str(directory), quantize="nf4" if spec.quantize else None)
        model = inject(fresh, self.config(spec))
        load_adapter(model, str(directory))
        return model


class PeftBackend:
    name = "peft"

    def __init__(self, optimizer: str = "adamw") -> None:
        self.optimizer_kind = optimizer

    def inject(self, model: torch.nn.Module, spec: AdapterSpec, tokenizer=None) -> torch.nn.Module:
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
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"lowrank_ext finetune: --optimizer must be one of {sorted(_OPTIMIZERS)}, got {optimizer!r}")
    if name == "lowrank_ext":
        return LowrankBackend(optimizer)
    if name == "peft":
        return PeftBackend(optimizer)
    raise ValueError(f"lowrank_ext finetune: --backend must be lowrank_ext or peft, got {name!r}")
