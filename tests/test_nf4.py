"""NF4 format ops vs bitsandbytes 0.50.2 (the oracle), float64 math, opcheck, torch.compile, errors.

Exactness tests take the `device` fixture (CUDA cases skip without a GPU); bitsandbytes always runs on
CPU. NF4Weight and the state-dict interop live in test_nf4_weight.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import require

import lowrank_ext
from lowrank_ext._reference.nf4 import NF4_CODEBOOK, dequantize_nf4_ref, dynamic_map, quantize_nf4_ref
from lowrank_ext.ops.nf4 import dequantize_nf4, dequantize_nf4_out, double_quant, quantize_nf4_raw

BNB_VERSION = "0.50.2"  # the version whose CPU code paths these tests pin
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# even/odd numel, a partial last block, a weight smaller than one block, odd last dim (bnb's other path)
SHAPES = [(96, 128), (33, 77), (4099,), (3, 5), (7, 1031)]


@pytest.fixture(scope="module")
def bnbF():
    return require("bitsandbytes.functional", BNB_VERSION)


@contextlib.contextmanager
def _eager():
    # bitsandbytes wraps its generic (odd-shape) paths in torch.compile; eager is the same math, faster here.
    with torch._dynamo.config.patch(disable=True):
        yield


def bnb_quantize(F, w: torch.Tensor, blocksize: int, double_quant: bool):
    with _eager():
        return F.quantize_4bit(w.cpu(), blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)


def bnb_state_from_ours(F, q: lowrank_ext.NF4Weight, dtype: torch.dtype):
    """A bitsandbytes QuantState built from our tensors (so dequantize_4bit decodes exactly our data)."""
    state2 = None
    if q.double_quant:
        state2 = F.QuantState(absmax=q.nested_absmax.cpu(), code=q.nested_map.cpu(), blocksize=256,
                              dtype=torch.float32)
    return F.QuantState(absmax=q.absmax.cpu(), shape=q.shape, code=NF4_CODEBOOK.clone(), blocksize=q.blocksize,
                        quant_type="nf4", dtype=dtype,
                        offset=None if state2 is None else q.offset.cpu().reshape(()), state2=state2)


def hard_weight(shape, dtype, blocksize, seed=0) -> torch.Tensor:
    """randn with per-region scales, outliers, an all-zero full block and (if partial) an all-zero tail."""
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    flat = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g).cumsum(0) * 0.01).clamp(1e-3, 1e3)
    flat[:: 97] *= 40.0  # outliers
    if n >= 2 * blocksize:
        flat[blocksize: 2 * blocksize] = 0.0  # an all-zero full block
    if n % blocksize and n > blocksize:
        flat[n - n % blocksize:] = 0.0  # an all-zero partial last block
    return flat.clamp(-6e4, 6e4).view(shape).to(dtype)  # finite in fp16 too


def assert_absmax_equal(ours: torch.Tensor, theirs: torch.Tensor, n: int, blocksize: int) -> None:
    """Exact, except bitsandbytes stores 1e-38 for an all-zero partial last block (we store 0, docs/format.md §9)."""
    ours, theirs = ours.cpu().clone(), theirs.cpu().clone()
    if n % blocksize and theirs[-1] == torch.tensor(1e-38, dtype=torch.float32):
        assert ours[-1] == 0
        ours[-1] = theirs[-1] = 0
    assert torch.equal(ours, theirs)


# ---------------------------------------------------------------------------------------------------
# constants
# ---------------------------------------------------------------------------------------------------
def test_codebook_and_dynamic_map_match_bitsandbytes(bnbF):
    assert torch.equal(NF4_CODEBOOK, bnbF.get_4bit_type("nf4", device="cpu").float())
    bmap = bnbF.create_dynamic_map(signed=True).float()
    ours = dynamic_map(signed=True)
    assert torch.equal(ours, bmap)
    assert bool((ours[1:] > ours[:-1]).all()) and int((ours == 0).sum()) == 1


# ---------------------------------------------------------------------------------------------------
# quantize: bytes and absmax identical to bitsandbytes
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_bytes_match_bitsandbytes(bnbF, device, dtype, blocksize, shape):
    w = hard_weight(shape, dtype, blocksize, seed=blocksize)
    packed, absmax = quantize_nf4_raw(w.to(device), blocksize)
    p_ref, st = bnb_quantize(bnbF, w, blocksize, double_quant=False)
    assert packed.shape == p_ref.shape and packed.dtype == torch.uint8
    assert torch.equal(packed.cpu(), p_ref)
    assert_absmax_equal(absmax, st.absmax, w.numel(), blocksize)
    # and the readable reference (the spec in plain PyTorch) agrees too
    p_spec, a_spec = quantize_nf4_ref(w, blocksize)
    assert torch.equal(packed.cpu(), p_spec) and torch.equal(absmax.cpu(), a_spec)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_double_quant_matches_bitsandbytes(bnbF, device, dtype, blocksize):
    """nested_absmax and offset bit-exact; the 8-bit codes within a few codes on a small fraction
    (bitsandbytes' CPU LUT is not exact-nearest; ours is, see test_nested_codes_are_exact_nearest)."""
    w = hard_weight((1000, 1000 + 3), dtype, blocksize, seed=3)  # ~15.7K blocks at 64: 62 nested blocks
    q = lowrank_ext.quantize_nf4(w.to(device), blocksize, double_quant=True)
    p_ref, st = bnb_quantize(bnbF, w, blocksize, double_quant=True)
    assert torch.equal(q.packed.cpu(), p_ref)
    off, off_ref = q.offset.cpu().reshape(()), st.offset.reshape(())
    if device == "cuda":
        # offset = mean(absmax): torch's CUDA mean sums in another order than bitsandbytes' CPU mean, so equal
        # up to rounding (the bound of test_cuda_kernels.py::test_double_quant_exact_given_the_offset, which
        # holds everything else exact given the GPU's offset)
        torch.testing.assert_close(off, off_ref, rtol=2e-6, atol=0)
    else:
        assert torch.equal(off, off_ref)
    if torch.equal(off, off_ref):
        assert torch.equal(q.nested_absmax.cpu(), st.state2.absmax)
    else:  # nested_absmax = max |absmax - offset| per 256: moves by the offset's difference (+ one rounding)
        torch.testing.assert_close(q.nested_absmax.cpu(), st.state2.absmax, rtol=2.5e-7,
                                   atol=float((off - off_ref).abs()))
    assert torch.equal(q.nested_map.cpu(), st.state2.code)
    diff = (q.absmax.cpu().int() - st.absmax.int()).abs()
    assert int(diff.max()) <= 3
    assert float((diff > 0).float().mean()) < 0.01


def test_all_zero_blocks_encode_code_7(bnbF, device):
    w = torch.zeros(64 * 3 + 10)
    w[:64] = torch.linspace(-2, 2, 64)
    packed, absmax = quantize_nf4_raw(w.to(device), 64)
    assert torch.equal(absmax.cpu(), torch.tensor([2.0, 0.0, 0.0, 0.0]))
    assert bool((packed.cpu().view(-1)[32:] == 0x77).all())  # code 7 = exact 0, both nibbles
    p_ref, st = bnb_quantize(bnbF, w, 64, double_quant=False)
    assert torch.equal(packed.cpu(), p_ref)
    assert float(st.absmax[-1]) == pytest.approx(1e-38)  # bitsandbytes' quirk in the partial block
    q = lowrank_ext.quantize_nf4(w.to(device), 64, double_quant=False)
    assert torch.equal(q.dequantize().cpu()[64:], torch.zeros(w.numel() - 64))


def test_subnormal_block_matches_bitsandbytes(bnbF, device):
    """absmax below 1e-38: bitsandbytes clamps before the reciprocal (codes 7, not inf/NaN); so do we."""
    w = torch.randn(64 * 2 + 6) * 1e-40
    packed, absmax = quantize_nf4_raw(w.to(device), 64)
    p_ref, st = bnb_quantize(bnbF, w, 64, double_quant=False)
    assert torch.equal(packed.cpu(), p_ref)
    assert torch.equal(absmax.cpu()[:2], st.absmax[:2])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_rejected(device, dtype, bad):
    for pos in (5, 64 * 3 + 1):  # in a full block and in the partial last block
        w = torch.randn(64 * 3 + 9, dtype=dtype)
        w[pos] = bad
        with pytest.raises(ValueError, match=r"quantize_nf4: x must contain only finite values, got NaN/Inf"):
            quantize_nf4_raw(w.to(device), 64)


@pytest.mark.parametrize("make", ["transpose", "slice", "expand"])
def test_non_contiguous_input(device, make):
    base = torch.randn(96, 160)
    w = {"transpose": base.t(), "slice": base[:, ::2], "expand": base[:1].expand(5, 160)}[make].to(device)
    assert not w.is_contiguous()
    ours = lowrank_ext.quantize_nf4(w, 64)
    ref = lowrank_ext.quantize_nf4(w.contiguous(), 64)
    for a, b in zip(ours.tensors(), ref.tensors()):
        assert torch.equal(a, b)
    assert ours.shape == w.shape


# ---------------------------------------------------------------------------------------------------
# double quant: the nested 8-bit codes are the exact nearest map entry (independent float64 check)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nb", [1, 255, 256, 257, 5000])
def test_nested_codes_are_exact_nearest(device, nb):
    g = torch.Generator().manual_seed(nb)
    absmax = (torch.rand(nb, generator=g) * 3 + 0.01) * torch.exp(torch.randn(nb, generator=g))
    absmax[:: 13] = absmax[0]  # exact repeats (c = 0 for some when offset hits)
    nmap = dynamic_map(signed=True)
    q, a2, off = double_quant(absmax.to(device), nmap.to(device))
    q, a2, off = q.cpu().long(), a2.cpu(), off.cpu()
    if device == "cuda":  # torch's CUDA mean: another summation order, equal up to rounding (test_cuda_kernels.py)
        torch.testing.assert_close(off, absmax.mean().reshape(1), rtol=2e-6, atol=0)
    else:
        assert torch.equal(off, absmax.mean().reshape(1))  # torch's own fp32 mean, as bitsandbytes
    c = absmax - off  # fp32, as the kernel, given the op's offset
    blk = torch.arange(nb) // 256
    assert torch.equal(a2, torch.stack([c[blk == j].abs().max() for j in range(a2.numel())]))
    s = c * (1.0 / a2)[blk]  # the fp32 value being coded
    # float64: every distance to every map entry; the fp32 distance is that value rounded to fp32.
    d64 = (nmap.double()[None, :] - s.double()[:, None]).abs()
    d32 = d64.float()
    valid = ~torch.isnan(s)
    best32 = d32.min(dim=1).values
    lowest_best = (d32 == best32[:, None]).float().argmax(dim=1)  # ties -> the lowest code
    assert torch.equal(q[valid], lowest_best[valid])
    exact = d64.argmin(dim=1)  # the truly nearest entry: ours is it, or within fp32 rounding of it
    gap = d64.gather(1, q[:, None]).squeeze(1) - d64.gather(1, exact[:, None]).squeeze(1)
    assert float(torch.cat([gap[valid], gap.new_zeros(1)]).max()) <= 2.0**-24
    if not bool(valid.all()):  # a nested block whose values all equal the offset: absmax2 = 0, s = NaN
        assert bool((q[~valid] == 0).all())
    # dequantized absmax: map[q] * absmax2 + offset in fp32, within one nested code step of absmax
    deq = nmap[q] * a2[blk] + off
    assert float(((deq - absmax).abs() / a2[blk].clamp_min(1e-30)).max()) < 0.07


# ---------------------------------------------------------------------------------------------------
# dequantize: identical to bitsandbytes' dequantize_4bit on the same quant state, and to float64 math
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 2048, 4096])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("shape", [(96, 128), (33, 77), (4099,), (64, 1031)], ids=str)
def test_dequantize_matches_bitsandbytes(bnbF, device, out_dtype, blocksize, double_quant, shape):
    w = hard_weight(shape, torch.float32, blocksize, seed=7)
    q = lowrank_ext.quantize_nf4(w.to(device), blocksize, double_quant=double_quant)
    ours = q.dequantize(out_dtype).cpu()
    state = bnb_state_from_ours(bnbF, q, out_dtype)
    with _eager():
        ref = bnbF.dequantize_4bit(q.packed.cpu(), state)
        generic = _bnb_generic_dequantize(bnbF, q.packed.cpu(), state)
    assert ours.dtype == ref.dtype == out_dtype and ours.shape == ref.shape == torch.Size(shape)
    assert torch.equal(ours, generic)
    if not torch.equal(ref, generic):
        # bitsandbytes 0.50.2's C++ CPU dequantize kernel mis-indexes some blocks that straddle rows
        # (last dim not a multiple of blocksize, e.g. (96, 128) at 256, (96, 160) at 64): it then
        # disagrees with its own generic path and with its own quantize. Only there do we skip it.
        assert shape[-1] % blocksize != 0
    else:
        assert torch.equal(ours, ref)


