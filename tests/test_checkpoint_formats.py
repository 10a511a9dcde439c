"""Injected NF4 models through the checkpoint formats users save them with (issue 19, item 4).

safetensors, transformers' `save_pretrained` (and so `Trainer` checkpoints) and accelerate's `save_state` refuse
or drop tensors that share storage, so no two keys of an injected model's state dict may share it. Each format
is checked by a round trip into a fresh injected model built from a different random base: every tensor and
the logits must come back identical."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import tiny_llama, tokens
from conftest import require

import lowrank_ext as L

require("transformers")
require("accelerate")
require("safetensors")
from safetensors.torch import load_file, load_model, save_model

CONFIGS = {
    "lora-nf4": lambda: L.LoRAConfig(r=4, target_modules="all-linear", quantize="nf4"),
    "lora-nf4-no-dq": lambda: L.LoRAConfig(r=4, target_modules=["q_proj", "down_proj"], quantize="nf4",
                                           double_quant=False),
    "dora-nf4": lambda: L.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], quantize="nf4", use_dora=True),
    "vera-nf4": lambda: L.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], quantize="nf4", variant="vera"),
    "lora-nf4-modules-to-save": lambda: L.LoRAConfig(r=4, target_modules=["q_proj"], quantize="nf4",
                                                     modules_to_save=["lm_head"]),
    "ia3-nf4": lambda: L.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                   quantize="nf4"),
}


def shared_storage(sd: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """Pairs of state-dict keys whose tensors share storage (what safetensors refuses)."""
    first: dict[int, str] = {}
    pairs = []
    for k, v in sd.items():
        if v.numel() == 0:
            continue
        ptr = v.untyped_storage().data_ptr()
        if ptr in first:
            pairs.append((first[ptr], k))
        else:
            first[ptr] = k
    return pairs


def _injected(kind: str, seed: int) -> torch.nn.Module:
    """An NF4 tiny Llama with `kind`'s adapter; seed sets the base weights and the adapter's (non-default) values."""
    model = L.inject(tiny_llama(seed), CONFIGS[kind]())
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _assert_same(model: torch.nn.Module, other: torch.nn.Module) -> None:
    a, b = model.state_dict(), other.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, other(input_ids=ids).logits)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_state_dict_has_no_shared_storage(kind):
    model = _injected(kind, 0)
    sd = model.state_dict()
    assert any(k.endswith("weight.quant_map") for k in sd)
    assert shared_storage(sd) == []
    # nor is any layer's tensor the package's codebook constant (writing into one would change every layer)
    from lowrank_ext._reference.nf4 import NF4_CODEBOOK

    assert all(v.untyped_storage().data_ptr() != NF4_CODEBOOK.untyped_storage().data_ptr() for v in sd.values())


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_safetensors_save_model_round_trip(kind, tmp_path):
    model, fresh = _injected(kind, 0), _injected(kind, 1)
    save_model(model, str(tmp_path / "m.safetensors"))
    missing, unexpected = load_model(fresh, str(tmp_path / "m.safetensors"))
    assert not missing and not unexpected
    _assert_same(model, fresh)


@pytest.mark.parametrize("kind", ["lora-nf4", "ia3-nf4"])
def test_transformers_save_pretrained_round_trip(kind, tmp_path):
    model, fresh = _injected(kind, 0), _injected(kind, 1)
    model.save_pretrained(str(tmp_path))
    sd = load_file(str(tmp_path / "model.safetensors"))
    assert set(sd) == set(model.state_dict())
    fresh.load_state_dict(sd)
    _assert_same(model, fresh)


@pytest.mark.parametrize("kind", ["lora-nf4", "ia3-nf4"])
def test_accelerate_save_state_load_state_round_trip(kind, tmp_path):
    from accelerate import Accelerator

    def prepared(seed):
        model = _injected(kind, seed)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        acc = Accelerator(cpu=True)
        model, opt = acc.prepare(model, opt)
        return acc, model, opt

    acc, model, opt = prepared(0)
    model(input_ids=tokens(), labels=tokens()).loss.backward()  # one step: optimizer state to save too
    opt.step()
    opt.zero_grad()
    acc.save_state(str(tmp_path / "ckpt"))

    acc2, fresh, opt2 = prepared(1)
    acc2.load_state(str(tmp_path / "ckpt"))
    _assert_same(model, fresh)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert sorted(s1) == sorted(s2)
    for i in s1:
        for k in s1[i]:
            assert torch.equal(s1[i][k], s2[i][k]), (i, k)


def test_dora_nf4_norms_follow_a_loaded_base():
    """DoRA on NF4 caches ||deq(W)||² per row; loading another base weight must not leave the old norms in use
    (they made the logits of a reloaded DoRA model differ, with every tensor equal)."""
    model, fresh = _injected("dora-nf4", 0), _injected("dora-nf4", 1)
    ids = tokens()
    with torch.no_grad():
        fresh(input_ids=ids)  # computes (and caches) the norms of fresh's own base
    fresh.load_state_dict(model.state_dict())
    _assert_same(model, fresh)
