"""The injector and model-level adapters against PEFT 0.21.2 on tiny random Llama / GPT-2 / BERT models."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import MODELS, TARGETS, copy_peft_to_ours, logits, pair, randomize_peft_adapter, tokens
from conftest import require

import lowrank_ext as L

peft = require("peft", "0.21.2")  # the PEFT oracle is pinned


def _peft_cfg(**kw):
    return peft.LoraConfig(**kw)


COUNT_CASES = [
    {"r": 4, "lora_alpha": 8},
    {"r": 8, "lora_alpha": 16, "use_rslora": True},
    {"r": 4, "lora_alpha": 8, "use_dora": True},
    {"r": 4, "lora_alpha": 8, "bias": "all"},
    {"r": 4, "lora_alpha": 8, "bias": "lora_only"},
    {"r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 2, "c_fc": 6, "value": 2}},
]


def _ours_from_peft_kw(kind: str, kw: dict, targets) -> L.LoRAConfig:
    return L.LoRAConfig(r=kw["r"], alpha=kw["lora_alpha"], target_modules=targets, use_rslora=kw.get("use_rslora", False),
                        use_dora=kw.get("use_dora", False), bias=kw.get("bias", "none"),
                        rank_pattern=kw.get("rank_pattern", {}), modules_to_save=kw.get("modules_to_save"))


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("kw", COUNT_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items() if k != "r"))
def test_trainable_counts_equal_peft(kind, kw):
    a, b = pair(kind)
    pm = peft.get_peft_model(a, _peft_cfg(target_modules=TARGETS[kind], **kw))
    L.inject(b, _ours_from_peft_kw(kind, kw, TARGETS[kind]))
    assert L.count_parameters(b) == pm.get_nb_trainable_parameters()
    s = L.inject_summary(b)
    assert (s.trainable, s.total) == pm.get_nb_trainable_parameters()
    assert len(s.replaced) == sum(1 for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert "trainable params" in str(s)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_all_linear_and_modules_to_save_counts_equal_peft(kind):
    a, b = pair(kind)
    head = "lm_head"
    pm = peft.get_peft_model(a, _peft_cfg(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=[head]))
    L.inject(b, L.LoRAConfig(r=4, alpha=8, target_modules="all-linear", modules_to_save=[head]))
    assert L.count_parameters(b) == pm.get_nb_trainable_parameters()
    ours = {n for n, _, _ in L.inject_summary(b).replaced}
    theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert ours == theirs and head not in ours


def test_vera_counts_equal_peft():
    a, b = pair("llama")
    pm = peft.get_peft_model(a, peft.VeraConfig(r=8, target_modules=["q_proj", "o_proj"]))
    L.inject(b, L.LoRAConfig(r=8, variant="vera", target_modules=["q_proj", "o_proj"]))
    assert L.count_parameters(b) == pm.get_nb_trainable_parameters()


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_outputs_equal_peft(kind, variant):
    a, b = pair(kind)
    kw = {"r": 4, "lora_alpha": 8, "use_dora": variant == "dora"}
    pm = peft.get_peft_model(a, _peft_cfg(target_modules=TARGETS[kind], **kw))
    L.inject(b, _ours_from_peft_kw(kind, kw, TARGETS[kind]))
    randomize_peft_adapter(pm)
    assert copy_peft_to_ours(pm, b) > 0
    ids = tokens()
    ref = logits(pm, ids)
    out = logits(b, ids)
    with L.disable_adapters(b):
        base = logits(b, ids)
    assert (out - base).abs().max() > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def _train_pair(variant: str, dropout: float):
    a, b = pair("llama")
    pm = peft.get_peft_model(a, _peft_cfg(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=variant == "dora",
                                          target_modules=["q_proj", "v_proj"]))
    L.inject(b, L.LoRAConfig(r=4, alpha=8, dropout=dropout, variant=variant, target_modules=["q_proj", "v_proj"]))
    randomize_peft_adapter(pm)
    copy_peft_to_ours(pm, b)
    return pm, b


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_forward_and_gradients_equal_peft(dropout):
    pm, ours = _train_pair("dora", dropout)
    pm.train(), ours.train()
    ids = tokens()
    grads = []
    for m in (pm, ours):
        torch.manual_seed(7)  # same dropout masks: both draw them in the same order from torch's RNG
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), {n.removeprefix("base_model.model.").replace(".default.weight", "")
                                      .replace(".default", ""): p.grad for n, p in m.named_parameters()
                                      if p.requires_grad}))
    (l1, g1), (l2, g2) = grads
    torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-5)
    assert set(g1) == set(g2) and len(g1) == 2 * 2 * 3
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], atol=1e-5, rtol=1e-4, msg=k)


def test_vera_output_equals_peft_same_seed():
    a, b = pair("llama")
    pm = peft.get_peft_model(a, peft.VeraConfig(r=8, target_modules=["q_proj", "down_proj"], projection_prng_key=5))
    L.inject(b, L.LoRAConfig(r=8, variant="vera", vera_seed=5, target_modules=["q_proj", "down_proj"]))
    # the frozen shared matrices are generated, not copied: they must already be equal
    sa, sb = L.adapters.get_state(b).vera_shared["default"]
    torch.testing.assert_close(sa, pm.base_model.vera_A["default"], atol=0, rtol=0)
    torch.testing.assert_close(sb, pm.base_model.vera_B["default"], atol=0, rtol=0)
    randomize_peft_adapter(pm)
    assert copy_peft_to_ours(pm, b) == 4 * 2
    ids = tokens()
    torch.testing.assert_close(logits(b, ids), logits(pm, ids), atol=2e-5, rtol=1e-4)


def test_nothing_matches_is_an_error():
    m = MODELS["llama"]()
    with pytest.raises(ValueError, match=r"lowrank_ext::inject: target_modules must match at least one .*nope"):
        L.inject(m, L.LoRAConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="lowrank_ext::inject: adapter_name must be a new adapter name"):
        L.inject(m, L.LoRAConfig(target_modules=["q_proj"]))
        L.inject(m, L.LoRAConfig(target_modules=["q_proj"]))


def test_regex_and_exclude_modules():
    m = MODELS["llama"]()
    L.inject(m, L.LoRAConfig(target_modules=r".*layers\.1\..*proj", exclude_modules=["o_proj", "gate_proj"]))
    names = {n for n, _, _ in L.inject_summary(m).replaced}
    assert names and all(".layers.1." in n and not n.endswith(("o_proj", "gate_proj")) for n in names)


def test_plain_module():
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    L.inject(net, L.LoRAConfig(r=2, target_modules=["0", "2"]))
    assert isinstance(net[0], L.nn.LoRALinear) and isinstance(net[2], L.nn.LoRALinear)
    assert L.count_parameters(net) == (2 * (8 + 16) + 2 * (16 + 4), 8 * 16 + 16 + 16 * 4 + 4 + 2 * (24 + 20))


def test_config_errors():
    with pytest.raises(ValueError, match="lowrank_ext::LoRAConfig: variant must be one of"):
        L.LoRAConfig(target_modules=["q"], variant="x")
    with pytest.raises(ValueError, match="lowrank_ext::LoRAConfig: use_dora must be False with variant='vera'"):
        L.LoRAConfig(target_modules=["q"], variant="vera", use_dora=True)
    with pytest.raises(ValueError, match="lowrank_ext::LoRAConfig: r must be a positive int"):
        L.LoRAConfig(target_modules=["q"], r=0)
    with pytest.raises(ValueError, match="lowrank_ext::LoRAConfig: target_modules must be"):
        L.LoRAConfig()
    assert L.LoRAConfig(target_modules=["q"], use_dora=True).variant == "dora"


def test_loraplus_param_groups():
    m = MODELS["llama"]()
    L.inject(m, L.LoRAConfig(r=4, target_modules=["q_proj"]))
    groups = L.loraplus_param_groups(m, lr=1e-4, ratio=16)
    assert groups[1]["lr"] == pytest.approx(16e-4) and groups[0]["lr"] == pytest.approx(1e-4)
    bs = {id(p) for n, p in m.named_parameters() if ".lora_B." in n}
    assert {id(p) for p in groups[1]["params"]} == bs and len(bs) == 2
    assert not bs & {id(p) for p in groups[0]["params"]}
    torch.optim.AdamW(groups)  # usable as is
    with pytest.raises(ValueError, match="lowrank_ext::loraplus_param_groups: ratio must be > 0"):
        L.loraplus_param_groups(m, 1e-4, ratio=0)


def test_qlora_inject_counts_equal_peft_on_bitsandbytes():
    bnb = require("bitsandbytes", "0.50.2")
    a, b = pair("llama")
    for name, m in list(a.named_modules()):  # PEFT's QLoRA base: bitsandbytes Linear4bit everywhere but the head
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=False, quant_type="nf4",
                                  compute_dtype=torch.float32)
            q.weight = bnb.nn.Params4bit(m.weight.data.clone(), requires_grad=False, quant_type="nf4")
            parent, _, child = name.rpartition(".")
            setattr(a.get_submodule(parent), child, q.to("cpu"))
    pm = peft.get_peft_model(a, _peft_cfg(r=8, lora_alpha=16, target_modules="all-linear"))
    L.inject(b, L.LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"], quantize="nf4"))
    assert all(isinstance(m, L.nn.QLoRALinear) for n, m in b.named_modules() if n.endswith("_proj"))
    assert L.count_parameters(b) == pm.get_nb_trainable_parameters()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_qlora_dora_forward_and_gradients_equal_peft(dropout):
    """DoRA on an NF4 base (row norms without a dense W) vs PEFT's DoRA on the dense deq(W) of the same bytes."""
    a, b = pair("llama")
    L.inject(b, L.LoRAConfig(r=4, alpha=8, dropout=dropout, variant="dora", quantize="nf4",
                             target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, m in b.named_modules():
            if isinstance(m, L.nn.QLoRALinear):
                a.get_submodule(n).weight.copy_(m.weight.dequantize(torch.float32))
    pm = peft.get_peft_model(a, _peft_cfg(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True,
                                          target_modules=["q_proj", "v_proj"]))
    randomize_peft_adapter(pm)
    copy_peft_to_ours(pm, b)
    pm.train(), b.train()
    ids = tokens()
    grads = []
    for m in (pm, b):
        torch.manual_seed(7)
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), {n.removeprefix("base_model.model.").replace(".default.weight", "")
                                      .replace(".default", ""): p.grad for n, p in m.named_parameters()
                                      if p.requires_grad}))
    (l1, g1), (l2, g2) = grads
    torch.testing.assert_close(l2, l1, atol=2e-5, rtol=1e-5)
    assert set(g1) == set(g2) and len(g1) == 12
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], atol=2e-5, rtol=2e-4, msg=k)