def _bnb_generic_dequantize(F, packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' generic (pure PyTorch) 4-bit dequantize, fed the same decoded absmax."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _dequantize_4bit_compute(packed.view(-1), absmax.float(), NF4_CODEBOOK.clone(), state.blocksize,
                                    state.shape, state.dtype)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_dequantize_matches_float64_math(device, out_dtype, double_quant):
    w = hard_weight((77, 333), torch.float32, 64, seed=11)
    q = lowrank_ext.quantize_nf4(w.to(device), 64, double_quant=double_quant)
    p = q.packed.cpu().view(-1).long()
    codes = torch.stack([p >> 4, p & 15], dim=1).view(-1)[: w.numel()]
    if double_quant:  # each fp32 op is the float64 op rounded to fp32
        blk2 = torch.arange(q.absmax.numel()) // 256
        prod = (q.nested_map.cpu().double()[q.absmax.cpu().long()] * q.nested_absmax.cpu().double()[blk2]).float()
        scale = (prod.double() + q.offset.cpu().double()).float()
    else:
        scale = q.absmax.cpu()
    val = (NF4_CODEBOOK.double()[codes] * scale.double().repeat_interleave(64)[: w.numel()]).float()
    assert torch.equal(q.dequantize(out_dtype).cpu().view(-1), val.to(out_dtype))
    assert torch.equal(q.dequantize(out_dtype).cpu().view(-1), dequantize_nf4_ref(*q.tensors(), 64, w.numel(),
                                                                                   out_dtype))


