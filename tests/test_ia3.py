"""(IA)³: outputs equal to PEFT's for the same vectors (dense; NF4 against a dequantized-weight reference),
files both ways with PEFT, gradients only to ia3_l, merging, and every error message."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from _tiny_models import assert_unchanged, logits, pair, snapshot, tiny_gpt2, tiny_llama, tokens
from conftest import require

import lowrank_ext as L
from lowrank_ext.nn import IA3Linear, Linear4bit, QIA3Linear

peft = require("peft", "0.21.2")
require("safetensors")
from safetensors.torch import load_file, save_file

FF_KEY = "base_model.model.model.layers.0.mlp.down_proj.ia3_l"
KV_KEY = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"


@torch.no_grad()
def _randomize(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "ia3_l" in n:
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


def _peft_ia3(model, **kw):
    return peft.get_peft_model(model, peft.IA3Config(task_type="CAUSAL_LM", **kw))


@torch.no_grad()
def _copy_from_peft(pm, ours):
    mine = dict(ours.named_parameters())
    n = 0
    for name, p in pm.named_parameters():
        if ".ia3_l.default" in name:
            mine[name.removeprefix("base_model.model.")].copy_(p)
            n += 1
    return n


def _dequantized_base(model):
    """A copy of the dense model whose target weights are deq(NF4(W)): the reference for an NF4 base."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for n, m in ref.named_modules():
            if n.endswith(("k_proj", "v_proj", "down_proj")):
                m.weight.copy_(L.quantize_nf4(m.weight).dequantize(torch.float32))
    return ref


# ---- outputs equal PEFT's -------------------------------------------------------------------------------------
def test_defaults_are_peft_defaults_and_outputs_match_peft():
    ours, base = pair("llama")
    pm = _peft_ia3(base)
    _randomize(pm)
    L.inject(ours, L.IA3Config())
    assert _copy_from_peft(pm, ours) == 6
    kinds = {n: (type(m).__name__, m.is_feedforward) for n, m in ours.named_modules() if isinstance(m, IA3Linear)}
    assert kinds["model.layers.0.mlp.down_proj"] == ("IA3Linear", True)
    assert kinds["model.layers.0.self_attn.k_proj"] == ("IA3Linear", False)
    assert len(kinds) == 6
    ids = tokens()
    torch.testing.assert_close(logits(ours, ids), logits(pm, ids), rtol=1e-5, atol=1e-5)
    assert L.count_parameters(ours) == tuple(pm.get_nb_trainable_parameters())


def test_bias_is_scaled_with_the_output_as_peft_does():
    """GPT-2's c_attn has a bias: PEFT scales (x Wᵀ + b) by l for output scaling; the feed-forward mlp.c_proj
    scales its input and leaves the bias alone."""
    ours, base = tiny_gpt2(), tiny_gpt2()
    pm = _peft_ia3(base)
    _randomize(pm)
    L.inject(ours, L.IA3Config())
    _copy_from_peft(pm, ours)
    ids = tokens()
    torch.testing.assert_close(logits(ours, ids), logits(pm, ids), rtol=1e-5, atol=1e-5)
    layer = ours.transformer.h[0].attn.c_attn
    x = torch.randn(3, layer.in_features)
    want = (x @ layer.weight.T + layer.bias) * layer.ia3_l["default"].flatten()
    torch.testing.assert_close(layer(x), want)


def test_explicit_targets_and_layer_math():
    w, b = torch.randn(6, 5), torch.randn(6)
    out_layer, in_layer = IA3Linear(w, b), IA3Linear(w, b, is_feedforward=True)
    for layer in (out_layer, in_layer):
        layer.add_adapter("a")
        layer.set_adapter("a")
    assert out_layer.ia3_l["a"].shape == (6, 1) and in_layer.ia3_l["a"].shape == (1, 5)
    x = torch.randn(4, 5)
    torch.testing.assert_close(out_layer(x), x @ w.T + b)  # init: identity
    with torch.no_grad():
        out_layer.ia3_l["a"].uniform_(0.5, 1.5)
        in_layer.ia3_l["a"].uniform_(0.5, 1.5)
    torch.testing.assert_close(out_layer(x), (x @ w.T + b) * out_layer.ia3_l["a"].flatten())
    torch.testing.assert_close(in_layer(x), (x * in_layer.ia3_l["a"].flatten()) @ w.T + b)


