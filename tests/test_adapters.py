"""Several adapters per model: switching, disabling, deleting, weighted combination, mixed batches, merging."""

from __future__ import annotations

import warnings

import pytest
import torch
from _tiny_models import (
    assert_unchanged,
    copy_peft_to_ours,
    logits,
    pair,
    randomize_peft_adapter,
    snapshot,
    tiny_llama,
    tokens,
)
from conftest import require

import lowrank_ext as L

peft = require("peft", "0.21.2")
T = ["q_proj", "v_proj", "down_proj"]


def _two_adapter_pair(r2: int = 4):
    """PEFT and ours with adapters "a" (r=4) and "b" (r=r2), same random values, "a" active."""
    a, b = pair("llama")
    pm = peft.get_peft_model(a, peft.LoraConfig(r=4, lora_alpha=8, target_modules=T), adapter_name="a")
    pm.add_adapter("b", peft.LoraConfig(r=r2, lora_alpha=16, target_modules=T))
    L.inject(b, L.LoRAConfig(r=4, alpha=8, target_modules=T), adapter_name="a")
    L.add_adapter(b, "b", L.LoRAConfig(r=r2, alpha=16, target_modules=T))
    for i, name in enumerate(("a", "b")):
        randomize_peft_adapter(pm, name, seed=10 + i)
        copy_peft_to_ours(pm, b, name)
    return pm.eval(), b


def test_switch_disable_delete():
    pm, ours = _two_adapter_pair()
    ids = tokens()
    for name in ("a", "b"):
        pm.set_adapter(name)
        L.set_adapter(ours, name)
        torch.testing.assert_close(logits(ours, ids), logits(pm, ids), atol=2e-5, rtol=1e-4)
        trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
        assert trainable and all(n.endswith("." + name) for n in trainable)
    with pm.disable_adapter(), L.disable_adapters(ours):
        torch.testing.assert_close(logits(ours, ids), logits(pm, ids), atol=2e-5, rtol=1e-4)
    base = logits(ours, ids)
    L.delete_adapter(ours, "b")
    assert not any(".b" in n for n, _ in ours.named_parameters())
    with pytest.raises(ValueError, match=r"lowrank_ext::set_adapter: names must be existing adapters \['a'\], got 'b'"):
        L.set_adapter(ours, "b")
    assert not torch.allclose(base, logits(ours, ids))


