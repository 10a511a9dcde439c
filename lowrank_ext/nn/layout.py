"""The one rule for how a linear-like module stores its weight.

torch's nn.Linear stores W as [out, in] (y = x·Wᵀ + b). transformers' Conv1D (GPT-2, GPT-J's old layout ...)
stores the same W transposed, as [in, out] (y = x·W + b). PEFT calls the transposed layout `fan_in_fan_out`
and, like us, decides it from the module class: a Conv1D is always transposed, an nn.Linear never is (PEFT
warns and resets a `fan_in_fan_out=True` given for an nn.Linear), and any other layer follows the flag.

Every place that reads a base layer's weight (the injector, IA3, load_pretrained, distributed.materialize)
asks these functions, so the rule cannot drift between them.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["base_transposed", "check_floating", "is_conv1d", "linear_in_out", "linear_weight", "record_base_layout",
           "weight_is_transposed"]


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' Conv1D (and subclasses), found without importing transformers."""
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers")
               for c in type(module).__mro__)


def weight_is_transposed(module: nn.Module, fan_in_fan_out: bool | None = None) -> bool:
    """Whether `module.weight` is stored [in, out]: Conv1D always, nn.Linear never, else `fan_in_fan_out`."""
    if is_conv1d(module):
        return True
    if isinstance(module, nn.Linear):
        return False
    return bool(fan_in_fan_out)


def linear_in_out(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module (a Conv1D's weight is [in, out])."""
    if is_conv1d(module):
        i, o = module.weight.shape
        return int(i), int(o)
    return module.in_features, module.out_features


def linear_weight(module: nn.Module, fan_in_fan_out: bool | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in], bias) of an nn.Linear or a transformers Conv1D (whose [in, out] weight is transposed)."""
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        raise TypeError(f"lowrank_ext::from_linear: linear must be an nn.Linear or Conv1D, got {type(module).__name__}")
    check_floating("from_linear", "linear.weight", module.weight)
    if module.bias is not None:
        check_floating("from_linear", "linear.bias", module.bias)
    w = module.weight.detach()
    if weight_is_transposed(module, fan_in_fan_out):
        w = w.t().contiguous()
    return w, (None if module.bias is None else module.bias.detach())


def check_floating(op: str, arg: str, t: torch.Tensor) -> None:
    """A base tensor an adapter is built on (a target's weight / bias, a bias BitFit trains) must be floating point:
    an integer one (a model quantized by another tool, a corrupt checkpoint) would be cast silently in forward and
    truncated by a merge, or fail half-way in torch (`requires_grad` on an int tensor). ValueError, before anything
    changes."""
    if not t.is_floating_point():
        raise ValueError(f"lowrank_ext::{op}: {arg} must be a floating-point tensor, got {t.dtype} {list(t.shape)}")


def record_base_layout(layer: nn.Module, base: nn.Module, fan_in_fan_out: bool | None = None) -> nn.Module:
    """Remember on an adapter layer built from `base` whether the base model stores this weight [in, out].

    The layer itself always holds W as [out, in]; the checkpoint it came from (GPT-2's `attn.c_proj.weight`)
    does not. Whatever later reads that checkpoint for the layer (distributed.materialize, filling a layer
    built on the meta device) must transpose exactly when this says so."""
    layer.base_transposed = weight_is_transposed(base, fan_in_fan_out)
    return layer


def base_transposed(layer: nn.Module) -> bool:
    """True when `layer`'s weight is stored [in, out] in the base model's checkpoint (record_base_layout)."""
    return bool(getattr(layer, "base_transposed", False))