def test_several_active_adapters_multiply_as_in_peft():
    ours, base = pair("llama")
    pm = _peft_ia3(base)
    pm.add_adapter("other", peft.IA3Config(task_type="CAUSAL_LM"))
    _randomize(pm, seed=4)
    pm.base_model.set_adapter(["default", "other"])
    L.inject(ours, L.IA3Config())
    L.inject(ours, L.IA3Config(), "other")
    L.set_adapter(ours, ["default", "other"])
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".ia3_l." in name:
                mine[name.removeprefix("base_model.model.")].copy_(p)
    ids = tokens()
    torch.testing.assert_close(logits(ours, ids), logits(pm, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_base_matches_peft_on_the_dequantized_weights(dtype):
    """On NF4 the base is nf4_linear: same as PEFT's IA3 on a dense model holding deq(NF4(W))."""
    base = tiny_llama()
    ref = _dequantized_base(base)
    pm = _peft_ia3(ref)
    _randomize(pm)
    ours = L.inject(copy.deepcopy(base), L.IA3Config(quantize="nf4"))
    assert {type(m) for m in ours.modules() if isinstance(m, (IA3Linear, QIA3Linear))} == {QIA3Linear}
    _copy_from_peft(pm, ours)
    ids = tokens()
    if dtype == torch.bfloat16:
        ours, pm = ours.to(dtype), pm.to(dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 4e-2, "atol": 4e-2}
    torch.testing.assert_close(logits(ours, ids).float(), logits(pm, ids).float(), **tol)


def test_nf4_forward_runs_the_fused_op_and_no_dense_weight():
    layer = QIA3Linear(L.quantize_nf4(torch.randn(64, 96)), torch.randn(64))
    layer.add_adapter("default")
    layer.set_adapter("default")
    x = torch.randn(5, 96, requires_grad=True)
    big = []

    def pack(t):
        if t.is_floating_point() and t.numel() >= 64 * 96:
            big.append(tuple(t.shape))
        return t

    with torch.profiler.profile() as prof, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    names = {e.name for e in prof.events()}
    assert "lowrank_ext::nf4_linear" in names
    assert "lowrank_ext::nf4_linear_grad_input" in names
    assert big == []  # nothing of N·K float elements saved for backward


def test_elementwise_scaling_is_cheap_next_to_the_nf4_op():
    """The IA3 scaling on an NF4 base is one elementwise multiply after nf4_linear: measured here against the
    op itself at a SmolLM2 k_proj shape (576 -> 192) and M = 512 rows (a 4 x 128 training batch). The median
    multiply must cost well under the op (it is O(M·N) next to O(M·N·K)); on the shared 2-core machine we saw
    about 1-3% (printed with -s)."""
    torch.manual_seed(0)
    w = L.quantize_nf4(torch.randn(192, 576))
    x = torch.randn(512, 576)
    vec = torch.rand(192) + 0.5
    y = L.ops.nf4_linear(x, w)

    def median(fn, n=15):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[n // 2]

    t_op = median(lambda: L.ops.nf4_linear(x, w))
    t_mul = median(lambda: y * vec)
    print(f"nf4_linear {t_op * 1e3:.3f} ms, scaling multiply {t_mul * 1e3:.3f} ms ({100 * t_mul / t_op:.1f}%)")
    assert t_mul < 0.25 * t_op


# ---- gradients ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_gradients_reach_only_ia3_vectors(quantize):
    model = L.inject(tiny_llama(), L.IA3Config(quantize=quantize))
    _randomize(model)
    ids = tokens()
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".ia3_l.default") for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_gradcheck_float64():
    w = torch.randn(6, 5, dtype=torch.float64)
    for ff in (False, True):
        layer = IA3Linear(w, torch.randn(6, dtype=torch.float64), is_feedforward=ff)
        layer.add_adapter("a", dtype=torch.float64)
        layer.set_adapter("a")
        x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
        v = (1 + 0.3 * torch.randn(layer.vector_shape(), dtype=torch.float64)).requires_grad_()
        def f(v, x, layer=layer):
            return torch.func.functional_call(layer, {"ia3_l.a": v}, (x,))

        assert torch.autograd.gradcheck(f, (v, x))


# ---- merge ----------------------------------------------------------------------------------------------------
def test_merge_and_unload_dense_equals_peft_merge():
    ours, base = pair("gpt2")
    pm = _peft_ia3(base)
    _randomize(pm)
    L.inject(ours, L.IA3Config())
    _copy_from_peft(pm, ours)
    ids = tokens()
    want = logits(pm, ids)
    merged = L.merge_and_unload(ours)
    assert not any(isinstance(m, IA3Linear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(pm.merge_and_unload(), ids), want, rtol=1e-5, atol=1e-5)


def test_layer_merge_unmerge_dense():
    layer = IA3Linear(torch.randn(6, 5), torch.randn(6))
    layer.add_adapter("a")
    layer.set_adapter("a")
    with torch.no_grad():
        layer.ia3_l["a"].uniform_(0.5, 1.5)
    x = torch.randn(4, 5)
    y = layer(x)
    w0 = layer.weight.clone()
    layer.merge()
    assert layer.merged_adapters == ["a"]
    torch.testing.assert_close(layer(x), y)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), y)


def test_nf4_merge_requantizes_only_when_asked():
    dense = torch.randn(64, 96)
    layer = QIA3Linear(L.quantize_nf4(dense), torch.randn(64))
    layer.add_adapter("a")
    layer.set_adapter("a")
    with torch.no_grad():
        layer.ia3_l["a"].uniform_(0.5, 1.5)
    with pytest.raises(ValueError, match=r"lowrank_ext::QIA3Linear.merge: requantize must be True to merge IA3 into "
                                         r"an NF4 weight .*got False"):
        layer.merge()
    x = torch.randn(4, 96)
    y = layer(x)
    want_w = L.quantize_nf4(layer.weight.dequantize(torch.float32) * layer.ia3_l["a"].detach()).dequantize()
    layer.merge(requantize=True)
    assert "a" not in layer.ia3_l
    torch.testing.assert_close(layer.weight.dequantize(), want_w)
    assert (layer(x) - y).abs().max() < 0.15 * y.abs().max()  # requantized: close, not equal


def test_merge_and_unload_nf4_dense_default_and_requantize():
    model = L.inject(tiny_llama(), L.IA3Config(quantize="nf4"))
    _randomize(model)
    ids = tokens()
    want = logits(model, ids)
    dense = L.merge_and_unload(copy.deepcopy(model))
    assert isinstance(dense.model.layers[0].mlp.down_proj, torch.nn.Linear)
    torch.testing.assert_close(logits(dense, ids), want, rtol=1e-4, atol=1e-4)
    q = L.merge_and_unload(copy.deepcopy(model), requantize=True)
    assert isinstance(q.model.layers[0].mlp.down_proj, Linear4bit)
    assert (logits(q, ids) - want).abs().max() < 0.5


# ---- files both ways ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_our_file_loads_in_peft(tmp_path, quantize):
    ours, base = pair("llama")
    L.inject(ours, L.IA3Config(quantize=quantize))
    _randomize(ours)
    ids = tokens()
    want = logits(ours, ids)
    L.save_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and cfg["feedforward_modules"] == ["down_proj"]
    assert load_file(str(tmp_path / "adapter_model.safetensors"))[FF_KEY].shape == (1, 96)
    pm = peft.PeftModel.from_pretrained(_dequantized_base(base) if quantize else base, str(tmp_path))
    torch.testing.assert_close(logits(pm, ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_peft_file_loads_in_ours(tmp_path, quantize):
    ours, base = pair("llama")
    pm = _peft_ia3(base, target_modules=["k_proj", "v_proj", "down_proj", "up_proj"],
                   feedforward_modules=["down_proj", "up_proj"])
    _randomize(pm)
    pm.save_pretrained(str(tmp_path))
    ref = _dequantized_base(pair("llama")[0]) if quantize else None
    if quantize:  # the dequantized reference must hold deq(W) for up_proj too
        with torch.no_grad():
            for n, m in ref.named_modules():
                if n.endswith("up_proj"):
                    m.weight.copy_(L.quantize_nf4(m.weight).dequantize(torch.float32))
        ref_pm = peft.PeftModel.from_pretrained(ref, str(tmp_path))
    out = L.load_adapter(ours, tmp_path, quantize=quantize)
    assert out is ours
    assert ours.model.layers[0].mlp.up_proj.is_feedforward
    ids = tokens()
    want = logits(ref_pm if quantize else pm, ids)
    torch.testing.assert_close(logits(ours, ids), want, rtol=1e-5, atol=1e-5)
    assert isinstance(L.read_adapter_config(tmp_path), L.IA3Config)


def test_round_trip_ours_to_ours(tmp_path):
    a = L.inject(tiny_llama(), L.IA3Config())
    _randomize(a)
    L.save_adapter(a, tmp_path)
    b = L.load_adapter(tiny_llama(), tmp_path)
    ids = tokens()
    torch.testing.assert_close(logits(b, ids), logits(a, ids))
    assert (tmp_path / "README.md").read_text().count("(IA)³") == 1


@pytest.mark.parametrize("fault, pattern", [
    ("missing", r"must hold every adapter key, got missing key '.*down_proj.ia3_l'"),
    ("unexpected", r"must hold only keys the model has, got unexpected key 'base_model.model.extra.ia3_l'"),
    ("shape", r"down_proj.ia3_l must have shape \(1, 96\), got \(96, 1\)"),
    ("dtype", r"down_proj.ia3_l must have a floating-point dtype, got torch.int64"),
    ("nan", r"down_proj.ia3_l must be finite, got 1 NaN/Inf values"),
])
def test_mismatched_files_refuse_and_change_nothing(tmp_path, fault, pattern):
    src = L.inject(tiny_llama(), L.IA3Config())
    L.save_adapter(src, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(str(path))
    if fault == "missing":
        del sd[FF_KEY]
    elif fault == "unexpected":
        sd["base_model.model.extra.ia3_l"] = torch.ones(1)
    elif fault == "shape":
        sd[FF_KEY] = sd[FF_KEY].reshape(96, 1).contiguous()
    elif fault == "dtype":
        sd[FF_KEY] = sd[FF_KEY].long()
    else:
        sd[FF_KEY][0, 3] = float("nan")
    save_file(sd, str(path), metadata={"format": "pt"})
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=pattern):
        L.load_adapter(model, tmp_path)
    assert_unchanged(before, snapshot(model))


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: d.pop("target_modules"),
     r"field 'target_modules' must be a list of module names or a regex string, got no such field"),
    (lambda d: d.update(init_ia3_weights="yes"), r"field 'init_ia3_weights' must be true or false, got 'yes'"),
    (lambda d: d.update(feedforward_modules=["up_proj"]),
     r"IA3Config, got: .*feedforward_modules must be a subset of target_modules .*, got \['up_proj'\]"),
    (lambda d: d.update(modules_to_save=["lm_head"]), r"field 'modules_to_save' must be null for IA3"),
    (lambda d: d.update(peft_type="ADALORA"),
     r"field 'peft_type' must be one of 'LORA', 'VERA', 'IA3', 'PROMPT_TUNING', 'BITFIT', got 'ADALORA'"),
    (lambda d: d.update(target_modules=["nothing_here"], feedforward_modules=[]),
     r"must describe an adapter this model can hold, got: lowrank_ext::inject: IA3Config.target_modules must match"),
])
def test_config_errors_name_the_file_and_field(tmp_path, edit, pattern):
    L.save_adapter(L.inject(tiny_llama(), L.IA3Config()), tmp_path)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    edit(d)
    (tmp_path / "adapter_config.json").write_text(json.dumps(d))
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=pattern):
        L.load_adapter(model, tmp_path)
    assert_unchanged(before, snapshot(model))