def test_two_active_adapters_sum():
    pm, ours = _two_adapter_pair()
    pm.base_model.set_adapter(["a", "b"])
    L.set_adapter(ours, ["a", "b"])
    ids = tokens()
    torch.testing.assert_close(logits(ours, ids), logits(pm, ids), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("ctype", ["linear", "cat", "svd"])
def test_weighted_combination_equals_peft(ctype):
    pm, ours = _two_adapter_pair()
    w = [0.7, -0.4]
    kw = {"svd_rank": 8} if ctype == "svd" else {}  # rank 8 >= rank of the sum: the SVD is exact
    pm.add_weighted_adapter(["a", "b"], w, "mix", combination_type=ctype, **kw)
    L.add_weighted_adapter(ours, ["a", "b"], w, "mix", combination_type=ctype, **kw)
    pm.set_adapter("mix")
    L.set_adapter(ours, "mix")
    ids = tokens()
    torch.testing.assert_close(logits(ours, ids), logits(pm, ids), atol=5e-5, rtol=1e-4)
    if ctype in ("cat", "svd"):  # these two are the exact weighted sum of the deltas
        layer = ours.model.layers[0].self_attn.q_proj
        want = w[0] * layer.delta_weight("a") + w[1] * layer.delta_weight("b")
        torch.testing.assert_close(layer.delta_weight("mix"), want, atol=1e-5, rtol=1e-4)


def test_combination_errors():
    _pm, ours = _two_adapter_pair(r2=8)
    with pytest.raises(ValueError, match="lowrank_ext::add_weighted_adapter: adapters must have equal ranks"):
        L.add_weighted_adapter(ours, ["a", "b"], [1, 1], "mix", combination_type="linear")
    with pytest.raises(ValueError, match="lowrank_ext::add_weighted_adapter: combination_type must be"):
        L.add_weighted_adapter(ours, ["a", "b"], [1, 1], "mix", combination_type="ties")


def test_mixed_batch_equals_per_row_and_peft():
    pm, ours = _two_adapter_pair(r2=8)
    ids = tokens(batch=5)
    names = ["a", "b", "__base__", "b", "a"]
    with L.mixed_batch(ours, names):
        out = logits(ours, ids)
    rows = []
    for i, n in enumerate(names):
        if n == "__base__":
            with L.disable_adapters(ours):
                rows.append(logits(ours, ids[i: i + 1]))
        else:
            L.set_adapter(ours, n)
            rows.append(logits(ours, ids[i: i + 1]))
    torch.testing.assert_close(out, torch.cat(rows), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out, logits(pm, ids, adapter_names=names), atol=2e-5, rtol=1e-4)
    L.merge_adapter(ours)
    with pytest.raises(ValueError, match=r"merged_adapters must be empty in a mixed batch \(unmerge first\)"), \
            L.mixed_batch(ours, names):
        logits(ours, ids)


def test_mixed_batch_is_one_batched_pass():
    _, ours = _two_adapter_pair()
    layer = ours.model.layers[0].self_attn.q_proj
    from torch.profiler import ProfilerActivity, profile

    names = ["a", "b"] * 8
    with L.mixed_batch(ours, names), profile(activities=[ProfilerActivity.CPU]) as prof:
        layer(torch.randn(16, 5, 64))
    counts = {e.key: e.count for e in prof.key_averages()}
    gemms = sum(counts.get(k, 0) for k in ("aten::mm", "aten::addmm", "aten::bmm"))
    assert 1 < gemms <= 3, counts  # base + two adapter GEMMs for 16 rows and 2 adapters: no per-row matmuls
    with pytest.raises(ValueError, match="lowrank_ext::mixed_batch: adapter_names must name existing adapters"), \
            L.mixed_batch(ours, ["zzz"]):
        pass


@pytest.mark.parametrize("variant", ["lora", "dora", "vera"])
def test_merge_unmerge_round_trip(variant):
    _, m = pair("llama")
    L.inject(m, L.LoRAConfig(r=4, alpha=8, variant=variant, target_modules=T))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in m.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    ids = tokens()
    w0 = m.model.layers[0].self_attn.q_proj.weight.detach().clone()
    ref = logits(m, ids)
    L.merge_adapter(m)
    assert not torch.equal(m.model.layers[0].self_attn.q_proj.weight, w0)
    torch.testing.assert_close(logits(m, ids), ref, atol=1e-5, rtol=1e-4)
    L.unmerge_adapter(m)
    torch.testing.assert_close(m.model.layers[0].self_attn.q_proj.weight, w0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits(m, ids), ref, atol=1e-5, rtol=1e-5)
    merged = L.merge_and_unload(m)
    assert not any(isinstance(x, L.nn.ADAPTER_LAYERS) for x in merged.modules())
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(merged, ids), ref, atol=1e-5, rtol=1e-4)


def test_merge_equals_peft_merge():
    pm, ours = _two_adapter_pair()
    L.merge_adapter(ours)
    pm.merge_adapter()
    got = ours.model.layers[1].mlp.down_proj.weight
    want = pm.base_model.model.model.layers[1].mlp.down_proj.base_layer.weight
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_safe_merge_refuses_non_finite():
    _, m = pair("llama")
    L.inject(m, L.LoRAConfig(r=4, target_modules=["q_proj"]))
    layer = m.model.layers[0].self_attn.q_proj
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"lowrank_ext::LoRALinear.merge: the merged weight must be finite, got NaN/Inf "
                                         r"after adapter 'default'"):
        L.merge_adapter(m, safe_merge=True)
    assert torch.equal(layer.weight, w0) and not layer.merged_adapters


