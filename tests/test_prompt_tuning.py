"""Prompt tuning: forward, loss and generate equal to PEFT's for the same virtual tokens, files both ways with
PEFT, gradients only to the virtual tokens, text initialisation as PEFT's, and every error message."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _tiny_models import assert_unchanged, pair, snapshot, tiny_llama, tokens
from conftest import require

import lowrank_ext as L

peft = require("peft", "0.21.2")
require("safetensors")
from safetensors.torch import load_file, save_file


class _Tok:
    """A stand-in tokenizer: one id per character (mod 96), with a BOS id 1 first (as Llama's adds one)."""

    def __call__(self, text):
        return {"input_ids": [1] + [ord(c) % 96 for c in text]}


def _peft_pt(model, n=5, **kw):
    return peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, **kw))


@torch.no_grad()
def _same_prompt(pm, ours):
    ours.prompt_embeddings["default"].copy_(pm.prompt_encoder["default"].embedding.weight)


def _mask(ids):
    m = torch.ones_like(ids)
    m[0, :2] = 0  # left padding on the first row
    return m


def test_forward_loss_and_mask_equal_peft():
    base, ref = pair("llama")
    pm = _peft_pt(ref)
    ours = L.inject(base, L.PromptTuningConfig(5))
    assert isinstance(ours, L.PromptTuningModel) and ours.base_model is base
    _same_prompt(pm, ours)
    ids = tokens()
    for kw in ({}, {"attention_mask": _mask(ids)}, {"labels": ids}, {"attention_mask": _mask(ids), "labels": ids}):
        a, b = ours(input_ids=ids, **kw), pm(input_ids=ids, **kw)
        assert a.logits.shape == (3, 5 + 7, 96)
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
        if "labels" in kw:
            torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    assert L.count_parameters(ours) == tuple(pm.get_nb_trainable_parameters())