# ---- errors ---------------------------------------------------------------------------------------------------
def test_config_errors():
    with pytest.raises(ValueError, match=r"lowrank_ext::IA3Config: feedforward_modules must be a subset of "
                                         r"target_modules \['k_proj'\], got \['down_proj'\]"):
        L.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match=r"lowrank_ext::IA3Config: quantize must be one of \(None, 'nf4'\), got 'int8'"):
        L.IA3Config(quantize="int8")
    with pytest.raises(ValueError, match=r"lowrank_ext::IA3Config: blocksize must be one of .*, got 48"):
        L.IA3Config(blocksize=48)
    with pytest.raises(ValueError, match=r"lowrank_ext::IA3Config: init_ia3_weights must be True or False, got 1"):
        L.IA3Config(init_ia3_weights=1)
    with pytest.raises(ValueError, match=r"lowrank_ext::IA3Config: target_modules must be given when "
                                         r"feedforward_modules is, got None"):
        L.IA3Config(feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match=r"lowrank_ext::IA3Config: target_modules must be None, a list of str or a "
                                         r"str, got 3"):
        L.IA3Config(target_modules=3)


def test_inject_errors_leave_the_model_unchanged():
    model = tiny_llama()
    model.config.model_type = "unknown"
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"lowrank_ext::inject: IA3Config.target_modules must be given for model type "
                                         r"'unknown' \(defaults exist for .*\), got None"):
        L.inject(model, L.IA3Config())
    with pytest.raises(ValueError, match=r"IA3Config.target_modules must match at least one linear module"):
        L.inject(model, L.IA3Config(target_modules=["nope"]))
    with pytest.raises(TypeError, match=r"lowrank_ext::inject: config must be a LoRAConfig, IA3Config, "
                                        r"PromptTuningConfig or BitFitConfig, got dict"):
        L.inject(model, {"r": 8})
    assert_unchanged(before, snapshot(model))
    L.inject(model, L.IA3Config(target_modules=["k_proj"]))
    with pytest.raises(ValueError, match=r"lowrank_ext::inject: config must be of the method the model's adapters use "
                                         r"\(IA3Config\), got LoRAConfig"):
        L.inject(model, L.LoRAConfig(target_modules=["q_proj"]), "lora")
    with pytest.raises(ValueError, match=r"lowrank_ext::inject: adapter_name must be a new adapter name, got 'default'"):
        L.inject(model, L.IA3Config(target_modules=["k_proj"]))
    with pytest.raises(ValueError, match=r"IA3Config.feedforward_modules must treat 'model.layers.0.self_attn.k_proj' "
                                         r"as the model's other IA3 adapters do \(is_feedforward=False\), got True"):
        L.inject(model, L.IA3Config(target_modules=["k_proj"], feedforward_modules=["k_proj"]), "b")