@pytest.mark.parametrize("blocksize,mean_err,mean_rel", [(64, 0.07332, 0.20572), (128, 0.07747, 0.21798)])
def test_round_trip_error_within_bitsandbytes_bounds(device, blocksize, mean_err, mean_rel):
    torch.manual_seed(0)
    w = torch.randn(1024, 1024)
    for dq in (False, True):
        deq = lowrank_ext.quantize_nf4(w.to(device), blocksize, double_quant=dq).dequantize().cpu()
        err = (w - deq).abs()
        assert float(err.mean()) < mean_err
        assert float((err / (w.abs() + 1e-8)).mean()) < mean_rel
        if dq and blocksize == 64:
            assert float(err.mean()) == pytest.approx(0.0729, abs=0.0005)


def test_dequantize_out_writes_the_buffer(device):
    w = hard_weight((33, 77), torch.float32, 64, seed=5).to(device)
    q = lowrank_ext.quantize_nf4(w, 64)
    for dtype in DTYPES:
        out = torch.full((33 * 77,), float("nan"), dtype=dtype, device=device)
        ret = dequantize_nf4_out(*q.tensors(), 64, q.numel, out)
        assert ret is out
        assert torch.equal(out.view(33, 77), q.dequantize(dtype))


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_dequantize_large_outputs(device, out_dtype):
    """Outputs >= 8 MiB take the streaming-store path (out=, aligned) and the huge-page fresh path;
    a misaligned out= buffer takes the ordinary one. All equal the readable reference."""
    w = torch.randn(2048, 2048 + 64)
    q = lowrank_ext.quantize_nf4(w.to(device), 64)
    ref = dequantize_nf4_ref(*q.tensors(), 64, w.numel(), out_dtype).to(device)
    assert torch.equal(q.dequantize(out_dtype).view(-1), ref)
    aligned = torch.full((w.numel(),), float("nan"), dtype=out_dtype, device=device)
    assert torch.equal(q.dequantize(out=aligned).view(-1), ref)
    misaligned = torch.full((w.numel() + 1,), float("nan"), dtype=out_dtype, device=device)[1:]
    assert misaligned.data_ptr() % 32 != 0
    assert torch.equal(q.dequantize(out=misaligned).view(-1), ref)


