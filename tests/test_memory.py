"""Gradient checkpointing, the checkpointed loss, the memory estimate and the measured split (finetune/memory.py).

References: the same model trained without checkpointing (losses and gradients), autograd's own saved tensors
(torch.autograd.graph.saved_tensors_hooks, each storage counted once) for the activation estimate, the
model's real parameter counts and tensor bytes for the weight rows.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import require
from torch import nn

from lowrank_ext import LoRAConfig, count_parameters, inject
from lowrank_ext.finetune import cli
from lowrank_ext.finetune import memory as M
from lowrank_ext.nn import QLoRALinear

transformers = require("transformers")
require("accelerate")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(layers=2, hidden=64, inter=96, vocab=96, heads=4, kv=2, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                   max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def _qlora(model, dropout=0.1):
    torch.manual_seed(1)
    model = inject(model, LoRAConfig(r=4, alpha=8, dropout=dropout, target_modules=TARGETS, quantize="nf4"))
    with torch.no_grad():  # B != 0, so every adapter parameter gets a gradient and the LoRA branch matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(n) % 2**31))
    return model.train()


def _step(model, ids, loss_fn):
    torch.manual_seed(7)  # the dropout masks
    loss = loss_fn(model, ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("chunked", [False, True, "trainable-head"])
def test_checkpointing_same_loss_and_grads(chunked, monkeypatch):
    """The chunked loss takes two paths: a frozen head (_FrozenHeadCE, the input gradient computed in forward),
    and a trainable one (each chunk under checkpoint): both equal the model's own loss and gradients."""
    ref = _qlora(_llama())
    if chunked == "trainable-head":
        ref.lm_head.weight.requires_grad_(True)  # tied: the embedding trains too
    got = copy.deepcopy(ref)
    M.enable_gradient_checkpointing(got)
    monkeypatch.setattr(M, "_LOSS_CHUNK", 96 * 7)  # several chunks of 7 rows (and a ragged last one)
    ids = torch.randint(0, 96, (3, 17), generator=torch.Generator().manual_seed(2))
    l0, g0 = _step(ref, ids, _lm_loss)
    l1, g1 = _step(got, ids, M.chunked_lm_loss if chunked else _lm_loss)
    assert sorted(g0) == sorted(g1) and len(g0) == 2 * 7 * 2 + (chunked == "trainable-head")
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # evaluation (no grad): chunked loss equal too
        torch.testing.assert_close(M.chunked_lm_loss(got.eval(), ids), _lm_loss(ref.eval(), ids), rtol=1e-6,
                                   atol=1e-6)


def _saved_bytes(model, ids, loss_fn) -> int:
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model, ids)
    del loss
    return sum(v for k, v in seen.items() if k not in params)


def test_checkpointing_keeps_only_block_inputs_and_recomputes_through_our_ops():
    from torch.utils._python_dispatch import TorchDispatchMode

    model = _qlora(_llama(layers=4))
    ids = torch.randint(0, 96, (2, 64), generator=torch.Generator().manual_seed(3))
    full = _saved_bytes(model, ids, _lm_loss)
    M.enable_gradient_checkpointing(model)
    ckpt = _saved_bytes(model, ids, M.chunked_lm_loss)
    assert ckpt < 0.25 * full, (ckpt, full)

    calls: dict[str, int] = {}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if name.startswith("lowrank_ext."):
                calls[name] = calls.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    loss = M.chunked_lm_loss(model, ids)
    with Count():
        loss.backward()
    # backward re-ran each block's fused NF4 + LoRA projections but the contracting ones, whose outputs the
    # selective policy keeps (k_proj, v_proj 64 -> 32 under GQA, down_proj 96 -> 64), and ran all seven backwards
    assert calls == {"lowrank_ext.nf4_lora_linear.default": 4 * 4,
                     "lowrank_ext.nf4_lora_linear_backward.default": 4 * 7}, calls


