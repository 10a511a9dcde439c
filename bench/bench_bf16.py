"""bf16 on the CPU (issue #12), ours side by side with dense PyTorch in one run; ratios are the result.

  (a) one QLoRA layer, M = 512, 4096x4096, r = 16:
        ours bf16 (nf4_lora_linear on bf16 x, A, B)  vs a dense bf16 LoRA layer   fwd+bwd (target <= 1.15x),
                                                                                   fwd     (target <= 1.1x)
        ours fp32 x with compute_dtype=bf16          vs the dense bf16 layer      fwd+bwd (target <= 1.25x)
                                                     and vs ours fp32             (target >= 2.5x faster)
  (b) M = 1 decode, weights streamed from memory (distinct 4096x4096 layers, more bytes than the L3):
        ours fp32 vs dense fp32 F.linear (target >= 4x faster); ours bf16 vs dense bf16 (target >= 2.5x)
  (c) one SmolLM2-135M training step (4 x 128 tokens, r = 16 on all seven projections, AdamW), bf16:
        ours (NF4 base, bf16 autocast) vs PEFT LoRA on the dense bf16 model (target <= 1.1x),
        and ours bf16 vs ours fp32: the main job's --dtype bf16 / --dtype fp32 step time (target <= 0.6x)
  (d) accuracy: max |error| against float64 of ours bf16 and of PyTorch's own bf16 (target: <= 2x)

On a CPU without native bf16 matmul (lowrank_ext.native_bf16_matmul() is False: no AVX512-BF16 / AMX)
the bf16 ratios are printed and marked "n/a here", not judged: PyTorch's own bf16 GEMM is the slow one
there. Each pair is timed alternately (a, b, a, b, ...) so load changes on a shared machine hit both.

Run: python bench/bench_bf16.py [--quick]       (--quick: fewer layers and repeats, no SmolLM2 step)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import bench, print_table

import lowrank_ext
from lowrank_ext.ops import nf4_linear, nf4_lora_linear

R, S = 16, 2.0


def _side_by_side(a, b, rounds: int) -> tuple[float, float]:
    """Median seconds of a() and b(), measured alternately."""
    a(), b()
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(bench(a, warmup=0, repeat=1, min_time=0.0))
        tb.append(bench(b, warmup=0, repeat=1, min_time=0.0))
    return statistics.median(ta), statistics.median(tb)


def _verdict(ratio: float, target: float, lower_is_better: bool, judged: bool) -> str:
    if not judged:
        return "n/a here"
    ok = ratio <= target if lower_is_better else ratio >= target
    return ("met" if ok else "MISSED") + f" ({'<=' if lower_is_better else '>='} {target}x)"


def _layer(quick: bool, native: bool) -> list[list[object]]:
    m, n, k = (256, 2048, 2048) if quick else (512, 4096, 4096)
    g = torch.Generator().manual_seed(0)
    w_f32 = torch.randn(n, k, generator=g) * 0.02
    w = lowrank_ext.quantize_nf4(w_f32)
    w_bf16 = w.dequantize(torch.float32).bfloat16()  # the dense baseline holds the same weights
    x = torch.randn(m, k, generator=g)
    gy = torch.randn(m, n, generator=g)
    a32 = (torch.randn(R, k, generator=g) / k**0.5).requires_grad_()
    b32 = (torch.randn(n, R, generator=g) * 0.01).requires_grad_()
    a16, b16 = (t.detach().bfloat16().requires_grad_() for t in (a32, b32))
    xb, gyb = x.bfloat16().requires_grad_(), gy.bfloat16()
    x32 = x.clone().requires_grad_()

    def dense_bf16_fwd():
        return F.linear(xb, w_bf16) + S * F.linear(F.linear(xb, a16), b16)

    def ours_bf16_fwd():
        return nf4_lora_linear(xb, w, a16, b16, S)

    def fb(fwd, grad):
        def run():
            fwd().backward(grad)
        return run

    def ours_cd_fwd():
        return nf4_lora_linear(x32, w, a32, b32, S, compute_dtype=torch.bfloat16)

    def ours_fp32_fwd():
        return nf4_lora_linear(x32, w, a32, b32, S)

    rounds = 3 if quick else 7
    shape = f"M={m} {k}x{n} r={R}"
    rows = []
    t_ours, t_dense = _side_by_side(fb(ours_bf16_fwd, gyb), fb(dense_bf16_fwd, gyb), rounds)
    rows.append([f"(a) layer fwd+bwd bf16 {shape}", t_ours * 1e3, "dense bf16 LoRA", t_dense * 1e3,
                 t_ours / t_dense, _verdict(t_ours / t_dense, 1.15, True, native)])
    with torch.no_grad():
        t_ours, t_dense = _side_by_side(ours_bf16_fwd, dense_bf16_fwd, rounds)
    rows.append([f"(a) layer fwd bf16 {shape}", t_ours * 1e3, "dense bf16 LoRA", t_dense * 1e3, t_ours / t_dense,
                 _verdict(t_ours / t_dense, 1.1, True, native)])
    t_cd, t_dense = _side_by_side(fb(ours_cd_fwd, gy), fb(dense_bf16_fwd, gyb), rounds)
    rows.append([f"(a) fp32 x, compute_dtype=bf16 {shape}", t_cd * 1e3, "dense bf16 LoRA", t_dense * 1e3,
                 t_cd / t_dense, _verdict(t_cd / t_dense, 1.25, True, native)])
    t_cd, t_32 = _side_by_side(fb(ours_cd_fwd, gy), fb(ours_fp32_fwd, gy), rounds)
    rows.append([f"(a) fp32 x, compute_dtype=bf16 {shape}", t_cd * 1e3, "ours fp32", t_32 * 1e3, t_32 / t_cd,
                 _verdict(t_32 / t_cd, 2.5, False, native) + " (speed-up)"])
    return rows


def _streamed(quick: bool, native: bool) -> list[list[object]]:
    """Distinct layers, each called once per sweep: every call reads its weights from DRAM."""
    n = k = 4096
    layers = 12 if quick else 48  # 48 x 8.9 MB NF4, x 64 MB fp32, x 32 MB bf16: all beyond any L3 here
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, k, generator=g)
    rows = []
    nf4 = [lowrank_ext.quantize_nf4(torch.randn(n, k, generator=g) * 0.02) for _ in range(layers)]
    nf4_bytes = nf4[0].nbytes
    for dtype, target, judged in ((torch.float32, 4.0, True), (torch.bfloat16, 2.5, native)):
        xd = x.to(dtype)
        dense = [torch.randn(n, k, generator=g).to(dtype) for _ in range(layers)]

        def ours(xd=xd):
            for wt in nf4:
                nf4_linear(xd, wt)

        def base(xd=xd, dense=dense):
            for wt in dense:
                F.linear(xd, wt)

        t_ours, t_dense = _side_by_side(ours, base, 3 if quick else 5)
        name = "fp32" if dtype == torch.float32 else "bf16"
        path = lowrank_ext.last_kernel_path("nt")
        gbs = nf4_bytes / (t_ours / layers) / 1e9
        rows.append([f"(b) M=1 streamed x{layers} {name} ({path}, {gbs:.1f} GB/s)", t_ours / layers * 1e3,
                     f"dense {name}", t_dense / layers * 1e3, t_dense / t_ours,
                     _verdict(t_dense / t_ours, target, False, judged) + " (speed-up)"])
        del dense, base  # the next dtype's dense weights replace these
    return rows


def _smollm2_step(native: bool) -> list[list[object]]:
    import peft

    from lowrank_ext.finetune.models import load_causal_lm

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ids = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(2))
    ours = lowrank_ext.inject(load_causal_lm().model, lowrank_ext.LoRAConfig(
        r=R, alpha=32, target_modules=targets, quantize="nf4"))
    dense = load_causal_lm().model.to(torch.bfloat16)
    dense = peft.get_peft_model(dense, peft.LoraConfig(r=R, lora_alpha=32, target_modules=targets))
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for m in (ours, dense)]

    def step(model, opt, autocast):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    t_ours, t_peft = _side_by_side(step(ours, opts[0], True), step(dense, opts[1], False), 3)
    t_bf16, t_fp32 = _side_by_side(step(ours, opts[0], True), step(ours, opts[0], False), 3)
    return [["(c) SmolLM2-135M step bf16, 4x128 tok, r=16 x7", t_ours * 1e3, "PEFT LoRA, dense bf16",
             t_peft * 1e3, t_ours / t_peft, _verdict(t_ours / t_peft, 1.1, True, native)],
            ["(c) the same step, ours --dtype bf16 vs fp32 (main job)", t_bf16 * 1e3, "ours fp32", t_fp32 * 1e3,
             t_bf16 / t_fp32, _verdict(t_bf16 / t_fp32, 0.6, True, native)]]


def _accuracy() -> list[list[object]]:
    g = torch.Generator().manual_seed(3)
    m, n, k = 64, 1024, 1024
    w = lowrank_ext.quantize_nf4(torch.randn(n, k, generator=g) * 0.02)
    x = torch.randn(m, k, generator=g).bfloat16()
    a = (torch.randn(R, k, generator=g) / k**0.5).bfloat16()
    b = (torch.randn(n, R, generator=g) * 0.01).bfloat16()
    wd = w.dequantize(torch.float32).double()
    ref = F.linear(x.double(), wd) + S * F.linear(F.linear(x.double(), a.double()), b.double())
    own = F.linear(x, wd.bfloat16()) + S * F.linear(F.linear(x, a), b)
    ours = nf4_lora_linear(x, w, a, b, S)
    e_ours = (ours.double() - ref).abs().max().item()
    e_own = (own.double() - ref).abs().max().item()
    return [[f"(d) |error| vs float64, bf16 fwd M={m} ({lowrank_ext.last_kernel_path('nt')})", e_ours,
             "PyTorch bf16", e_own, e_ours / e_own, _verdict(e_ours / e_own, 2.0, True, True)]]


def run(quick: bool = False) -> list[dict]:
    """Prints the table; returns the chart rows of `python -m lowrank_ext bench` (timings only, seconds)."""
    native = lowrank_ext.native_bf16_matmul()
    timed = _layer(quick, native) + _streamed(quick, native)
    if not quick:
        timed += _smollm2_step(native)
    title = (f"bench_bf16 (CPU kernels: {lowrank_ext.cpu_isa()}, native bf16 matmul: {native}, "
             f"{torch.get_num_threads()} threads; times in ms (errors for (d)), ratio = ours / baseline unless "
             f"marked speed-up)")
    print_table(title, ["case", "ours", "baseline", "baseline value", "ratio", "target"], timed + _accuracy())
    return [{"shape": r[0], "ours": r[1] / 1e3, "baselines": {r[2]: r[3] / 1e3}} for r in timed]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes, fewer layers, no SmolLM2 step")
    run(ap.parse_args().quick)