@pytest.mark.parametrize("path", ["cat", "bmm"])
def test_mixed_batch_paths_equal_per_row_loop(path):
    """Both mixed-batch formulations against the obvious per-row loop (float64)."""
    from lowrank_ext.nn import functional as LF

    g = torch.Generator().manual_seed(0)
    ranks, k, n_out, b = [3, 5, 2], 12, 7, 6
    A = [torch.randn(r, k, generator=g, dtype=torch.float64) for r in ranks]
    B = [torch.randn(n_out, r, generator=g, dtype=torch.float64) for r in ranks]
    ids = torch.tensor([2, 0, 1, 1, 0, 2])
    x = torch.randn(b, 4, k, generator=g, dtype=torch.float64)
    want = torch.stack([x[i] @ A[j].T @ B[j].T for i, j in enumerate(ids.tolist())])
    if path == "cat":
        owner = torch.tensor([i for i, r in enumerate(ranks) for _ in range(r)])
        got = LF.mixed_lora_delta_cat(x, ids, torch.cat(A), torch.cat(B, dim=1), owner)
    else:
        rm = max(ranks)
        a_all = torch.stack([torch.nn.functional.pad(a, (0, 0, 0, rm - a.shape[0])) for a in A])
        b_all = torch.stack([torch.nn.functional.pad(bb, (0, rm - bb.shape[1])) for bb in B])
        got = LF.mixed_lora_delta(x, ids, a_all, b_all)
    torch.testing.assert_close(got, want)


def test_mixed_batch_large_ranks_use_the_bmm_path():
    _, m = pair("llama")
    L.inject(m, L.LoRAConfig(r=160, alpha=8, target_modules=["q_proj"]), adapter_name="a")
    L.add_adapter(m, "b", L.LoRAConfig(r=160, alpha=8, target_modules=["q_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in m.named_parameters():
            if ".lora_" in _:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    layer = m.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 4, 64)
    names = ["b", "a", "b"]
    with torch.no_grad(), L.mixed_batch(m, names):
        assert len(layer._stacked(["b", "a"], x.dtype, x.device)) == 2  # Σr = 320 > 256: stacked for bmm
        out = layer(x)
    rows = []
    for i, n in enumerate(names):
        L.set_adapter(m, n)
        rows.append(layer(x[i: i + 1]))
    torch.testing.assert_close(out, torch.cat(rows).detach(), atol=1e-5, rtol=1e-5)


def test_mixed_batch_refuses_dropout_in_training():
    """A mixed batch applies no dropout: in training mode an adapter with dropout > 0 is refused (PEFT refuses
    adapter_names in training mode altogether); adapters without dropout compute the same in both modes."""
    pm, m = pair("llama")
    L.inject(m, L.LoRAConfig(r=4, dropout=0.1, target_modules=T), adapter_name="a")
    L.add_adapter(m, "b", L.LoRAConfig(r=4, target_modules=T))
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.lora_B["b"].normal_()
    ids = tokens()
    msg = (r"lowrank_ext::mixed_batch: model must be in eval mode \(model\.eval\(\)\) when a mixed adapter has "
           r"dropout > 0, got training mode with adapter 'a' \(dropout=0\.1\)")
    m.train()
    with pytest.raises(ValueError, match=msg), L.mixed_batch(m, ["a", "b", "a"]):
        pass
    with L.mixed_batch(m, ["b", "__base__", "b"]):  # no dropout involved: runs in training mode
        train_out = logits(m, ids)
    m.eval()
    with L.mixed_batch(m, ["b", "__base__", "b"]):
        torch.testing.assert_close(train_out, logits(m, ids))
    with pytest.raises(ValueError, match=msg), L.mixed_batch(m, ["a", "b", "a"]):
        m.train()  # switched to training inside the block: refused in forward
        logits(m, ids)
    pm = peft.get_peft_model(pm, peft.LoraConfig(r=4, lora_dropout=0.1, target_modules=T)).train()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when the model is in training mode"):
        pm(input_ids=ids, adapter_names=["default"] * 3)


# ---- PEFT's behaviour where a user relies on it ------------------------------------------------------
def test_delete_active_adapter_switches_like_peft():
    """Deleting the only active adapter activates the first remaining one by name, with a warning (PEFT)."""
    pm, ours = _two_adapter_pair()  # "a" active, "b" not
    ids = tokens()
    with pytest.warns(UserWarning, match="Adapter a was active which is now deleted. Setting active adapter to b"):
        pm.delete_adapter("a")
    with pytest.warns(UserWarning, match=r"lowrank_ext::delete_adapter: adapter 'a' was active and is now deleted; "
                                         r"the active adapter is now 'b'"):
        L.delete_adapter(ours, "a")
    assert pm.active_adapters == ["b"] and L.get_state(ours).active == ["b"]
    torch.testing.assert_close(logits(ours, ids), logits(pm, ids), atol=2e-5, rtol=1e-4)
    with L.disable_adapters(ours):
        assert not torch.allclose(logits(ours, ids), logits(pm, ids), atol=1e-3)  # "b" really computes
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".b") for n in trainable)
    pm.delete_adapter("b")  # the last one: nothing active, base outputs (PEFT's forward then fails: KeyError)
    L.delete_adapter(ours, "b")
    assert pm.active_adapters == [] and L.get_state(ours).active == []
    torch.testing.assert_close(logits(ours, ids), logits(tiny_llama(), ids), atol=2e-5, rtol=1e-4)