def test_generate_equals_greedy_decoding_with_peft_forward():
    """generate (with the KV cache) equals greedy decoding by repeated full forwards of PEFT's model. PEFT's own
    generate (0.21.2 with transformers 5.25) agrees on the first new token and then drifts: its cache positions
    count the real tokens only, after the virtual ones were put in the cache — so it is not the reference."""
    base, ref = pair("llama")
    pm = _peft_pt(ref)
    ours = L.inject(base, L.PromptTuningConfig(5))
    _same_prompt(pm, ours)
    ids = tokens(batch=2, seq=4)
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    a = ours.generate(input_ids=ids, **kw)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, pm(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert a.shape == (2, 4 + 6)
    assert torch.equal(a, seq)
    assert torch.equal(a[:, :5], pm.generate(input_ids=ids, **kw)[:, :5])  # PEFT's generate: the first token
    assert torch.equal(ours.generate(ids, attention_mask=torch.ones_like(ids), **kw), a)


def test_init_text_as_peft():
    """PEFT's TEXT init: the text's ids cut or repeated to n, looked up in the input embeddings."""
    model = tiny_llama()
    emb = model.get_input_embeddings().weight.detach().clone()
    ours = L.inject(model, L.PromptTuningConfig(7, init_text="abc", tokenizer=_Tok()))
    ids = ([1] + [ord(c) % 96 for c in "abc"]) * 2
    torch.testing.assert_close(ours.prompt_embeddings["default"], emb[ids[:7]])
    short = L.inject(tiny_llama(), L.PromptTuningConfig(2, init_text="abc", tokenizer=_Tok()))
    torch.testing.assert_close(short.prompt_embeddings["default"], emb[[1, ord("a") % 96]])


def test_gradients_reach_only_the_virtual_tokens():
    ours = L.inject(tiny_llama(), L.PromptTuningConfig(4))
    ids = tokens()
    ours(input_ids=ids, labels=ids).loss.backward()
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_embeddings.default"]
    assert ours.prompt_embeddings["default"].grad.abs().sum() > 0
    assert all(p.grad is None for n, p in ours.named_parameters() if n != "prompt_embeddings.default")


def test_our_file_loads_in_peft_and_back(tmp_path):
    base, ref = pair("llama")
    ours = L.inject(base, L.PromptTuningConfig(5, init_text="hi", tokenizer=_Tok()))
    with torch.no_grad():
        ours.prompt_embeddings["default"].add_(0.1)
    L.save_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["token_dim"] == 64 and cfg["task_type"] == "CAUSAL_LM"
    assert list(load_file(str(tmp_path / "adapter_model.safetensors"))) == ["prompt_embeddings"]
    pm = peft.PeftModel.from_pretrained(ref, str(tmp_path))
    ids = tokens()
    torch.testing.assert_close(ours(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    again = L.load_adapter(tiny_llama(), tmp_path)
    assert isinstance(again, L.PromptTuningModel)
    torch.testing.assert_close(again(input_ids=ids).logits, ours(input_ids=ids).logits)
    assert isinstance(L.read_adapter_config(tmp_path), L.PromptTuningConfig)


def test_peft_file_loads_in_ours(tmp_path):
    base, ref = pair("llama")
    pm = _peft_pt(ref, n=3)
    pm.save_pretrained(str(tmp_path))
    ours = L.load_adapter(base, tmp_path)
    ids = tokens()
    torch.testing.assert_close(ours(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fault, pattern", [
    ("shape", r"prompt_embeddings must have shape \(5, 64\), got \(4, 64\)"),
    ("missing", r"must hold every adapter key, got missing key 'prompt_embeddings'"),
    ("extra", r"must hold only keys the model has, got unexpected key 'other'"),
    ("nan", r"prompt_embeddings must be finite, got 1 NaN/Inf values"),
])
def test_mismatched_files_refuse_and_change_nothing(tmp_path, fault, pattern):
    L.save_adapter(L.inject(tiny_llama(), L.PromptTuningConfig(5)), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    sd = load_file(str(path))
    if fault == "shape":
        sd["prompt_embeddings"] = sd["prompt_embeddings"][:4].contiguous()
    elif fault == "missing":
        sd = {"other": torch.ones(1)}
    elif fault == "extra":
        sd["other"] = torch.ones(1)
    else:
        sd["prompt_embeddings"][0, 0] = float("inf")
    save_file(sd, str(path), metadata={"format": "pt"})
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=pattern):
        L.load_adapter(model, tmp_path)
    assert_unchanged(before, snapshot(model))


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: d.update(token_dim=32),
     (r"must describe an adapter this model can hold, got: lowrank_ext::inject: PromptTuningConfig.token_dim must "
      r"equal the model's embedding size 64, got 32")),
    (lambda d: d.update(num_virtual_tokens=0), r"field 'num_virtual_tokens' must be a positive int, got 0"),
    (lambda d: d.update(task_type="SEQ_2_SEQ_LM"), r"field 'task_type' must be 'CAUSAL_LM'"),
    (lambda d: d.update(num_transformer_submodules=2), r"field 'num_transformer_submodules' must be 1"),
    (lambda d: d.update(prompt_tuning_init_text=3), r"field 'prompt_tuning_init_text' must be null or a string"),
])
def test_config_errors_name_the_file_and_field(tmp_path, edit, pattern):
    L.save_adapter(L.inject(tiny_llama(), L.PromptTuningConfig(5)), tmp_path)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    edit(d)
    (tmp_path / "adapter_config.json").write_text(json.dumps(d))
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=pattern):
        L.load_adapter(model, tmp_path)
    assert_unchanged(before, snapshot(model))


