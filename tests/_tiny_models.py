"""Tiny random transformers models built from configs (no downloads), shared by the layer/PEFT tests."""

from __future__ import annotations

import copy

import torch
from conftest import require

transformers = require("transformers")


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def save_tiny_llama_dir(path, seed: int = 0) -> None:
    """A transformers causal LM directory (what `finetune --model DIR` reads) with no downloads: a random
    2-layer Llama (hidden 32) and a byte-level tokenizer (one token per UTF-8 byte, EOS = 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(str(path))
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True, eos_token_id=vocab["<eos>"])
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path))


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


# ---- one tiny config per causal-LM family (vocab 96, hidden 64, 2 layers): the architecture matrix of the
# loading tests. name -> (config factory, the family's linear layer names to target).
def _causal_configs() -> dict:
    t = transformers
    attn = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    proj = ["q_proj", "k_proj", "v_proj", "o_proj"]
    mlp = [*proj, "gate_proj", "up_proj", "down_proj"]
    return {
        "llama": (lambda: t.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        tie_word_embeddings=True, **attn), mlp),
        "qwen2": (lambda: t.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        tie_word_embeddings=False, **attn), mlp),
        "mistral": (lambda: t.MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            **attn), mlp),
        "gemma": (lambda: t.GemmaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        head_dim=16, **attn), mlp),
        "phi": (lambda: t.PhiConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64),
                ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]),
        # c_attn [64, 192] and mlp.c_proj [256, 64] are non-square Conv1D, attn.c_proj [64, 64] a square one
        "gpt2": (lambda: t.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0), ["c_attn", "c_proj", "c_fc"]),
        "gpt_neox": (lambda: t.GPTNeoXConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=64, bos_token_id=0,
                                             eos_token_id=0),
                     ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
        "opt": (lambda: t.OPTConfig(vocab_size=96, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                    num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=64,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=1),
                ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
        "mixtral": (lambda: t.MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_local_experts=4, num_experts_per_tok=2, **attn), proj),
    }


CAUSAL_LMS = sorted(_causal_configs())


def tiny_causal_lm(kind: str, seed: int = 0) -> tuple[torch.nn.Module, list[str]]:
    """(a random tiny causal LM of family `kind` in CAUSAL_LMS, its target layer names). Norm weights are drawn
    too (not left at their init), so a norm that a loader skipped would show."""
    make, targets = _causal_configs()[kind]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(make()).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "ln_" in n:  # RMSNorm / LayerNorm (GPT-2: ln_1, ln_2, ln_f)
                p.uniform_(0.5, 1.5)
    return model, targets


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value", "dense"]}


def tokens(seed: int = 1, batch: int = 3, seq: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (batch, seq), generator=g)


def logits(model: torch.nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    return model(input_ids=ids, **kw).logits


def pair(kind: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    m = MODELS[kind](seed)
    return m, copy.deepcopy(m)


@torch.no_grad()
def randomize_peft_adapter(peft_model: torch.nn.Module, adapter: str = "default", seed: int = 3) -> None:
    """Give every adapter tensor of `adapter` random values (B ≠ 0, so the adapter changes outputs)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if f".{adapter}." in name + "." and any(k in name for k in ("lora_", "vera_lambda")):
            if "magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


@torch.no_grad()
def copy_peft_to_ours(peft_model: torch.nn.Module, ours: torch.nn.Module, adapter: str = "default",
                      ours_adapter: str | None = None) -> int:
    """Copy adapter tensors by PEFT's parameter names (independent of our file code). Returns the count."""
    ours_adapter = ours_adapter or adapter
    mine = dict(ours.named_parameters())
    n = 0
    for name, p in peft_model.named_parameters():
        if f".{adapter}." not in name + ".":
            continue
        key = name.removeprefix("base_model.model.")
        for src, dst in ((f"lora_A.{adapter}.weight", f"lora_A.{ours_adapter}"),
                         (f"lora_B.{adapter}.weight", f"lora_B.{ours_adapter}"),
                         (f"lora_magnitude_vector.{adapter}.weight", f"lora_magnitude_vector.{ours_adapter}"),
                         (f"vera_lambda_d.{adapter}", f"vera_lambda_d.{ours_adapter}"),
                         (f"vera_lambda_b.{adapter}", f"vera_lambda_b.{ours_adapter}")):
            if key.endswith(src):
                mine[key[: -len(src)] + dst].copy_(p)
                n += 1
    return n


def snapshot(model: torch.nn.Module) -> dict:
    """What an all-or-nothing operation must leave as it was: module types, parameters (names, shapes,
    requires_grad), every state_dict() tensor, and the adapter state (configs, active set)."""
    import lowrank_ext as L

    st = L.get_state(model)
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "params": [(n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()],
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "adapters": None if st is None else (dict(st.configs), list(st.active), sorted(st.vera_shared),
                                             sorted(st.summaries)),
    }


def assert_unchanged(before: dict, after: dict) -> None:
    assert after["modules"] == before["modules"]
    assert after["params"] == before["params"]
    assert after["state_dict"].keys() == before["state_dict"].keys()
    for k, v in before["state_dict"].items():
        w = after["state_dict"][k]
        assert torch.equal(w, v) or (v.is_floating_point() and torch.allclose(w, v, 0, 0, equal_nan=True)), k
    assert after["adapters"] == before["adapters"]
