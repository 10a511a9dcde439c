"""Layer-level benchmarks, ours vs PEFT, measured side by side in one run (ratios are the result).

1. One QLoRA training step (forward + backward + AdamW step) of a small Llama built from a config:
   lowrank_ext.inject(quantize="nf4") vs PEFT LoRA on bitsandbytes Linear4bit layers (same NF4 bytes,
   same LoRA config: all linear layers except lm_head, r=16).
2. Mixed-batch inference with 4 LoRA adapters (each row of the batch uses its own adapter):
   lowrank_ext.mixed_batch vs PEFT's `adapter_names=` path.
3. (IA)³ on an NF4 base: QIA3Linear (nf4_linear + one elementwise scaling of the output, or of the input for a
   feed-forward layer) vs the bare nf4_linear op (Linear4bit), forward + backward to x and l, at SmolLM2 shapes.
   The ratio is the scaling's overhead (1.0 = free).

Run: python bench/bench_layers.py [--quick]     (or import and call run(quick=True))
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import bench, print_table

import lowrank_ext as L


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


def _side_by_side(a, b, rounds: int) -> tuple[float, float]:
    """Median seconds of a() and b(), measured alternately (a, b, a, b, ...) so load changes hit both."""
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(bench(a, warmup=0, repeat=1, min_time=0.0))
        tb.append(bench(b, warmup=0, repeat=1, min_time=0.0))
    return statistics.median(ta), statistics.median(tb)


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

    hidden, layers, inter, batch, seq = (256, 2, 704, 2, 64) if quick else (512, 4, 1408, 4, 128)
    base = _llama(hidden, layers, inter)
    ours = _to_bnb_4bit(copy.deepcopy(base))  # inject imports bitsandbytes' NF4 bytes as they are
    L.inject(ours, L.LoRAConfig(r=16, alpha=32, target_modules="all-linear", quantize="nf4"))
    assert all(type(m).__module__.startswith("lowrank_ext") for m in ours.modules()
               if "Linear4bit" in type(m).__name__)
    theirs = peft.get_peft_model(_to_bnb_4bit(copy.deepcopy(base)),
                                 peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    assert L.count_parameters(ours) == theirs.get_nb_trainable_parameters()
    ids = torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(0))
    ours.train(), theirs.train()
    with torch.no_grad():  # correctness once before timing (B = 0: the loss is the base model's)
        deq = copy.deepcopy(base)  # dense model holding deq(W) of the same NF4 bytes
        for n, m in ours.named_modules():
            if isinstance(m, L.nn.QLoRALinear):
                deq.get_submodule(n).weight.copy_(m.weight.dequantize(torch.float32))
        l_ours, l_theirs, l_deq = (m(input_ids=ids, labels=ids).loss.item() for m in (ours, theirs, deq))
    assert abs(l_ours - l_deq) < 1e-4, (l_ours, l_deq)
    # sizes are multiples of the blocksize: bitsandbytes 0.50.2's CPU dequantize_4bit is wrong otherwise
    assert abs(l_theirs - l_deq) < 1e-4, (l_theirs, l_deq)
    print(f"loss before training: ours {l_ours:.6f}  PEFT+bnb {l_theirs:.6f}  dense deq(W) {l_deq:.6f}")
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], 1e-4)
    opt_peft = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], 1e-4)
    t_ours, t_peft = _side_by_side(_train_step(ours, opt_ours, ids), _train_step(theirs, opt_peft, ids),
                                   rounds=5 if quick else 9)
    shape = f"llama h{hidden} L{layers} {batch}x{seq}"
    return [[f"QLoRA train step, {shape}", t_ours * 1e3, t_peft * 1e3, t_peft / t_ours]]


def bench_mixed(quick: bool) -> list[list[object]]:
    import peft

    hidden, layers, inter, batch, seq = (256, 2, 704, 16, 32) if quick else (512, 4, 1408, 32, 64)
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
    t_ours, t_peft = _side_by_side(run_ours, run_peft, rounds=7 if quick else 15)
    return [[f"mixed batch 4 adapters, llama h{hidden} L{layers} {batch}x{seq}", t_ours * 1e3, t_peft * 1e3,
             t_peft / t_ours]]


def bench_ia3(quick: bool) -> list[list[object]]:
    from lowrank_ext.nn import Linear4bit, QIA3Linear

    rows = []
    m = 128 if quick else 512  # a 4 x 128 training batch
    for name, (n, k, ff) in {"k_proj 576->192": (192, 576, False), "down_proj 1536->576": (576, 1536, True)}.items():
        torch.manual_seed(0)
        w = L.quantize_nf4(torch.randn(n, k))
        base = Linear4bit(w)
        layer = QIA3Linear(w, is_feedforward=ff)
        layer.add_adapter("default")
        layer.set_adapter("default")
        with torch.no_grad():
            layer.ia3_l["default"].uniform_(0.5, 1.5)
        x = torch.randn(m, k, requires_grad=True)

        def step(mod, x=x):
            mod(x).sum().backward()

        t_ia3, t_base = _side_by_side(lambda layer=layer: step(layer), lambda base=base: step(base),
                                      rounds=5 if quick else 15)
        rows.append([f"ia3 NF4 {name} ({'input' if ff else 'output'} scaling), {m} rows fwd+bwd", t_ia3 * 1e3,
                     t_base * 1e3, t_ia3 / t_base])
    return rows


def run(quick: bool = False) -> str:
    rows = bench_training(quick) + bench_mixed(quick)
    text = print_table("bench_layers (CPU; ratio = PEFT time / ours, > 1 means we are faster)",
                       ["case", "ours ms", "PEFT ms", "ratio"], rows)
    return text + print_table("bench_layers: (IA)³ scaling overhead on the NF4 op (ratio = ours / bare op)",
                              ["case", "ours ms", "nf4_linear ms", "overhead"], bench_ia3(quick))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats (CI smoke run)")
    run(ap.parse_args().quick)
