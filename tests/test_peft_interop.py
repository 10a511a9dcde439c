"""PEFT adapter files both ways (LoRA, DoRA, VeRA), strict loading, and bitsandbytes Linear4bit import."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _tiny_models import copy_peft_to_ours, logits, pair, randomize_peft_adapter, tokens
from conftest import require

import lowrank_ext as L

peft = require("peft", "0.21.2")
safetensors = require("safetensors")
from safetensors import safe_open
from safetensors.torch import load_file, save_file

T = ["q_proj", "v_proj", "down_proj"]


def _keys(directory):
    with safe_open(os.path.join(directory, "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()  # noqa: SIM118


@pytest.mark.parametrize("kw", [{}, {"use_dora": True}, {"use_rslora": True, "r": 8},
                                {"modules_to_save": ["lm_head"]}, {"bias": "all"}, {"bias": "lora_only"}],
                         ids=["lora", "dora", "rslora", "modules_to_save", "bias_all", "bias_lora_only"])
def test_ours_to_peft(tmp_path, kw):
    a, b = pair("llama")
    kw = {"r": 4, **kw}
    ours_cfg = L.LoRAConfig(alpha=8, target_modules=T, **{k.replace("lora_", ""): v for k, v in kw.items()})
    L.inject(b, ours_cfg)
    # train-like random values in every adapter tensor (B != 0, biases/heads changed)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in b.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    L.save_adapter(b, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(a, tmp_path / "ours").eval()
    ids = tokens()
    torch.testing.assert_close(logits(pm, ids), logits(b, ids), atol=2e-5, rtol=1e-4)
    # same keys, shapes and metadata as the file PEFT itself writes
    pm.save_pretrained(tmp_path / "peft")
    (ko, mo), (kp, mp) = _keys(tmp_path / "ours"), _keys(tmp_path / "peft")
    assert ko == kp and mo == mp == {"format": "pt"}
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] == ours_cfg.use_dora


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["dense", "nf4"])
def test_peft_to_ours(tmp_path, use_dora, quantize):
    a, b = pair("llama")
    pm = peft.get_peft_model(a, peft.LoraConfig(r=4, lora_alpha=8, target_modules=T, use_dora=use_dora))
    randomize_peft_adapter(pm)
    pm.save_pretrained(tmp_path)
    L.load_adapter(b, tmp_path, quantize=quantize)
    ids = tokens()
    ref = logits(pm, ids)
    if quantize is None:
        torch.testing.assert_close(logits(b, ids), ref, atol=2e-5, rtol=1e-4)
    else:  # NF4 base: compare with PEFT on the same dequantized base weights
        for n, m in b.named_modules():
            if isinstance(m, L.nn.QLoRALinear):
                pm.get_submodule("base_model.model." + n).get_base_layer().weight.data.copy_(m.weight.dequantize())
        if use_dora:  # PEFT's magnitude came from the dense W: give both the same m
            copy_peft_to_ours(pm, b)
        torch.testing.assert_close(logits(b, ids), logits(pm, ids), atol=1e-4, rtol=1e-3)


def test_loading_into_an_injected_model_and_between_names(tmp_path):
    a, b = pair("llama")
    pm = peft.get_peft_model(a, peft.LoraConfig(r=4, lora_alpha=8, target_modules=T))
    randomize_peft_adapter(pm)
    pm.save_pretrained(tmp_path)
    L.inject(b, L.LoRAConfig(r=4, alpha=8, target_modules=T))  # existing "default": weights are replaced
    L.load_adapter(b, tmp_path)
    L.load_adapter(b, tmp_path, adapter_name="second")          # a new adapter from the file's config
    ids = tokens()
    ref = logits(pm, ids)
    torch.testing.assert_close(logits(b, ids), ref, atol=2e-5, rtol=1e-4)
    L.set_adapter(b, "second")
    torch.testing.assert_close(logits(b, ids), ref, atol=2e-5, rtol=1e-4)


def test_vera_files_both_ways(tmp_path):
    a, b = pair("llama")
    pm = peft.get_peft_model(a, peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"], projection_prng_key=3))
    randomize_peft_adapter(pm)
    pm.save_pretrained(tmp_path / "peft")
    L.load_adapter(b, tmp_path / "peft")
    ids = tokens()
    torch.testing.assert_close(logits(b, ids), logits(pm, ids), atol=2e-5, rtol=1e-4)
    L.save_adapter(b, tmp_path / "ours")
    assert _keys(tmp_path / "ours")[0] == _keys(tmp_path / "peft")[0]
    a2, _ = pair("llama")
    pm2 = peft.PeftModel.from_pretrained(a2, tmp_path / "ours").eval()
    torch.testing.assert_close(logits(pm2, ids), logits(b, ids), atol=2e-5, rtol=1e-4)


def _saved(tmp_path):
    _, b = pair("llama")
    L.inject(b, L.LoRAConfig(r=4, alpha=8, target_modules=T))
    L.save_adapter(b, tmp_path)
    return load_file(tmp_path / "adapter_model.safetensors")


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def test_missing_key_is_an_error(tmp_path):
    sd = _saved(tmp_path)
    del sd[KEY]
    save_file(sd, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    _, fresh = pair("llama")
    with pytest.raises(ValueError, match=r"lowrank_ext::load_adapter: .* missing key '" + KEY.replace(".", r"\.")):
        L.load_adapter(fresh, tmp_path)


def test_unexpected_key_is_an_error(tmp_path):
    sd = _saved(tmp_path)
    sd[KEY.replace("q_proj", "k_proj")] = sd[KEY].clone()
    save_file(sd, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    _, fresh = pair("llama")
    with pytest.raises(ValueError, match=r"unexpected key '.*k_proj\.lora_A\.weight'"):
        L.load_adapter(fresh, tmp_path)


def test_unprefixed_keys_are_an_error(tmp_path):
    sd = _saved(tmp_path)
    save_file({k.removeprefix("base_model.model."): v for k, v in sd.items()}, tmp_path / "adapter_model.safetensors")
    _, fresh = pair("llama")
    with pytest.raises(ValueError, match="missing key 'base_model.model."):
        L.load_adapter(fresh, tmp_path)


def test_shape_mismatch_is_an_error(tmp_path):
    sd = _saved(tmp_path)
    sd[KEY] = sd[KEY][:, :-1].contiguous()
    save_file(sd, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    _, fresh = pair("llama")
    with pytest.raises(ValueError, match=r"lowrank_ext::load_adapter: " + KEY.replace(".", r"\.") + r" must have shape \(4, 64\), got \(4, 63\)"):
        L.load_adapter(fresh, tmp_path)


def test_never_overwrites_unless_asked(tmp_path):
    _, b = pair("llama")
    L.inject(b, L.LoRAConfig(r=4, alpha=8, target_modules=T))
    L.save_adapter(b, tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        b.model.layers[0].self_attn.q_proj.lora_B["default"].fill_(1.0)
    with pytest.raises(FileExistsError, match="lowrank_ext::save_adapter: directory must not already hold an adapter"):
        L.save_adapter(b, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    L.save_adapter(b, tmp_path, overwrite=True)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() != before


def test_only_safetensors(tmp_path):
    torch.save({}, tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_config.json").write_text("{}")
    _, b = pair("llama")
    with pytest.raises(FileNotFoundError, match="must contain adapter_model.safetensors"):
        L.load_adapter(b, tmp_path)


def test_load_with_a_differing_config_refuses_where_peft_keeps_the_model_config(tmp_path):
    """PEFT's load_adapter into an adapter name the model already has keeps the in-memory config and only
    copies the tensors (here: runs with scaling 64/4 = 16 instead of the file's 8/4 = 2). We refuse instead,
    and after delete_adapter the adapter is built from the file, equal to PeftModel.from_pretrained."""
    a, b = pair("llama")
    a2, _ = pair("llama")
    pm = peft.get_peft_model(a, peft.LoraConfig(r=4, lora_alpha=8, target_modules=T))
    randomize_peft_adapter(pm)
    pm.save_pretrained(tmp_path)
    pm2 = peft.get_peft_model(a2, peft.LoraConfig(r=4, lora_alpha=64, target_modules=T))
    pm2.load_adapter(tmp_path, adapter_name="default")
    assert pm2.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == 16.0  # not the file's 2
    L.inject(b, L.LoRAConfig(r=4, alpha=64, target_modules=T))
    with pytest.raises(ValueError, match=r"lowrank_ext::load_adapter: the model's adapter 'default' must have the "
                                         r"config in .* got differing fields: alpha \(file 8\.0, model 64\.0\)\. "):
        L.load_adapter(b, tmp_path)
    L.delete_adapter(b, "default")
    L.load_adapter(b, tmp_path)
    ids = tokens()
    torch.testing.assert_close(logits(b, ids), logits(pm.eval(), ids), atol=2e-5, rtol=1e-4)


# ---- adapter_config.json fields: what PEFT writes loads, what changes the math and we lack is refused ----------
def _peft_lora_dir(tmp_path, **kw):
    a, _ = pair("llama")
    pm = peft.get_peft_model(a, peft.LoraConfig(r=4, lora_alpha=8, target_modules=T, **kw))
    randomize_peft_adapter(pm)
    pm.save_pretrained(tmp_path)
    return pm.eval()


def _set_field(directory, key, value):
    path = os.path.join(directory, "adapter_config.json")
    cfg = json.loads(open(path).read())
    cfg[key] = value
    with open(path, "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("field,kw", [
    ("alora_invocation_tokens", {"alora_invocation_tokens": [5, 6], "task_type": "CAUSAL_LM"}),
    ("use_qalora", {"use_qalora": True}),
    ("init_lora_weights", {"init_lora_weights": "pissa"}),   # PEFT rewrites the base weight when it loads this
    ("future_feature", {}),                                  # a field no table knows, set: may change the math
], ids=["alora", "qalora", "pissa", "unknown-field"])
def test_peft_files_with_math_changing_fields_we_lack_are_refused(tmp_path, field, kw):
    """Issue 19 defect 3: these loaded silently as plain LoRA (aLoRA: logits 0.73 off PEFT's)."""
    _peft_lora_dir(tmp_path, **kw)
    if field == "future_feature":
        _set_field(tmp_path, field, {"mode": "on"})
    _, b = pair("llama")
    before = {n: p.clone() for n, p in b.state_dict().items()}
    path = str(tmp_path / "adapter_config.json").replace(".", r"\.")
    with pytest.raises(ValueError, match=rf"lowrank_ext::load_adapter: {path} field '{field}' must be "):
        L.load_adapter(b, tmp_path)
    assert L.get_state(b) is None and all(torch.equal(p, before[n]) for n, p in b.state_dict().items())


def test_set_fields_unknown_to_us_are_ignored_only_while_unset(tmp_path):
    pm = _peft_lora_dir(tmp_path)
    _set_field(tmp_path, "future_feature", None)     # unset: the feature is off, loads
    _, b = pair("llama")
    L.load_adapter(b, tmp_path)
    ids = tokens()
    torch.testing.assert_close(logits(b, ids), logits(pm, ids), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("make", [
    lambda: peft.LoraConfig(target_modules=T),
    lambda: peft.LoraConfig(target_modules=T, use_dora=True, task_type="CAUSAL_LM"),
    lambda: peft.VeraConfig(target_modules=["q_proj"]),
    lambda: peft.IA3Config(target_modules=T, feedforward_modules=["down_proj"]),
    lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, token_dim=64,
                                    num_transformer_submodules=1),
], ids=["lora", "dora", "vera", "ia3", "prompt_tuning"])
def test_every_field_peft_writes_with_its_defaults_is_known_and_reads(make):
    """Every key of PEFT 0.21.2's to_dict() is in our table (a new PEFT field makes this fail: classify it), and
    the dict itself (sets of names included) reads: with defaults, nothing is refused."""
    from lowrank_ext.adapters import peft_fields
    from lowrank_ext.adapters.files import _CONFIG_CLASSES

    d = make().to_dict()
    table = getattr(peft_fields, d["peft_type"])
    assert set(d) - {"peft_type"} <= {f.name for f in table.fields}
    cfg = _CONFIG_CLASSES[d["peft_type"]].from_peft_dict(d)
    if d["peft_type"] in ("LORA", "VERA", "IA3"):
        assert cfg.target_modules == sorted(d["target_modules"])


def test_loraconfig_from_peft_dict_accepts_pefts_own_sets():
    """Issue 19 defect 12: PEFT's LoraConfig.to_dict() holds sets; any collection of names reads."""
    d = peft.LoraConfig(r=4, target_modules=T, exclude_modules=["o_proj"]).to_dict()
    assert isinstance(d["target_modules"], set)
    cfg = L.LoRAConfig.from_peft_dict(d)
    assert cfg.target_modules == sorted(T) and cfg.exclude_modules == ["o_proj"] and cfg.r == 4
    assert L.LoRAConfig.from_peft_dict({**d, "target_modules": tuple(T)}).target_modules == T
    with pytest.raises(ValueError, match=r"lowrank_ext::LoRAConfig.from_peft_dict: field 'target_modules' must be a "
                                         r"list of module names or a regex string, got \{1\}"):
        L.LoRAConfig.from_peft_dict({**d, "target_modules": {1}})


# ---- PEFT's AutoPeftModelForCausalLM reads our files (task_type) --------------------------------------------
@pytest.mark.parametrize("kw", [{"variant": "lora"}, {"variant": "dora"}, {"variant": "vera", "r": 8}],
                         ids=["lora", "dora", "vera"])
def test_auto_peft_model_for_causal_lm_loads_our_files(tmp_path, kw):
    """Issue 19 defect 12: our LoRA / DoRA / VeRA files said task_type null, so AutoPeftModelForCausalLM refused."""
    from _tiny_models import save_tiny_llama_dir
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    save_tiny_llama_dir(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    L.inject(model, L.LoRAConfig(**{"r": 4, "alpha": 8, "target_modules": T, **kw}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    L.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    pm = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    ids = tokens()
    torch.testing.assert_close(logits(pm, ids), logits(model, ids), atol=2e-5, rtol=1e-4)


def test_task_type_is_causal_lm_only_for_a_causal_lm():
    from _tiny_models import tiny_bert, tiny_gpt2
    from lowrank_ext.adapters.peft_fields import peft_task_type

    assert peft_task_type(pair("llama")[0]) == peft_task_type(tiny_gpt2()) == "CAUSAL_LM"
    assert peft_task_type(tiny_bert()) is None                     # BertForSequenceClassification
    assert peft_task_type(torch.nn.Linear(2, 2)) is None


# ---- prompt tuning: a "TEXT" file loads without its tokenizer (PEFT's behaviour) -----------------------------
def test_prompt_tuning_text_file_loads_without_its_tokenizer(tmp_path):
    """Issue 19 defect 9: loading looked the tokenizer up (OSError once it was gone); the weights are in the file."""
    import shutil

    from _tiny_models import save_tiny_llama_dir
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    save_tiny_llama_dir(base)
    tok_dir = tmp_path / "tokenizer"
    shutil.copytree(base, tok_dir)
    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                             peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                                     prompt_tuning_init="TEXT", prompt_tuning_init_text="hello there",
                                                     tokenizer_name_or_path=str(tok_dir))).eval()
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.add_(0.1)  # "trained": not what the text init gives
    pm.save_pretrained(tmp_path / "adapter")
    shutil.rmtree(tok_dir)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["prompt_tuning_init"] == "TEXT" and cfg["tokenizer_name_or_path"] == str(tok_dir)
    ours = L.load_adapter(AutoModelForCausalLM.from_pretrained(base).eval(), tmp_path / "adapter")
    torch.testing.assert_close(ours.prompt_embeddings["default"], pm.prompt_encoder["default"].embedding.weight)
    ids = tokens()
    torch.testing.assert_close(logits(ours, ids), logits(pm, ids), atol=2e-5, rtol=1e-4)
