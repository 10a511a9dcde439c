"""bitsandbytes / Hugging Face 4-bit import: reuse the NF4 bytes as they are (never requantize).

    nf4_from_bnb_linear(m)        a bitsandbytes Linear4bit -> (NF4Weight, bias)
    from_bnb(model)               every bitsandbytes nf4 Linear4bit in `model` -> lowrank_ext.nn.Linear4bit
    linear4bit_from_state_dict    a state dict in bitsandbytes' / HF's 4-bit key layout -> Linear4bit
`inject(model, config)` on the result (or directly on a bitsandbytes model) gives QLoRA layers over the
same NF4 weights, so outputs match bitsandbytes' up to its own dequantize-then-matmul rounding.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lowrank_ext.nf4 import NF4Weight
from lowrank_ext.nn import Linear4bit

__all__ = ["from_bnb", "is_bnb_4bit", "linear4bit_from_state_dict", "nf4_from_bnb_linear"]


def is_bnb_4bit(m: nn.Module) -> bool:
    """True for a bitsandbytes Linear4bit (checked by name: bitsandbytes itself is never imported here)."""
    return type(m).__name__ == "Linear4bit" and type(m).__module__.startswith("bitsandbytes")


def nf4_from_bnb_linear(m: nn.Module) -> tuple[NF4Weight, torch.Tensor | None]:
    """(NF4Weight, bias) of a bitsandbytes Linear4bit, read through its own state dict (bnb's key layout)."""
    if not is_bnb_4bit(m):
        raise TypeError(f"lowrank_ext::nf4_from_bnb_linear: m must be a bitsandbytes Linear4bit, got {type(m).__name__}")
    qs = getattr(m.weight, "quant_state", None)
    if qs is None:
        raise ValueError("lowrank_ext::nf4_from_bnb_linear: m.weight must be quantized (move the layer to its device "
                         "or load a 4-bit checkpoint first), got a weight without quant_state")
    if qs.quant_type != "nf4":
        raise ValueError(f"lowrank_ext::nf4_from_bnb_linear: quant_type must be 'nf4', got {qs.quant_type!r}")
    sd = m.state_dict()
    w = NF4Weight.from_bnb_state_dict(sd)
    bias = sd.get("bias")
    return w, (None if bias is None else bias.detach())


def linear4bit_from_state_dict(sd: Mapping[str, torch.Tensor], prefix: str = "") -> Linear4bit:
    """A Linear4bit from `prefix`weight, `prefix`weight.absmax, ... (and `prefix`bias if present)."""
    w = NF4Weight.from_bnb_state_dict(sd, prefix)
    return Linear4bit(w, sd.get(prefix + "bias"))


def from_bnb(model: nn.Module) -> nn.Module:
    """Replace every bitsandbytes nf4 Linear4bit in `model` by lowrank_ext.nn.Linear4bit (same bytes); in place.

    All or nothing: every layer is read and validated (NF4Weight.from_bnb_state_dict) before any is replaced."""
    found = [(n, m) for n, m in model.named_modules() if is_bnb_4bit(m)]
    if not found:
        raise ValueError("lowrank_ext::from_bnb: model must contain bitsandbytes Linear4bit layers, got none")
    new = [(name, Linear4bit(*nf4_from_bnb_linear(m))) for name, m in found]
    for name, layer in new:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    return model
