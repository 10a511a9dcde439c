"""BitFit: only biases train, models without biases are told so (or get zero biases when asked), the
documented safetensors file round-trips and refuses mismatches loudly, every error message."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_models import assert_unchanged, logits, snapshot, tiny_gpt2, tiny_llama, tokens
from conftest import require

import lowrank_ext as L

require("safetensors")
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def _bump(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_only_biases_train_on_a_model_with_biases():
    model = L.inject(tiny_gpt2(), L.BitFitConfig())
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == biases and len(trainable) > 10
    ids = tokens()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    assert L.count_parameters(model)[0] == sum(p.numel() for n, p in model.named_parameters() if n in biases)


def test_bias_patterns_select_modules():
    model = L.inject(tiny_gpt2(), L.BitFitConfig(bias_patterns=["c_attn"]))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["transformer.h.0.attn.c_attn.bias", "transformer.h.1.attn.c_attn.bias"]
    regex = L.inject(tiny_gpt2(), L.BitFitConfig(bias_patterns=r".*\.ln_f"))
    assert sorted(n for n, p in regex.named_parameters() if p.requires_grad) == ["transformer.ln_f.bias"]


def test_a_model_without_biases_is_told_so_and_unchanged():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"lowrank_ext::inject: the model must have bias parameters for BitFit, got "
                                         r"none \(e.g. Llama has no biases\); pass BitFitConfig\(add_bias_to='all-linear'\)"):
        L.inject(model, L.BitFitConfig())
    assert_unchanged(before, snapshot(model))


@pytest.mark.parametrize("quantize", [False, True])
def test_zero_biases_when_asked_leave_outputs_unchanged_and_train(quantize):
    model = tiny_llama()
    if quantize:  # an NF4 base (Linear4bit layers) gets biases the same way
        from lowrank_ext.nn import Linear4bit

        for name, m in list(model.named_modules()):
            if name.endswith(("q_proj", "v_proj")):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, Linear4bit.from_linear(m))
    ids = tokens()
    want = logits(model, ids)
    model = L.inject(model, L.BitFitConfig(add_bias_to="all-linear"))
    added = L.get_state(model).configs["default"].added_biases
    assert "lm_head" not in added and len(added) == 14  # 7 linears x 2 layers, not the output head
    torch.testing.assert_close(logits(model, ids), want)
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 14 and all(n.endswith(".bias") and p.grad.abs().sum() > 0 for n, p in trainable)
    listed = L.inject_summary(model)
    assert len(listed.replaced) == 14 and listed.trainable == sum(p.numel() for _, p in trainable)


def test_file_round_trip_with_added_biases(tmp_path):
    model = L.inject(tiny_llama(), L.BitFitConfig(add_bias_to=["q_proj", "down_proj"]))
    _bump(model)
    ids = tokens()
    want = logits(model, ids)
    L.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BITFIT" and cfg["format_version"] == 1
    assert cfg["added_biases"] == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                                   "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(sd) == sorted(f"base_model.model.{n}.bias" for n in cfg["added_biases"])
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    fresh = tiny_llama()
    loaded = L.load_adapter(fresh, tmp_path)
    assert loaded is fresh
    torch.testing.assert_close(logits(loaded, ids), want)
    assert isinstance(L.read_adapter_config(tmp_path), L.BitFitConfig)
    assert "PEFT does not know BitFit" in (tmp_path / "README.md").read_text()


def test_file_of_a_model_with_biases(tmp_path):
    model = L.inject(tiny_gpt2(), L.BitFitConfig())
    _bump(model)
    ids = tokens()
    L.save_adapter(model, tmp_path)
    loaded = L.load_adapter(tiny_gpt2(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids))


@pytest.mark.parametrize("fault, pattern", [
    ("missing", r"must hold every adapter key, got missing key 'base_model.model.model.layers.0.self_attn.q_proj.bias'"),
    ("extra", r"must hold only keys the model has, got unexpected key 'base_model.model.x.bias'"),
    ("shape", r"base_model.model.model.layers.0.self_attn.q_proj.bias must have shape \(64,\), got \(3,\)"),
    ("added", (r"must describe an adapter this model can hold, got: lowrank_ext::load_adapter: added_biases must "
               r"name linear modules without a bias, got 'model.nope' \(no such linear module\)")),
    ("version", r"field 'format_version' must be 1, got 2"),
    ("peft_type", r"field 'peft_type' must be one of 'LORA', 'VERA', 'IA3', 'PROMPT_TUNING', 'BITFIT', got 'BITFIT2'"),
    ("list", r"field 'added_biases' must be a list of module names, got 'q_proj'"),
])
def test_mismatched_files_refuse_and_change_nothing(tmp_path, fault, pattern):
    L.save_adapter(L.inject(tiny_llama(), L.BitFitConfig(add_bias_to=["q_proj"])), tmp_path)
    wpath, cpath = tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"
    sd, cfg = load_file(str(wpath)), json.loads(cpath.read_text())
    key = "base_model.model.model.layers.0.self_attn.q_proj.bias"
    if fault == "missing":
        del sd[key]
    elif fault == "extra":
        sd["base_model.model.x.bias"] = torch.zeros(2)
    elif fault == "shape":
        sd[key] = torch.zeros(3)
    elif fault == "added":
        cfg["added_biases"].append("model.nope")
    elif fault == "version":
        cfg["format_version"] = 2
    elif fault == "peft_type":
        cfg["peft_type"] = "BITFIT2"
    else:
        cfg["added_biases"] = "q_proj"
    save_file(sd, str(wpath), metadata={"format": "pt"})
    cpath.write_text(json.dumps(cfg))
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=pattern):
        L.load_adapter(model, tmp_path)
    assert_unchanged(before, snapshot(model))


def test_errors(tmp_path):
    with pytest.raises(ValueError, match=r"lowrank_ext::BitFitConfig: bias_patterns must be None, a list of str or a "
                                         r"str, got 3"):
        L.BitFitConfig(bias_patterns=3)
    model = tiny_gpt2()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"lowrank_ext::inject: BitFitConfig.bias_patterns must match a module with a "
                                         r"bias, got \['nothing'\]"):
        L.inject(model, L.BitFitConfig(bias_patterns=["nothing"]))
    with pytest.raises(ValueError, match=r"lowrank_ext::inject: BitFitConfig.add_bias_to must match at least one "
                                         r"linear module, got \['nothing'\]"):
        L.inject(model, L.BitFitConfig(add_bias_to=["nothing"]))
    assert_unchanged(before, snapshot(model))
    L.inject(model, L.BitFitConfig())
    with pytest.raises(ValueError, match=r"lowrank_ext::inject: config must be of the method the model's adapters use "
                                         r"\(BitFitConfig\), got IA3Config"):
        L.inject(model, L.IA3Config(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match=r"lowrank_ext::inject: model must have no other adapters for BitFit"):
        L.inject(model, L.BitFitConfig(), "second")
    L.save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match=r"lowrank_ext::load_adapter: quantize must be None for a BITFIT adapter"):
        L.load_adapter(tiny_gpt2(), tmp_path, quantize="nf4")


def test_bitfit_cannot_be_disabled_or_deleted():
    model = L.inject(tiny_gpt2(), L.BitFitConfig())
    with pytest.raises(ValueError, match=r"lowrank_ext::disable_adapters: model must not hold a BitFit adapter"), \
            L.disable_adapters(model):
        pass
    with pytest.raises(ValueError, match=r"lowrank_ext::delete_adapter: name must not be a BitFit adapter"):
        L.delete_adapter(model, "default")


def test_more_errors(tmp_path):
    model = tiny_gpt2()
    with pytest.raises(ValueError, match=r"lowrank_ext::inject: adapter_name must be a non-empty str without '.', "
                                         r"got ''"):
        L.inject(model, L.BitFitConfig(), "")
    L.save_adapter(L.inject(tiny_llama(), L.BitFitConfig(add_bias_to=["q_proj"])), tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    d = json.loads(cfg_path.read_text())
    already = L.inject(tiny_llama(), L.BitFitConfig(add_bias_to=["q_proj"]))  # q_proj has a bias now
    del already.lowrank_ext_state
    before = snapshot(already)
    with pytest.raises(ValueError, match=r"added_biases must name linear modules without a bias, got "
                                         r"'model.layers.0.self_attn.q_proj' \(it already has a bias\)"):
        L.load_adapter(already, tmp_path)
    assert_unchanged(before, snapshot(already))
    d["bias_patterns"] = 5
    cfg_path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"field 'bias_patterns' must be null, a list of module names or a regex "
                                         r"string, got 5"):
        L.load_adapter(tiny_llama(), tmp_path)
