"""lowrank_ext.inject models inside transformers.Trainer, TRL's SFTTrainer and accelerate (issue 20, items 3 and 4).

`lowrank_ext.hf.to_peft_model(model)` makes the tools treat the model as an adapter model: checkpoints hold the
adapter (not the base), the optimizer (torch AdamW, our PagedAdamW8bit), the scheduler and the RNG state;
resume continues bit-identically on CPU (the same losses and final adapter as one uninterrupted run);
`save_model()` loads with lowrank_ext.load_adapter and with peft.PeftModel.from_pretrained to the trained logits.
Adapter files record the base's quantization, so loading into a dense base rebuilds the same NF4 layers.
Tiny Llama, 16 rows of 8 tokens, 4-6 steps: a few seconds each.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from _tiny_models import save_tiny_llama_dir, tiny_llama
from conftest import require

import lowrank_ext as L

transformers = require("transformers")
peft = require("peft")
datasets = require("datasets")
H = require("lowrank_ext.hf")

TARGETS = ["q_proj", "v_proj", "down_proj"]
CHECKPOINT_FILES = {"adapter_model.safetensors", "adapter_config.json", "README.md", "optimizer.pt", "scheduler.pt",
                    "rng_state.pth", "trainer_state.json", "training_args.bin"}


# ---- builders ----------------------------------------------------------------------------------------------
def _config(method: str, nf4: bool):
    q = "nf4" if nf4 else None
    if method == "ia3":
        return L.IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"], quantize=q)
    # dropout > 0: the resumed run must restore the RNG state to draw the same masks
    return L.LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=TARGETS, variant=method, quantize=q)


def _model(method: str, nf4: bool, seed: int = 0):
    base = tiny_llama(seed).train()
    torch.manual_seed(seed + 1)  # the adapter's init
    return H.to_peft_model(L.inject(base, _config(method, nf4)))


def _optimizer(kind: str, model: torch.nn.Module):
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adamw":
        opt = torch.optim.AdamW(params, lr=2e-2)
    else:  # min_8bit_size=64: the tiny adapter tensors (256+ elements) get 8-bit state, as real ones do
        opt = L.optim.PagedAdamW8bit(params, lr=2e-2, min_8bit_size=64)
    return opt, transformers.get_linear_schedule_with_warmup(opt, 1, 6)


def _dataset(n: int = 16, seq: int = 8):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 96, (n, seq), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def _args(out, **kw):
    kw = {"max_steps": 6, "save_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1, "report_to": [],
          "use_cpu": True, "seed": 0, "save_strategy": "steps", "disable_tqdm": True, **kw}
    return transformers.TrainingArguments(output_dir=str(out), **kw)


def _losses(trainer, after: int = 0) -> dict[int, float]:
    """{step: logged loss} of the steps after `after` (a resumed run's history starts with the checkpoint's)."""
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > after}


def _adapter(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in L.adapter_state_dict(model.base_model.model).items()}


def _ids(seed: int = 9) -> torch.Tensor:
    return torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return model(input_ids=ids).logits
    finally:
        model.train(was)


def _check_adapter_only_checkpoint(ckpt: str, model) -> None:
    """The checkpoint holds the adapter (exactly its tensors), optimizer, scheduler, RNG: never the base."""
    assert set(os.listdir(ckpt)) == CHECKPOINT_FILES
    from safetensors import safe_open

    with safe_open(os.path.join(ckpt, "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    live = L.adapter_state_dict(model.base_model.model)
    assert keys == set(live)
    adapter_bytes = sum(t.numel() * t.element_size() for t in live.values())
    size = os.path.getsize(os.path.join(ckpt, "adapter_model.safetensors"))
    assert adapter_bytes < size < adapter_bytes + 16384  # tensors + a JSON header
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert size < base_bytes / 10


# ---- Trainer: checkpoints, bit-identical resume, save_model ------------------------------------------------
CASES = [("lora", True), ("dora", False), ("dora", True), ("ia3", True), ("ia3", False)]


@pytest.mark.parametrize("opt_kind", ["adamw", "paged8bit"])
@pytest.mark.parametrize(("method", "nf4"), CASES, ids=[f"{m}-{'nf4' if q else 'dense'}" for m, q in CASES])
def test_trainer_checkpoints_resume_and_save_model(tmp_path, method, nf4, opt_kind):
    ds = _dataset()
    model = _model(method, nf4)
    t = transformers.Trainer(model=model, args=_args(tmp_path / "a"), train_dataset=ds,
                             optimizers=_optimizer(opt_kind, model))
    t.train()
    full_losses, full_adapter = _losses(t), _adapter(model)
    assert sorted(full_losses) == [1, 2, 3, 4, 5, 6]
    ckpt = str(tmp_path / "a" / "checkpoint-3")
    _check_adapter_only_checkpoint(ckpt, model)
    if opt_kind == "paged8bit":  # the 8-bit state went through the checkpoint (torch.save / weights_only load)
        assert any("state1" in s for s in t.optimizer.state.values())

    # resume from step 3 on a fresh model: the same losses for steps 4-6 and the same final adapter, exactly
    resumed = _model(method, nf4)
    t2 = transformers.Trainer(model=resumed, args=_args(tmp_path / "b"), train_dataset=ds,
                              optimizers=_optimizer(opt_kind, resumed))
    t2.train(resume_from_checkpoint=ckpt)
    assert _losses(t2, after=3) == {s: full_losses[s] for s in (4, 5, 6)}
    got = _adapter(resumed)
    assert got.keys() == full_adapter.keys()
    for k, v in full_adapter.items():
        assert torch.equal(got[k], v), k

    # save_model -> lowrank_ext.load_adapter into a plain base: the trained logits exactly
    out = tmp_path / "final"
    t.save_model(str(out))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(out))
    assert not {"model.safetensors", "pytorch_model.bin"} & set(os.listdir(out))
    ids = _ids()
    want = _logits(model, ids)
    ours = L.load_adapter(tiny_llama(0), str(out))
    torch.testing.assert_close(_logits(ours, ids), want, rtol=0, atol=0)
    # ... and PEFT on the plain base (NF4: a dense base holding deq(NF4(W)), the weights the model trained on)
    plain = tiny_llama(0)
    if nf4:
        with torch.no_grad():
            for name, m in plain.named_modules():
                if name.split(".")[-1] in TARGETS:
                    m.weight.copy_(L.quantize_nf4(m.weight).dequantize())
    with pytest.warns(UserWarning, match="lowrank_ext"):  # PEFT ignores our extra field, with its warning
        theirs = peft.PeftModel.from_pretrained(plain, str(out))
    torch.testing.assert_close(_logits(theirs, ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [L.PromptTuningConfig(3), L.BitFitConfig(add_bias_to=["q_proj"])],
                         ids=["prompt_tuning", "bitfit"])
def test_trainer_resumes_prompt_tuning_and_bitfit(tmp_path, cfg):
    ds = _dataset()

    def run(out, resume=None):
        torch.manual_seed(1)
        model = H.to_peft_model(L.inject(tiny_llama(0).train(), cfg))
        t = transformers.Trainer(model=model, args=_args(out, max_steps=4, save_steps=2), train_dataset=ds)
        t.train(resume_from_checkpoint=resume)
        return model, _losses(t, after=2)

    model, losses = run(tmp_path / "a")
    assert set(os.listdir(tmp_path / "a" / "checkpoint-2")) == CHECKPOINT_FILES
    resumed, tail = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert tail == losses and sorted(tail) == [3, 4]
    for k, v in _adapter(model).items():
        assert torch.equal(_adapter(resumed)[k], v), k


def test_trainer_sees_an_adapter_model():
    model = _model("lora", True)
    assert transformers.trainer_utils._is_peft_model(model)
    from accelerate.utils import is_peft_model

    assert is_peft_model(model)
    assert model.active_adapters == ["default"] and model.active_adapter == "default"
    cfg = model.peft_config["default"]
    assert isinstance(cfg, peft.LoraConfig) and cfg.r == 4 and cfg.lora_alpha == 8 and not cfg.is_prompt_learning
    assert model.get_base_model() is model.base_model.model
    assert isinstance(model.get_base_model(), transformers.LlamaForCausalLM)
    assert model.get_nb_trainable_parameters() == L.count_parameters(model.base_model.model)
    # the count PEFT gives for the same adapter on the same (dense) base
    ref = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    assert model.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    assert isinstance(model.peft_config["default"], peft.LoraConfig)


def test_disable_set_and_load_adapter_follow_peft(tmp_path):
    model = _model("lora", False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = _ids()
    base = _logits(tiny_llama(0), ids)
    adapted = _logits(model, ids)
    assert not torch.allclose(adapted, base)
    with model.disable_adapter():  # a context manager (DPO / KTO / GRPO's reference model)
        torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=0)
    torch.testing.assert_close(_logits(model, ids), adapted, rtol=0, atol=0)
    model.save_pretrained(str(tmp_path))
    # a second adapter: load_adapter(is_trainable=False) freezes it; set_adapter switches
    model.load_adapter(str(tmp_path), "second")
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".second" in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_A.default" in n)
    model.set_adapter("second")
    assert model.active_adapters == ["second"]
    torch.testing.assert_close(_logits(model, ids), adapted, rtol=0, atol=0)
    model.set_adapter("default")
    model.save_pretrained(str(tmp_path / "both"))  # PEFT's layout: default at the top, others in a subdirectory
    assert {"adapter_model.safetensors", "second"} <= set(os.listdir(tmp_path / "both"))
    assert "adapter_model.safetensors" in os.listdir(tmp_path / "both" / "second")


def test_to_peft_model_refuses_bad_input():
    with pytest.raises(ValueError, match=r"lowrank_ext::to_peft_model: model must have adapters"):
        H.to_peft_model(tiny_llama(0))
    ref = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(TypeError, match=r"lowrank_ext::to_peft_model: model must be a model adapted by"):
        H.to_peft_model(ref)
    model = _model("lora", False)
    assert H.to_peft_model(model) is model
    with pytest.raises(ValueError, match=r"lowrank_ext::save_pretrained: state_dict must be None"):
        model.save_pretrained("unused", state_dict={})
    with pytest.raises(ValueError, match=r"lowrank_ext::save_pretrained: safe_serialization must be True"):
        model.save_pretrained("unused", safe_serialization=False)
    with pytest.raises(ValueError, match=r"lowrank_ext::load_adapter: model_id must be a local adapter directory"):
        model.load_adapter("no/such/dir", "x")
    with pytest.raises(ValueError, match=r"lowrank_ext::load_adapter: torch_device must be None"):
        model.load_adapter("no/such/dir", "x", torch_device="cuda")


# ---- our optimizers' state through Trainer's torch.save / torch.load(weights_only=True) --------------------
@pytest.mark.parametrize("cls", ["PagedAdamW", "PagedAdamW8bit", "AdamW8bit"])
def test_optimizer_state_round_trips_weights_only(tmp_path, cls):
    p = torch.nn.Parameter(torch.randn(64, 8))
    opt = getattr(L.optim, cls)([p], lr=1e-2, min_8bit_size=64)
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = getattr(L.optim, cls)([q], lr=1e-2, min_8bit_size=64)
    opt2.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    g = torch.randn_like(p)
    p.grad, q.grad = g, g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p, q)


# ---- TRL's SFTTrainer ----------------------------------------------------------------------------------------
def test_sft_trainer_checkpoints_resume_and_save_model(tmp_path):
    trl = require("trl")
    save_tiny_llama_dir(tmp_path / "base")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "base"))
    texts = [f"row {i}: the quick brown fox {i * 7 % 13}" for i in range(16)]
    ds = datasets.Dataset.from_dict({"text": texts})

    def build():
        m = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
        torch.manual_seed(1)
        return H.to_peft_model(L.inject(m, _config("lora", True)))

    def sft(model, out):
        args = trl.SFTConfig(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4,
                             logging_steps=1, report_to=[], use_cpu=True, seed=0, max_length=24,
                             disable_tqdm=True, bf16=False)
        return trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                              optimizers=_optimizer("paged8bit", model))

    model = build()
    t = sft(model, tmp_path / "a")
    t.train()
    losses = _losses(t)
    assert sorted(losses) == [1, 2, 3, 4]
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= set(os.listdir(ckpt))
    assert not {"model.safetensors", "pytorch_model.bin"} & set(os.listdir(ckpt))
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path / "base")

    resumed = build()
    t2 = sft(resumed, tmp_path / "b")
    t2.train(resume_from_checkpoint=str(ckpt))
    assert _losses(t2, after=2) == {3: losses[3], 4: losses[4]}
    for k, v in _adapter(model).items():
        assert torch.equal(_adapter(resumed)[k], v), k

    t.save_model(str(tmp_path / "final"))
    ids = torch.randint(0, 200, (2, 8), generator=torch.Generator().manual_seed(3))
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    loaded = L.load_adapter(plain, str(tmp_path / "final"))
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)


# ---- accelerate ----------------------------------------------------------------------------------------------
def test_accelerate_save_and_load_state_hold_the_adapter(tmp_path):
    accelerate = require("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    ds = _dataset()
    batches = [torch.tensor(ds["input_ids"][i: i + 4]) for i in range(0, 16, 4)] * 2

    def run(steps, load_from=None, save_to=None, save_at=None):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        acc = accelerate.Accelerator(cpu=True)
        model = _model("lora", True)
        opt, sched = _optimizer("paged8bit", model)
        model, opt, sched = acc.prepare(model, opt, sched)
        H.register_accelerate_hooks(acc)
        if load_from is not None:
            acc.load_state(str(load_from))
        losses = []
        for step in steps:
            loss = model(input_ids=batches[step], labels=batches[step]).loss
            acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(loss.item())
            if step == save_at:
                acc.save_state(str(save_to))
        return losses, _adapter(acc.unwrap_model(model))

    full, adapter = run(range(6), save_to=tmp_path / "state", save_at=2)
    names = set(os.listdir(tmp_path / "state"))
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.bin", "scheduler.bin"} <= names
    assert not any(n.startswith("model") for n in names)  # no model.safetensors: the base is not saved
    tail, resumed = run(range(3, 6), load_from=tmp_path / "state")
    assert tail == full[3:]
    for k, v in adapter.items():
        assert torch.equal(resumed[k], v), k


# ---- item 4: adapter files say what base they were trained on ----------------------------------------------
def _train_a_little(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = _ids(4)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_nf4_adapter_loads_into_a_dense_base_as_nf4(tmp_path, method):
    torch.manual_seed(1)
    cfg = _config(method, True)
    if method != "ia3":
        cfg = L.LoRAConfig(r=4, alpha=8, target_modules=TARGETS, variant=method, quantize="nf4", blocksize=128,
                           double_quant=False, compute_dtype=torch.bfloat16)
    trained = L.inject(tiny_llama(0).train(), cfg)
    _train_a_little(trained)
    trained.config._name_or_path = "org/tiny-llama"
    L.save_adapter(trained, tmp_path)
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    want_q = ({"quant_type": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": None} if method == "ia3"
              else {"quant_type": "nf4", "blocksize": 128, "double_quant": False, "compute_dtype": "bfloat16"})
    assert d["lowrank_ext"] == {"base_quantization": want_q}
    assert d["base_model_name_or_path"] == "org/tiny-llama"
    peft_cfg = peft.PeftConfig.from_pretrained(str(tmp_path))  # PEFT reads the file, our field ignored
    assert not hasattr(peft_cfg, "lowrank_ext")

    loaded = L.load_adapter(tiny_llama(0), tmp_path)  # a plain dense base
    layers = L.nn.IA3_LAYERS if method == "ia3" else L.nn.ADAPTER_LAYERS
    got = {n: m for n, m in loaded.named_modules() if isinstance(m, layers)}
    want = {n: m for n, m in trained.named_modules() if isinstance(m, layers)}
    assert sorted(got) == sorted(want) and got
    for n, m in got.items():
        assert isinstance(m, L.nn.QIA3Linear if method == "ia3" else L.nn.QLoRALinear), n
        assert m.compute_dtype == want[n].compute_dtype
        for a, b in zip(m.weight.tensors(), want[n].weight.tensors()):
            assert (a is None and b is None) or torch.equal(a, b), n
    trained.eval()
    ids = _ids()
    torch.testing.assert_close(_logits(loaded, ids), _logits(trained, ids), rtol=0, atol=0)


def test_dense_adapter_records_no_quantization_and_loads_dense(tmp_path):
    trained = L.inject(tiny_llama(0), _config("lora", False))
    L.save_adapter(trained, tmp_path, base_model_name_or_path="given/name")
    d = json.loads((tmp_path / "adapter_config.json").read_text())
    assert d["lowrank_ext"] == {"base_quantization": None} and d["base_model_name_or_path"] == "given/name"
    loaded = L.load_adapter(tiny_llama(0), tmp_path)
    assert all(type(m) is L.nn.LoRALinear for _, m in loaded.named_modules() if isinstance(m, L.nn.ADAPTER_LAYERS))


def test_base_quantization_field_is_checked(tmp_path):
    trained = L.inject(tiny_llama(0), _config("lora", True))
    L.save_adapter(trained, tmp_path)
    path = tmp_path / "adapter_config.json"
    d = json.loads(path.read_text())
    for bad in ({"base_quantization": {**d["lowrank_ext"]["base_quantization"], "quant_type": "fp4"}},
                {"base_quantization": None, "newer_setting": 1}, "nf4"):
        path.write_text(json.dumps({**d, "lowrank_ext": bad}))
        with pytest.raises(ValueError, match=r"adapter_config.json field 'lowrank_ext' must be \{\"base_quantization"):
            L.load_adapter(tiny_llama(0), tmp_path)


def test_save_refuses_mixed_base_quantization(tmp_path):
    model = tiny_llama(0)
    L.inject(model, L.LoRAConfig(r=4, target_modules=["q_proj"], quantize="nf4"))
    L.inject(model, L.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), "two")
    with pytest.raises(ValueError, match=r"lowrank_ext::save_adapter: the base layers of adapter 'two' must share one"):
        L.save_adapter(model, tmp_path, "two")


def test_loading_another_adapter_over_an_existing_one_refuses(tmp_path):
    """IA3 / BitFit load in place only into the same adapter (Trainer's resume); another one is refused, the
    model unchanged."""
    L.save_adapter(L.inject(tiny_llama(0), L.IA3Config(target_modules=["q_proj"])), tmp_path / "ia3")
    model = L.inject(tiny_llama(0), _config("ia3", False))
    before = _adapter(H.to_peft_model(model))
    with pytest.raises(ValueError, match=r"lowrank_ext::load_adapter: the model's adapter 'default' must be the "
                                         r"adapter in .*got differing: target_modules / feedforward_modules"):
        L.load_adapter(model, tmp_path / "ia3")
    L.save_adapter(L.inject(tiny_llama(0), L.BitFitConfig(add_bias_to=["v_proj"])), tmp_path / "bitfit")
    with pytest.raises(ValueError, match=r"got differing: method \(file BITFIT, model IA3\)"):
        L.load_adapter(model, tmp_path / "bitfit")
    bitfit = L.inject(tiny_llama(0), L.BitFitConfig(add_bias_to=["q_proj"]))
    with pytest.raises(ValueError, match=r"got differing: add_bias_to \(file \['v_proj'\], model \['q_proj'\]\)"):
        L.load_adapter(bitfit, tmp_path / "bitfit")
    after = _adapter(H.to_peft_model(model))
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize(("cfg", "peft_cls"), [
    (L.LoRAConfig(r=4, target_modules=TARGETS, variant="vera"), "VeraConfig"),
    (L.IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"]), "IA3Config"),
    (L.PromptTuningConfig(3), "PromptTuningConfig"),
    (L.BitFitConfig(add_bias_to=["q_proj"]), "PeftConfig"),
], ids=["vera", "ia3", "prompt_tuning", "bitfit"])
def test_peft_config_of_every_method(cfg, peft_cls):
    model = H.to_peft_model(L.inject(tiny_llama(0), cfg))
    got = model.peft_config["default"]
    assert type(got) is getattr(peft, peft_cls)
    assert got.is_prompt_learning == isinstance(cfg, L.PromptTuningConfig)
    if peft_cls == "IA3Config":
        assert set(got.target_modules) == set(TARGETS) and set(got.feedforward_modules) == {"down_proj"}
    assert isinstance(model.get_base_model(), transformers.LlamaForCausalLM)
    ids = _ids()
    torch.testing.assert_close(_logits(model, ids), _logits(model.base_model.model, ids), rtol=0, atol=0)