# ---------------------------------------------------------------------------------------------------
# custom-op machinery: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,blocksize,shape", [(torch.float32, 64, (16, 40)), (torch.float16, 32, (7, 9)),
                                                   (torch.bfloat16, 4096, (3, 2000))], ids=str)
def test_opcheck(device, dtype, blocksize, shape):
    w = torch.randn(shape, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.lowrank_ext.quantize_nf4.default, (w, blocksize))
    packed, absmax = quantize_nf4_raw(w, blocksize)
    nmap = dynamic_map().to(device)
    torch.library.opcheck(torch.ops.lowrank_ext.double_quant.default, (absmax, nmap))
    qa, a2, off = double_quant(absmax, nmap)
    n = w.numel()
    for bundle in ((packed, absmax, None, None, None), (packed, qa, a2, nmap, off)):
        torch.library.opcheck(torch.ops.lowrank_ext.dequantize_nf4.default, (*bundle, blocksize, n, dtype))
        out = torch.empty(n, dtype=dtype, device=device)
        torch.library.opcheck(torch.ops.lowrank_ext.dequantize_nf4_out.default, (*bundle, blocksize, n, out))


def test_torch_compile_fullgraph(device):
    nmap = dynamic_map().to(device)

    def roundtrip(w: torch.Tensor, buf: torch.Tensor):
        packed, absmax = torch.ops.lowrank_ext.quantize_nf4(w, 64)
        qa, a2, off = torch.ops.lowrank_ext.double_quant(absmax, nmap)
        deq = torch.ops.lowrank_ext.dequantize_nf4(packed, qa, a2, nmap, off, 64, w.numel(), torch.bfloat16)
        torch.ops.lowrank_ext.dequantize_nf4_out(packed, qa, a2, nmap, off, 64, w.numel(), buf)
        return deq.view(w.shape) * 2, buf

    w = torch.randn(48, 80, device=device)
    buf_c, buf_e = torch.empty(w.numel(), device=device), torch.empty(w.numel(), device=device)
    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    got, _ = compiled(w, buf_c)
    want, want_buf = roundtrip(w, buf_e)
    assert torch.equal(got, want) and torch.equal(buf_c, want_buf)
    assert torch.equal(want_buf.view(w.shape), lowrank_ext.quantize_nf4(w).dequantize())


