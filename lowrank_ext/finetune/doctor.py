"""`python -m lowrank_ext doctor [--json]`: a self-check of this install on this machine.

Prints what the extension was built with (CUDA archs, CPU ISA flags, CUDA runtime, torch), the devices
present, then runs small cases of every op family on every device present in every dtype against the
float64 / plain-PyTorch oracles in `lowrank_ext._reference` (and against bitsandbytes' own quantizer when
bitsandbytes is installed), one table row each:

    op | device | dtype | path | max error | tolerance | ok/FAIL | time

`path` is the kernel that really ran, as the C++ dispatchers recorded it (`lowrank_ext.last_kernel_path`,
csrc/include/lowrank_ext/kernel_path.h). Tolerances:
- format ops (quantize, double quant, dequantize) and bitsandbytes' format: exact; the error is the number
  of differing bytes / values;
- matmuls: at most TOL_FACTOR x PyTorch's own error at the same precision (a dense F.linear on deq(W) in
  that dtype) + FLOOR_ULPS ulps of the result's magnitude, the rule of the test suite;
- AdamW: bitsandbytes' bounds against a float64 reference (fp32 state), one rounding of the parameter dtype;
- on CUDA also: AdamW states equal to the CPU's bit for bit; the three fp16/bf16 matmul paths
  (gemv/mma/simt, forced) within the documented bound of each other (docs/kernels.md, "Results across
  paths"); dequantize into a misaligned buffer.
Exit status 1 if any row fails. A check that raises is a FAIL row carrying the exception.

This module is part of the application layer: it imports the core, never the reverse; bitsandbytes is
optional and imported inside the function that uses it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

__all__ = ["SCHEMA", "Check", "format_report", "main", "paths_bound", "run"]

SCHEMA = "lowrank_ext.doctor/1"
TOL_FACTOR = 2.0  # a matmul's error vs float64 may be at most this many times PyTorch's own error
FLOOR_ULPS = 8.0  # ... plus this many ulps (of the output dtype) of the result's largest magnitude
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 2.0**-52}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2}
BNB_VERSION = "0.50.2"  # the bitsandbytes release whose format we match bit for bit (docs/format.md)


@dataclasses.dataclass
class Check:
    """One row of the table. max_error / tolerance are None when the check could not compute them."""

    op: str
    device: str
    dtype: str
    path: str
    max_error: float | None
    tolerance: float | None
    ok: bool
    time_ms: float
    note: str = ""


# ------------------------------------------------------------------------------------------ machine
def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cpu_features() -> list[str]:
    """The ISA features our kernels care about that this CPU has (from /proc/cpuinfo where readable)."""
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_tile")
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [w for w in wanted if w in have]
    return []


def build_section() -> dict[str, object]:
    from lowrank_ext._extension import build_info

    info = dict(build_info())
    info.update(
        python=platform.python_version(),
        torch_cuda=torch.version.cuda,
        torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cpu_isa_env=os.environ.get("LOWRANK_EXT_CPU_ISA", ""),
        force_kernel_env=os.environ.get("LOWRANK_EXT_FORCE_KERNEL", ""),
    )
    return info


def device_section() -> list[dict[str, object]]:
    from lowrank_ext import ops
    from lowrank_ext._extension import has_cuda_kernels

    devs: list[dict[str, object]] = [
        {"device": "cpu", "name": _cpu_model(), "threads": torch.get_num_threads(), "features": _cpu_features()}
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            d: dict[str, object] = {
                "device": f"cuda:{i}", "name": p.name, "capability": f"{p.major}.{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count,
                "kernels_built": has_cuda_kernels(),
            }
            if has_cuda_kernels():
                d["paged_prefetch"] = ops.paged_prefetch_supported(i)
            devs.append(d)
    return devs


# ------------------------------------------------------------------------------------------ helpers
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _mismatches(a: torch.Tensor, b: torch.Tensor) -> int:
    a, b = a.detach().cpu().reshape(-1), b.detach().cpu().reshape(-1)
    if a.shape != b.shape:
        return max(a.numel(), b.numel())
    same = (a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a == b
    return int((~same).sum())


def _matmul_tol(ref: torch.Tensor, own: torch.Tensor, dtype: torch.dtype) -> float:
    """TOL_FACTOR x PyTorch's own error at this precision + FLOOR_ULPS ulps of max |ref|."""
    ref = ref.detach().double().cpu()
    err_own = (own.detach().double().cpu() - ref).abs().max().item()
    return TOL_FACTOR * err_own + FLOOR_ULPS * EPS[dtype] * max(ref.abs().max().item(), 1e-30)


