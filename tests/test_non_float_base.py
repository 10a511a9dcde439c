"""A base tensor an adapter is built on must be floating point (issue 19, item 12): an integer target weight
(a model quantized by another tool, a corrupt checkpoint) or an integer bias BitFit would train is refused with
one ValueError before the model changes — it used to be cast silently in forward and truncated by a merge
(LoRA, DoRA, VeRA, IA3), a TypeError from the quantizer (NF4), or torch's RuntimeError half-way (BitFit)."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import assert_unchanged, snapshot, tiny_gpt2, tiny_llama
from conftest import require

import lowrank_ext as L
from lowrank_ext.nn import Linear4bit, LoRALinear, QLoRALinear

require("transformers")

LLAMA_TARGETS = ["q_proj", "v_proj"]
CONFIGS = {
    "lora": L.LoRAConfig(r=2, target_modules=LLAMA_TARGETS),
    "dora": L.LoRAConfig(r=2, target_modules=LLAMA_TARGETS, use_dora=True),
    "vera": L.LoRAConfig(r=2, target_modules=LLAMA_TARGETS, variant="vera"),
    "qlora": L.LoRAConfig(r=2, target_modules=LLAMA_TARGETS, quantize="nf4"),
    "ia3": L.IA3Config(target_modules=LLAMA_TARGETS, feedforward_modules=[]),
    "ia3-nf4": L.IA3Config(target_modules=LLAMA_TARGETS, feedforward_modules=[], quantize="nf4"),
}


def _with_int(model: torch.nn.Module, name: str, attr: str = "weight") -> torch.nn.Module:
    m = model.get_submodule(name)
    setattr(m, attr, torch.nn.Parameter((getattr(m, attr) * 100).to(torch.int8), requires_grad=False))
    return model


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_inject_refuses_an_integer_target_weight_and_changes_nothing(kind):
    # the last target: every other target is swapped in first, so the refusal must undo them
    model = _with_int(tiny_llama(), "model.layers.1.self_attn.v_proj")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"lowrank_ext::from_linear: linear.weight must be a floating-point tensor, "
                                         r"got torch.int8 \[32, 64\]"):
        L.inject(model, CONFIGS[kind])
    assert_unchanged(before, snapshot(model))


def test_bitfit_refuses_an_integer_bias_and_changes_nothing():
    model = _with_int(tiny_gpt2(), "transformer.h.1.mlp.c_proj", "bias")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"lowrank_ext::inject: transformer.h.1.mlp.c_proj.bias \(a bias BitFit "
                                         r"trains\) must be a floating-point tensor, got torch.int8 \[64\]"):
        L.inject(model, L.BitFitConfig())
    assert_unchanged(before, snapshot(model))
    L.inject(model, L.BitFitConfig(bias_patterns=["c_attn"]))  # an integer bias it does not train is no concern


@pytest.mark.parametrize(("layer", "attr"), [(LoRALinear, "weight"), (LoRALinear, "bias"), (QLoRALinear, "weight"),
                                             (QLoRALinear, "bias"), (Linear4bit, "weight")])
def test_from_linear_refuses_integer_tensors(layer, attr):
    lin = torch.nn.Linear(64, 16)
    setattr(lin, attr, torch.nn.Parameter(getattr(lin, attr).to(torch.int32), requires_grad=False))
    with pytest.raises(ValueError, match=rf"lowrank_ext::from_linear: linear.{attr} must be a floating-point "
                                         rf"tensor, got torch.int32"):
        layer.from_linear(lin)


def test_conv1d_and_float64_targets_still_load():
    """The rule is floating point, not a dtype list: a dense float64 base and GPT-2's Conv1D keep working."""
    model = tiny_gpt2().double()
    L.inject(model, L.LoRAConfig(r=2, target_modules=["c_attn"]))
    assert model(input_ids=torch.zeros(1, 3, dtype=torch.long)).logits.dtype == torch.float64