def test_delete_one_of_two_active_adapters_keeps_the_other():
    pm, ours = _two_adapter_pair()
    pm.base_model.set_adapter(["a", "b"])
    L.set_adapter(ours, ["a", "b"])
    pm.delete_adapter("b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L.delete_adapter(ours, "b")
    assert pm.active_adapters == ["a"] and L.get_state(ours).active == ["a"]
    torch.testing.assert_close(logits(ours, ids := tokens()), logits(pm, ids), atol=2e-5, rtol=1e-4)


def test_delete_merged_adapter_is_refused_like_peft():
    pm, ours = _two_adapter_pair()
    pm.merge_adapter()
    L.merge_adapter(ours)
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['a'\] while they are merged"):
        pm.delete_adapter("a")
    names = [n for n, _ in ours.named_parameters()]
    with pytest.raises(ValueError, match=r"lowrank_ext::delete_adapter: name must not be merged \(call "
                                         r"unmerge_adapter first\), got 'a' merged in 6 layers"):
        L.delete_adapter(ours, "a")
    assert [n for n, _ in ours.named_parameters()] == names and "a" in L.get_state(ours).configs  # nothing deleted


def test_merge_twice_warns_like_peft():
    pm, ours = _two_adapter_pair()
    pm.merge_adapter()
    L.merge_adapter(ours)
    layer = ours.model.layers[1].mlp.down_proj
    peft_layer = pm.base_model.model.model.layers[1].mlp.down_proj
    w1 = layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        pm.merge_adapter()
    with pytest.warns(UserWarning, match=r"lowrank_ext::merge_adapter: all adapters are already merged "
                                         r"\(\['a'\]\), nothing to do"):
        L.merge_adapter(ours)
    assert torch.equal(layer.weight, w1)  # merged once, not twice
    with pytest.warns(UserWarning, match="Already following adapters were merged a. You are now additionally "
                                         "merging b"):
        pm.merge_adapter(["b"])
    with pytest.warns(UserWarning, match=r"lowrank_ext::merge_adapter: adapters \['a'\] are already merged; now "
                                         r"also merging \['b'\]"):
        L.merge_adapter(ours, ["b"])
    torch.testing.assert_close(layer.weight, peft_layer.base_layer.weight, atol=1e-6, rtol=1e-5)
    with pytest.warns(UserWarning, match=r"lowrank_ext::LoRALinear\.merge: all adapters are already merged"):
        layer.merge(["a", "b"])  # the layer method warns too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L.merge_and_unload(ours)  # merging what is left is the point: no warning


CAT_CASES = {
    # adapters on different modules: "a" on q/v, "b" on v/down
    "different_targets": ({"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                          {"r": 8, "alpha": 16, "target_modules": ["v_proj", "down_proj"]}),
    # per-module ranks and alphas
    "rank_pattern": ({"r": 4, "alpha": 8, "target_modules": T, "rank_pattern": {"v_proj": 2}},
                     {"r": 8, "alpha": 16, "target_modules": T, "rank_pattern": {"model.layers.1.mlp.down_proj": 3},
                      "alpha_pattern": {"q_proj": 4}}),
}


def _peft_cfg(c):
    kw = {"r": c["r"], "lora_alpha": c["alpha"], "target_modules": c["target_modules"]}
    return peft.LoraConfig(**kw, rank_pattern=c.get("rank_pattern", {}), alpha_pattern=c.get("alpha_pattern", {}))


@pytest.mark.parametrize("case", list(CAT_CASES))
def test_cat_is_sized_per_layer_and_equals_peft(case, tmp_path):
    """PEFT had and fixed this: 'cat' must size each layer by the ranks of the adapters that layer holds."""
    ca, cb = CAT_CASES[case]
    a, ours = pair("llama")
    pm = peft.get_peft_model(a, _peft_cfg(ca), adapter_name="a")
    pm.add_adapter("b", _peft_cfg(cb))
    L.inject(ours, L.LoRAConfig(**ca), adapter_name="a")
    L.add_adapter(ours, "b", L.LoRAConfig(**cb))
    for i, name in enumerate(("a", "b")):
        randomize_peft_adapter(pm, name, seed=10 + i)
        assert copy_peft_to_ours(pm, ours, name) > 0
    w = [0.7, -0.4]
    pm.add_weighted_adapter(["a", "b"], w, "mix", combination_type="cat")
    L.add_weighted_adapter(ours, ["a", "b"], w, "mix", combination_type="cat")
    pm.set_adapter("mix")
    L.set_adapter(ours, "mix")
    ids = tokens()
    torch.testing.assert_close(logits(ours, ids), logits(pm.eval(), ids), atol=5e-5, rtol=1e-4)
    n_layers = 0
    for name, layer in ours.named_modules():
        if not isinstance(layer, L.nn.ADAPTER_LAYERS) or "mix" not in layer.specs:
            continue
        n_layers += 1
        held = [x for x in ("a", "b") if x in layer.specs]
        assert layer.specs["mix"].r == sum(layer.specs[x].r for x in held)  # this layer's ranks, no padding
        assert layer.specs["mix"].scaling == 1.0
        want = sum(wi * layer.delta_weight(x) for wi, x in zip(w, ("a", "b")) if x in layer.specs)
        torch.testing.assert_close(layer.delta_weight("mix"), want, atol=1e-5, rtol=1e-4)
        peft_layer = pm.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.delta_weight("mix"), peft_layer.get_delta_weight("mix"), atol=1e-5, rtol=1e-4)
    assert n_layers == 6
    # the per-layer ranks travel in the file's rank_pattern: PEFT loads it as it is
    L.save_adapter(ours, tmp_path, adapter_name="mix")
    a2, _ = pair("llama")
    pm2 = peft.PeftModel.from_pretrained(a2, tmp_path).eval()
    torch.testing.assert_close(logits(pm2, ids), logits(ours, ids), atol=5e-5, rtol=1e-4)


def test_failed_weighted_combination_changes_nothing():
    _pm, ours = _two_adapter_pair(r2=8)
    L.add_adapter(ours, "d", L.LoRAConfig(r=4, variant="dora", target_modules=T))
    cases = [
        ({"adapters": ["a", "b"], "weights": [1, 1], "adapter_name": "b", "combination_type": "cat"},
         r"lowrank_ext::inject: adapter_name must be a new adapter name, got 'b'"),
        ({"adapters": ["a", "b"], "weights": [1, 1], "adapter_name": "mi.x", "combination_type": "cat"},
         r"lowrank_ext::inject: adapter_name must be a non-empty str without '\.', got 'mi\.x'"),
        ({"adapters": ["a", "b"], "weights": [1, 1], "adapter_name": "mix", "combination_type": "linear"},
         (r"add_weighted_adapter: adapters must have equal ranks for 'linear' in every module, got ranks \[4, 8\] in "
         r"model\.layers\.0\.self_attn\.q_proj")),
        ({"adapters": ["a", "d"], "weights": [1, 1], "adapter_name": "mix", "combination_type": "cat"},
         r"add_weighted_adapter: adapters must be plain LoRA adapters, got 'd' with variant='dora'"),
        ({"adapters": ["a", "b"], "weights": [1], "adapter_name": "mix", "combination_type": "cat"},
         r"add_weighted_adapter: weights must have one entry per adapter \(2\), got 1"),
        ({"adapters": ["a", "b"], "weights": [1, 1], "adapter_name": "mix", "combination_type": "svd", "svd_rank": 0},
         r"add_weighted_adapter: svd_rank must be a positive int or None, got 0"),
    ]
    for kw, pattern in cases:
        before = snapshot(ours)
        with pytest.raises(ValueError, match=pattern):
            L.add_weighted_adapter(ours, **kw)
        assert_unchanged(before, snapshot(ours))
    with torch.no_grad():  # a failure while computing the factors (after every check): nothing injected either
        ours.model.layers[1].mlp.down_proj.lora_B["b"][0, 0] = float("nan")
    before = snapshot(ours)
    with pytest.raises(torch.linalg.LinAlgError, match="non-finite values"):
        L.add_weighted_adapter(ours, ["a", "b"], [1, 1], "mix", combination_type="svd")
    assert_unchanged(before, snapshot(ours))