def _max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _format_input(dtype: torch.dtype, blocksize: int = 64) -> torch.Tensor:
    """randn with outliers, an all-zero block, a subnormal block (fp32/bf16 keep it) and a partial block."""
    n = 16 * blocksize + 37
    x = torch.randn(n, generator=_gen(1))
    x[::53] *= 30.0
    x[blocksize : 2 * blocksize] = 0.0
    x[3 * blocksize : 4 * blocksize] *= 1e-40
    return x.clamp(-6e4, 6e4).to(dtype)


def _weight(n: int, k: int, device: str, double_quant: bool = True, seed: int = 2):
    from lowrank_ext.nf4 import quantize_nf4

    w = torch.randn(n, k, generator=_gen(seed)) * 0.05
    return quantize_nf4(w, 64, double_quant).to(device)


# ------------------------------------------------------------------------------------------ checks
# Each check returns (max_error, tolerance, path, note); the runner times it, compares, catches errors.
CheckFn = Callable[[], tuple[float, float, str, str]]


def _check_quantize(device: str, dtype: torch.dtype) -> CheckFn:
    def fn():
        from lowrank_ext._extension import last_kernel_path
        from lowrank_ext._reference.nf4 import quantize_nf4_ref
        from lowrank_ext.ops.nf4 import quantize_nf4_raw

        x = _format_input(dtype)
        packed, absmax = quantize_nf4_raw(x.to(device), 64)
        path = last_kernel_path("quantize")
        p_ref, a_ref = quantize_nf4_ref(x, 64)
        return float(_mismatches(packed, p_ref) + _mismatches(absmax, a_ref)), 0.0, path, "bytes + absmax differing"

    return fn


