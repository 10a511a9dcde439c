"""Fused model ops (lowrank_ext/ops/fused.py; kernels csrc/cpu/fused_*): RMSNorm (+ residual add), rotary
embedding, SwiGLU — forward and backward against float64 eager math (lowrank_ext/_reference/fused.py, the
formulas of transformers' modules), on every CPU kernel family this machine runs (LOWRANK_EXT_CPU_ISA), in
fp32 and bf16; gradcheck in float64; opcheck; torch.compile(fullgraph=True); what backward saves; every
error message."""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA_OK, DEVICES

import lowrank_ext
from lowrank_ext._reference.fused import add_rms_norm_ref, rms_norm_ref, rope_ref, swiglu_ref
from lowrank_ext.ops import add_rms_norm, apply_rotary_pos_emb, rms_norm, rope, swiglu

ORDER = ("avx2", "avx512", "avx512bf16", "amx")
# The kernel tables this CPU can run: avx2, avx512 and avx512bf16 (amx CPUs take the avx512bf16 table)
ISAS = [isa for isa in ORDER[:3] if ORDER.index(isa) <= ORDER.index(lowrank_ext.cpu_isa(detected=True))]

# Error bound of one rounding of each output (bf16: 8 significant bits), plus fp32 accumulation slack.
TOL = {torch.float32: {"rtol": 2e-5, "atol": 2e-5}, torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2}}


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("LOWRANK_EXT_CPU_ISA", request.param)
    return request.param


def _rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _close(got, want, dtype):
    torch.testing.assert_close(got.double(), want.double(), **TOL[dtype])


