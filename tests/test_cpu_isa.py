"""CPU kernel families (csrc/cpu/cpu_isa.h): detection, the LOWRANK_EXT_CPU_ISA override, the numerics of
every family a CPU can run, and proof that the bf16 path really runs on bf16 hardware (oneDNN's own
verbose log names the micro-kernel it took: a silent fallback fails here).

Independent references: /proc/cpuinfo for the features, float64 math for the numerics, dequantize() for
the bf16 decode, ONEDNN_VERBOSE for which GEMM ran.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lowrank_ext
from lowrank_ext._reference.linear import dequantize_weight_f64, nf4_lora_linear_ref
from lowrank_ext.ops import nf4_linear, nf4_lora_linear

ORDER = ("avx2", "avx512", "avx512bf16", "amx")


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _expected_family(flags: set[str]) -> str:
    avx512 = {"avx512f", "avx512bw"} <= flags
    if avx512 and {"amx_bf16", "amx_tile"} <= flags:
        return "amx"
    if avx512 and "avx512_bf16" in flags:
        return "avx512bf16"
    return "avx512" if avx512 else "avx2"


FLAGS = _cpuinfo_flags()
DETECTED = lowrank_ext.cpu_isa(detected=True)
RUNNABLE = ORDER[: ORDER.index(DETECTED) + 1]


@pytest.mark.skipif(not FLAGS, reason="no /proc/cpuinfo (not Linux)")
def test_detection_matches_the_os():
    assert DETECTED == _expected_family(FLAGS)
    assert lowrank_ext.build_info()["cpu_isa_detected"] == DETECTED


def test_override_forces_lower_families_and_refuses_the_rest(monkeypatch):
    for isa in RUNNABLE:
        monkeypatch.setenv("LOWRANK_EXT_CPU_ISA", isa)
        assert lowrank_ext.cpu_isa() == isa and lowrank_ext.build_info()["cpu_isa"] == isa
        assert lowrank_ext.cpu_isa(detected=True) == DETECTED
    w = lowrank_ext.quantize_nf4(torch.randn(64, 64))
    for isa in ORDER[len(RUNNABLE):]:
        monkeypatch.setenv("LOWRANK_EXT_CPU_ISA", isa)
        msg = rf"lowrank_ext::cpu_isa: LOWRANK_EXT_CPU_ISA must name a kernel family this CPU supports \(auto, or up to {DETECTED}\), got {isa}"
        with pytest.raises(ValueError, match=msg):
            nf4_linear(torch.randn(16, 64), w)
        assert lowrank_ext.build_info()["cpu_isa"].startswith("invalid (")
    monkeypatch.setenv("LOWRANK_EXT_CPU_ISA", "avx1024")
    with pytest.raises(ValueError, match="LOWRANK_EXT_CPU_ISA must be one of auto, avx2, avx512, avx512bf16, amx, got avx1024"):
        lowrank_ext.cpu_isa()
    monkeypatch.setenv("LOWRANK_EXT_CPU_ISA", "auto")
    assert lowrank_ext.cpu_isa() == DETECTED
    assert lowrank_ext.native_bf16_matmul() == (DETECTED in ("avx512bf16", "amx"))


def _err(ours, ref):
    return (ours.detach().double() - ref).abs().max().item()


@pytest.mark.parametrize("isa", ORDER)
@pytest.mark.parametrize("m,n,k,bs", [(64, 192, 256, 64), (33, 130, 97, 32), (17, 72, 1000, 128)])
def test_bf16_lora_forward_backward_per_family(monkeypatch, isa, m, n, k, bs):
    """bf16 activations, M > 8 (the panel path) on each family: output and every gradient within 2x
    PyTorch's own bf16 error (a dense bf16 LoRA layer on deq(W)) against float64, plus a bf16 ulp floor."""
    if isa not in RUNNABLE:
        pytest.skip(f"this CPU runs up to {DETECTED}")
    monkeypatch.setenv("LOWRANK_EXT_CPU_ISA", isa)
    g = torch.Generator().manual_seed(m + n)
    w = lowrank_ext.quantize_nf4(torch.randn(n, k, generator=g) * 0.05, bs)
    x = torch.randn(m, k, generator=g)
    a = torch.randn(8, k, generator=g) / k**0.5
    b = torch.randn(n, 8, generator=g) * 0.1
    gy = torch.randn(m, n, generator=g)
    leaves = [t.bfloat16().requires_grad_() for t in (x, a, b)]
    y = nf4_lora_linear(*leaves[:1], w, *leaves[1:], 2.0)
    assert lowrank_ext.last_kernel_path("nt") == ("panel-bf16" if isa in ("avx512bf16", "amx") else "panel")
    y.backward(gy.bfloat16())
    assert lowrank_ext.last_kernel_path("nn") == ("panel-bf16" if isa in ("avx512bf16", "amx") else "panel")
    own_leaves = [t.bfloat16().requires_grad_() for t in (x, a, b)]
    wd = dequantize_weight_f64(w).bfloat16()
    own = F.linear(own_leaves[0], wd) + 2.0 * F.linear(F.linear(own_leaves[0], own_leaves[1]), own_leaves[2])
    own.backward(gy.bfloat16())
    ref_leaves = [t.bfloat16().double().requires_grad_() for t in (x, a, b)]
    ref = nf4_lora_linear_ref(ref_leaves[0], w, ref_leaves[1], ref_leaves[2], 2.0)
    ref.backward(gy.bfloat16().double())
    pairs = [("y", y, own, ref)] + [(nm, o.grad, p.grad, r.grad)
                                     for nm, o, p, r in zip(("gx", "gA", "gB"), leaves, own_leaves, ref_leaves)]
    for nm, ours, torch_own, r in pairs:
        r = r.detach()
        floor = 8 * 2.0**-8 * r.abs().max().item()
        assert ours.dtype == torch.bfloat16, nm
        assert _err(ours, r) <= 2 * _err(torch_own, r) + floor, f"{isa} {nm}: {_err(ours, r):.3g} vs {_err(torch_own, r):.3g}"