def test_generic_module_checkpointing():
    """A plain nn.Module (no transformers switch): each block of transformer_blocks is checkpointed."""
    from lowrank_ext import quantize_nf4

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.layers = nn.ModuleList(QLoRALinear(quantize_nf4(torch.randn(32, 32, generator=g))) for _ in range(3))
            for layer in self.layers:
                layer.add_adapter("default", r=4, alpha=8, dropout=0.2)
                layer.set_adapter("default")
                nn.init.normal_(layer.lora_B["default"], std=0.1)

        def forward(self, x):
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return x.square().mean()

    ref = Net().train()
    got = copy.deepcopy(ref)
    M.enable_gradient_checkpointing(got)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    l0, g0 = _step(ref, x, lambda m, x: m(x))
    l1, g1 = _step(got, x, lambda m, x: m(x))
    assert torch.equal(l0, l1) and all(torch.equal(g0[n], g1[n]) for n in g0)
    with pytest.raises(ValueError, match="--gradient-checkpointing must find transformer blocks"):
        M.enable_gradient_checkpointing(nn.Sequential(nn.Linear(2, 2)))


def test_chunked_loss_support():
    assert M.supports_chunked_loss(_llama())
    assert not M.supports_chunked_loss(nn.Linear(2, 2))
    peft = require("peft")
    wrapped = peft.get_peft_model(_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert not M.supports_chunked_loss(wrapped)  # its .model is a whole causal LM, not the bare decoder
    gemma = transformers.Gemma2Config(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    with torch.device("meta"):
        assert not M.supports_chunked_loss(transformers.Gemma2ForCausalLM(gemma))  # soft-capped logits


# ------------------------------------------------------------------------------------------- estimate
SMOL = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "tie_word_embeddings": True}


def test_estimate_weights_match_a_real_model(tmp_path):
    cfg = transformers.LlamaConfig(**{**SMOL, "num_hidden_layers": 2})
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(cfg)
    est = {e.method: e for e in M.estimate(cfg.to_dict(), rank=8, seq_len=16, runtime=0)}
    n = sum(p.numel() for p in meta.parameters())
    assert est["full"].notes["total_params"] == n and est["full"].base == 4 * n
    small = _llama(layers=2)
    small_cfg = small.config.to_dict()
    model = inject(small, LoRAConfig(r=8, alpha=16, target_modules=TARGETS, quantize="nf4"))
    q = {e.method: e for e in M.estimate(small_cfg, rank=8, seq_len=16, runtime=0)}["qlora"]
    trainable, _ = count_parameters(model)
    assert q.notes["trainable"] == trainable and q.adapters == 4 * trainable
    split = M.measured_split(model)
    assert q.base == split["nf4"] + split["other"] - sum(b.numel() * 4 for n, b in model.named_buffers()
                                                          if "inv_freq" in n)
    assert split["adapter"] == 2 * 4 * trainable
    with pytest.raises(ValueError, match="targets must be among"):
        M.estimate(small_cfg, targets=["c_attn"])
    with pytest.raises(ValueError, match="--optimizer must be adamw, paged-adamw or paged-adamw8bit"):
        M.estimate(small_cfg, optimizer="sgd")
    with pytest.raises(FileNotFoundError, match="--model must be a model directory with config.json"):
        M.estimate(tmp_path / "nope")


def _tiny_cfg(kind: str):
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
    if kind == "gpt2":
        return transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
            "mistral": transformers.MistralConfig}[kind](**kw)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("targets", [None, ["q_proj", "v_proj"], ["mlp.down_proj", "k_proj"]])
def test_estimate_counts_targets_with_the_target_rule(kind, targets):
    """Parameter counts from the model the config builds (Qwen2's q/k/v biases included) and the targets the
    injector itself selects: trainable and total equal inject()'s count_parameters."""
    cfg = _tiny_cfg(kind)
    torch.manual_seed(0)
    model = inject(transformers.AutoModelForCausalLM.from_config(cfg),
                   LoRAConfig(r=4, target_modules=targets or TARGETS, quantize="nf4"))
    q = {e.method: e for e in M.estimate(cfg.to_dict(), rank=4, seq_len=8, targets=targets, runtime=0)}["qlora"]
    trainable, total = count_parameters(model)  # total: the base model's parameters + the adapters'
    assert (q.notes["trainable"], q.notes["total_params"]) == (trainable, total - trainable)


