"""Several adapters per model: switching, disabling, deleting, weighted combination, mixed batches, merging."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import copy_peft_to_ours, logits, pair, randomize_peft_adapter, tokens
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