def test_errors():
    with pytest.raises(ValueError, match=r"lowrank_ext::PromptTuningConfig: num_virtual_tokens must be a positive "
                                         r"int, got 0"):
        L.PromptTuningConfig(0)
    with pytest.raises(ValueError, match=r"lowrank_ext::PromptTuningConfig: init_text must be None or a non-empty "
                                         r"str, got ''"):
        L.PromptTuningConfig(2, init_text="")
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"lowrank_ext::inject: PromptTuningConfig.tokenizer or tokenizer_name_or_path "
                                         r"must be given with init_text"):
        L.inject(model, L.PromptTuningConfig(2, init_text="abc"))
    with pytest.raises(ValueError, match=r"lowrank_ext::inject: PromptTuningConfig.token_dim must equal the model's "
                                         r"embedding size 64, got 8"):
        L.inject(model, L.PromptTuningConfig(2, token_dim=8))
    with pytest.raises(ValueError, match=r"lowrank_ext::inject: model must have input embeddings"):
        L.inject(torch.nn.Linear(2, 2), L.PromptTuningConfig(2))
    assert_unchanged(before, snapshot(model))
    wrapped = L.inject(model, L.PromptTuningConfig(2))
    with pytest.raises(ValueError, match=r"lowrank_ext::inject: model must not already be a PromptTuningModel"):
        L.inject(wrapped, L.PromptTuningConfig(2))
    ids = tokens()
    with pytest.raises(ValueError, match=r"lowrank_ext::PromptTuningModel.forward: exactly one of input_ids and "
                                         r"inputs_embeds must be given, got input_ids=None, inputs_embeds=None"):
        wrapped()
    with pytest.raises(ValueError, match=r"lowrank_ext::PromptTuningModel.generate: input_ids must be given, got None"):
        wrapped.generate()
    with pytest.raises(ValueError, match=r"lowrank_ext::PromptTuningModel.forward: past_key_values must be None"):
        wrapped(input_ids=ids, past_key_values=object())
    lora = L.inject(tiny_llama(), L.LoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"lowrank_ext::inject: model must have no adapters of another method to add "
                                         r"prompt tuning, got adapters \['default'\]"):
        L.inject(lora, L.PromptTuningConfig(2))


def test_load_refuses_quantize_and_existing_wrapper(tmp_path):
    L.save_adapter(L.inject(tiny_llama(), L.PromptTuningConfig(3)), tmp_path)
    with pytest.raises(ValueError, match=r"lowrank_ext::load_adapter: quantize must be None for a PROMPT_TUNING adapter"):
        L.load_adapter(tiny_llama(), tmp_path, quantize="nf4")
    wrapped = L.load_adapter(tiny_llama(), tmp_path)
    assert L.load_adapter(wrapped, tmp_path) is wrapped  # the same adapter again: loaded in place (Trainer's resume)
    L.save_adapter(L.inject(tiny_llama(), L.PromptTuningConfig(4)), tmp_path / "four")
    with pytest.raises(ValueError, match=r"lowrank_ext::load_adapter: the model's adapter 'default' must be the adapter "
                                         r"in .*got differing: num_virtual_tokens \(file 4, model 3\)"):
        L.load_adapter(wrapped, tmp_path / "four")
    with pytest.raises(ValueError, match=r"must describe an adapter this model can hold, got: lowrank_ext::inject: "
                                         r"model must not already be a PromptTuningModel"):
        L.load_adapter(wrapped, tmp_path, adapter_name="other")


def test_wrapper_reads_base_attributes_and_unwraps():
    base = tiny_llama()
    w = L.inject(base, L.PromptTuningConfig(2))
    assert w.config is base.config and w.unwrap() is base
    assert w.get_input_embeddings() is base.get_input_embeddings()
    assert copy.deepcopy(w).num_virtual_tokens == 2


def test_disable_and_delete():
    base = tiny_llama()
    ids = tokens()
    want = base(input_ids=ids).logits
    w = L.inject(base, L.PromptTuningConfig(3))
    with L.disable_adapters(w):
        torch.testing.assert_close(w(input_ids=ids).logits, want)
        assert w.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (3, 9)
    assert w(input_ids=ids).logits.shape == (3, 10, 96)
    L.delete_adapter(w, "default")
    assert len(w.prompt_embeddings) == 0
    torch.testing.assert_close(w(input_ids=ids).logits, want)


def test_more_errors(tmp_path):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"lowrank_ext::inject: adapter_name must be a non-empty str without '.', "
                                         r"got 'a.b'"):
        L.inject(model, L.PromptTuningConfig(2), "a.b")

    class Empty:
        def __call__(self, text):
            return {"input_ids": []}

    with pytest.raises(ValueError, match=r"lowrank_ext::inject: PromptTuningConfig.init_text must give at least one "
                                         r"token, got 'x' -> \[\]"):
        L.inject(model, L.PromptTuningConfig(2, init_text="x", tokenizer=Empty()))
    assert_unchanged(before, snapshot(model))
    L.save_adapter(L.inject(tiny_llama(), L.PromptTuningConfig(2)), tmp_path)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    d["modules_to_save"] = ["lm_head"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"field 'modules_to_save' must be null for prompt tuning"):
        L.load_adapter(model, tmp_path)