def _grads(fn, inputs, grads_out):
    """Gradients of sum(out · g) w.r.t. inputs (in their own dtype)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, grads_out)
    return [t.grad for t in leaves]


# ---- RMSNorm --------------------------------------------------------------------------------------------------

NORM_SHAPES = [(3, 1), (2, 5, 7), (4, 33), (2, 3, 576)]  # dim 1, tails of 8 and 16 lanes, SmolLM2's hidden


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_forward_backward(isa, dtype, shape, offset):
    x, res, gy, gh = (_rand(*shape, dtype=dtype, seed=s) for s in (1, 2, 3, 4))
    w = _rand(shape[-1], seed=5, scale=0.3) + 1.0  # fp32 weight (what a bf16 activation under autocast sees)
    w = w.to(dtype) if offset == 0.0 else w
    eps = 1e-6
    # plain norm
    _close(rms_norm(x, w, eps, offset), rms_norm_ref(x.double(), w.double(), eps, offset), dtype)
    gx, gw = _grads(lambda a, b: rms_norm(a, b, eps, offset), (x, w), (gy,))
    gx_ref, gw_ref = _grads(lambda a, b: rms_norm_ref(a, b, eps, offset), (x.double(), w.double()), (gy.double(),))
    _close(gx, gx_ref, dtype)
    assert gw.dtype == w.dtype
    torch.testing.assert_close(gw.double(), gw_ref, rtol=TOL[dtype]["rtol"] * 4, atol=TOL[dtype]["atol"] * x.numel() ** 0.5)
    # with the residual add: h rounded to the dtype (the next residual stream), y = norm(h)
    y, h = add_rms_norm(x, res, w, eps, offset)
    h_want = (x + res)  # one rounding, as eager's add
    assert torch.equal(h, h_want)
    _close(y, rms_norm_ref(h.double(), w.double(), eps, offset), dtype)
    grads = _grads(lambda a, b, c: add_rms_norm(a, b, c, eps, offset), (x, res, w), (gy, gh))
    want = _grads(lambda a, b, c: add_rms_norm_ref(a, b, c, eps, offset), (x.double(), res.double(), w.double()),
                  (gy.double(), gh.double()))
    _close(grads[0], want[0], dtype)
    _close(grads[1], want[1], dtype)


@pytest.mark.parametrize("threads", [1, 2])
def test_rms_norm_weight_gradient_over_several_threads(isa, threads):
    # 256 x 576: ~147K elements, several 32K-element tasks, each with its own weight-gradient row
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, gy = _rand(256, 576, seed=1), _rand(256, 576, seed=2)
        w = _rand(576, seed=3, scale=0.3) + 1.0
        gx, gw = _grads(lambda a, b: rms_norm(a, b, 1e-6), (x, w), (gy,))
    finally:
        torch.set_num_threads(old)
    gx_ref, gw_ref = _grads(lambda a, b: rms_norm_ref(a, b, 1e-6), (x.double(), w.double()), (gy.double(),))
    _close(gx, gx_ref, torch.float32)
    torch.testing.assert_close(gw.double(), gw_ref, rtol=1e-5, atol=1e-4)


def test_rms_norm_gradcheck():
    x, res = _rand(3, 7, dtype=torch.float64, seed=1), _rand(3, 7, dtype=torch.float64, seed=2)
    w = _rand(7, dtype=torch.float64, seed=3)
    for offset in (0.0, 1.0):
        args = [t.clone().requires_grad_(True) for t in (x, res, w)]
        assert torch.autograd.gradcheck(lambda a, b, c, o=offset: add_rms_norm(a, b, c, 1e-5, o), args)
        assert torch.autograd.gradcheck(lambda a, c, o=offset: rms_norm(a, c, 1e-5, o), [args[0], args[2]])


# ---- rotary embedding -----------------------------------------------------------------------------------------


def _qkcs(B, Hq, Hk, S, D, dtype, cos_batch=None):
    # q, k as the attention makes them: proj(x).view(B, S, H, D).transpose(1, 2) — strided, no copy
    q = _rand(B, S, Hq, D, dtype=dtype, seed=1).transpose(1, 2)
    k = _rand(B, S, Hk, D, dtype=dtype, seed=2).transpose(1, 2)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    pos = torch.arange(S, dtype=torch.float64)[None, :, None] + torch.arange(cos_batch or B, dtype=torch.float64)[:, None, None]
    freqs = pos * inv
    # distinct halves (not HF's cat(freqs, freqs)) so a kernel that mixes up sin[:half] and sin[half:] fails
    emb = torch.cat((freqs, 1.3 * freqs + 0.1), dim=-1)
    return q, k, emb.cos().to(dtype), emb.sin().to(dtype)


ROPE_SHAPES = [(1, 1, 1, 1, 2), (2, 3, 1, 5, 10), (2, 9, 3, 7, 64), (1, 4, 2, 3, 96)]  # D/2 = 1, 5, 32, 48


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ROPE_SHAPES)
def test_rope_forward_backward(isa, dtype, shape):
    q, k, cos, sin = _qkcs(*shape, dtype)
    qo, ko = rope(q, k, cos, sin)
    qr, kr = rope_ref(q.double(), k.double(), cos.double(), sin.double())
    _close(qo, qr, dtype)
    _close(ko, kr, dtype)
    assert qo.stride() == q.stride()  # the input's layout, as eager q * cos keeps it
    gq, gk = _rand(*q.shape, dtype=dtype, seed=7), _rand(*k.shape, dtype=dtype, seed=8)
    got = _grads(lambda a, b: rope(a, b, cos, sin), (q, k), (gq, gk))
    want = _grads(lambda a, b: rope_ref(a, b, cos.double(), sin.double()), (q.double(), k.double()),
                  (gq.double(), gk.double()))
    _close(got[0], want[0], dtype)
    _close(got[1], want[1], dtype)


def test_rope_broadcast_batch_and_unsqueeze_dim_2():
    q, k, cos, sin = _qkcs(3, 4, 2, 5, 16, torch.float32, cos_batch=1)
    qr, kr = rope_ref(q.double(), k.double(), cos.double(), sin.double())
    qo, ko = rope(q, k, cos, sin)
    _close(qo, qr, torch.float32)
    _close(ko, kr, torch.float32)
    # [B, S, H, D] inputs with unsqueeze_dim=2, as transformers' signature allows
    qs, ks = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
    qo2, ko2 = apply_rotary_pos_emb(qs, ks, cos, sin, unsqueeze_dim=2)
    _close(qo2, qr.transpose(1, 2), torch.float32)
    _close(ko2, kr.transpose(1, 2), torch.float32)


def test_mixed_dtypes_follow_eager_type_promotion():
    """What bf16 autocast hands the wrappers (a bf16 projection output next to the fp32 residual stream, fp32
    cos/sin, an fp32 norm weight): the result dtypes are eager PyTorch's (x + residual, q·cos, weight·n̂ are
    fp32), the values those of the fp32 math on the bf16 inputs widened exactly."""
    torch.manual_seed(0)
    xb = torch.randn(3, 33).bfloat16()
    res, w = torch.randn(3, 33), torch.rand(33) + 0.5
    y = rms_norm(xb, w, 1e-6)
    assert y.dtype == torch.float32  # transformers: weight(fp32) * normed.to(bf16) -> fp32
    _close(y, rms_norm_ref(xb.double(), w.double(), 1e-6), torch.bfloat16)
    y, h = add_rms_norm(xb, res, w, 1e-6)
    assert h.dtype == y.dtype == torch.float32
    yr, hr = add_rms_norm_ref(xb.double(), res.double(), w.double(), 1e-6)
    _close(h, hr, torch.float32)
    _close(y, yr, torch.float32)
    q, k, cos, sin = _qkcs(2, 3, 2, 5, 16, torch.float32)
    qo, ko = rope(q.bfloat16(), k.bfloat16(), cos, sin)
    assert qo.dtype == ko.dtype == torch.float32
    qr, kr = rope_ref(q.bfloat16().double(), k.bfloat16().double(), cos.double(), sin.double())
    _close(qo, qr, torch.float32)
    _close(ko, kr, torch.float32)
    gate, up = torch.randn(4, 9).bfloat16(), torch.randn(4, 9)
    out = swiglu(gate, up)
    assert out.dtype == torch.float32
    _close(out, swiglu_ref(gate.double(), up.double()), torch.float32)


def test_rope_gradcheck():
    q, k, cos, sin = _qkcs(2, 2, 1, 3, 6, torch.float64)
    args = [q.clone().requires_grad_(True), k.clone().requires_grad_(True)]
    assert torch.autograd.gradcheck(lambda a, b: rope(a, b, cos, sin), args)


# ---- SwiGLU ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (3, 7), (2, 5, 96), (4, 1536)])
def test_swiglu_forward_backward(isa, dtype, shape):
    gate, up, gy = _rand(*shape, dtype=dtype, seed=1, scale=4.0), _rand(*shape, dtype=dtype, seed=2), _rand(*shape, dtype=dtype, seed=3)
    _close(swiglu(gate, up), swiglu_ref(gate.double(), up.double()), dtype)
    got = _grads(swiglu, (gate, up), (gy,))
    want = _grads(swiglu_ref, (gate.double(), up.double()), (gy.double(),))
    _close(got[0], want[0], dtype)
    _close(got[1], want[1], dtype)


def test_swiglu_extremes(isa):
    # exp clamps at ±87/88: silu(g) -> g for large g, -> 0 for very negative g; σ's range never leaves [0, 1]
    gate = torch.tensor([-1e4, -200.0, -88.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 88.0, 200.0, 1e4], dtype=torch.float32)
    up = torch.ones_like(gate)
    _close(swiglu(gate, up), swiglu_ref(gate.double(), up.double()), torch.float32)
    g = _grads(swiglu, (gate, up), (torch.ones_like(gate),))
    _close(g[0], _grads(swiglu_ref, (gate.double(), up.double()), (torch.ones(11, dtype=torch.float64),))[0],
           torch.float32)


def test_swiglu_gradcheck():
    gate, up = _rand(3, 5, dtype=torch.float64, seed=1, scale=3.0), _rand(3, 5, dtype=torch.float64, seed=2)
    assert torch.autograd.gradcheck(swiglu, [gate.requires_grad_(True), up.requires_grad_(True)])


# ---- the bf16 rounding: one rounding of the fp32 result, to nearest even --------------------------------------


def test_bf16_rounding_is_nearest_even_bit_for_bit(isa):
    # rope with sin = 0 computes q·cos in fp32 exactly (two 8-bit mantissas: a 16-bit product), so every
    # product of mantissas 1 + i/128 and 1 + s/128 lands on ties (low 16 bits 0x8000, even and odd), just above
    # and just below them: the kernel's bf16 store must round each exactly as torch's round-to-nearest-even.
    m = 1 + torch.arange(128, dtype=torch.float32) / 128
    q = torch.cat((m, -m)).repeat(128, 1)[None, None]  # [1, 1, 128 positions, 256]
    cos = m[:, None].expand(128, 256)[None].contiguous()  # row s: 1 + s/128
    q, cos = q.bfloat16(), cos.bfloat16()
    out, _ = rope(q, q, cos, torch.zeros_like(cos))
    assert torch.equal(out.view(torch.int16), (q.float() * cos.float()).bfloat16().view(torch.int16))


def test_bf16_store_of_an_fp32_subnormal(isa):
    # 2^-70 · 2^-60 = 2^-130: an fp32 subnormal that bf16 can hold. The integer rounding (avx2, avx512) keeps it,
    # as torch does; AVX512-BF16's vcvtneps2bf16 flushes it to 0 by definition (documented in docs/kernels.md).
    q = torch.full((1, 1, 1, 32), 2.0**-70).bfloat16()
    cos = torch.full((1, 1, 32), 2.0**-60).bfloat16()
    out, _ = rope(q, q, cos, torch.zeros_like(cos))
    want = (q.float() * cos.float()).bfloat16()
    assert want[0, 0, 0, 0].item() == 2.0**-130
    assert torch.equal(out, torch.zeros_like(out) if isa == "avx512bf16" else want)


def test_bf16_output_is_the_fp32_result_rounded_once(isa):
    gate, up = _rand(4, 100, seed=1), _rand(4, 100, seed=2)
    gate, up = gate.bfloat16().float(), up.bfloat16().float()  # exactly representable inputs
    gate[1, 3] = float("nan")  # NaN stays NaN
    fp32 = swiglu(gate, up)
    got = swiglu(gate.bfloat16(), up.bfloat16())
    assert torch.equal(got.isnan(), fp32.isnan()) and got[1, 3].isnan()
    ok = ~fp32.isnan()
    assert torch.equal(got[ok], fp32.bfloat16()[ok])  # torch's .bfloat16() rounds to nearest even


# ---- what backward keeps ---------------------------------------------------------------------------------------


def _saved(fn, *inputs):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(*inputs)
    return saved


def test_backward_saves_the_least():
    x = _rand(4, 32).requires_grad_(True)
    res = _rand(4, 32, seed=2).requires_grad_(True)
    w = torch.ones(32, requires_grad=True)
    saved = _saved(lambda: add_rms_norm(x, res, w, 1e-6))
    assert len(saved) == 2 and saved[1] is w and saved[0].shape == x.shape  # h and the weight: no rstd, no x
    gate, up = _rand(4, 32).requires_grad_(True), _rand(4, 32, seed=2).requires_grad_(True)
    assert [t is s for t, s in zip(_saved(lambda: swiglu(gate, up)), (gate, up))] == [True, True]
    q, k, cos, sin = _qkcs(1, 2, 2, 3, 8, torch.float32)
    q.requires_grad_(True)
    saved = _saved(lambda: rope(q, k, cos, sin))
    assert len(saved) == 2 and saved[0] is cos and saved[1] is sin  # no copy of q or k


# ---- opcheck, torch.compile ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    lib = torch.ops.lowrank_ext
    x, res = _rand(3, 40, dtype=dtype).to(device), _rand(3, 40, dtype=dtype, seed=2).to(device)
    w = torch.rand(40, device=device) + 0.5
    for grad in (False, True):
        xs, rs, ws = (t.clone().requires_grad_(grad) for t in (x, res, w))
        torch.library.opcheck(lib.rms_norm, (xs, ws, 1e-6, 0.0))
        torch.library.opcheck(lib.add_rms_norm, (xs, rs, ws, 1e-6, 1.0))
        q, k, cos, sin = (t.to(device) for t in _qkcs(2, 3, 1, 4, 16, dtype))
        torch.library.opcheck(lib.rope, (q.requires_grad_(grad), k.requires_grad_(grad), cos, sin))
        torch.library.opcheck(lib.swiglu, (xs, rs))
    torch.library.opcheck(lib.rms_norm_backward, (res, None, x, w, 1e-6, 0.0))
    torch.library.opcheck(lib.rms_norm_backward, (res, x, x, w, 1e-6, 0.0))
    torch.library.opcheck(lib.rope_backward, (q.detach(), k.detach(), cos, sin))
    torch.library.opcheck(lib.swiglu_backward, (x, res, x))


@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_forward_backward(dtype):
    """The CUDA kernels (csrc/cuda/fused_*.cuh) against float64 eager math, with the CPU tests' bounds."""
    x, res, gy, gh = (_rand(5, 300, dtype=dtype, seed=s).cuda() for s in (1, 2, 3, 4))
    w = (_rand(300, seed=5, scale=0.3) + 1.0).cuda()
    got = _grads(lambda a, b, c: add_rms_norm(a, b, c, 1e-6, 1.0), (x, res, w), (gy, gh))
    want = _grads(lambda a, b, c: add_rms_norm_ref(a, b, c, 1e-6, 1.0), (x.double(), res.double(), w.double()),
                  (gy.double(), gh.double()))
    _close(got[0], want[0], dtype)
    _close(add_rms_norm(x, res, w, 1e-6, 1.0)[0], add_rms_norm_ref(x.double(), res.double(), w.double(), 1e-6, 1.0)[0],
           dtype)
    q, k, cos, sin = (t.cuda() for t in _qkcs(2, 9, 3, 7, 64, dtype))
    qo, ko = rope(q, k, cos, sin)
    qr, kr = rope_ref(q.double(), k.double(), cos.double(), sin.double())
    _close(qo, qr, dtype)
    _close(ko, kr, dtype)
    gq, gk = _rand(*q.shape, dtype=dtype, seed=7).cuda(), _rand(*k.shape, dtype=dtype, seed=8).cuda()
    got = _grads(lambda a, b: rope(a, b, cos, sin), (q, k), (gq, gk))
    want = _grads(lambda a, b: rope_ref(a, b, cos.double(), sin.double()), (q.double(), k.double()),
                  (gq.double(), gk.double()))
    _close(got[0], want[0], dtype)
    _close(got[1], want[1], dtype)
    gate, up = _rand(4, 1536, dtype=dtype, seed=1, scale=4.0).cuda(), _rand(4, 1536, dtype=dtype, seed=2).cuda()
    _close(swiglu(gate, up), swiglu_ref(gate.double(), up.double()), dtype)
    got = _grads(swiglu, (gate, up), (gy[:4, :1].expand(4, 1536).contiguous(),))
    want = _grads(swiglu_ref, (gate.double(), up.double()), (gy[:4, :1].expand(4, 1536).double(),))
    _close(got[0], want[0], dtype)
    _close(got[1], want[1], dtype)


