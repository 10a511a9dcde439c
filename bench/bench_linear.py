"""Fused NF4 matmul + LoRA on CPU, side by side with its baselines in one run (ratios are the result).

  (a) decode, M = 1, r = 16:  ours (nf4_lora_linear) vs dense fp32 F.linear + LoRA  (goal >= 2x faster)
                              and vs bitsandbytes matmul_4bit + LoRA              (goal >= 15x faster)
  (b) training, M = 512, 4096x4096, r = 16, forward + backward of one QLoRA layer:
      ours fp32 vs a dense fp32 LoRA layer (goal within 1.15x) and vs PEFT LoRA on a bitsandbytes
      Linear4bit (goal: faster); ours bf16 vs the dense fp32 layer (goal within 1.5x)
  (c) the largest single allocation of the (b) step (profiler), against N·K·4 bytes (a dense fp32 W)

  (d) --under-load: M = 1, 4096x4096, our nf4_linear vs dense fp32 F.linear on deq(W), each call timed alone
      (interleaved), idle and then with two busy-looping processes started by the bench (median, p90):
      goal: ours slows down by no more than dense does
  (a') alone: --cold-only (add LOWRANK_EXT_CPU_ISA=avx2 to time the AVX2 kernels on an AVX-512 CPU)

Run: python bench/bench_linear.py [--quick] [--threads T] [--under-load | --cold-only]
     (--quick: fewer repeats, skips 4096x11008 and PEFT; --threads 1: steadier on a busy machine)
Shapes are (in_features K, out_features N); the weight is W [N, K].
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

import lowrank_ext
from bench._timing import bench, print_table
from lowrank_ext.ops import nf4_linear, nf4_lora_linear

try:
    import bitsandbytes as bnb
except ImportError:  # the comparison is skipped, not faked
    bnb = None

__all__ = ["run"]

R, SCALING = 16, 2.0


class QLoRALayer(torch.nn.Module):
    """The smallest QLoRA layer around our op: frozen NF4 weight, trainable A and B."""

    def __init__(self, w: torch.Tensor, r: int, dtype: torch.dtype) -> None:
        super().__init__()
        n, k = w.shape
        self.weight = lowrank_ext.quantize_nf4(w.to(dtype))
        self.lora_A = torch.nn.Parameter(torch.randn(r, k, dtype=dtype) / k**0.5)
        self.lora_B = torch.nn.Parameter(torch.randn(n, r, dtype=dtype) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_lora_linear(x, self.weight, self.lora_A, self.lora_B, SCALING)


class DenseLoRALayer(torch.nn.Module):
    """A dense fp32 LoRA layer: frozen W, y = x Wᵀ + s (x Aᵀ) Bᵀ."""

    def __init__(self, w: torch.Tensor, r: int) -> None:
        super().__init__()
        n, k = w.shape
        self.register_buffer("weight", w.float())
        self.lora_A = torch.nn.Parameter(torch.randn(r, k) / k**0.5)
        self.lora_B = torch.nn.Parameter(torch.randn(n, r) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + SCALING * F.linear(F.linear(x, self.lora_A), self.lora_B)


def _peft_bnb_layer(w: torch.Tensor, r: int):
    """PEFT's LoRA on a bitsandbytes Linear4bit (NF4, fp32 compute), or None when unavailable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    n, k = w.shape

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.float32, quant_type="nf4")
            self.proj.weight = bnb.nn.Params4bit(w.float(), requires_grad=False, quant_type="nf4")

        def forward(self, x):
            return self.proj(x)

    holder = Holder().to("cpu")  # quantizes the weight
    cfg = LoraConfig(r=r, lora_alpha=SCALING * r, lora_dropout=0.0, target_modules=["proj"], init_lora_weights=False)
    return get_peft_model(holder, cfg)


def _step(layer: torch.nn.Module, x: torch.Tensor):
    def fn() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).sum().backward()
    return fn


def _largest_allocation(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.self_cpu_memory_usage for e in prof.events())