def _check_double_quant(device: str) -> CheckFn:
    def fn():
        from lowrank_ext._reference.nf4 import dynamic_map
        from lowrank_ext.ops.nf4 import double_quant

        absmax = torch.rand(700, generator=_gen(3)) * 3 + 0.01
        absmax[350] = 50.0
        qmap = dynamic_map()
        q, a2, off = (t.cpu() for t in double_quant(absmax.to(device), qmap.to(device)))
        # given the op's offset (torch's mean on that device), the rest is exact fp32 with single roundings
        c = absmax - off
        pad = torch.zeros(-(-c.numel() // 256) * 256)
        pad[: c.numel()] = c.abs()
        a2_ref = pad.view(-1, 256).amax(1)
        s = c * (1.0 / a2_ref).repeat_interleave(256)[: c.numel()]
        q_ref = (qmap[None, :] - s[:, None]).abs().argmin(dim=1).to(torch.uint8)
        err = _mismatches(q, q_ref) + _mismatches(a2, a2_ref)
        off_err = abs(float(off) - float(absmax.double().mean()))
        note = f"codes + nested absmax differing; offset {off_err:.1e} from the float64 mean"
        return float(err) + (0.0 if off_err <= 4e-7 * float(absmax.mean()) else 1.0), 0.0, "-", note

    return fn


def _check_dequantize(device: str, dtype: torch.dtype, misaligned: bool) -> CheckFn:
    def fn():
        from lowrank_ext._extension import last_kernel_path
        from lowrank_ext._reference.nf4 import dequantize_nf4_ref
        from lowrank_ext.nf4 import quantize_nf4
        from lowrank_ext.ops.nf4 import dequantize_nf4, dequantize_nf4_out

        q = quantize_nf4(_format_input(torch.float32), 64, double_quant=True).to(device)
        ref = dequantize_nf4_ref(*q.tensors(), 64, q.numel, dtype)
        if misaligned:  # a view offset by one element: not 16-byte aligned (scalar stores on CUDA)
            out = torch.full((q.numel + 1,), float("nan"), dtype=dtype, device=device)[1:]
            dequantize_nf4_out(*q.tensors(), 64, q.numel, out)
            note = "values differing; out= offset by one element"
        else:
            out = dequantize_nf4(*q.tensors(), 64, q.numel, dtype)
            note = "values differing (double quant)"
        return float(_mismatches(out, ref)), 0.0, last_kernel_path("dequantize"), note

    return fn


def _lora_case(device: str, dtype: torch.dtype, m: int, n: int = 192, k: int = 256, r: int = 8):
    g = _gen(4)
    w = _weight(n, k, device)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    a = (torch.randn(r, k, generator=g) / k**0.5).to(device, dtype)
    b = (torch.randn(n, r, generator=g) * 0.1).to(device, dtype)
    bias = (torch.randn(n, generator=g) * 0.1).to(device, dtype)
    return w, x, a, b, bias


def _check_lora_forward(device: str, dtype: torch.dtype, m: int) -> CheckFn:
    def fn():
        from lowrank_ext import ops
        from lowrank_ext._extension import last_kernel_path
        from lowrank_ext._reference.linear import dequantize_weight_f64, nf4_lora_linear_ref

        w, x, a, b, bias = _lora_case(device, dtype, m)
        y = ops.nf4_lora_linear(x, w, a, b, 0.5, bias)
        path = last_kernel_path("nt")
        ref = nf4_lora_linear_ref(x.cpu(), w.to("cpu"), a.cpu(), b.cpu(), 0.5, bias.cpu())
        wd = dequantize_weight_f64(w).to(device, dtype)
        own = F.linear(x, wd, bias) + 0.5 * F.linear(F.linear(x, a), b)
        return _max_err(y, ref), _matmul_tol(ref, own, dtype), path, f"M={m} N=192 K=256 r=8, bias"

    return fn


def _check_lora_backward(device: str, dtype: torch.dtype, m: int) -> CheckFn:
    def fn():
        from lowrank_ext._extension import last_kernel_path
        from lowrank_ext._reference.linear import dequantize_weight_f64

        w, x, a, b, _ = _lora_case(device, dtype, m)
        gy = torch.randn(m, w.shape[0], generator=_gen(5)).to(device, dtype)
        s = 0.5
        u = F.linear(x, a)
        gx, ga, gb, _ = torch.ops.lowrank_ext.nf4_lora_linear_backward(
            gy, x, u, *w.tensors(), w.blocksize, w.shape[1], a, b, s, True)
        path = last_kernel_path("nn")
        wd64 = dequantize_weight_f64(w)
        g64, x64, a64, b64, u64 = (t.double().cpu() for t in (gy, x, a, b, u))
        gu64 = s * g64 @ b64
        refs = (g64 @ wd64 + gu64 @ a64, gu64.t() @ x64, s * g64.t() @ u64)
        wd = wd64.to(device, dtype)
        gu = s * gy @ b
        owns = (gy @ wd + gu @ a, gu.t() @ x, s * gy.t() @ u)
        worst = (0.0, 1.0)
        for ours, ref, own in zip((gx, ga, gb), refs, owns):
            e, t = _max_err(ours, ref), _matmul_tol(ref, own, dtype)
            if e / t >= worst[0] / worst[1]:
                worst = (e, t)
        return worst[0], worst[1], path, f"M={m}: worst of grad_x, grad_A, grad_B"

    return fn


def _check_row_sqnorm(device: str) -> CheckFn:
    def fn():
        from lowrank_ext import ops
        from lowrank_ext._reference.linear import dequantize_weight_f64

        w = _weight(96, 1000, device)
        sq = ops.nf4_row_sqnorm(w)
        ref = dequantize_weight_f64(w.to("cpu")).pow(2).sum(1)
        return _max_err(sq, ref), 1e-5 * ref.abs().max().item(), "-", "fp32 [N] vs float64"

    return fn


def _adamw_tensors(dtype: torch.dtype, n: int = 256 * 20 + 17, seed: int = 6):
    g = _gen(seed)
    p = (torch.randn(n, generator=g) * 0.1).to(dtype)
    grads = [(torch.randn(n, generator=g) * 0.01).to(dtype) for _ in range(3)]
    return p, grads


def _check_adamw(device: str, dtype: torch.dtype) -> CheckFn:
    def fn():
        from lowrank_ext import ops
        from lowrank_ext._extension import last_kernel_path
        from lowrank_ext._reference.optim import adamw_step_ref

        p0, grads = _adamw_tensors(dtype)
        p, m, v = p0.to(device), torch.zeros(p0.numel(), device=device), torch.zeros(p0.numel(), device=device)
        p64, m64, v64 = p0.double(), torch.zeros(p0.numel(), dtype=torch.float64), torch.zeros(p0.numel(), dtype=torch.float64)
        for t, gr in enumerate(grads, start=1):
            ops.adamw_step(p, gr.to(device), m, v, step=t, **HYPER)
            adamw_step_ref(p64, gr.double(), m64, v64, lr=HYPER["lr"], beta1=HYPER["beta1"], beta2=HYPER["beta2"],
                           eps=HYPER["eps"], weight_decay=HYPER["weight_decay"], step=t)
            p64 = p64.to(dtype).double()  # the parameter is stored in its dtype after every step
        path = last_kernel_path("adamw")
        # bitsandbytes' 32-bit bounds (atol 1e-6, rtol 1e-5) on the fp32 state; params: one rounding to dtype
        ratio = max(
            ((p.double().cpu() - p64).abs() / (1e-6 + max(1e-5, 2 * EPS[dtype]) * p64.abs())).max().item(),
            ((m.double().cpu() - m64).abs() / (1e-9 + 1e-5 * m64.abs())).max().item(),
            ((v.double().cpu() - v64).abs() / (1e-12 + 1e-5 * v64.abs())).max().item(),
        )
        return ratio, 1.0, path, "3 steps vs float64; error as a fraction of atol + rtol·|ref|"

    return fn


def _check_adamw8bit(device: str, dtype: torch.dtype) -> CheckFn:
    def fn():
        from lowrank_ext import ops
        from lowrank_ext._extension import last_kernel_path
        from lowrank_ext._reference.optim import adamw8bit_step_ref, optim_maps

        p0, grads = _adamw_tensors(dtype, seed=7)
        n, nb = p0.numel(), -(-p0.numel() // 256)
        q1, q2 = optim_maps()
        g = _gen(8)
        s1 = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
        s2 = torch.randint(128, 256, (n,), generator=g, dtype=torch.uint8)
        a1, a2 = torch.rand(nb, generator=g) * 1e-2, torch.rand(nb, generator=g) * 1e-4
        ref = [t.clone() for t in (p0, grads[0], s1, s2, a1, a2)]
        ours = [t.to(device) for t in (p0, grads[0], s1, s2, a1, a2)]
        ops.adamw8bit_step(*ours, q1.to(device), q2.to(device), step=3, **HYPER)
        path = last_kernel_path("adamw")
        adamw8bit_step_ref(*ref, q1, q2, lr=HYPER["lr"], beta1=HYPER["beta1"], beta2=HYPER["beta2"],
                           eps=HYPER["eps"], weight_decay=HYPER["weight_decay"], step=3)
        p_err = ((ours[0].double().cpu() - ref[0].double()).abs()
                 / (1e-6 + max(1e-5, 2 * EPS[dtype]) * ref[0].double().abs())).max().item()
        flips = max(_mismatches(ours[2], ref[2]), _mismatches(ours[3], ref[3])) / n  # codes at a midpoint tie
        err = max(p_err, flips / 1e-3)
        return err, 1.0, path, f"1 step vs the fp32 reference; {flips:.1e} of codes differ (<= 1e-3 allowed)"

    return fn


def _check_adamw_cpu_equal(device: str, dtype: torch.dtype, eight_bit: bool) -> CheckFn:
    """CUDA AdamW states equal to the CPU's, bit for bit (explicitly rounded operations in both)."""

    def fn():
        from lowrank_ext import ops
        from lowrank_ext._extension import last_kernel_path
        from lowrank_ext._reference.optim import optim_maps

        p0, grads = _adamw_tensors(dtype, seed=9)
        n, nb = p0.numel(), -(-p0.numel() // 256)
        if eight_bit:
            q1, q2 = optim_maps()
            g = _gen(10)
            st = [p0, torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8),
                  torch.randint(128, 256, (n,), generator=g, dtype=torch.uint8),
                  torch.rand(nb, generator=g) * 1e-2, torch.rand(nb, generator=g) * 1e-4]
        else:
            st = [p0, torch.zeros(n), torch.zeros(n)]
        cpu = [t.clone() for t in st]
        gpu = [t.to(device) for t in st]
        for t, gr in enumerate(grads, start=1):
            if eight_bit:
                ops.adamw8bit_step(cpu[0], gr, *cpu[1:], q1, q2, step=t, **HYPER)
                ops.adamw8bit_step(gpu[0], gr.to(device), *gpu[1:], q1.to(device), q2.to(device), step=t, **HYPER)
            else:
                ops.adamw_step(cpu[0], gr, *cpu[1:], step=t, **HYPER)
                ops.adamw_step(gpu[0], gr.to(device), *gpu[1:], step=t, **HYPER)
        path = last_kernel_path("adamw")
        err = sum(_mismatches(a, b) for a, b in zip(gpu, cpu))
        return float(err), 0.0, path, "3 steps; state and param elements differing from the CPU's"

    return fn


def _ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at |t| (t float64)."""
    mant = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    tiny = {torch.float16: 2.0**-14, torch.bfloat16: 2.0**-126}[dtype]
    e = torch.floor(torch.log2(t.abs().clamp_min(tiny)))
    return torch.pow(2.0, e - mant)


def paths_bound(ys: list[torch.Tensor], s_abs: torch.Tensor, dtype: torch.dtype) -> float:
    """The cross-path bound of docs/kernels.md ("Results across paths"), as a ratio (<= 1 passes):
    |y_p - y_q| <= ulp_dtype(max(|y_p|, |y_q|)) + 2^-20 · S for every pair of paths, S = Σ |terms| of the row
    (the fp32 summation-order term)."""
    worst = 0.0
    ys64 = [y.double().cpu() for y in ys]
    for i in range(len(ys64)):
        for j in range(i + 1, len(ys64)):
            a, b = ys64[i], ys64[j]
            bound = _ulp(torch.maximum(a.abs(), b.abs()), dtype) + 2.0**-20 * s_abs
            worst = max(worst, ((a - b).abs() / bound).max().item())
    return worst


def _check_cuda_paths(device: str, dtype: torch.dtype) -> CheckFn:
    def fn():
        from lowrank_ext import ops
        from lowrank_ext._extension import last_kernel_path
        from lowrank_ext._reference.linear import dequantize_weight_f64

        w, x, a, b, bias = _lora_case(device, dtype, 8, n=320, k=512, r=16)
        ys, paths = [], []
        for path in ("gemv", "mma", "simt"):
            with _env("LOWRANK_EXT_FORCE_KERNEL", path):
                ys.append(ops.nf4_lora_linear(x, w, a, b, 0.5, bias))
                paths.append(last_kernel_path("nt"))
        # S: the row sums of |x|·|deq(W)| + |s·u|·|B| + |bias|, in float64
        wd = dequantize_weight_f64(w.to("cpu"))
        x64, a64, b64 = x.double().cpu(), a.double().cpu(), b.double().cpu()
        s_abs = x64.abs() @ wd.abs().t() + (0.5 * x64 @ a64.t()).abs() @ b64.abs().t() + bias.double().cpu().abs()
        differ = max(_mismatches(ys[0], y) for y in ys[1:]) / ys[0].numel()
        err = max(paths_bound(ys, s_abs, dtype), differ / 0.10)
        return err, 1.0, "/".join(paths), f"M=8 forced paths; {differ:.1%} of outputs differ (<= 10% allowed)"

    return fn


def _bnb():
    """bitsandbytes.functional, or None with the reason (not installed / another version / fails to load)."""
    try:
        with contextlib.redirect_stdout(sys.stderr):  # whatever it prints on import must not break --json
            import bitsandbytes as bnb
            import bitsandbytes.functional as bF
    except Exception as e:  # noqa: BLE001 - any import failure just means "no bitsandbytes comparison"
        return None, f"bitsandbytes not usable ({type(e).__name__}: {e})"
    if bnb.__version__ != BNB_VERSION:
        return None, f"bitsandbytes {bnb.__version__} installed; the format comparison pins {BNB_VERSION}"
    return bF, ""


def _check_bnb_quantize(bF, device: str, dtype: torch.dtype) -> CheckFn:
    def fn():
        from lowrank_ext.nf4 import quantize_nf4
        from lowrank_ext.ops.nf4 import quantize_nf4_raw

        # no all-zero or subnormal block: bitsandbytes' CUDA kernel codes an all-zero block 0 where we (and
        # its CPU path) write 7 (format.md §9c); its tiny-absmax handling is not what this row compares
        x = torch.randn(16 * 64 + 37, generator=_gen(11))
        x[::53] *= 30.0
        xd = x.to(device, dtype)
        with torch._dynamo.config.patch(disable=True):  # bitsandbytes' generic paths use torch.compile
            p_ref, st = bF.quantize_4bit(xd, blocksize=64, quant_type="nf4", compress_statistics=False)
            ours_p, ours_a = quantize_nf4_raw(xd, 64)
            deq_ref = bF.dequantize_4bit(p_ref, st)
        q = quantize_nf4(xd, 64, double_quant=False)
        err = (_mismatches(ours_p.view(-1), p_ref.view(-1)) + _mismatches(ours_a, st.absmax)
               + _mismatches(q.dequantize(dtype).view(-1), deq_ref.view(-1)))
        return float(err), 0.0, "bnb " + BNB_VERSION, "bytes + absmax + dequantized values differing"

    return fn


def _bnb_runs_on(bF, device: str) -> str:
    """"" when bitsandbytes can quantize on `device`, else why not (e.g. no CUDA library for this runtime)."""
    try:
        with torch._dynamo.config.patch(disable=True):
            bF.quantize_4bit(torch.ones(64, device=device), blocksize=64, quant_type="nf4")
        _sync(device)
        return ""
    except Exception as e:  # noqa: BLE001 - reported as a note: no comparison possible there
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _plan(devices: list[str], bnb_state, notes: list[str]) -> list[tuple[str, str, str, CheckFn]]:
    """(op, device, dtype, fn) for every op family x device x dtype."""
    plan: list[tuple[str, str, str, CheckFn]] = []
    bF, _ = bnb_state
    for dev in devices:
        cuda = dev.startswith("cuda")
        for dt in DTYPES:
            plan.append(("quantize_nf4", dev, SHORT[dt], _check_quantize(dev, dt)))
        plan.append(("double_quant", dev, "fp32", _check_double_quant(dev)))
        for dt in DTYPES:
            plan.append(("dequantize_nf4", dev, SHORT[dt], _check_dequantize(dev, dt, misaligned=False)))
            plan.append(("dequantize_nf4_out", dev, SHORT[dt], _check_dequantize(dev, dt, misaligned=True)))
        for dt in DTYPES:
            for m in (1, 33):
                plan.append(("nf4_lora_linear", dev, SHORT[dt], _check_lora_forward(dev, dt, m)))
            plan.append(("nf4_lora_linear_backward", dev, SHORT[dt], _check_lora_backward(dev, dt, 33)))
        plan.append(("nf4_row_sqnorm", dev, "fp32", _check_row_sqnorm(dev)))
        for dt in DTYPES:
            plan.append(("adamw_step", dev, SHORT[dt], _check_adamw(dev, dt)))
            plan.append(("adamw8bit_step", dev, SHORT[dt], _check_adamw8bit(dev, dt)))
        if cuda:
            for dt in (torch.float32, torch.bfloat16):
                plan.append(("adamw_step == cpu", dev, SHORT[dt], _check_adamw_cpu_equal(dev, dt, False)))
                plan.append(("adamw8bit_step == cpu", dev, SHORT[dt], _check_adamw_cpu_equal(dev, dt, True)))
            for dt in (torch.float16, torch.bfloat16):
                plan.append(("nf4_lora_linear paths", dev, SHORT[dt], _check_cuda_paths(dev, dt)))
        why_not = _bnb_runs_on(bF, dev) if bF is not None else "not installed"
        if bF is not None and why_not:
            notes.append(f"bitsandbytes cannot run on {dev} ({why_not}): its format rows there are skipped")
        if bF is not None and not why_not:
            for dt in DTYPES:
                plan.append(("bnb quantize/dequantize_4bit", dev, SHORT[dt], _check_bnb_quantize(bF, dev, dt)))
    return plan


def _run_one(op: str, device: str, dtype: str, fn: CheckFn) -> Check:
    _sync(device)
    t0 = time.perf_counter()
    try:
        err, tol, path, note = fn()
        _sync(device)
        ok = math.isfinite(err) and err <= tol
    except Exception as e:  # noqa: BLE001 - a check that raises is a failure, reported with its message
        return Check(op, device, dtype, "-", None, None, False, (time.perf_counter() - t0) * 1e3,
                     f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return Check(op, device, dtype, path or "-", err if math.isfinite(err) else None, tol, ok,
                 (time.perf_counter() - t0) * 1e3, note)


def run(devices: list[str] | None = None) -> dict[str, object]:
    """Run every check on `devices` (default: the CPU and every CUDA device the build can use)."""
    from lowrank_ext._extension import has_cuda_kernels

    t0 = time.perf_counter()
    notes: list[str] = []
    if devices is None:
        devices = ["cpu"]
        if torch.cuda.is_available():
            if has_cuda_kernels():
                devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
            else:
                notes.append("a CUDA GPU is present but this build has no CUDA kernels (LOWRANK_EXT_CUDA=0 or no "
                             "toolkit at build time): only the CPU is checked")
    bnb_state = _bnb()
    if bnb_state[0] is None:
        notes.append(bnb_state[1] + ": bitsandbytes format rows skipped")
    checks = [_run_one(*item) for item in _plan(devices, bnb_state, notes)]
    ok = all(c.ok for c in checks)
    return {
        "schema": SCHEMA,
        "ok": ok,
        "build": build_section(),
        "devices": device_section(),
        "checked_devices": devices,
        "checks": [dataclasses.asdict(c) for c in checks],
        "failures": sum(not c.ok for c in checks),
        "notes": notes,
        "total_s": round(time.perf_counter() - t0, 2),
    }


# ------------------------------------------------------------------------------------------ output
def _num(v: float | None) -> str:
    return "-" if v is None else ("0" if v == 0 else f"{v:.2e}")


def format_report(report: dict[str, object]) -> str:
    b = report["build"]
    lines = [
        "lowrank_ext doctor",
        (f"  torch {b['torch_installed']} (extension built with {b['torch_built_with']}), Python {b['python']}, "
         f"torch CUDA {b['torch_cuda']}, torch CPU capability {b['torch_cpu_capability']}"),
        f"  build: CUDA kernels {'yes' if b['cuda'] else 'no'}"
        + (f" (runtime {b['cuda_runtime']}, archs {';'.join(b['cuda_archs'])})" if b["cuda"] else "")
        + f"; CPU flags '{b['cpu_flags']}' (avx2={b['avx2']}, fma={b['fma']}, openmp={b['openmp']})",
    ]
    for env in ("cpu_isa_env", "force_kernel_env"):
        if b[env]:
            lines.append(f"  {'LOWRANK_EXT_CPU_ISA' if env == 'cpu_isa_env' else 'LOWRANK_EXT_FORCE_KERNEL'}={b[env]}")
    lines.append("devices:")
    for d in report["devices"]:
        extra = ", ".join(f"{k}={v}" for k, v in d.items() if k not in ("device", "name"))
        lines.append(f"  {d['device']}: {d['name']} ({extra})")
    head = ("op", "device", "dtype", "path", "max error", "tolerance", "result", "time")
    rows = [(c["op"], c["device"], c["dtype"], c["path"], _num(c["max_error"]), _num(c["tolerance"]),
             "ok" if c["ok"] else "FAIL", f"{c['time_ms']:.0f} ms") for c in report["checks"]]
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines += ["", fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    for c in report["checks"]:
        if not c["ok"]:
            lines.append(f"FAIL {c['op']} [{c['device']}, {c['dtype']}]: {c['note']}")
    for n in report["notes"]:
        lines.append(f"note: {n}")
    verdict = "all checks passed" if report["ok"] else f"{report['failures']} check(s) FAILED"
    lines.append(f"{verdict} ({len(report['checks'])} checks, {report['total_s']} s)")
    return "\n".join(lines)


def main(as_json: bool = False, devices: list[str] | None = None) -> int:
    """Print the report (text, or JSON with --json); 0 if every check passed, else 1."""
    report = run(devices)
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
    sys.stdout.flush()
    return 0 if report["ok"] else 1
