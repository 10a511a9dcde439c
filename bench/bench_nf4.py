"""NF4 quantize / dequantize on CPU: lowrank_ext vs bitsandbytes' CPU functions, side by side.

    python bench/bench_nf4.py [--quick]

For each weight shape (4096x4096, 4096x11008; --quick: 4096x4096 only) and NF4 + double quant at
blocksize 64, it times, in interleaved rounds (median over rounds, so load spikes hit all alike):
  quantize            ours vs bitsandbytes.functional.quantize_4bit(compress_statistics=True)
  dequantize fp32/bf16  ours (fresh output) vs bitsandbytes.functional.dequantize_4bit, and vs the
                      allocation floor torch.empty(...).fill_() of the same size (docs/kernels.md:
                      a fresh 64 MiB result costs page faults that dominate on this CPU). "beyond alloc"
                      compares the time each spends past that floor (ours asks for huge pages for a
                      large fresh result, so it can come in below the 4 KiB-page floor: negative).
  dequantize out=     ours into a reused buffer vs a warm fill_ of that buffer (the write-bandwidth floor)
  vs reference        1024x1024 fp32 (no double quant): quantize / dequantize vs the plain-PyTorch reference
                      (lowrank_ext._reference.nf4). Keeps the kernels honest: a silent fallback to
                      tensor-level PyTorch math shows as a ratio near 1 (measured ~26x / ~8.5x on 2 loaded
                      cores; it was a unit test's wall-clock assertion before, moved here: timing is not a
                      unit test on a shared machine).
Correctness is checked once before timing (same bytes and same dequantized values as bitsandbytes).
`run(quick)` returns the rows so `python -m lowrank_ext bench` can call it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.append(os.path.dirname(_HERE))  # an in-place build of the repo, when lowrank_ext is not installed
from _timing import bench, print_table

import lowrank_ext

__all__ = ["HEADER", "run"]

HEADER = ["shape", "op", "ours ms", "ours GB/s", "baseline", "baseline ms", "baseline/ours"]
BLOCKSIZE = 64


def _side_by_side(fns: dict[str, Callable[[], object]], rounds: int, repeat: int) -> dict[str, float]:
    """Median seconds per call of each fn, measured in `rounds` interleaved rounds."""
    per: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            per[name].append(bench(fn, warmup=1, repeat=repeat, min_time=0.0))
    return {k: statistics.median(v) for k, v in per.items()}


def _bnb():
    try:
        import bitsandbytes.functional as F
    except ImportError:
        return None
    return F


def _check(F, w: torch.Tensor, q: lowrank_ext.NF4Weight) -> None:
    packed, state = F.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, q.packed), "packed bytes differ from bitsandbytes"
    assert torch.equal(state.state2.absmax, q.nested_absmax) and torch.equal(state.offset.reshape(1), q.offset)
    ours_state = F.QuantState(absmax=q.absmax, shape=q.shape, code=state.code, blocksize=BLOCKSIZE, quant_type="nf4",
                              dtype=torch.float32, offset=q.offset.reshape(()),
                              state2=F.QuantState(absmax=q.nested_absmax, code=q.nested_map, blocksize=256,
                                                  dtype=torch.float32))
    assert torch.equal(F.dequantize_4bit(q.packed, ours_state), q.dequantize()), "dequantize differs from bnb"


def _gbs(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _rows_for_shape(shape: tuple[int, int], quick: bool) -> list[list[object]]:
    F = _bnb()
    torch.manual_seed(0)
    w = torch.randn(shape)
    n = w.numel()
    q = lowrank_ext.quantize_nf4(w, BLOCKSIZE)
    label = "x".join(map(str, shape))
    rounds, rep = (3, 2) if quick else (5, 3)
    rows: list[list[object]] = []

    # -- quantize (NF4 + double quant) --
    fns = {"ours": lambda: lowrank_ext.quantize_nf4(w, BLOCKSIZE)}
    if F is not None:
        _check(F, w, q)
        fns["bnb"] = lambda: F.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
    t = _side_by_side(fns, rounds, 1)
    q_bytes = 4 * n + n // 2 + n // BLOCKSIZE
    if "bnb" in t:
        rows.append([label, "quantize fp32", t["ours"] * 1e3, _gbs(q_bytes, t["ours"]), "bnb quantize_4bit",
                     t["bnb"] * 1e3, t["bnb"] / t["ours"]])
    else:
        rows.append([label, "quantize fp32", t["ours"] * 1e3, _gbs(q_bytes, t["ours"]), "-", "-", "-"])

    # -- dequantize to a fresh tensor, and into a reused buffer --
    for dtype, dname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        out = torch.empty(n, dtype=dtype)
        fns = {
            "ours": lambda dtype=dtype: q.dequantize(dtype),
            "empty+fill": lambda dtype=dtype: torch.empty(n, dtype=dtype).fill_(1.0),
            "ours out=": lambda dtype=dtype, out=out: q.dequantize(dtype, out=out),
            "warm fill_": lambda out=out: out.fill_(1.0),
        }
        if F is not None:
            packed_b, st = F.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
            st.dtype = dtype  # bitsandbytes dequantizes to the state's dtype
            fns["bnb"] = lambda packed_b=packed_b, st=st: F.dequantize_4bit(packed_b, st)
        t = _side_by_side(fns, rounds, rep)
        d_bytes = n // 2 + n * out.element_size()
        op = f"dequantize {dname}"
        if "bnb" in t:
            rows.append([label, op, t["ours"] * 1e3, _gbs(d_bytes, t["ours"]), "bnb dequantize_4bit", t["bnb"] * 1e3,
                         t["bnb"] / t["ours"]])
            # time past the allocation floor; ours can be below it (huge pages for the fresh result)
            beyond_ours, beyond_bnb = t["ours"] - t["empty+fill"], t["bnb"] - t["empty+fill"]
            ratio = beyond_bnb / beyond_ours if beyond_ours > 0 else "ours below floor"
            rows.append([label, op + " beyond alloc", beyond_ours * 1e3, "-", "bnb beyond alloc",
                         beyond_bnb * 1e3, ratio])
        rows.append([label, op, t["ours"] * 1e3, _gbs(d_bytes, t["ours"]), "torch.empty().fill_()",
                     t["empty+fill"] * 1e3, t["empty+fill"] / t["ours"]])
        rows.append([label, op + " out=", t["ours out="] * 1e3, _gbs(d_bytes, t["ours out="]), "warm fill_",
                     t["warm fill_"] * 1e3, t["warm fill_"] / t["ours out="]])
        if "bnb" in t:
            rows.append([label, op + " out=", t["ours out="] * 1e3, _gbs(d_bytes, t["ours out="]), "bnb dequantize_4bit",
                         t["bnb"] * 1e3, t["bnb"] / t["ours out="]])
    return rows


def _rows_vs_reference(quick: bool) -> list[list[object]]:
    """Our kernels vs the plain-PyTorch reference of the format, 1024x1024 fp32, blocksize 64."""
    from lowrank_ext._reference.nf4 import dequantize_nf4_ref, quantize_nf4_ref
    from lowrank_ext.ops.nf4 import quantize_nf4_raw

    torch.manual_seed(0)
    w = torch.randn(1024, 1024)
    n = w.numel()
    q = lowrank_ext.quantize_nf4(w, BLOCKSIZE, double_quant=False)
    ref_packed, ref_absmax = quantize_nf4_ref(w, BLOCKSIZE)
    assert torch.equal(ref_packed, q.packed) and torch.equal(ref_absmax, q.absmax), "quantize differs from reference"
    assert torch.equal(dequantize_nf4_ref(*q.tensors(), BLOCKSIZE, n), q.dequantize().view(-1))
    rounds, rep = (3, 2) if quick else (5, 3)
    t = _side_by_side({"ours q": lambda: quantize_nf4_raw(w, BLOCKSIZE), "ref q": lambda: quantize_nf4_ref(w, BLOCKSIZE),
                       "ours d": q.dequantize, "ref d": lambda: dequantize_nf4_ref(*q.tensors(), BLOCKSIZE, n)},
                      rounds, rep)
    q_bytes, d_bytes = 4 * n + n // 2 + n // BLOCKSIZE, n // 2 + 4 * n
    return [["1024x1024", "quantize fp32", t["ours q"] * 1e3, _gbs(q_bytes, t["ours q"]), "PyTorch reference",
             t["ref q"] * 1e3, t["ref q"] / t["ours q"]],
            ["1024x1024", "dequantize fp32", t["ours d"] * 1e3, _gbs(d_bytes, t["ours d"]), "PyTorch reference",
             t["ref d"] * 1e3, t["ref d"] / t["ours d"]]]


def run(quick: bool = False) -> list[list[object]]:
    """Benchmark rows: [shape, op, ours ms, ours GB/s, baseline, baseline ms, baseline/ours] (also printed)."""
    shapes = [(4096, 4096)] if quick else [(4096, 4096), (4096, 11008)]
    rows: list[list[object]] = []
    for shape in shapes:
        rows += _rows_for_shape(shape, quick)
    rows += _rows_vs_reference(quick)
    title = (f"NF4 + double quant, blocksize {BLOCKSIZE}, CPU, {torch.get_num_threads()} threads "
             f"(baseline/ours > 1: ours faster)")
    print_table(title, HEADER, rows)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, fewer rounds")
    args = ap.parse_args(argv)
    run(args.quick)


if __name__ == "__main__":
    main()


def chart_rows(rows: list[list[object]]) -> list[dict]:
    """`run()` rows as `python -m lowrank_ext bench` chart rows: per shape and op, ours vs each baseline."""
    out: dict[str, dict] = {}
    for shape, op, ours_ms, _gbs, baseline, base_ms, _ratio in rows:
        if "beyond alloc" in op:
            continue
        row = out.setdefault(f"{shape} {op}", {"shape": f"{shape} {op}", "ours": ours_ms / 1e3, "baselines": {}})
        row["baselines"][baseline] = base_ms / 1e3
    return list(out.values())
