"""merge_adapter on an IA3 model with NF4 bases (issue 19, item 12): merging IA3 into an NF4 weight requantizes it,
which only merge_and_unload(requantize=True) does. merge_adapter used to surface the layer's error naming a
`requantize=` argument merge_adapter does not have, after merging any dense IA3 layers before it."""

from __future__ import annotations

import copy
import inspect
import re

import pytest
import torch
from _tiny_models import assert_unchanged, logits, snapshot, tiny_llama, tokens

import lowrank_ext as L
from lowrank_ext.nn import IA3Linear, Linear4bit, QIA3Linear

MESSAGE = (r"lowrank_ext::merge_adapter: model must have dense IA3 bases to merge in place \(merging into an NF4 "
           r"weight requantizes it: lossy and permanent; use merge_and_unload\(model, requantize=True\) for NF4 "
           r"layers holding NF4\(deq\(W\) \* l\), or merge_and_unload\(model\) for dense layers\), got {n} NF4 IA3 "
           r"layers, e.g. '{first}'")


@torch.no_grad()
def _randomize(model):
    g = torch.Generator().manual_seed(3)
    for n, p in model.named_parameters():
        if "ia3_l" in n:
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


def _mixed_ia3():
    """IA3 on k/v/down_proj of a tiny Llama whose layer-1 v_proj is already an NF4 Linear4bit: dense and NF4 bases."""
    model = tiny_llama()
    v = model.model.layers[1].self_attn.v_proj
    model.model.layers[1].self_attn.v_proj = Linear4bit.from_linear(v)
    L.inject(model, L.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    _randomize(model)
    return model


def test_merge_adapter_refuses_nf4_bases_naming_what_exists_and_changes_nothing():
    model = _mixed_ia3()
    kinds = {type(m) for m in model.modules()}
    assert IA3Linear in kinds and QIA3Linear in kinds
    before = snapshot(model)
    with pytest.raises(ValueError, match=MESSAGE.format(n=1, first="model.layers.1.self_attn.v_proj")) as e:
        L.merge_adapter(model)
    assert_unchanged(before, snapshot(model))  # the dense IA3 layers were not merged either
    assert not any(m.merged_adapters for m in model.modules() if isinstance(m, IA3Linear))
    # every call the message suggests exists with the arguments it names; merge_adapter's own are not misnamed
    for call in re.findall(r"(\w+)\(model(?:, (\w+)=\w+)?\)", str(e.value)):
        fn, arg = call
        assert hasattr(L, fn) and (not arg or arg in inspect.signature(getattr(L, fn)).parameters)
    assert "requantize" not in inspect.signature(L.merge_adapter).parameters


def test_the_suggested_merges_do_what_the_message_says():
    model = L.inject(tiny_llama(), L.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                               feedforward_modules=["down_proj"], quantize="nf4"))
    _randomize(model)
    ids = tokens()
    want = logits(model, ids)
    with pytest.raises(ValueError, match=MESSAGE.format(n=6, first="model.layers.0.self_attn.k_proj")):
        L.merge_adapter(model)
    layer = model.model.layers[0].self_attn.k_proj
    # reference: NF4(deq(W) ⊙ l) for output scaling (l [out, 1] scales rows)
    ref_w = L.quantize_nf4(layer.weight.dequantize(torch.float32) * layer.ia3_l["default"].detach()).dequantize()
    q = L.merge_and_unload(copy.deepcopy(model), requantize=True)
    merged = q.model.layers[0].self_attn.k_proj
    assert isinstance(merged, Linear4bit) and torch.equal(merged.weight.dequantize(), ref_w)
    assert (logits(q, ids) - want).abs().max() < 0.5  # requantized: close, not equal
    dense = L.merge_and_unload(copy.deepcopy(model))
    assert isinstance(dense.model.layers[0].self_attn.k_proj, torch.nn.Linear)
    torch.testing.assert_close(logits(dense, ids), want, rtol=1e-4, atol=1e-4)