def test_estimate_refuses_a_block_it_does_not_model():
    """GPT-2's blocks (Conv1D c_attn 64 -> 192, c_fc, two c_proj) are not the Llama block the estimate counts:
    a ValueError (the finetune summary prints "n/a (...)"), never a number for another shape."""
    with pytest.raises(ValueError, match=r"lowrank_ext memory: the model's blocks must be Llama blocks .*got "
                                         r"'transformer.h.0.attn.c_attn' \(Conv1D, in/out \(64, 192\)\) in a "
                                         r"'gpt2' model"):
        M.estimate(_tiny_cfg("gpt2").to_dict(), rank=4, seq_len=8, runtime=0)
    with pytest.raises(ValueError, match=r"lowrank_ext memory: targets must be among .* \(each adapted in every "
                                         r"layer\), got \['model.layers.0.self_attn.q_proj'\] selecting 1 modules"):
        M.estimate(_tiny_cfg("llama").to_dict(), targets=["model.layers.0.self_attn.q_proj"])


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_estimate_activations_vs_autograd(dropout):
    """The per-block activation estimate against what autograd really saves (SmolLM2's shapes, 2 blocks vs 1, so
    the embedding and loss cancel), and the whole-model figure within 15%."""
    def saved(layers):
        model = _qlora(_llama(layers=layers, hidden=576, inter=1536, vocab=4096, heads=9, kv=3), dropout=dropout)
        ids = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(4))
        return _saved_bytes(model, ids, _lm_loss)

    one, two = saved(1), saved(2)
    cfg = {**SMOL, "vocab_size": 4096, "num_hidden_layers": 2}
    q = {e.method: e for e in M.estimate(cfg, rank=4, seq_len=64, batch_size=2, dropout=dropout > 0,
                                         runtime=0)}["qlora"]
    per_block = q.notes["per_block"]
    assert abs(per_block - (two - one)) <= 0.12 * (two - one), (per_block, two - one)
    # the whole: saved tensors + the loss's transient (2 more vocab-sized tensors in backward)
    assert abs(q.activations - (two + 2 * 2 * 64 * 4096 * 4)) <= 0.15 * q.activations


def test_memory_command(capsys, tmp_path):
    cfg = transformers.LlamaConfig(**SMOL)
    cfg.save_pretrained(str(tmp_path))
    rc = cli.main(["memory", "--model", str(tmp_path), "--rank", "16", "--seq-len", "2048", "--batch-size", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    for row in ("full fine-tuning", "QLoRA (NF4)", "base weights", "adapters", "gradients", "optimizer state",
                "activations, checkpointed", "total, checkpointed", "4,884,480"):
        assert row in out
    rc = cli.main(["memory", "--model", str(tmp_path), "--rank", "0"])
    assert rc == 2 and "--rank must be >= 1, got 0" in capsys.readouterr().err
    rc = cli.main(["memory", "--model", str(tmp_path / "nope")])
    assert rc == 2 and "lowrank_ext memory: --model must be a model directory" in capsys.readouterr().err


def test_memory_command_prints_na_for_a_block_it_does_not_model(capsys, tmp_path):
    """Issue 19 item 11: `memory` on a GPT-2 directory prints "n/a" with the reason and no figure (it used to
    stop with the estimate's ValueError, and before that print a Llama-shaped number)."""
    _tiny_cfg("gpt2").save_pretrained(str(tmp_path))
    rc = cli.main(["memory", "--model", str(tmp_path), "--rank", "4", "--seq-len", "8"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "n/a: lowrank_ext memory: the model's blocks must be Llama blocks" in out and "'gpt2' model" in out
    assert "MiB" not in out and "total" not in out


def test_frozen_head_is_cast_once_per_call_under_autocast(monkeypatch):
    """Under bf16 autocast the frozen fp32 head is cast to bf16 once per loss call, not once per matmul (two per
    chunk); the loss and gradients are those of the model's own loss under the same autocast."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = _qlora(_llama())
    monkeypatch.setattr(M, "_LOSS_CHUNK", 96 * 7)  # 8 chunks of 7 rows
    ids = torch.randint(0, 96, (3, 17), generator=torch.Generator().manual_seed(2))
    head_shape = tuple(model.lm_head.weight.shape)

    class HeadCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == head_shape:
                self.count += 1
            return func(*args, **(kwargs or {}))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        with HeadCasts() as casts:
            l1, g1 = _step(model, ids, M.chunked_lm_loss)
        l0, g0 = _step(copy.deepcopy(model), ids, _lm_loss)
    assert casts.count == 1, casts.count
    torch.testing.assert_close(l1, l0, rtol=2e-3, atol=2e-3)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=2e-2, atol=2e-3)