def test_nan_weight_to_quantize_undoes_the_layers_already_built():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError):
        L.inject(model, L.IA3Config(quantize="nf4"))
    assert_unchanged(before, snapshot(model))


def test_layer_errors():
    layer = IA3Linear(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"lowrank_ext::IA3Linear: weight must be 2-D \[out, in\], got \(4,\)"):
        IA3Linear(torch.randn(4))
    with pytest.raises(ValueError, match=r"lowrank_ext::IA3Linear: name must be a non-empty str without '.', got 'a.b'"):
        layer.add_adapter("a.b")
    layer.add_adapter("a")
    with pytest.raises(ValueError, match=r"lowrank_ext::IA3Linear: name must not be an existing adapter, got 'a'"):
        layer.add_adapter("a")
    with pytest.raises(ValueError, match=r"lowrank_ext::IA3Linear: adapter name must be one of \['a'\], got 'z'"):
        layer.set_adapter("z")
    with pytest.raises(ValueError, match=r"lowrank_ext::IA3Linear.merge: requantize must be False on a dense base"):
        layer.merge(requantize=True)
    layer.set_adapter("a")
    layer.merge()
    with pytest.raises(ValueError, match=r"lowrank_ext::IA3Linear: name must not be merged \(unmerge first\)"):
        layer.delete_adapter("a")
    with pytest.raises(ValueError, match=r"lowrank_ext::QIA3Linear: weight must be a 2-D NF4Weight"):
        QIA3Linear(L.quantize_nf4(torch.randn(4, 4, 4)))
    with torch.no_grad():
        layer.ia3_l["a"].fill_(float("inf"))
    layer.unmerge()
    with pytest.raises(ValueError, match=r"lowrank_ext::IA3Linear.merge: the merged weight must be finite, got "
                                         r"NaN/Inf after adapter 'a'"):
        layer.merge(safe_merge=True)


