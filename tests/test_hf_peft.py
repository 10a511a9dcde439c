"""PEFT's get_peft_model on a lowrank_ext NF4 model (lowrank_ext/hf/peft_lora.py).

Reference: PEFT's own LoRA / rslora / DoRA on the same model with every NF4 layer replaced by a dense nn.Linear
holding deq(W) (what our fused op computes with), compared in fp32 — logits and adapter gradients.
"""

from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
from conftest import require
from torch import nn

from lowrank_ext.nf4 import NF4Weight, quantize_nf4
from lowrank_ext.nn import Linear4bit

peft = require("peft", "0.21.2")
transformers = require("transformers")
H = require("lowrank_ext.hf")
from lowrank_ext.hf import NF4LoraLinear, enable_peft, merge_and_unload
from lowrank_ext.hf.peft_lora import register

enable_peft()
OP = "lowrank_ext.nf4_lora_linear.default"
N_ADAPTED = 14  # tiny Llama: 2 layers x (q, k, v, o, gate, up, down)


def tiny_llama(seed: int = 0) -> nn.Module:
    """2-layer Llama whose vocabulary (128) differs from every linear's sizes (64, 32, 96), so a [vocab, hidden]
    tensor is never mistaken for a dense weight below."""
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def nf4_model(model: nn.Module) -> nn.Module:
    """`model` through lowrank_ext.NF4Config: saved to a temporary directory, then
    `AutoModelForCausalLM.from_pretrained(dir, quantization_config=NF4Config())` (every nn.Linear / Conv1D but the
    output head becomes a Linear4bit, the model says it is 4-bit)."""
    import tempfile

    from lowrank_ext.hf import NF4Config

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return transformers.AutoModelForCausalLM.from_pretrained(d, quantization_config=NF4Config()).eval()


def dense_twin(model: nn.Module) -> nn.Module:
    """A copy of an NF4 model with each Linear4bit replaced by nn.Linear(deq(W)): PEFT's plain-LoRA reference."""
    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear4bit):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                lin.weight.data.copy_(child.weight.dequantize(torch.float32))
                if child.bias is not None:
                    lin.bias.data.copy_(child.bias)
                setattr(parent, name, lin)
    for attr in ("is_loaded_in_4bit", "quantization_method"):
        twin.__dict__.pop(attr, None)
    return twin