def test_gaussian_init_and_rslora_scaling():
    m = MODELS["llama"]()
    L.inject(m, L.LoRAConfig(r=16, alpha=8, init="gaussian", use_rslora=True, target_modules=["down_proj"]))
    layer = m.model.layers[0].mlp.down_proj
    a = layer.lora_A["default"]
    assert abs(a.std().item() - 1 / 16) < 0.01 and torch.count_nonzero(layer.lora_B["default"]) == 0
    assert layer.specs["default"].scaling == pytest.approx(8 / 4)


def test_qlora_vera_equals_peft_vera_on_deq_weights():
    a, b = pair("llama")
    L.inject(b, L.LoRAConfig(r=8, variant="vera", vera_seed=2, quantize="nf4", target_modules=["q_proj", "up_proj"]))
    with torch.no_grad():
        for n, m in b.named_modules():
            if isinstance(m, L.nn.QLoRALinear):
                a.get_submodule(n).weight.copy_(m.weight.dequantize(torch.float32))
    pm = peft.get_peft_model(a, peft.VeraConfig(r=8, target_modules=["q_proj", "up_proj"], projection_prng_key=2))
    randomize_peft_adapter(pm)
    assert copy_peft_to_ours(pm, b) == 8
    ids = tokens()
    torch.testing.assert_close(logits(b, ids), logits(pm.eval(), ids), atol=5e-5, rtol=1e-4)