# ---------------------------------------------------------------------------------------------------
# every error message of the ops (C++ checks; Python ValueError / TypeError)
# ---------------------------------------------------------------------------------------------------
def test_quantize_errors():
    op = torch.ops.lowrank_ext.quantize_nf4
    with pytest.raises(ValueError, match=r"quantize_nf4: blocksize must be one of 32, 64, .*, got 48"):
        op(torch.randn(64), 48)
    with pytest.raises(TypeError, match=r"quantize_nf4: x must be float32, float16 or bfloat16, got Double"):
        op(torch.randn(64, dtype=torch.float64), 64)
    with pytest.raises(TypeError, match=r"quantize_nf4: x must be float32, float16 or bfloat16, got Int"):
        op(torch.ones(64, dtype=torch.int32), 64)
    with pytest.raises(ValueError, match=r"quantize_nf4: x must be non-empty, got shape \[0, 4\]"):
        op(torch.empty(0, 4), 64)
    with pytest.raises(TypeError, match=r"quantize_nf4: w must be a torch.Tensor, got list"):
        lowrank_ext.quantize_nf4([1.0, 2.0])
    with pytest.raises(TypeError, match=r"quantize_nf4: double_quant must be a bool, got str"):
        lowrank_ext.quantize_nf4(torch.randn(64), 64, double_quant="yes")


def test_double_quant_errors():
    op, nmap = torch.ops.lowrank_ext.double_quant, dynamic_map()
    with pytest.raises(TypeError, match=r"double_quant: absmax must have dtype Float, got Half"):
        op(torch.rand(10).half(), nmap)
    with pytest.raises(TypeError, match=r"double_quant: nested_map must have dtype Float, got Double"):
        op(torch.rand(10), nmap.double())
    with pytest.raises(ValueError, match=r"double_quant: nested_map must have 256 elements, got 255"):
        op(torch.rand(10), nmap[:255])
    with pytest.raises(ValueError, match=r"double_quant: nested_map must be sorted ascending, got map\[0\]"):
        op(torch.rand(10), nmap.flip(0))
    with pytest.raises(ValueError, match=r"double_quant: absmax must be non-empty, got shape \[0\]"):
        op(torch.empty(0), nmap)


def _dq_bundle(n=1000, bs=64):
    q = lowrank_ext.quantize_nf4(torch.randn(n), bs)
    return list(q.tensors()), bs, n