def randomize(pm: nn.Module, seed: int = 0) -> None:
    """Train-like adapter values (B != 0, magnitudes off the norms) so every term of the math is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def copy_adapters(src: nn.Module, dst: nn.Module) -> None:
    sd = {k: v for k, v in src.state_dict().items() if "lora_" in k}
    missing = set(sd) - set(dst.state_dict())
    assert not missing, missing
    dst.load_state_dict(sd, strict=False)


def ids(b: int = 2, t: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (b, t), generator=torch.Generator().manual_seed(seed))


def pair(model: nn.Module | None = None, **kw):
    """(ours, PEFT's dense reference) with identical adapters."""
    base = nf4_model(tiny_llama() if model is None else model)
    twin = dense_twin(base)
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", **kw)
    ours = peft.get_peft_model(base, peft.LoraConfig(**cfg))
    ref = peft.get_peft_model(twin, peft.LoraConfig(**cfg))
    randomize(ours)
    copy_adapters(ours, ref)
    return ours, ref


def count_ops(fn) -> tuple[dict[str, int], list[tuple[torch.Size, torch.dtype]]]:
    """Calls per op and the (shape, dtype) of every op output while fn() runs (TorchDispatchMode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls: dict[str, int] = {}
    outs: list = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls[str(func)] = calls.get(str(func), 0) + 1
            r = func(*args, **(kwargs or {}))
            for t in r if isinstance(r, (tuple, list)) else (r,):
                if isinstance(t, torch.Tensor):
                    outs.append((t.shape, t.dtype))
            return r

    with Count():
        fn()
    return calls, outs


CASES = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


@pytest.mark.parametrize("kw", list(CASES.values()), ids=list(CASES))
def test_logits_and_gradients_match_peft_on_dequantized_weights(kw):
    ours, ref = pair(**kw)
    assert sum(isinstance(m, NF4LoraLinear) for m in ours.modules()) == N_ADAPTED
    assert not any(isinstance(m, Linear4bit) for m in ref.modules())
    x = ids()
    for model in (ours, ref):
        model.train()
        model(x, labels=x).loss.backward()
    torch.testing.assert_close(ours(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert len(grads) == N_ADAPTED * (3 if "use_dora" in kw else 2)
    for n, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads.pop(n), rtol=1e-4, atol=1e-6)
    assert not grads


def test_gpt2_conv1d_layers_all_linear_match_peft():
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    ours, ref = pair(transformers.GPT2LMHeadModel(cfg).eval())
    names = {n.rsplit(".", 1)[-1] for n, m in ours.named_modules() if isinstance(m, NF4LoraLinear)}
    assert names == {"c_attn", "c_proj", "c_fc"}
    x = ids()
    torch.testing.assert_close(ours(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"use_dora": True}], ids=["lora", "dora"])
def test_dropout_matches_peft_under_the_same_seed(kw):
    ours, ref = pair(lora_dropout=0.3, **kw)
    x = ids()
    out = []
    for model in (ours, ref):
        model.train()
        torch.manual_seed(5)
        out.append(model(x).logits)
    assert not torch.allclose(out[0], ours.eval()(x).logits)  # the dropout really acted
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"use_dora": True}, {"lora_dropout": 0.1}], ids=["lora", "dora", "dropout"])
def test_one_fused_op_per_adapted_layer_and_no_dense_weight(kw):
    ours, _ = pair(**kw)
    ours.train()
    x = ids()
    shapes = {tuple(m.weight.shape) for m in ours.modules() if isinstance(m, Linear4bit)}
    shapes |= {s[::-1] for s in shapes}
    calls, outs = count_ops(lambda: ours(x, labels=x).loss.backward())
    assert calls.get(OP) == N_ADAPTED, calls
    dense = [(s, d) for s, d in outs if d.is_floating_point and tuple(s) in shapes]
    assert not dense, dense  # no deq(W) (nor its transpose) ever computed, forward or backward

    saved: list[torch.Tensor] = []
    params = {p.untyped_storage().data_ptr() for p in ours.parameters()}

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = ours(x, labels=x).loss
    del loss
    big = [tuple(t.shape) for t in saved if t.is_floating_point() and tuple(t.shape) in shapes
           and t.untyped_storage().data_ptr() not in params]
    assert not big, big


def test_multiple_adapters_set_adapter_disable_and_delete():
    base = nf4_model(tiny_llama())
    base_logits = base(ids()).logits
    twin = dense_twin(base)
    ours = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ref = peft.get_peft_model(twin, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for m in (ours, ref):
        m.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                                                use_dora=True))
    randomize(ours)
    copy_adapters(ours, ref)
    x = ids()
    first = ours(x).logits
    ours.set_adapter("second")
    ref.set_adapter("second")
    assert ours.active_adapter == "second"
    second = ours(x).logits
    torch.testing.assert_close(second, ref(x).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, second, atol=1e-3)
    for m in (ours, ref):
        m.base_model.set_adapter(["default", "second"])
    torch.testing.assert_close(ours(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)
    with ours.disable_adapter():
        torch.testing.assert_close(ours(x).logits, base_logits, rtol=0, atol=0)
    ours.set_adapter("default")
    torch.testing.assert_close(ours(x).logits, first, rtol=0, atol=0)
    ours.delete_adapter("second")
    assert all("second" not in m.lora_A for m in ours.modules() if isinstance(m, NF4LoraLinear))
    torch.testing.assert_close(ours(x).logits, first, rtol=0, atol=0)


def test_mixed_batch_adapter_names_match_peft():
    ours, ref = pair()
    for m in (ours, ref):
        m.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    randomize(ours, seed=3)
    copy_adapters(ours, ref)
    x = ids(b=3)
    names = ["default", "__base__", "other"]
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x, adapter_names=names).logits, ref(x, adapter_names=names).logits,
                               rtol=1e-5, atol=1e-5)


def _nf4_bytes(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if v.dtype == torch.uint8}


@pytest.mark.parametrize("kw", [{}, {"use_dora": True}], ids=["lora", "dora"])
def test_merge_is_dense_and_exact_unmerge_restores_the_nf4_bytes(kw):
    ours, ref = pair(**kw)
    x = ids()
    before, nf4_before = ours(x).logits, _nf4_bytes(ours)
    ours.merge_adapter()
    assert all(isinstance(m.base_layer, nn.Linear) for m in ours.modules() if isinstance(m, NF4LoraLinear))
    torch.testing.assert_close(ours(x).logits, before, rtol=1e-5, atol=1e-5)
    ours.unmerge_adapter()
    after = _nf4_bytes(ours)
    assert after.keys() == nf4_before.keys() and all(torch.equal(after[k], nf4_before[k]) for k in after)
    torch.testing.assert_close(ours(x).logits, before, rtol=0, atol=0)

    merged = ours.merge_and_unload()
    ref_merged = ref.merge_and_unload()
    assert not any(isinstance(m, (Linear4bit, NF4LoraLinear)) for m in merged.modules())
    for (n, p), (n2, p2) in zip(merged.named_parameters(), ref_merged.named_parameters(), strict=True):
        assert n == n2
        torch.testing.assert_close(p, p2, rtol=1e-5, atol=1e-6)  # PEFT's merge of the same dense deq(W)
    torch.testing.assert_close(merged(x).logits, before, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_requantize_is_pefts_4bit_merge():
    ours, _ = pair()
    q = ours.base_model.model.model.layers[0].self_attn.q_proj
    expect = quantize_nf4(q.base_layer.weight.dequantize(torch.float32) + q.get_delta_weight("default").detach())
    with pytest.warns(UserWarning, match="requantizing the merged weight to NF4 is lossy"):
        merged = merge_and_unload(ours, requantize=True)
    layer = merged.model.layers[0].self_attn.q_proj
    assert isinstance(layer, Linear4bit)
    for got, want in zip(layer.weight.tensors(), expect.tensors(), strict=True):
        assert (got is None and want is None) or torch.equal(got, want)
    assert sum(isinstance(m, Linear4bit) for m in merged.modules()) == N_ADAPTED


def test_requantized_merge_and_unmerge_follow_pefts_4bit_layer():
    ours, _ = pair()
    layers = [m for m in ours.modules() if isinstance(m, NF4LoraLinear)]
    q = layers[0]
    w, delta = q.base_layer.weight.dequantize(torch.float32), q.get_delta_weight("default").detach()
    merged_w = quantize_nf4(w + delta)
    unmerged_w = quantize_nf4(merged_w.dequantize(torch.float32) - delta)
    for m in layers:
        m.requantize_on_merge = True
    with pytest.warns(UserWarning, match="lossy"):
        ours.merge_adapter()
    assert torch.equal(q.base_layer.weight.packed, merged_w.packed)
    ours.unmerge_adapter()
    assert not q.merged and isinstance(q.base_layer, Linear4bit)
    assert torch.equal(q.base_layer.weight.packed, unmerged_w.packed)
    assert torch.equal(q.base_layer.weight.absmax, unmerged_w.absmax)


def test_requantized_dora_merge_cannot_be_unmerged():
    ours, _ = pair(use_dora=True)
    layer = next(m for m in ours.modules() if isinstance(m, NF4LoraLinear))
    with pytest.warns(UserWarning, match="lossy"):
        layer.merge(requantize=True)
    with pytest.raises(ValueError, match="lowrank_ext::NF4LoraLinear: merged adapters must not include a DoRA"):
        layer.unmerge()


def test_merge_modes_cannot_be_mixed():
    ours, _ = pair()
    ours.add_adapter("b", peft.LoraConfig(r=2, target_modules="all-linear"))
    ours.base_model.merge_adapter(["default"])
    layer = next(m for m in ours.modules() if isinstance(m, NF4LoraLinear))
    with pytest.raises(ValueError, match=r"lowrank_ext::NF4LoraLinear: requantize must match how the merged"):
        layer.merge(adapter_names=["b"], requantize=True)


def test_save_pretrained_then_from_pretrained_gives_the_same_logits(tmp_path):
    ours, _ = pair(use_dora=True)
    ours.eval()
    x = ids()
    want = ours(x).logits
    ours.save_pretrained(str(tmp_path))
    from safetensors import safe_open

    with safe_open(os.path.join(tmp_path, "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    assert not any("base_layer" in k or "weight_packed" in k for k in keys)  # adapter only

    fresh = nf4_model(tiny_llama())
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path))
    assert sum(isinstance(m, NF4LoraLinear) for m in loaded.modules()) == N_ADAPTED
    torch.testing.assert_close(loaded(x).logits, want, rtol=0, atol=0)
    # the same file is a plain PEFT adapter: PEFT's dense LoRA on deq(W) gives the same logits
    dense = peft.PeftModel.from_pretrained(dense_twin(nf4_model(tiny_llama())), str(tmp_path))
    torch.testing.assert_close(dense(x).logits, want, rtol=1e-5, atol=1e-5)


def test_auto_peft_model_rebuilds_the_nf4_model(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(str(base_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), quantization_config=H.NF4Config())
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))
    randomize(pm)
    pm.save_pretrained(str(adapter_dir))
    x = ids()
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir), quantization_config=H.NF4Config())
    assert isinstance(loaded, peft.PeftModelForCausalLM)
    assert sum(isinstance(m, NF4LoraLinear) for m in loaded.modules()) == N_ADAPTED
    torch.testing.assert_close(loaded(x).logits, pm(x).logits, rtol=0, atol=0)


def test_target_modules_that_match_nothing_are_a_clear_error():
    model = nf4_model(tiny_llama())
    with pytest.raises(ValueError, match=r"Target modules \{'qproj'\} not found in the base model"):
        peft.get_peft_model(model, peft.LoraConfig(target_modules=["qproj"]))


@pytest.mark.parametrize("kw, match", [({"init_lora_weights": "pissa"}, "init_lora_weights must be one of"),
                                       ({"lora_bias": True}, "lora_bias must be False on an NF4 base")])
def test_unsupported_lora_options_are_refused(kw, match):
    with pytest.raises(ValueError, match="lowrank_ext::NF4LoraLinear: " + match):
        peft.get_peft_model(nf4_model(tiny_llama()), peft.LoraConfig(target_modules=["q_proj"], **kw))


def test_enable_peft_is_idempotent_and_register_is_pefts_per_config_hook():
    from peft.tuners import tuners_utils
    from peft.tuners.lora import LoraModel

    hooks = (LoraModel._create_new_module, tuners_utils._maybe_include_all_linear_layers)
    enable_peft()
    assert (LoraModel._create_new_module, tuners_utils._maybe_include_all_linear_layers) == hooks
    cfg = register(peft.LoraConfig(target_modules=["q_proj"]))
    assert cfg._custom_modules == {Linear4bit: NF4LoraLinear}
    assert peft.LoraConfig()._custom_modules is None  # per instance


def test_without_enable_peft_register_alone_builds_our_layer(monkeypatch):
    from peft.tuners import tuners_utils
    from peft.tuners.lora import LoraModel

    plain, registered = nf4_model(tiny_llama()), nf4_model(tiny_llama())  # (an NF4Config load enables the hooks)
    monkeypatch.setattr(LoraModel, "_create_new_module", staticmethod(LoraModel._create_new_module.original))
    monkeypatch.setattr(tuners_utils, "_maybe_include_all_linear_layers",
                        tuners_utils._maybe_include_all_linear_layers.original)
    with pytest.raises(ValueError, match="Target module Linear4bit.* is not supported"):
        peft.get_peft_model(plain, peft.LoraConfig(target_modules=["q_proj"]))
    pm = peft.get_peft_model(registered, register(peft.LoraConfig(target_modules=["q_proj"])))
    assert sum(isinstance(m, NF4LoraLinear) for m in pm.modules()) == 2


def test_all_linear_targets_every_linear4bit_but_not_the_head():
    model = nf4_model(tiny_llama())
    model.lm_head = Linear4bit(quantize_nf4(model.lm_head.weight.detach()))  # a quantized head is still excluded
    pm = peft.get_peft_model(model, peft.LoraConfig(target_modules="all-linear"))
    got = {n.rsplit(".", 1)[-1] for n in pm.peft_config["default"].target_modules}
    assert got == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(pm.peft_config["default"].target_modules) == N_ADAPTED
    assert isinstance(pm.base_model.model.lm_head, Linear4bit)


def test_prepare_model_for_kbit_training_then_the_model_trains():
    model = nf4_model(tiny_llama()).to(torch.bfloat16)  # transformers keeps norms/embeddings in the load dtype
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight, NF4Weight)
    model = peft.prepare_model_for_kbit_training(model)
    floats = [p for p in model.parameters() if p.is_floating_point()]
    assert floats and all(p.dtype == torch.float32 and not p.requires_grad for p in floats)
    assert model.is_gradient_checkpointing
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    x = ids(b=4, t=8)
    losses = []
    for _ in range(8):
        loss = pm(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("how", ["peft_config", "peft_model"])
def test_trl_dpo_two_steps(tmp_path, how):
    """TRL's DPOTrainer on the NF4 model: given `peft_config=LoraConfig(...)` TRL builds the PeftModel itself and its
    reference is the model under disable_adapter(); given a PeftModel, TRL copies the adapter into a frozen "ref"
    adapter and switches to it with set_adapter."""
    trl = require("trl")
    datasets = require("datasets")
    from _tiny_models import save_tiny_llama_dir

    save_tiny_llama_dir(tmp_path / "base")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "base"))
    tok.pad_token = tok.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), quantization_config=H.NF4Config())
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    ds = datasets.Dataset.from_dict({"prompt": ["hi ", "say ", "the ", "a "],
                                     "chosen": ["there", "yes", "cat", "dog"],
                                     "rejected": ["no", "never", "xx", "zz"]})
    args = trl.DPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                         learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                         bf16=False, fp16=False, max_length=32, dataloader_num_workers=0)
    if how == "peft_model":
        trainer = trl.DPOTrainer(model=peft.get_peft_model(model, lora), ref_model=None, args=args,
                                 train_dataset=ds, processing_class=tok)
    else:
        trainer = trl.DPOTrainer(model=model, ref_model=None, args=args, train_dataset=ds, processing_class=tok,
                                 peft_config=lora)
    pm = trainer.model
    assert isinstance(pm, peft.PeftModel) and trainer.ref_model is None
    layers = [m for m in pm.modules() if isinstance(m, NF4LoraLinear)]
    assert len(layers) == N_ADAPTED
    reference_passes = []
    if how == "peft_model":
        assert all(set(m.lora_A) == {"default", "ref"} for m in layers)
        real_set_adapter = pm.set_adapter

        def set_adapter(name, *a, **kw):
            reference_passes.append(name)
            return real_set_adapter(name, *a, **kw)

        pm.set_adapter = set_adapter
    else:
        real_disable = pm.disable_adapter

        @contextlib.contextmanager
        def disable_adapter():
            with real_disable():
                assert all(m.disable_adapters for m in layers)
                reference_passes.append("disabled")
                yield

        pm.disable_adapter = disable_adapter
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    calls, _ = count_ops(trainer.train)
    assert trainer.state.global_step == 2
    assert reference_passes.count("ref" if how == "peft_model" else "disabled") >= 2  # a reference pass per step
    n = calls.get(OP, 0)  # each policy forward (and checkpointed recompute) runs it once in every adapted layer
    assert n >= 2 * N_ADAPTED and n % N_ADAPTED == 0, n
    changed = [n for n, p in pm.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all(".default." in n for n in changed)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(v)) for v in losses)