def test_dora_magnitude_initialised_like_peft():
    a, b = pair("gpt2")  # Conv1D weights [in, out]: the norm is over the output rows of Wᵀ
    pm = peft.get_peft_model(a, _peft_cfg(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "c_proj"]))
    L.inject(b, L.LoRAConfig(r=4, alpha=8, use_dora=True, target_modules=["c_attn", "c_proj"]))
    theirs = {n.removeprefix("base_model.model.").replace(".default.weight", ""): p
              for n, p in pm.named_parameters() if "magnitude" in n}
    ours = {n.replace(".default", ""): p for n, p in b.named_parameters() if "magnitude" in n}
    assert set(ours) == set(theirs) and len(ours) == 6  # c_attn, attn.c_proj, mlp.c_proj x 2 layers
    for k, v in ours.items():
        torch.testing.assert_close(v, theirs[k], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("rank_pattern, alpha_pattern", [
    ({"v_proj": 2, r".*\.1\.mlp\.down_proj": 6}, {"q_proj": 3, "down_proj": 24}),
    # PEFT's rule is a regex over a dotted suffix, `(.*\.)?(key)$`: alternations and partial paths match too
    ({"q_proj|v_proj": 2, r"self_attn\.[ko]_proj": 6}, {r"mlp\.(up|gate)_proj": 3, "1.mlp.down_proj": 24}),
])
def test_rank_and_alpha_patterns_equal_peft(rank_pattern, alpha_pattern):
    a, b = pair("llama")
    kw = {"r": 4, "lora_alpha": 8, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    pm = peft.get_peft_model(a, _peft_cfg(target_modules=TARGETS["llama"], **kw))
    L.inject(b, L.LoRAConfig(r=4, alpha=8, target_modules=TARGETS["llama"], rank_pattern=kw["rank_pattern"],
                             alpha_pattern=kw["alpha_pattern"]))
    assert L.count_parameters(b) == pm.get_nb_trainable_parameters()
    for n, m in b.named_modules():
        if isinstance(m, L.nn.LoRALinear):
            theirs = pm.get_submodule("base_model.model." + n)
            assert (m.specs["default"].r, m.specs["default"].scaling) == (theirs.r["default"],
                                                                         theirs.scaling["default"]), n
    randomize_peft_adapter(pm)
    copy_peft_to_ours(pm, b)
    ids = tokens()
    torch.testing.assert_close(logits(b, ids), logits(pm, ids), atol=2e-5, rtol=1e-4)


def test_qlora_model_state_dict_round_trip():
    _, m = pair("llama")
    L.inject(m, L.LoRAConfig(r=4, target_modules="all-linear", quantize="nf4"))
    sd = m.state_dict()
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in sd
    assert sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in m.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    _, other = pair("llama", seed=1)  # different base weights: everything comes from the state dict
    L.inject(other, L.LoRAConfig(r=4, target_modules="all-linear", quantize="nf4"))
    other.load_state_dict(m.state_dict())
    ids = tokens()
    torch.testing.assert_close(logits(other, ids), logits(m, ids), atol=0, rtol=0)


def test_failed_inject_changes_nothing():
    """Quantizing fails on the last target (a NaN weight): the layers already swapped in are put back."""
    from _tiny_models import assert_unchanged, snapshot

    _, m = pair("llama")
    L.inject(m, L.LoRAConfig(r=2, target_modules=["q_proj", "k_proj"]), "other")  # q_proj is an adapter layer
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    before = snapshot(m)
    with pytest.raises(ValueError, match="lowrank_ext::quantize_nf4: x must contain only finite values"):
        L.inject(m, L.LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], quantize="nf4"), "new")
    assert_unchanged(before, snapshot(m))
    assert "new" not in m.model.layers[0].self_attn.q_proj.specs
