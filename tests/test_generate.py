"""Generation end to end: transformers' `generate` over our NF4 layers (QLoRALinear from inject, Linear4bit),
with and without patch_model, under torch.inference_mode() and torch.no_grad(), with an attention mask
(left padding) and a TextStreamer.

Oracle: the same model with each NF4 layer replaced by a dense nn.Linear holding deq(W) + s·B·A (fp32, the
model's own unfused forward). Greedy decoding must pick the same tokens, and every step's logits must agree
within fp32 rounding.

The model is wide enough (hidden 256, MLP 1024) and the prompt long enough (32 tokens) that the prefill's MLP
products take the multi-threaded panel path of the CPU op: under inference mode its worker threads once
wrote an inference tensor outside inference mode and raised (csrc/cpu/nf4_linear.cpp, WorkerModeGuard).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import require
from torch import nn

import lowrank_ext
from lowrank_ext.nn import Linear4bit, QLoRALinear

transformers = require("transformers")

PROMPTS = ["The quick brown fox jumps over the lazy dog again", "A short one"]
NEW_TOKENS = 8


@pytest.fixture
def two_threads():
    """2 intra-op threads (the tests run with OMP_NUM_THREADS=1): the op's parallel regions get a worker."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def byte_tokenizer():
    """A byte-level tokenizer (one token per UTF-8 byte, <eos> = 256, left padding with <eos>): no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>",
                                                padding_side="left")


def tiny_llama(vocab: int) -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True, initializer_range=0.1)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def to_nf4(model: nn.Module, layer: str) -> nn.Module:
    """Our NF4 model: inject (QLoRALinear, LoRA B drawn non-zero so the adapter branch counts) or every
    decoder linear swapped for a Linear4bit."""
    if layer == "qlora":
        lowrank_ext.inject(model, lowrank_ext.LoRAConfig(r=4, alpha=8, target_modules="all-linear", quantize="nf4"))
        g = torch.Generator().manual_seed(1)
        for m in model.modules():
            if isinstance(m, QLoRALinear):
                with torch.no_grad():
                    m.lora_B["default"].copy_(torch.randn(m.lora_B["default"].shape, generator=g) * 0.05)
        return model
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Linear4bit.from_linear(m))
    return model


@torch.no_grad()
def dense_reference(base: nn.Module, ours: nn.Module) -> nn.Module:
    """`base` (the unquantized model) with each of `ours`'s NF4 layers as nn.Linear(deq(W) + s·B·A)."""
    ref = copy.deepcopy(base)
    for name, m in ours.named_modules():
        if isinstance(m, QLoRALinear):
            w = m.dense_weight() + m.delta_weight("default")
        elif isinstance(m, Linear4bit):
            w = m.weight.dequantize(torch.float32)
        else:
            continue
        ref.get_submodule(name).weight.copy_(w)
    return ref


def greedy(model, enc, streamer=None):
    return model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS,
                          streamer=streamer, output_logits=True, return_dict_in_generate=True, pad_token_id=256)


@pytest.mark.parametrize("layer", ["qlora", "linear4bit"])
@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patch_model"])
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_generate_greedy_equals_dense_reference(two_threads, capsys, layer, patched, mode):
    tok = byte_tokenizer()
    base = tiny_llama(len(tok))
    ours = to_nf4(copy.deepcopy(base), layer)
    ref = dense_reference(base, ours)
    if patched:
        lowrank_ext.patch_model(ours)
    batches = [tok(PROMPTS, return_tensors="pt", padding=True),  # left-padded: the mask matters
               tok(PROMPTS[:1], return_tensors="pt")]                # batch 1: what TextStreamer takes
    assert (batches[0]["attention_mask"] == 0).any() and batches[1]["input_ids"].shape[1] >= 32
    for enc in batches:
        streamer = transformers.TextStreamer(tok) if len(enc["input_ids"]) == 1 else None
        with torch.no_grad():
            expected = greedy(ref, enc)
        with torch.inference_mode() if mode == "inference_mode" else torch.no_grad():
            got = greedy(ours, enc, streamer)
        assert torch.equal(got.sequences, expected.sequences)
        for step, (s_got, s_ref) in enumerate(zip(got.logits, expected.logits)):
            scale = s_ref.abs().max().item()
            assert (s_got - s_ref).abs().max().item() <= 1e-4 * scale, f"step {step}"
    streamed = capsys.readouterr().out
    assert tok.decode(got.sequences[0, enc["input_ids"].shape[1]:]) in streamed  # the streamer saw the tokens
