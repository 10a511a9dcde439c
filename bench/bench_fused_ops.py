"""Fused model ops (lowrank_ext/ops/fused.py) forward+backward against the eager PyTorch ops they replace (the
formulas of transformers' LlamaRMSNorm + the decoder's residual add, apply_rotary_pos_emb, silu(gate) * up) and
against torch.compile of those same eager functions, side by side in one run.

    python bench/bench_fused_ops.py [--quick] [--no-compile] [--dtype fp32|bf16|both] [--shapes smollm2|4096|both]
Shapes: SmolLM2-135M (hidden 576, intermediate 1536, 9 q heads / 3 kv heads x 64) and a 4096-wide model
(intermediate 11008, 32 / 8 heads x 128), both at batch 4 x seq 128 tokens. Target (issue 22): >= 2x eager.
Prints the CPU (lscpu model name, lowrank_ext.cpu_isa()), the thread count and the load average: the
ratios are what to compare, the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))  # the repo root, for an in-place build
from _timing import bench, cpu_name, print_table

import lowrank_ext
from lowrank_ext.ops import add_rms_norm, rope, swiglu

SHAPES = {  # name -> (tokens B x S, hidden, intermediate, q heads, kv heads, head_dim)
    "smollm2": ((4, 128), 576, 1536, 9, 3, 64),
    "4096": ((4, 128), 4096, 11008, 32, 8, 128),
}
EPS = 1e-5


# ---- the eager ops being replaced, as transformers writes them ---------------------------------------------------


def eager_add_rms_norm(x, residual, weight):
    h = residual + x  # the decoder layer's residual add
    hf = h.to(torch.float32)  # LlamaRMSNorm.forward
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)
    return weight * hf.to(h.dtype), h


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def eager_rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # apply_rotary_pos_emb, unsqueeze_dim=1
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def eager_swiglu(gate, up):
    return F.silu(gate) * up  # LlamaMLP: act_fn(gate_proj(x)) * up_proj(x)


def fused_add_rms_norm(x, residual, weight):
    return add_rms_norm(x, residual, weight, EPS)


# ---- inputs and the fwd+bwd step -------------------------------------------------------------------------------


def make_cases(shape, dtype):
    (B, S), hidden, inter, hq, hk, hd = SHAPES[shape]
    g = torch.Generator().manual_seed(0)

    def rnd(*s, grad=True):
        return torch.randn(*s, generator=g).to(dtype).requires_grad_(grad)

    pos = torch.arange(S, dtype=torch.float32)[:, None] / (10000 ** (torch.arange(0, hd, 2) / hd))
    emb = torch.cat((pos, pos), -1).expand(B, S, hd)
    # q/k as the attention makes them: proj(x).view(B, S, H, D).transpose(1, 2) (strided)
    q = rnd(B, S, hq, hd, grad=False).transpose(1, 2).requires_grad_(True)
    k = rnd(B, S, hk, hd, grad=False).transpose(1, 2).requires_grad_(True)
    return {
        f"add_rms_norm [{B * S}, {hidden}]": (
            (eager_add_rms_norm, fused_add_rms_norm),
            (rnd(B, S, hidden), rnd(B, S, hidden), (torch.rand(hidden, generator=g) + 0.5).to(dtype).requires_grad_(True)),
        ),
        f"rope q {hq}x{hd}, k {hk}x{hd}": (
            (eager_rope, rope),
            (q, k, emb.cos().to(dtype).contiguous(), emb.sin().to(dtype).contiguous()),
        ),
        f"swiglu [{B * S}, {inter}]": ((eager_swiglu, swiglu), (rnd(B, S, inter), rnd(B, S, inter))),
    }


def fwd_bwd(fn, inputs):
    leaves = [t for t in inputs if t.requires_grad]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.ones_like(o) for o in outs]
    return torch.autograd.grad(outs, leaves, grads)


def check_once(eager, fused, inputs, dtype):
    want = fwd_bwd(eager, [t.detach().double().requires_grad_(t.requires_grad) for t in inputs])
    got = fwd_bwd(fused, inputs)
    tol = 2e-3 if dtype == torch.float32 else 5e-2
    for a, b in zip(got, want):
        err = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
        assert err < tol, f"fused op disagrees with float64 eager: max relative error {err:.2e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--shapes", choices=["smollm2", "4096", "both"], default="both")
    args = ap.parse_args()
    repeat = 5 if args.quick else 20
    print(f"CPU: {cpu_name()}; lowrank_ext.cpu_isa() = {lowrank_ext.cpu_isa()}; torch threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    dtypes = {"fp32": [torch.float32], "bf16": [torch.bfloat16], "both": [torch.float32, torch.bfloat16]}[args.dtype]
    shapes = ["smollm2", "4096"] if args.shapes == "both" else [args.shapes]
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            for name, ((eager, fused), inputs) in make_cases(shape, dtype).items():
                check_once(eager, fused, inputs, dtype)
                t_eager = bench(lambda f=eager, x=inputs: fwd_bwd(f, x), repeat=repeat)
                t_fused = bench(lambda f=fused, x=inputs: fwd_bwd(f, x), repeat=repeat)
                row = [shape, str(dtype).replace("torch.", ""), name, t_fused * 1e3, t_eager * 1e3, t_eager / t_fused]
                if not args.no_compile:
                    compiled = torch.compile(eager, dynamic=False)
                    t_comp = bench(lambda f=compiled, x=inputs: fwd_bwd(f, x), repeat=repeat, warmup=3)
                    row += [t_comp * 1e3, t_comp / t_fused]
                rows.append(row)
    header = ["shape", "dtype", "op (fwd+bwd)", "fused ms", "eager ms", "eager/fused"]
    if not args.no_compile:
        header += ["compiled ms", "compiled/fused"]
    print_table("fused model ops, forward + backward (median)", header, rows)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