# ---- model-level management and compile ------------------------------------------------------------------------
def test_management_delete_disable_merge_unmerge():
    model = L.inject(tiny_llama(), L.IA3Config())
    _randomize(model)
    ids = tokens()
    base = logits(tiny_llama(), ids)
    y = logits(model, ids)
    with L.disable_adapters(model):
        torch.testing.assert_close(logits(model, ids), base)
    torch.testing.assert_close(logits(model, ids), y)
    L.merge_adapter(model)
    torch.testing.assert_close(logits(model, ids), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"lowrank_ext::delete_adapter: name must not be merged"):
        L.delete_adapter(model, "default")
    L.unmerge_adapter(model)
    torch.testing.assert_close(logits(model, ids), y, rtol=1e-5, atol=1e-5)
    L.delete_adapter(model, "default")
    assert not any(len(m.ia3_l) for m in model.modules() if isinstance(m, IA3Linear))
    torch.testing.assert_close(logits(model, ids), base, rtol=1e-5, atol=1e-5)


def test_merge_adapter_on_nf4_refuses():
    model = L.inject(tiny_llama(), L.IA3Config(quantize="nf4"))
    with pytest.raises(ValueError, match=r"lowrank_ext::merge_adapter: model must have dense IA3 bases to merge in "
                                         r"place .*merge_and_unload\(model, requantize=True\)"):
        L.merge_adapter(model)  # tests/test_ia3_nf4_merge.py: the whole message, all or nothing


