"""save_adapter / load_adapter: PEFT's adapter directory format, both ways (docs/format.md, "Adapter files").

    directory/adapter_model.safetensors   metadata {"format": "pt"}, keys (adapter name stripped):
        base_model.model.<module>.lora_A.weight [r, in]    base_model.model.<module>.lora_B.weight [out, r]
        base_model.model.<module>.lora_magnitude_vector [out]                      (DoRA)
        base_model.model.<module>.vera_lambda_d [r], ...vera_lambda_b [out], base_model.vera_A, base_model.vera_B
        base_model.model.<module>.<param>                                         (modules_to_save copies)
        base_model.model.<module>.base_layer.bias / base_model.model.<module>.bias  (bias="all" / "lora_only")
    directory/adapter_config.json         LoRAConfig.to_peft_dict()

Loading is strict where PEFT only warns: a missing key, an unexpected key or a shape mismatch is a
ValueError naming the key. safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from lowrank_ext.adapters.config import LoRAConfig
from lowrank_ext.adapters.injector import inject
from lowrank_ext.adapters.state import ModulesToSave, get_state
from lowrank_ext.nn import ADAPTER_LAYERS

__all__ = ["adapter_state_dict", "load_adapter", "save_adapter"]

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The live tensors of adapter `adapter_name`, under PEFT's file keys."""
    state = get_state(model)
    if state is None or adapter_name not in state.configs:
        have = [] if state is None else sorted(state.configs)
        raise ValueError(f"lowrank_ext::save_adapter: adapter_name must be one of the model's adapters {have}, "
                         f"got {adapter_name!r}")
    cfg = state.configs[adapter_name]
    out: dict[str, torch.Tensor] = {}
    for mod, m in model.named_modules():
        if isinstance(m, ADAPTER_LAYERS) and adapter_name in m.specs:
            p = PREFIX + mod + "."
            if cfg.variant == "vera":
                out[p + "vera_lambda_d"] = m.vera_lambda_d[adapter_name]
                out[p + "vera_lambda_b"] = m.vera_lambda_b[adapter_name]
            else:
                out[p + "lora_A.weight"] = m.lora_A[adapter_name]
                out[p + "lora_B.weight"] = m.lora_B[adapter_name]
                if cfg.variant == "dora":
                    out[p + "lora_magnitude_vector"] = m.lora_magnitude_vector[adapter_name]
            if cfg.bias != "none" and m.bias is not None:
                out[p + "base_layer.bias"] = m.bias
        elif isinstance(m, ModulesToSave) and adapter_name in m.modules_to_save:
            for pname, t in m.modules_to_save[adapter_name].named_parameters():
                out[PREFIX + mod + "." + pname] = t
    if cfg.bias == "all":
        skip = [n for n, m in model.named_modules() if isinstance(m, (*ADAPTER_LAYERS, ModulesToSave))]
        for pname, t in model.named_parameters():
            if pname.endswith("bias") and not any(pname.startswith(s + ".") for s in skip):
                out[PREFIX + pname] = t
    if cfg.variant == "vera":
        a, b = state.vera_shared[adapter_name]
        out["base_model.vera_A"], out["base_model.vera_B"] = a, b
    return out


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 overwrite: bool = False, base_model_name_or_path: str | None = None) -> None:
    """Write adapter `adapter_name` as a PEFT adapter directory (loadable by peft.PeftModel.from_pretrained)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model, adapter_name).items()}
    path = os.path.join(directory, WEIGHTS)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"lowrank_ext::save_adapter: directory must not already hold an adapter "
                              f"(pass overwrite=True to replace it), got {path!r}")
    os.makedirs(directory, exist_ok=True)
    cfg = get_state(model).configs[adapter_name]
    save_file(tensors, path, metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(cfg.to_peft_dict(base_model_name_or_path), f, indent=2, sort_keys=True)


def read_adapter_config(directory: str | os.PathLike, **overrides) -> LoRAConfig:
    path = os.path.join(directory, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lowrank_ext::load_adapter: directory must contain {CONFIG}, got {str(directory)!r}")
    with open(path) as f:
        return LoRAConfig.from_peft_dict(json.load(f), **overrides)


@torch.no_grad()
def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 quantize: str | None = None) -> nn.Module:
    """Load a PEFT (or save_adapter) LoRA / DoRA / VeRA adapter directory into `model` as `adapter_name`.

    If the model does not have that adapter yet it is injected from the file's config (with `quantize`:
    None keeps dense bases, "nf4" quantizes them). Every key must match exactly; see the module docstring.
    """
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lowrank_ext::load_adapter: directory must contain {WEIGHTS} (safetensors only), "
                                f"got {str(directory)!r}")
    file = load_file(path)
    state = get_state(model)
    if state is None or adapter_name not in state.configs:
        inject(model, read_adapter_config(directory, quantize=quantize), adapter_name)
    live = adapter_state_dict(model, adapter_name)
    missing = sorted(set(live) - set(file))
    unexpected = sorted(set(file) - set(live))
    if missing:
        raise ValueError(f"lowrank_ext::load_adapter: the file must hold every adapter key, got missing key "
                         f"{missing[0]!r} ({len(missing)} missing)")
    if unexpected:
        raise ValueError(f"lowrank_ext::load_adapter: the file must hold only keys the model has, got unexpected key "
                         f"{unexpected[0]!r} ({len(unexpected)} unexpected)")
    for key, t in live.items():
        if tuple(file[key].shape) != tuple(t.shape):
            raise ValueError(f"lowrank_ext::load_adapter: {key} must have shape {tuple(t.shape)}, "
                             f"got {tuple(file[key].shape)}")
    for key, t in live.items():
        if key in ("base_model.vera_A", "base_model.vera_B"):
            continue
        t.copy_(file[key])
    if "base_model.vera_A" in live:
        a, b = file["base_model.vera_A"], file["base_model.vera_B"]
        get_state(model).vera_shared[adapter_name] = (a, b)
        for _, m in model.named_modules():
            if isinstance(m, ADAPTER_LAYERS) and adapter_name in m.specs:
                getattr(m, f"vera_A_{adapter_name}").copy_(a[: m.specs[adapter_name].r, : m.in_features])
                getattr(m, f"vera_B_{adapter_name}").copy_(b[: m.out_features, : m.specs[adapter_name].r])
    return model
