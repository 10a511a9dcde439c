"""Optimizer step time on ~10M params (CPU): ours vs torch.optim.AdamW(fused=True) (32-bit state) and vs
bitsandbytes' CPU 8-bit blockwise AdamW, plus state bytes. Ratios measured side by side in one run.

    python bench/bench_optim.py [--quick]
Goals (issue #5): 32-bit step at least as fast as torch's fused AdamW; 8-bit >= 2x faster than
bitsandbytes' CPU 8-bit AdamW; 8-bit state <= 30% of the fp32 state's bytes.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))  # the repo root, for an in-place build
from _timing import bench, print_table

from lowrank_ext.optim import AdamW8bit, PagedAdamW

HYPER = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}


def _params(shapes, dtype):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in shapes]
    for p in ps:
        p.grad = (torch.randn(p.shape, generator=gen) * 0.01).to(dtype)
    return ps


def _state_bytes(opt) -> int:
    return sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )


def _bnb_adamw8bit():
    try:
        import bitsandbytes as bnb
    except Exception:  # noqa: BLE001 - optional baseline
        return None
    return bnb.optim.AdamW8bit


def run(quick: bool = False) -> list[list[object]]:
    # ~10M params as a few LLM-like matrices (quick: ~2.6M)
    shapes = (
        [(1024, 1024)] * 2 + [(576, 1536)] if quick else [(2048, 2048)] * 2 + [(1536, 576)] * 2 + [(4096, 96)]
    )
    n = sum(torch.Size(s).numel() for s in shapes)
    repeat = 5 if quick else 10
    rows: list[list[object]] = []
    for dtype in (torch.float32, torch.bfloat16):
        ps_ref, ps_ours = _params(shapes, dtype), _params(shapes, dtype)
        ref = torch.optim.AdamW(ps_ref, **HYPER, fused=True)
        ours = PagedAdamW(ps_ours, **HYPER)
        ref.step()
        ours.step()
        # correctness once before timing (same params and grads, one step)
        for a, b in zip(ps_ref, ps_ours):
            torch.testing.assert_close(
                a.float(),
                b.float(),
                atol=1e-2 if dtype != torch.float32 else 1e-6,
                rtol=1e-2 if dtype != torch.float32 else 1e-5,
            )
        t_ref = bench(ref.step, warmup=1, repeat=repeat)
        t_ours = bench(ours.step, warmup=1, repeat=repeat)
        gbs = n * (3 * dtype.itemsize + 16) / t_ours / 1e9  # p, g read, p written; m, v fp32 read+written
        rows.append(
            [
                f"32-bit {str(dtype)[6:]}",
                n,
                f"{t_ref * 1e3:.1f}",
                f"{t_ours * 1e3:.1f}",
                f"{gbs:.1f}",
                f"{t_ref / t_ours:.2f}x",
                _state_bytes(ref),
                _state_bytes(ours),
            ]
        )
    bnb_cls = _bnb_adamw8bit()
    ps_ours = _params(shapes, torch.float32)
    ours8 = AdamW8bit(ps_ours, **HYPER)
    ours8.step()
    t8 = bench(ours8.step, warmup=1, repeat=repeat)
    fp32_bytes = 2 * 4 * n
    if bnb_cls is not None:
        ps_bnb = _params(shapes, torch.float32)
        bnb_opt = bnb_cls(ps_bnb, **HYPER)
        bnb_opt.step()
        t_bnb = bench(bnb_opt.step, warmup=1, repeat=max(3, repeat // 2))
        rows.append(
            [
                "8-bit fp32 vs bnb",
                n,
                f"{t_bnb * 1e3:.1f}",
                f"{t8 * 1e3:.1f}",
                "",
                f"{t_bnb / t8:.2f}x",
                _state_bytes(bnb_opt),
                _state_bytes(ours8),
            ]
        )
    else:
        rows.append(["8-bit fp32 (no bnb)", n, "", f"{t8 * 1e3:.1f}", "", "", "", _state_bytes(ours8)])
    print_table(
        f"optimizer step, CPU, {torch.get_num_threads()} threads (baseline: torch fused AdamW / bitsandbytes "
        f"AdamW8bit); 8-bit state = {_state_bytes(ours8) / fp32_bytes:.1%} of fp32 state",
        [
            "case",
            "params",
            "baseline ms",
            "ours ms",
            "ours GB/s",
            "speedup",
            "baseline state B",
            "ours state B",
        ],
        rows,
    )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller problem, fewer repeats")
    run(parser.parse_args().quick)


def chart_rows(rows: list[list[object]]) -> list[dict]:
    """`run()` rows as `python -m lowrank_ext bench` chart rows (seconds)."""
    return [{"shape": str(r[0]), "ours": float(r[3]) / 1e3, "baselines": {"baseline": float(r[2]) / 1e3}}
            for r in rows]
