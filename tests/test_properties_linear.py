"""Property tests of the fused NF4 matmul + LoRA ops (hypothesis; see tests/_properties.py): nf4_linear,
nf4_linear_grad_input, nf4_lora_linear forward and backward (dropout masks included), nf4_row_sqnorm,
against float64 math on the dequantized weight (lowrank_ext._reference.linear).

Tolerance: outputs and gradients vs float64 at most 2x PyTorch's own error at the same precision (a dense
F.linear chain in that dtype on deq(W) rounded to it, differentiated by autograd), plus one ulp of the
largest reference value (one rounding of the output that PyTorch's error may happen to miss) and the fp32
rounding scale of the sums (2·eps·sqrt(k)·Σ|terms|; see assert_within_torch_error)."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from _properties import EPS, LOW, SEEDS, gen, props, weight_values
from hypothesis import given
from hypothesis import strategies as st

import lowrank_ext
from lowrank_ext._reference.linear import dequantize_weight_f64, nf4_linear_ref, nf4_lora_linear_ref
from lowrank_ext._reference.nf4 import VALID_BLOCKSIZES
from lowrank_ext.ops import nf4_linear, nf4_lora_linear, nf4_row_sqnorm

ops = torch.ops.lowrank_ext


@st.composite
def nf4_weights(draw, max_n: int = 300, max_k: int = 300):
    """(NF4Weight, N, K): any N, K in 1..300, every blocksize, plain or double quant, stored dtype."""
    n, k = draw(st.integers(1, max_n)), draw(st.integers(1, max_k))
    blocksize = draw(st.sampled_from(VALID_BLOCKSIZES))
    kind = draw(st.sampled_from(["gauss", "scales", "levels", "ints"]))
    dq = draw(st.booleans())
    wdtype = draw(st.sampled_from(LOW))
    # scales within ±6 binades: fp16 outputs of the matmul stay finite (an overflow compares inf to inf)
    w = weight_values((n, k), kind, blocksize, draw(st.integers(*SEEDS)), binades=6) * 0.05
    w = w.clamp(-6e4, 6e4).to(wdtype)  # finite in fp16
    return lowrank_ext.quantize_nf4(w, blocksize, double_quant=dq), n, k


def activation(draw, m: int, k: int, dtype: torch.dtype, seed: int):
    """(leaf, x, grad_of_x): x [.., K] of `m` rows in one of four layouts, a view of the leaf;
    grad_of_x maps the leaf's gradient to x's."""
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "3d"]))
    g = gen(seed)
    if layout == "contiguous":
        leaf = torch.randn(m, k, generator=g).to(dtype).requires_grad_()
        return leaf, leaf, lambda gr: gr
    if layout == "transposed":
        leaf = torch.randn(k, m, generator=g).to(dtype).requires_grad_()
        return leaf, leaf.t(), lambda gr: gr.t()
    if layout == "strided":
        leaf = torch.randn(m, 2 * k, generator=g).to(dtype).requires_grad_()
        return leaf, leaf[:, ::2], lambda gr: gr[:, ::2]
    b = draw(st.integers(1, 4))  # 3-D [b, m, k], itself transposed in its last two dims
    leaf = torch.randn(b, k, m, generator=g).to(dtype).requires_grad_()
    return leaf, leaf.transpose(1, 2), lambda gr: gr.transpose(1, 2)


@contextlib.contextmanager
def cpu_isa(isa: str):
    """LOWRANK_EXT_CPU_ISA for the GEMV (read per call): "avx2" forces the AVX2 path, "auto" takes
    AVX-512 where the CPU has it."""
    old = os.environ.get("LOWRANK_EXT_CPU_ISA")
    os.environ["LOWRANK_EXT_CPU_ISA"] = isa
    try:
        yield
    finally:
        if old is None:
            del os.environ["LOWRANK_EXT_CPU_ISA"]
        else:
            os.environ["LOWRANK_EXT_CPU_ISA"] = old


def assert_within_torch_error(ours, ref, own, mag, k: int, what: str) -> None:
    """|ours - ref|max <= 2 |own - ref|max + floor, ref in float64, own = PyTorch at ours' dtype.

    floor = one ulp of |ref|max at ours' dtype (one rounding of the output, which PyTorch's error may happen
    to miss on a few elements) + 2·eps·sqrt(k)·|mag|max at the compute precision (fp32; fp64 for float64):
    the rounding scale of a k-term sum whose |terms| add up to mag (a lone output of a long dot product
    with cancellation is not held to PyTorch's luck on that one element)."""
    ref, mag = ref.detach().double(), mag.detach().double()
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    if ref.numel() == 0:
        return
    err = (ours.detach().double() - ref).abs().max().item()
    err_own = (own.detach().double() - ref).abs().max().item()
    eps_compute = EPS[torch.float64] if ours.dtype == torch.float64 else EPS[torch.float32]
    floor = EPS[ours.dtype] * ref.abs().max().item() + 2 * eps_compute * k**0.5 * mag.abs().max().item()
    assert err <= 2 * err_own + floor, f"{what}: error {err:.3g} vs PyTorch's own {err_own:.3g} (+{floor:.3g})"


def magnitudes(x, wd, gy, bias=None, a=None, b=None, s=0.0, noise=None):
    """What each output and gradient sums, in absolute value: the same float64 math on |inputs| with
    |grad_y|. Returns (y, grad_x, grad_A, grad_B, grad_bias) (None where not applicable)."""
    leaves = [None if t is None else t.detach().double().abs().requires_grad_() for t in (x, a, b, bias)]
    xa, aa, ba, biasa = leaves
    y = xa @ wd.abs().t()
    if aa is not None:
        xl = xa if noise is None else xa * noise.double().abs().reshape(xa.shape)
        y = y + abs(s) * (xl @ aa.t()) @ ba.t()
    if biasa is not None:
        y = y + biasa
    y.backward(gy.double().abs())
    return (y.detach(), *(None if t is None else t.grad for t in leaves))



# ---------------------------------------------------------------------------------------------------
# fused NF4 matmul + LoRA
# ---------------------------------------------------------------------------------------------------
def _rows(draw) -> int:
    return draw(st.one_of(st.integers(1, 8), st.integers(9, 300)))  # both sides of the GEMV / panel switch


@given(st.data())
@props(120)
def test_nf4_linear_forward_backward(data):
    draw = data.draw
    w, n, k = draw(nf4_weights())
    dtype = draw(st.sampled_from([*LOW, torch.float64]))
    m = _rows(draw)
    leaf, x, grad_of = activation(draw, m, k, dtype, draw(st.integers(*SEEDS)))
    bias = (torch.randn(n, generator=gen(m)) * 0.1).to(dtype).requires_grad_() if draw(st.booleans()) else None
    with cpu_isa(draw(st.sampled_from(["auto", "avx2"]))):
        y = nf4_linear(x, w, bias)
        gy = torch.randn(y.shape, generator=gen(n)).to(dtype)
        y.backward(gy)
    x64 = x.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    ref = nf4_linear_ref(x64, w, b64)
    ref.backward(gy.double())
    wd = dequantize_weight_f64(w)
    xo = x.detach().clone().requires_grad_()
    bo = None if bias is None else bias.detach().clone().requires_grad_()
    own = F.linear(xo, wd.to(dtype), bo)
    own.backward(gy)
    mag_y, mag_x, _, _, mag_b = magnitudes(x, wd, gy, bias)
    rows = gy.numel() // n
    assert_within_torch_error(y, ref, own, mag_y, k, "y")
    assert_within_torch_error(grad_of(leaf.grad), x64.grad, xo.grad, mag_x, n, "grad_x")
    if bias is not None:
        assert_within_torch_error(bias.grad, b64.grad, bo.grad, mag_b, rows, "grad_bias")


@given(st.data())
@props(80)
def test_nf4_linear_grad_input_raw_op(data):
    """The raw op on any grad_y layout (autograd passes contiguous ones; the op must not care)."""
    draw = data.draw
    w, n, k = draw(nf4_weights())
    dtype = draw(st.sampled_from([*LOW, torch.float64]))
    m = _rows(draw)
    base = torch.randn(n, m, generator=gen(m + n)).to(dtype)
    gy = base.t() if draw(st.booleans()) else base.t().contiguous()
    gx = ops.nf4_linear_grad_input(gy, *w.tensors(), w.blocksize, k)
    wd = dequantize_weight_f64(w)
    assert gx.dtype == dtype
    assert_within_torch_error(gx, gy.double() @ wd, gy @ wd.to(dtype), gy.double().abs() @ wd.abs(), n,
                              "grad_input")


@given(st.data())
@props(120)
def test_nf4_lora_linear_forward_backward(data):
    draw = data.draw
    w, n, k = draw(nf4_weights())
    dtype = draw(st.sampled_from([*LOW, torch.float64]))
    m = _rows(draw)
    r = draw(st.integers(1, 80))
    s = draw(st.sampled_from([0.5, 2.0, 16.0, -1.25]))
    p = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5]))
    seed = draw(st.integers(*SEEDS))
    leaf, x, grad_of = activation(draw, m, k, dtype, seed)
    g = gen(seed + 1)
    a = (torch.randn(r, k, generator=g) / k**0.5).to(dtype).requires_grad_()
    b = (torch.randn(n, r, generator=g) * 0.1).to(dtype).requires_grad_()
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype).requires_grad_() if draw(st.booleans()) else None
    torch.manual_seed(seed)
    with cpu_isa(draw(st.sampled_from(["auto", "avx2"]))):
        y = nf4_lora_linear(x, w, a, b, s, bias, dropout=p)
        gy = torch.randn(y.shape, generator=g).to(dtype)
        y.backward(gy)
    # the dropout mask: the same RNG draws on the same [rows, K] shape and dtype (F.dropout of ones)
    x2 = x.detach().reshape(-1, k)
    torch.manual_seed(seed)
    noise = (F.dropout(torch.ones_like(x2), p, training=True) if p > 0 else torch.ones_like(x2)).reshape(x.shape)
    x64 = x.detach().double().requires_grad_()
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    bias64 = None if bias is None else bias.detach().double().requires_grad_()
    ref = nf4_lora_linear_ref(x64, w, a64, b64, s, bias64, x_lora=x64 * noise.double())
    ref.backward(gy.double())
    wd = dequantize_weight_f64(w)
    xo, ao, bo = (t.detach().clone().requires_grad_() for t in (x, a, b))
    biaso = None if bias is None else bias.detach().clone().requires_grad_()
    x_drop = xo * noise if p > 0 else xo  # what F.dropout computes, in x's dtype
    own = F.linear(xo, wd.to(dtype), biaso) + s * F.linear(F.linear(x_drop, ao), bo)
    own.backward(gy)
    mag_y, mag_x, mag_a, mag_b, mag_bias = magnitudes(x, wd, gy, bias, a, b, s, noise)
    rows = gy.numel() // n
    assert_within_torch_error(y, ref, own, mag_y, k + r, "y")
    assert_within_torch_error(grad_of(leaf.grad), x64.grad, xo.grad, mag_x, n + r, "grad_x")
    assert_within_torch_error(a.grad, a64.grad, ao.grad, mag_a, rows + n, "grad_A")
    assert_within_torch_error(b.grad, b64.grad, bo.grad, mag_b, rows + k, "grad_B")
    if bias is not None:
        assert_within_torch_error(bias.grad, bias64.grad, biaso.grad, mag_bias, rows, "grad_bias")


@given(nf4_weights())
@props(80)
def test_nf4_row_sqnorm(wnk):
    w, n, k = wnk
    sq = nf4_row_sqnorm(w)
    deq = dequantize_weight_f64(w)
    ref = deq.pow(2).sum(1)
    own = deq.float().pow(2).sum(1)  # PyTorch in fp32 on the (exactly fp32) dequantized weight
    assert sq.dtype == torch.float32 and sq.shape == (n,)
    assert_within_torch_error(sq, ref, own, ref, k, "row_sqnorm")