def test_compile_fullgraph():
    def block(x, res, w, gate, up, q, k, cos, sin):
        y, h = add_rms_norm(x, res, w, 1e-6)
        qo, ko = rope(q, k, cos, sin)
        return y.sum() + h.sum() + swiglu(gate, up).sum() + qo.sum() + ko.sum()

    q, k, cos, sin = _qkcs(2, 3, 1, 4, 16, torch.float32)
    args = [_rand(3, 40, seed=1), _rand(3, 40, seed=2), torch.rand(40) + 0.5, _rand(3, 40, seed=3), _rand(3, 40, seed=4),
            q, k, cos, sin]
    leaves = [a.clone().requires_grad_(True) if i < 7 else a for i, a in enumerate(args)]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    out.backward()
    ref = [a.clone().requires_grad_(True) if i < 7 else a for i, a in enumerate(args)]
    block(*ref).backward()
    torch.testing.assert_close(out, block(*args))
    for a, b in zip(leaves[:7], ref[:7]):
        torch.testing.assert_close(a.grad, b.grad)


# ---- errors ---------------------------------------------------------------------------------------------------


def test_errors():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"lowrank_ext::rms_norm: weight must have shape \[8\], got \[7\]"):
        rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(TypeError, match=r"lowrank_ext::rms_norm: weight must have the dtype of x \(Float\) or float32, got Double"):
        torch.ops.lowrank_ext.rms_norm(x, torch.ones(8, dtype=torch.float64), 1e-6, 0.0)  # the op: one dtype
    with pytest.raises(TypeError, match="lowrank_ext::rms_norm: x must be float32, bfloat16 or float64, got Half"):
        rms_norm(x.half(), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="lowrank_ext::rms_norm: eps must be >= 0, got -1"):
        rms_norm(x, torch.ones(8), -1.0)
    with pytest.raises(ValueError, match=r"lowrank_ext::rms_norm: x must have a last dimension of size >= 1, got shape \[2, 0\]"):
        rms_norm(torch.randn(2, 0), torch.ones(0), 1e-6)
    with pytest.raises(ValueError, match=r"lowrank_ext::add_rms_norm: residual must have the shape of x \[2, 8\], got \[2, 7\]"):
        add_rms_norm(x, torch.randn(2, 7), torch.ones(8), 1e-6)
    with pytest.raises(TypeError, match=r"lowrank_ext::add_rms_norm: residual must have the dtype of x \(Float\), got BFloat16"):
        torch.ops.lowrank_ext.add_rms_norm(x, x.bfloat16(), torch.ones(8), 1e-6, 0.0)  # (wrappers promote)
    with pytest.raises(ValueError, match=r"lowrank_ext::rms_norm_backward: grad_y must have the shape of h \[2, 8\], got \[8\]"):
        torch.ops.lowrank_ext.rms_norm_backward(torch.randn(8), None, x, torch.ones(8), 1e-6, 0.0)
    q, k, cos, sin = _qkcs(2, 3, 1, 4, 16, torch.float32)
    with pytest.raises(ValueError, match=r"lowrank_ext::rope: q must be 4-D \[batch, heads, seq, head_dim\], got shape \[3, 4, 16\]"):
        rope(q[0], k, cos, sin)
    with pytest.raises(ValueError, match=r"lowrank_ext::rope: q must have an even head_dim \(rotate_half splits it in two\), got 15"):
        rope(q[..., :15], k[..., :15], cos[..., :15], sin[..., :15])
    with pytest.raises(ValueError, match=r"lowrank_ext::rope: k must have shape \[2, heads, 4, 16\], got \[2, 1, 3, 16\]"):
        rope(q, k[:, :, :3], cos, sin)
    with pytest.raises(ValueError, match=r"lowrank_ext::rope: cos must have shape \[2 or 1, 4, 16\], got \[2, 3, 16\]"):
        rope(q, k, cos[:, :3], sin)
    with pytest.raises(TypeError, match=r"lowrank_ext::rope: cos must have the dtype of q \(Float\), got Double"):
        torch.ops.lowrank_ext.rope(q, k, cos.double(), sin)
    with pytest.raises(ValueError, match=r"lowrank_ext::rope: sin must have the shape of cos \[2, 4, 16\], got \[1, 4, 16\]"):
        rope(q, k, cos, sin[:1])
    with pytest.raises(ValueError, match=r"lowrank_ext::rope: cos and sin must not require grad \(the op treats them as constants\), got requires_grad=True \(cos\), False \(sin\)"):
        rope(q, k, cos.clone().requires_grad_(True), sin)
    with pytest.raises(ValueError, match="lowrank_ext::apply_rotary_pos_emb: unsqueeze_dim must be 1 or 2, got 3"):
        apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=3)
    with pytest.raises(ValueError, match=r"lowrank_ext::swiglu: up must have the shape of gate \[2, 8\], got \[2, 7\]"):
        swiglu(x, torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"lowrank_ext::swiglu_backward: grad must have the shape of gate \[2, 8\], got \[8\]"):
        torch.ops.lowrank_ext.swiglu_backward(torch.randn(8), x, x)