@pytest.mark.parametrize("case,exc,pattern", [
    ("blocksize", ValueError, r"dequantize_nf4: blocksize must be one of .*, got 100"),
    ("numel", ValueError, r"dequantize_nf4: numel \(the weight's element count\) must be positive, got 0"),
    ("packed_dtype", TypeError, r"dequantize_nf4: packed must have dtype Byte, got Char"),
    ("packed_numel", ValueError, r"dequantize_nf4: packed must have 500 elements, got 499"),
    ("packed_strided", ValueError, r"dequantize_nf4: packed must be contiguous, got strides"),
    ("absmax_numel", ValueError, r"dequantize_nf4: absmax must have 16 elements, got 15"),
    ("absmax_dtype", TypeError, (r"dequantize_nf4: absmax must be float32 \(plain\) or uint8 \(double-quantized\), "
                                 r"got Int")),
    ("nested_missing", ValueError, (r"dequantize_nf4: nested_absmax/nested_map/offset must all be given when absmax "
                                    r"is uint8 \(double quant\), got no nested_absmax")),
    ("nested_absmax_dtype", TypeError, r"dequantize_nf4: nested_absmax must have dtype Float, got Half"),
    ("nested_absmax_numel", ValueError, r"dequantize_nf4: nested_absmax must have 1 elements, got 2"),
    ("nested_map_numel", ValueError, r"dequantize_nf4: nested_map must have 256 elements, got 16"),
    ("offset_numel", ValueError, r"dequantize_nf4: offset must have 1 elements, got 2"),
    ("dtype", TypeError, r"dequantize_nf4: dtype must be float32, float16 or bfloat16, got Double"),
    ("absmax_strided", ValueError, r"dequantize_nf4: absmax must be contiguous, got strides \[2\]"),
    ("nested_map_dtype", TypeError, r"dequantize_nf4: nested_map must have dtype Float, got Double"),
    ("offset_dtype", TypeError, r"dequantize_nf4: offset must have dtype Float, got Half"),
    ("nested_strided", ValueError, r"dequantize_nf4: nested tensors must be contiguous, got strides \[2\]"),
])
def test_dequantize_errors(case, exc, pattern):
    (packed, absmax, a2, nmap, off), bs, n = _dq_bundle()
    dtype = torch.float32
    if case == "blocksize":
        bs = 100
    elif case == "numel":
        n = 0
    elif case == "packed_dtype":
        packed = packed.view(torch.int8)
    elif case == "packed_numel":
        packed = packed[:-1]
    elif case == "packed_strided":
        packed = torch.stack([packed.view(-1), packed.view(-1)], 1)[:, 0]
    elif case == "absmax_numel":
        absmax = absmax[:-1]
    elif case == "absmax_dtype":
        absmax = absmax.int()
    elif case == "nested_missing":
        a2 = None
    elif case == "nested_absmax_dtype":
        a2 = a2.half()
    elif case == "nested_absmax_numel":
        a2 = torch.cat([a2, a2])
    elif case == "nested_map_numel":
        nmap = nmap[:16]
    elif case == "offset_numel":
        off = torch.cat([off, off])
    elif case == "dtype":
        dtype = torch.float64
    elif case == "absmax_strided":
        absmax = torch.stack([absmax, absmax], 1)[:, 0]
    elif case == "nested_map_dtype":
        nmap = nmap.double()
    elif case == "offset_dtype":
        off = off.half()
    elif case == "nested_strided":
        nmap = torch.stack([nmap, nmap], 1)[:, 0]
    with pytest.raises(exc, match=pattern):
        dequantize_nf4(packed, absmax, a2, nmap, off, bs, n, dtype)


def test_dequantize_out_errors():
    (packed, absmax, a2, nmap, off), bs, n = _dq_bundle()
    with pytest.raises(TypeError, match=r"dequantize_nf4_out: out must be float32, float16 or bfloat16, got Double"):
        dequantize_nf4_out(packed, absmax, a2, nmap, off, bs, n, torch.empty(n, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"dequantize_nf4_out: out must have 1000 elements, got 999"):
        dequantize_nf4_out(packed, absmax, a2, nmap, off, bs, n, torch.empty(999))
    with pytest.raises(ValueError, match=r"dequantize_nf4_out: out must be contiguous, got strides \[2\]"):
        dequantize_nf4_out(packed, absmax, a2, nmap, off, bs, n, torch.empty(2 * n)[::2])
    with pytest.raises(ValueError, match=r"dequantize_nf4_out: packed must have 500 elements, got 499"):
        dequantize_nf4_out(packed[:-1], absmax, a2, nmap, off, bs, n, torch.empty(n))


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_maps_equal_bitsandbytes(signed):
    bnb_f = require("bitsandbytes.functional", BNB_VERSION)
    from lowrank_ext._reference.nf4 import dynamic_map

    ours = dynamic_map(signed=signed)
    assert ours.shape == (256,)
    assert torch.equal(ours, bnb_f.create_dynamic_map(signed=signed))