def decode_table(quick: bool) -> list[list[object]]:
    rows = []
    shapes = [(4096, 4096)] if quick else [(4096, 4096), (4096, 11008)]
    rep = {"warmup": 2, "repeat": 5 if quick else 20}
    for k, n in shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k) * 0.02
        a, b = torch.randn(R, k) / k**0.5, torch.randn(n, R) * 0.01
        x = torch.randn(1, k)
        wq = lowrank_ext.quantize_nf4(w)

        def lora(x=x, a=a, b=b):
            return SCALING * F.linear(F.linear(x, a), b)

        def ours(x=x, wq=wq, a=a, b=b):
            return nf4_lora_linear(x, wq, a, b, SCALING)

        def dense(x=x, w=w):
            return F.linear(x, w) + lora()

        # correctness once before timing
        torch.testing.assert_close(ours(), F.linear(x, wq.dequantize()) + lora(), rtol=1e-4, atol=1e-4)
        t_ours, t_dense = bench(ours, **rep), bench(dense, **rep)
        t_bnb = float("nan")
        if bnb is not None:
            packed, qs = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)

            def bnb_fn(x=x, packed=packed, qs=qs):
                return bnb.matmul_4bit(x, packed.t(), qs) + lora()

            t_bnb = bench(bnb_fn, warmup=1, repeat=3 if quick else 10)
        gbs = wq.nbytes / t_ours / 1e9
        rows.append([f"{k}x{n}", t_ours * 1e3, t_dense * 1e3, t_bnb * 1e3, gbs, t_dense / t_ours, t_bnb / t_ours])
    print_table("(a) M = 1, r = 16, fp32 activations (ms; ratio > 1: ours faster)",
                ["K x N", "ours", "dense fp32", "bnb 4bit", "ours GB/s", "dense/ours", "bnb/ours"], rows)
    return rows


def decode_cold_table(quick: bool, cache_bytes: int = 512 * 2**20) -> list[list[object]]:
    """M = 1 as in a real decode step, where every layer's weights stream from memory once per token:
    both sides rotate over enough distinct layers that even the NF4 copies exceed the last-level cache
    (this machine's L3 is 480 MiB, so the warm table above times the dense fp32 weight from cache)."""
    k = n = 4096
    torch.manual_seed(0)
    n_layers = 1 + cache_bytes // lowrank_ext.quantize_nf4(torch.randn(n, k)).nbytes
    if quick:
        n_layers = min(n_layers, 8)
    ws = [torch.randn(n, k) * 0.02 for _ in range(n_layers)]
    wqs = [lowrank_ext.quantize_nf4(w) for w in ws]
    a, b, x = torch.randn(R, k) / k**0.5, torch.randn(n, R) * 0.01, torch.randn(1, k)

    def sweep_ours():
        for wq in wqs:
            nf4_lora_linear(x, wq, a, b, SCALING)

    def sweep_dense():
        for w in ws:
            F.linear(x, w) + SCALING * F.linear(F.linear(x, a), b)

    rep = {"warmup": 1, "repeat": 3 if quick else 5}
    t_ours, t_dense = bench(sweep_ours, **rep) / n_layers, bench(sweep_dense, **rep) / n_layers
    rows = [[f"{k}x{n} x{n_layers} layers", t_ours * 1e3, t_dense * 1e3, wqs[0].nbytes / t_ours / 1e9,
             k * n * 4 / t_dense / 1e9, t_dense / t_ours]]
    print_table("(a') M = 1, r = 16, weights streamed from memory (rotating distinct layers; ms per layer)",
                ["K x N", "ours", "dense fp32", "ours GB/s", "dense GB/s", "dense/ours"], rows)
    del ws
    return rows


