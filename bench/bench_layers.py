"""Layer-level benchmarks, ours vs PEFT, measured side by side in one run (ratios are the result).

1. One QLoRA training step (forward + backward + AdamW step) of a small Llama built from a config:
   lowrank_ext.inject(quantize="nf4") vs PEFT LoRA on bitsandbytes Linear4bit layers (same NF4 bytes,
   same LoRA config: all linear layers except lm_head, r=16).
2. Mixed-batch inference with 4 LoRA adapters (each row of the batch uses its own adapter):
   lowrank_ext.mixed_batch vs PEFT's `adapter_names=` path.

Run: python bench/bench_layers.py [--quick]     (or import and call run(quick=True))
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import bench, print_table  # noqa: E402

import lowrank_ext as L  # noqa: E402


def _llama(hidden: int, layers: int, inter: int, seed: int = 0):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                   num_key_value_heads=max(1, hidden // 128), max_position_embeddings=512)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def _to_bnb_4bit(model, skip: str = "lm_head"):
    """Replace every nn.Linear (but the head) by bitsandbytes' Linear4bit holding the same NF4 bytes as ours."""
    import bitsandbytes as bnb

    for name, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear) and not name.endswith(skip):
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
            q.weight = bnb.nn.Params4bit(m.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64)
            if m.bias is not None:
                q.bias = torch.nn.Parameter(m.bias.data.clone(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, q.to("cpu"))
    return model


def _train_step(model, opt, ids):
    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def bench_training(quick: bool) -> list[list[object]]:
    import peft

    hidden, layers, inter, batch, seq = (256, 2, 688, 2, 64) if quick else (512, 4, 1376, 4, 128)
    base = _llama(hidden, layers, inter)
    ours = copy.deepcopy(base)
    L.inject(ours, L.LoRAConfig(r=16, alpha=32, target_modules="all-linear", quantize="nf4"))
    theirs = peft.get_peft_model(_to_bnb_4bit(copy.deepcopy(base)),
                                 peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    assert L.count_parameters(ours) == theirs.get_nb_trainable_parameters()
    ids = torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(0))
    ours.train(), theirs.train()
    with torch.no_grad():  # correctness once before timing: same NF4 weights, B = 0 -> same loss
        l_ours, l_theirs = ours(input_ids=ids, labels=ids).loss, theirs(input_ids=ids, labels=ids).loss
    assert abs(l_ours.item() - l_theirs.item()) < 1e-3, (l_ours.item(), l_theirs.item())
    t_ours = bench(_train_step(ours, torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], 1e-4), ids),
                   warmup=1, repeat=3 if quick else 5)
    t_peft = bench(_train_step(theirs, torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], 1e-4),
                               ids), warmup=1, repeat=3 if quick else 5)
    shape = f"llama h{hidden} L{layers} {batch}x{seq}"
    return [[f"QLoRA train step, {shape}", t_ours * 1e3, t_peft * 1e3, t_peft / t_ours]]


def bench_mixed(quick: bool) -> list[list[object]]:
    import peft

    hidden, layers, inter, batch, seq = (256, 2, 688, 16, 32) if quick else (512, 4, 1376, 32, 64)
    base = _llama(hidden, layers, inter)
    names = ["a0", "a1", "a2", "a3"]
    t = ["q_proj", "k_proj", "v_proj", "o_proj"]
    ours = copy.deepcopy(base)
    L.inject(ours, L.LoRAConfig(r=16, alpha=32, target_modules=t), adapter_name=names[0])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, target_modules=t),
                                 adapter_name=names[0])
    for n in names[1:]:
        L.add_adapter(ours, n, L.LoRAConfig(r=16, alpha=32, target_modules=t))
        theirs.add_adapter(n, peft.LoraConfig(r=16, lora_alpha=32, target_modules=t))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # same random adapters in both
        mine = dict(ours.named_parameters())
        for k, p in theirs.named_parameters():
            if ".lora_" in k:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
                mine[k.removeprefix("base_model.model.").removesuffix(".weight")].copy_(p)
    theirs.eval(), ours.eval()
    rows = [names[i % 4] for i in range(batch)]
    ids = torch.randint(0, 512, (batch, seq), generator=g)

    @torch.no_grad()
    def run_ours():
        with L.mixed_batch(ours, rows):
            return ours(input_ids=ids).logits

    @torch.no_grad()
    def run_peft():
        return theirs(input_ids=ids, adapter_names=rows).logits

    torch.testing.assert_close(run_ours(), run_peft(), atol=1e-4, rtol=1e-4)
    t_ours = bench(run_ours, warmup=2, repeat=5 if quick else 10)
    t_peft = bench(run_peft, warmup=2, repeat=5 if quick else 10)
    return [[f"mixed batch 4 adapters, llama h{hidden} L{layers} {batch}x{seq}", t_ours * 1e3, t_peft * 1e3,
             t_peft / t_ours]]


def run(quick: bool = False) -> str:
    rows = bench_training(quick) + bench_mixed(quick)
    return print_table("bench_layers (CPU; ratio = PEFT time / ours, > 1 means we are faster)",
                       ["case", "ours ms", "PEFT ms", "ratio"], rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats (CI smoke run)")
    run(ap.parse_args().quick)