@pytest.mark.skipif(DETECTED not in ("avx512bf16", "amx"), reason="needs a CPU with native bf16 matmul")
@pytest.mark.parametrize("n,k,bs", [(96, 256, 64), (40, 97, 32), (24, 1000, 128)])
def test_bf16_panels_hold_each_weight_rounded_once(n, k, bs):
    """x = I picks single weights out of the GEMM: each output is one product 1·w (exact in fp32), so the
    bf16 panel path must return deq(W)ᵀ rounded to bf16 once (round to nearest even) — bit for bit,
    including the odd-K rows that start on an odd nibble and blocks straddling rows."""
    w = lowrank_ext.quantize_nf4(torch.randn(n, k) * 0.05, bs)
    eye = torch.eye(k, dtype=torch.bfloat16)
    y = nf4_linear(eye, w)
    assert lowrank_ext.last_kernel_path("nt") == "panel-bf16"
    want = w.dequantize(torch.float32).to(torch.bfloat16).t()
    assert torch.equal(y.view(torch.int16), want.contiguous().view(torch.int16))


_PROBE = """
import torch, lowrank_ext
w = lowrank_ext.quantize_nf4(torch.randn(256, 512))
x = torch.randn(64, 512).bfloat16().requires_grad_()
y = lowrank_ext.ops.nf4_linear(x, w)
y.sum().backward()
print("PATH", lowrank_ext.last_kernel_path("nt"))
"""


@pytest.mark.skipif(DETECTED not in ("avx512bf16", "amx"), reason="needs a CPU with native bf16 matmul")
def test_bf16_gemm_runs_on_bf16_hardware():
    """oneDNN's verbose log names each matmul's micro-kernel: on an AMX CPU it must be an AMX one, on an
    AVX512-BF16 CPU the avx512_core_bf16 one — never a plain AVX-512 / reference fallback."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("LOWRANK_EXT_CPU_ISA", None)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300,
                         check=True).stdout
    assert "PATH panel-bf16" in out
    impls = {line.split(",")[6] for line in out.splitlines()
             if line.startswith("onednn_verbose") and ",exec,cpu,matmul," in line}
    assert impls, f"no oneDNN matmul ran:\n{out[-2000:]}"
    want = "amx" if DETECTED == "amx" else "avx512_core_bf16"
    assert all(want in impl for impl in impls), f"expected {want} micro-kernels, got {sorted(impls)}"


def test_compute_dtype_runs_the_base_in_bf16_and_returns_x_dtype():
    """compute_dtype=bf16 on fp32 activations (bitsandbytes' meaning): the base product equals the op on x
    and bias cast to bf16 (bit for bit), the result is fp32, the LoRA branch is fp32 (x's dtype), and the
    gradients reach the fp32 leaves."""
    g = torch.Generator().manual_seed(0)
    w = lowrank_ext.quantize_nf4(torch.randn(96, 256, generator=g) * 0.05)
    x = torch.randn(2, 20, 256, generator=g).requires_grad_()
    bias = torch.randn(96, generator=g)
    a = (torch.randn(8, 256, generator=g) / 16).requires_grad_()
    b = (torch.randn(96, 8, generator=g) * 0.1).requires_grad_()
    base = nf4_linear(x, w, bias, compute_dtype=torch.bfloat16)
    assert base.dtype == torch.float32
    assert torch.equal(base, nf4_linear(x.detach().bfloat16(), w, bias.bfloat16()).float())
    y = nf4_lora_linear(x, w, a, b, 2.0, bias, compute_dtype=torch.bfloat16)
    lora = 2.0 * F.linear(F.linear(x, a), b)
    torch.testing.assert_close(y, base + lora, rtol=0, atol=0)
    y.square().sum().backward()
    assert x.grad.dtype == a.grad.dtype == b.grad.dtype == torch.float32
    # gB is exact fp32 math on the fp32 branch: s · gyᵀ · u, gy = 2y
    u = F.linear(x.detach(), a.detach())
    torch.testing.assert_close(b.grad, 2.0 * (2 * y.detach()).reshape(-1, 96).t() @ u.reshape(-1, 8),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match=r"lowrank_ext::nf4_linear: compute_dtype must be None, torch.float32, "
                                        r"torch.bfloat16 or torch.float16, got torch.int8"):
        nf4_linear(x, w, compute_dtype=torch.int8)