def test_compiles_fullgraph():
    layer = QIA3Linear(L.quantize_nf4(torch.randn(32, 48)), torch.randn(32), is_feedforward=True)
    layer.add_adapter("default")
    layer.set_adapter("default")
    x = torch.randn(4, 48)
    torch.testing.assert_close(torch.compile(layer, backend="aot_eager", fullgraph=True)(x), layer(x))


def test_on_a_bitsandbytes_4bit_model():
    """IA3 on bitsandbytes Linear4bit layers: ours imports the same NF4 bytes (no requantizing) into QIA3Linear.
    Reference: PEFT's IA3 on a dense model holding the dequantized bytes. (Not PEFT's bnb IA3 layer itself:
    bitsandbytes 0.50.2's CPU dequantize_4bit is wrong when in_features is not a multiple of the blocksize —
    down_proj here has 96 — see tests/test_layers.py.)"""
    bnb = require("bitsandbytes", "0.50.2")
    a = tiny_llama()
    dense = copy.deepcopy(a)
    for name, m in list(a.named_modules()):
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=False, quant_type="nf4",
                                  compute_dtype=torch.float32)
            q.weight = bnb.nn.Params4bit(m.weight.data.clone(), requires_grad=False, quant_type="nf4")
            parent, _, child = name.rpartition(".")
            setattr(a.get_submodule(parent), child, q.to("cpu"))
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # no bnb layer left
    L.inject(a, L.IA3Config(target_modules=every, feedforward_modules=["down_proj"]))
    assert not any(type(m).__name__ == "Linear4bit" for m in a.modules())
    assert isinstance(a.model.layers[0].mlp.down_proj, QIA3Linear)
    with torch.no_grad():
        for name, m in a.named_modules():
            if isinstance(m, QIA3Linear):
                dense.get_submodule(name).weight.copy_(m.weight.dequantize(torch.float32))
    pm = _peft_ia3(dense, target_modules=every, feedforward_modules=["down_proj"])
    _randomize(pm)
    assert _copy_from_peft(pm, a) == 14
    ids = tokens()
    torch.testing.assert_close(logits(a, ids), logits(pm, ids), rtol=1e-5, atol=1e-5)


def test_adapter_name_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"lowrank_ext::inject: adapter_name must be a non-empty str without '.', "
                                         r"got 'a.b'"):
        L.inject(model, L.IA3Config(), "a.b")
    with pytest.raises(ValueError, match=r"lowrank_ext::IA3Config.from_peft_dict: field 'peft_type' must be 'IA3', "
                                         r"got 'LORA'"):
        L.IA3Config.from_peft_dict({"peft_type": "LORA"})
    with pytest.raises(ValueError, match=r"field 'fan_in_fan_out' must be true or false, got 1"):
        L.IA3Config.from_peft_dict({"peft_type": "IA3", "target_modules": ["k_proj"], "fan_in_fan_out": 1})


def test_compute_dtype_rides_on_the_nf4_op():
    """IA3Config(compute_dtype=...) as LoRAConfig's: the NF4 product runs in it, the output comes back in x's dtype."""
    model = L.inject(tiny_llama(), L.IA3Config(quantize="nf4", compute_dtype="bf16"))
    layer = model.model.layers[0].self_attn.k_proj
    assert isinstance(layer, QIA3Linear) and layer.compute_dtype == torch.bfloat16
    _randomize(model)
    x = torch.randn(3, layer.in_features)
    want = L.ops.nf4_linear(x, layer.weight, None, torch.bfloat16) * layer.ia3_l["default"].flatten()
    y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, want)
    assert isinstance(L.merge_and_unload(model, requantize=True).model.layers[0].mlp.down_proj, Linear4bit)
    with pytest.raises(ValueError, match=r"lowrank_ext::IA3Config: compute_dtype must be None, torch.float32, "
                                         r"torch.bfloat16, torch.float16 or one of their names, got 'int8'"):
        L.IA3Config(compute_dtype="int8")
