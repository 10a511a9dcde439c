"""The one Conv1D / weight-layout rule (lowrank_ext/nn/layout.py), held to transformers' Conv1D and PEFT's
fan_in_fan_out handling."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lowrank_ext as L
from lowrank_ext.nn.layout import (
    base_transposed,
    is_conv1d,
    linear_in_out,
    linear_weight,
    record_base_layout,
    weight_is_transposed,
)

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


class Conv1DSubclass(Conv1D):
    pass


class Conv1DLookalike(nn.Module):
    """Named Conv1D, not transformers': not a transposed layer (the rule goes by the class, not its name)."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))


Conv1DLookalike.__name__ = "Conv1D"


@pytest.mark.parametrize("cls", [Conv1D, Conv1DSubclass])
def test_transformers_conv1d_is_transposed(cls):
    torch.manual_seed(0)
    conv = cls(5, 3)  # nf=5 outputs, nx=3 inputs: weight [3, 5] = [in, out]
    nn.init.normal_(conv.bias)
    assert is_conv1d(conv) and weight_is_transposed(conv) and weight_is_transposed(conv, fan_in_fan_out=False)
    assert linear_in_out(conv) == (3, 5)
    w, b = linear_weight(conv)
    x = torch.randn(4, 3)
    torch.testing.assert_close(x @ w.t() + b, conv(x), rtol=0, atol=1e-6)  # [out, in], the nn.Linear layout


def test_a_class_only_named_conv1d_is_not_one():
    m = Conv1DLookalike(3, 5)
    assert type(m).__name__ == "Conv1D" and not is_conv1d(m)
    assert not weight_is_transposed(m) and weight_is_transposed(m, fan_in_fan_out=True)  # follows the flag
    with pytest.raises(TypeError, match="lowrank_ext::from_linear: linear must be an nn.Linear or Conv1D, got Conv1D"):
        linear_weight(m)


def test_nn_linear_with_fan_in_fan_out_is_not_transposed_as_in_peft():
    """PEFT warns and resets fan_in_fan_out=True for an nn.Linear (and sets it for a Conv1D); so does the rule."""
    peft = pytest.importorskip("peft")
    lin = nn.Linear(3, 5)
    net = nn.Sequential(lin)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        pm = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["0"], fan_in_fan_out=True), net)
    assert pm[0].fan_in_fan_out is False
    assert weight_is_transposed(lin, fan_in_fan_out=True) is False
    w, _ = linear_weight(lin, fan_in_fan_out=True)
    assert torch.equal(w, lin.weight)
    gpt2 = nn.Sequential(Conv1D(5, 3))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        pm = peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["0"], fan_in_fan_out=False), gpt2)
    assert pm[0].fan_in_fan_out is True and weight_is_transposed(Conv1D(5, 3), fan_in_fan_out=False)
    # our injector: the same output as the nn.Linear itself, the flag ignored
    ours = L.inject(nn.Sequential(nn.Linear(3, 5)), L.LoRAConfig(target_modules=["0"], fan_in_fan_out=True))
    assert ours[0].base_transposed is False


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_injected_layers_record_the_base_layout(quantize):
    """The adapter layer's weight is [out, in]; whether the base checkpoint stored it [in, out] is remembered
    (distributed.materialize needs it on a layer built on the meta device)."""
    from _tiny_models import tiny_gpt2, tiny_llama

    g = L.inject(tiny_gpt2(0), L.LoRAConfig(target_modules=["c_attn", "c_proj"], quantize=quantize))
    assert all(base_transposed(m) for _, m in L.adapters.state.adapter_layers(g))
    lm = L.inject(tiny_llama(0), L.LoRAConfig(target_modules=["q_proj"], quantize=quantize))
    assert not any(base_transposed(m) for _, m in L.adapters.state.adapter_layers(lm))
    ia3 = L.inject(tiny_gpt2(0), L.IA3Config(target_modules=["c_fc"], quantize=quantize))
    assert base_transposed(ia3.transformer.h[0].mlp.c_fc)
    assert L.nn.LoRALinear.from_linear(Conv1D(5, 3), r=2).base_transposed
    assert not L.nn.QLoRALinear.from_linear(nn.Linear(64, 8), r=2).base_transposed
    assert record_base_layout(nn.Identity(), Conv1D(5, 3)).base_transposed is True