def _per_call_times(fns: dict, calls: int) -> dict[str, list[float]]:
    """Seconds of each call, the functions alternated call by call so a load change hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(calls):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def under_load_table(quick: bool, busy: int = 2) -> list[list[object]]:
    """M = 1 at 4096x4096: ours vs dense fp32 F.linear, idle and with `busy` busy-looping processes (as many as
    this machine has cores here: each of our threads then shares its core). The busy processes are started and
    killed by this function. Slowdown = loaded median / idle median."""
    k = n = 4096
    torch.manual_seed(0)
    wq = lowrank_ext.quantize_nf4(torch.randn(n, k) * 0.02)
    w = wq.dequantize()  # the dense baseline multiplies the same values
    x = torch.randn(1, k)
    fns = {"ours": lambda: nf4_linear(x, wq), "dense fp32": lambda: F.linear(x, w)}
    torch.testing.assert_close(fns["ours"](), fns["dense fp32"](), rtol=1e-4, atol=1e-4)
    calls = 100 if quick else 400
    _per_call_times(fns, 20)  # warm-up
    idle = _per_call_times(fns, calls)
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        time.sleep(0.5)  # let the scheduler see them as CPU hogs
        loaded = _per_call_times(fns, calls)
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()

    def q(ts: list[float], f: float) -> float:
        return statistics.quantiles(ts, n=10)[8] if f == 0.9 else statistics.median(ts)

    rows = []
    for name in fns:
        rows.append([name, q(idle[name], 0.5) * 1e3, q(idle[name], 0.9) * 1e3, q(loaded[name], 0.5) * 1e3,
                     q(loaded[name], 0.9) * 1e3, q(loaded[name], 0.5) / q(idle[name], 0.5),
                     q(loaded[name], 0.9) / q(idle[name], 0.9)])
    print_table(f"(d) M = 1, {k}x{n}, threads={torch.get_num_threads()}: idle vs {busy} busy processes "
                f"({calls} calls each; ms)",
                ["op", "idle med", "idle p90", "load med", "load p90", "slowdown med", "slowdown p90"], rows)
    return rows


def train_table(quick: bool) -> list[list[object]]:
    k = n = 4096
    m = 512
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.02
    x32 = torch.randn(m, k, requires_grad=True)
    x16 = x32.detach().bfloat16().requires_grad_()
    rep = {"warmup": 1, "repeat": 3 if quick else 7, "min_time": 0.0}
    ours32, ours16, dense = QLoRALayer(w, R, torch.float32), QLoRALayer(w, R, torch.bfloat16), DenseLoRALayer(w, R)
    times = {
        "ours fp32": bench(_step(ours32, x32), **rep),
        "dense fp32": bench(_step(dense, x32), **rep),
        "ours bf16": bench(_step(ours16, x16), **rep),
    }
    peft_layer = None if (quick or bnb is None) else _peft_bnb_layer(w, R)
    if peft_layer is not None:
        times["PEFT+bnb fp32"] = bench(_step(peft_layer, x32), **rep)
    mem = {
        "ours fp32": _largest_allocation(_step(ours32, x32)),
        "dense fp32": _largest_allocation(_step(dense, x32)),
        "ours bf16": _largest_allocation(_step(ours16, x16)),
    }
    if peft_layer is not None:
        mem["PEFT+bnb fp32"] = _largest_allocation(_step(peft_layer, x32))
    base = times["dense fp32"]
    dense_w = n * k * 4
    rows = [[name, t * 1e3, t / base, mem.get(name, 0) / 2**20, mem.get(name, 0) / dense_w]
            for name, t in times.items()]
    if "PEFT+bnb fp32" in times:
        rows.append(["PEFT+bnb / ours fp32", times["PEFT+bnb fp32"] / times["ours fp32"], "", "", ""])
    print_table(f"(b, c) M = {m}, {k}x{n}, r = {R}: forward + backward of one layer "
                "(time/dense > 1: slower than dense; largest allocation vs a dense fp32 W)",
                ["layer", "ms", "time / dense fp32", "largest alloc MiB", "alloc / (N*K*4)"], rows)
    return rows


def run(quick: bool = False) -> dict[str, list[list[object]]]:
    print(f"threads={torch.get_num_threads()} build={lowrank_ext.build_info()['cpu_flags']} "
          f"bitsandbytes={getattr(bnb, '__version__', 'missing')}", flush=True)
    return {"decode": decode_table(quick), "decode_cold": decode_cold_table(quick), "train": train_table(quick)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller set of baselines")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads (0: default); 1 gives steadier ratios on a shared machine")
    parser.add_argument("--under-load", action="store_true",
                        help="only (d): M = 1 idle vs two busy processes, ours vs dense (median, p90)")
    parser.add_argument("--cold-only", action="store_true", help="only (a'): M = 1 with weights streamed from memory")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.under_load or args.cold_only:
        print(f"threads={torch.get_num_threads()} isa={lowrank_ext.cpu_isa()} load={os.getloadavg()[0]:.2f}",
              flush=True)
        if args.under_load:
            under_load_table(args.quick)
        if args.cold_only:
            decode_cold_table(args.quick)
    else:
        run(args.quick)


def chart_rows(result: dict[str, list[list[object]]]) -> list[dict]:
    """`run()` tables as `python -m lowrank_ext bench` chart rows (seconds)."""
    rows = [{"shape": f"M=1 {r[0]}", "ours": r[1] / 1e3, "baselines": {"dense fp32": r[2] / 1e3, "bnb 4bit": r[3] / 1e3}}
            for r in result["decode"]]
    rows += [{"shape": f"M=1 {r[0]}", "ours": r[1] / 1e3, "baselines": {"dense fp32": r[2] / 1e3}}
             for r in result.get("decode_cold", [])]
    train = {r[0]: r[1] for r in result["train"] if isinstance(r[1], float) and r[0] != "PEFT+bnb / ours fp32"}
    if "ours fp32" in train:
        rows.append({"shape": "M=512 fwd+bwd 4096x4096", "ours": train["ours fp32"] / 1e3,
                     "baselines": {k: v / 1e3 for k, v in train.items() if not k.startswith("ours")}})
    return rows
