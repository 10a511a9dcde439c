"""The fused model-op CUDA kernels (csrc/cuda/fused_rmsnorm.cuh, fused_rope.cuh, fused_swiglu.cuh) executed on
the CPU by the host simulator (tests/sim/sim_fused.cpp), against float64 eager math
(lowrank_ext/_reference/fused.py) — the same bounds as the CPU ops' tests (tests/test_fused_ops.py). Grids
smaller than the work exercise the grid-stride loops; several CTAs exercise the per-CTA weight-gradient rows.
Every test name contains `simulated`."""

from __future__ import annotations

import _sim
import pytest
import torch
from conftest import IN_CI

from lowrank_ext._reference.fused import add_rms_norm_ref, rms_norm_ref, rope_ref, swiglu_ref

TOL = {torch.float32: {"rtol": 2e-5, "atol": 2e-5}, torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2}}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def sim() -> _sim.Sim:
    if _sim.build_mod.compiler() is None:
        if IN_CI:
            pytest.fail("the simulated kernel tests need a C++ compiler (g++ or $CXX); CI must have one")
        pytest.skip("needs a C++ compiler (g++ or $CXX) to build the kernel simulator")
    return _sim.Sim.load(units=["fused"])


def _rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _close(got, want, dtype):
    torch.testing.assert_close(got.double(), want.double(), **TOL[dtype])


def _vjp(fn, inputs, grads):
    leaves = [t.detach().double().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    torch.autograd.backward(outs if isinstance(outs, tuple) else (outs,), [g.double() for g in grads])
    return [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_simulated_rms_norm(sim, dtype, offset):
    rows, dim = 5, 300  # dim > 256 threads: two columns for some threads; 5 rows on 2 CTAs
    x, res, gy, gh = (_rand(rows, dim, dtype=dtype, seed=s) for s in (1, 2, 3, 4))
    w = _rand(dim, seed=5, scale=0.3) + 1.0
    y, h = sim.rms_norm(x, w, 1e-6, offset, residual=res, grid=2)
    assert torch.equal(h, x + res)
    y_ref, _ = add_rms_norm_ref(x.double(), res.double(), w.double(), 1e-6, offset)
    _close(y, y_ref, dtype)
    y_plain, _ = sim.rms_norm(x, w, 1e-6, offset, grid=3)
    _close(y_plain, rms_norm_ref(x.double(), w.double(), 1e-6, offset), dtype)
    gx, gw = sim.rms_norm_backward(gy, gh, h, w, 1e-6, offset, grid=2)
    want = _vjp(lambda a, b: rms_norm_ref(a, b, 1e-6, offset), (h, w), (gy,))
    _close(gx, want[0] + gh.double(), dtype)
    torch.testing.assert_close(gw.double(), want[1], rtol=TOL[dtype]["rtol"] * 4, atol=TOL[dtype]["atol"] * 10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_simulated_rope(sim, dtype):
    B, H, S, D = 2, 3, 5, 12
    t = _rand(B, S, H, D, dtype=dtype, seed=1).transpose(1, 2)  # the attention's strided [B, H, S, D] view
    freqs = torch.arange(S, dtype=torch.float64)[:, None] * torch.linspace(0.1, 1.0, D)[None]
    cos, sin = freqs.cos()[None].to(dtype), (freqs + 0.3).sin()[None].to(dtype)  # [1, S, D]: batch broadcast
    out = sim.rope(t, cos, sin, grid=2)
    assert out.stride() == t.stride()
    want, _ = rope_ref(t.double(), t.double(), cos.double(), sin.double())
    _close(out, want, dtype)
    g = _rand(B, H, S, D, dtype=dtype, seed=2)
    grad = sim.rope(g, cos, sin, backward=True, grid=3)
    _close(grad, _vjp(lambda a: rope_ref(a, a, cos.double(), sin.double())[0], (t,), (g,))[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_simulated_swiglu(sim, dtype):
    n = 700  # 256-thread CTAs, grid 2: the grid-stride loop runs twice
    gate, up, gy = _rand(n, dtype=dtype, seed=1, scale=4.0), _rand(n, dtype=dtype, seed=2), _rand(n, dtype=dtype, seed=3)
    _close(sim.swiglu(gate, up, grid=2), swiglu_ref(gate.double(), up.double()), dtype)
    gg, gu = sim.swiglu_backward(gy, gate, up, grid=2)
    want = _vjp(swiglu_ref, (gate, up), (gy,))
    _close(gg, want[0], dtype)
    _close(gu, want[1], dtype)
