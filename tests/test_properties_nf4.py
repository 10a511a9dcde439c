"""Property tests of the NF4 format ops (hypothesis; see tests/_properties.py): quantize_nf4 (+ double
quant) and dequantize_nf4 / dequantize_nf4_out on any shape and blocksize, against the readable reference
(lowrank_ext._reference.nf4) and bitsandbytes 0.50.2 where it is exact. All comparisons are exact."""

from __future__ import annotations

import torch
from _properties import LOW, SEEDS, props, weight_values
from conftest import require
from hypothesis import given
from hypothesis import strategies as st

import lowrank_ext
from lowrank_ext._reference.nf4 import NF4_CODEBOOK, VALID_BLOCKSIZES, dequantize_nf4_ref, quantize_nf4_ref
from lowrank_ext.ops import dequantize_nf4, dequantize_nf4_out, quantize_nf4_raw


# ---------------------------------------------------------------------------------------------------
# NF4 format: quantize / double quant / dequantize
# ---------------------------------------------------------------------------------------------------
@st.composite
def raw_weights(draw):
    shape = draw(st.one_of(st.tuples(st.integers(1, 300), st.integers(1, 300)), st.tuples(st.integers(1, 20000))))
    blocksize = draw(st.sampled_from(VALID_BLOCKSIZES))
    kind = draw(st.sampled_from(["gauss", "scales", "levels", "ints"]))
    dtype = draw(st.sampled_from(LOW))
    w = weight_values(shape, kind, blocksize, draw(st.integers(*SEEDS)))
    if dtype == torch.float16:
        w = w.clamp(-6e4, 6e4)
    return w.to(dtype), blocksize


def _bnb_absmax_quirk(theirs: torch.Tensor, n: int, blocksize: int) -> torch.Tensor:
    """bitsandbytes stores 1e-38 for an all-zero partial last block where the format (and we) store 0."""
    theirs = theirs.clone()
    if n % blocksize and theirs[-1] == torch.tensor(1e-38):
        theirs[-1] = 0.0
    return theirs


def _check_nested_codes(absmax: torch.Tensor, q: torch.Tensor, a2: torch.Tensor, off: torch.Tensor,
                        nmap: torch.Tensor) -> None:
    """Double quant's spec, independently: offset = fp32 mean, absmax2 = per-256 max |absmax - offset|,
    code = the lowest of the nearest map entries to (absmax - offset) / absmax2 in fp32 (float64 distances)."""
    nb = absmax.numel()
    assert torch.equal(off, absmax.mean().reshape(1))
    c = absmax - off
    blk = torch.arange(nb) // 256
    assert torch.equal(a2, torch.stack([c[blk == j].abs().max() for j in range(a2.numel())]))
    s = c * (1.0 / a2)[blk]
    d32 = (nmap.double()[None, :] - s.double()[:, None]).abs().float()
    valid = ~torch.isnan(s)  # a nested block whose values all equal the offset: absmax2 = 0, code 0
    lowest_best = (d32 == d32.min(dim=1).values[:, None]).float().argmax(dim=1)
    assert torch.equal(q.long()[valid], lowest_best[valid])
    assert bool((q[~valid] == 0).all())


@given(raw_weights(), st.booleans())
@props(120)
def test_quantize_matches_reference_and_bitsandbytes(wb, double_quant):
    w, blocksize = wb
    n = w.numel()
    packed, absmax = quantize_nf4_raw(w, blocksize)
    p_ref, a_ref = quantize_nf4_ref(w, blocksize)
    assert torch.equal(packed, p_ref) and torch.equal(absmax, a_ref)
    if w.dim() == 2 and min(w.shape) > 1:  # a non-contiguous view quantizes as its contiguous copy
        wt = w.t().contiguous().t()
        assert not wt.is_contiguous()
        pt, at_ = quantize_nf4_raw(wt, blocksize)
        assert torch.equal(pt, packed) and torch.equal(at_, absmax)
    q = lowrank_ext.quantize_nf4(w, blocksize, double_quant=double_quant)
    assert torch.equal(q.packed, packed)
    if double_quant:
        _check_nested_codes(absmax, q.absmax, q.nested_absmax, q.offset, q.nested_map)
    bnb_f = require("bitsandbytes.functional", "0.50.2")
    with torch._dynamo.config.patch(disable=True):  # bnb wraps odd shapes in torch.compile: same math, eager
        p_bnb, st_bnb = bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                            compress_statistics=double_quant)
    assert torch.equal(packed, p_bnb)
    zero_tail = n % blocksize and absmax[-1] == 0  # bnb stores 1e-38 there, which shifts its mean
    if double_quant and not zero_tail:  # nested absmax and offset bit-exact; bnb's 8-bit LUT codes are not nearest
        assert torch.equal(q.nested_absmax, st_bnb.state2.absmax)
        assert torch.equal(q.offset.reshape(()), st_bnb.offset.reshape(()))
    elif not double_quant:
        assert torch.equal(absmax, _bnb_absmax_quirk(st_bnb.absmax, n, blocksize))


@given(raw_weights(), st.booleans(), st.sampled_from(LOW))
@props(120)
def test_dequantize_matches_reference_and_bitsandbytes(wb, double_quant, out_dtype):
    w, blocksize = wb
    n = w.numel()
    q = lowrank_ext.quantize_nf4(w, blocksize, double_quant=double_quant)
    ref = dequantize_nf4_ref(*q.tensors(), blocksize, n, out_dtype)
    got = dequantize_nf4(*q.tensors(), blocksize, n, out_dtype)
    assert got.dtype == out_dtype and torch.equal(got, ref)
    out = torch.full((n + 1,), float("nan"), dtype=out_dtype)[1:]  # a misaligned reused buffer
    assert dequantize_nf4_out(*q.tensors(), blocksize, n, out) is out and torch.equal(out, ref)
    if not double_quant:  # the values are the fp32 product of code level and absmax, rounded once
        codes = torch.stack([q.packed.view(-1) >> 4, q.packed.view(-1) & 15], 1).view(-1)[:n].long()
        val = NF4_CODEBOOK.double()[codes] * q.absmax.double().repeat_interleave(blocksize)[:n]
        assert torch.equal(got, val.float().to(out_dtype))
    bnb_f = require("bitsandbytes.functional", "0.50.2")
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    scale = q.absmax
    if double_quant:
        state2 = bnb_f.QuantState(absmax=q.nested_absmax, code=q.nested_map, blocksize=256, dtype=torch.float32)
        scale = bnb_f.dequantize_blockwise(q.absmax, state2) + q.offset.reshape(())
    shape = (n,)  # bitsandbytes' generic (pure PyTorch) path on the same bytes and scales
    generic = _dequantize_4bit_compute(q.packed.view(-1), scale.float(), NF4_CODEBOOK.clone(), blocksize, shape,
                                       out_dtype)
    assert torch.equal(got, generic.view(-1))
    if w.shape[-1] % blocksize == 0:  # bnb's C++ CPU kernel too (it mis-indexes blocks that straddle rows)
        state = bnb_f.QuantState(absmax=q.absmax, shape=w.shape, code=NF4_CODEBOOK.clone(), blocksize=blocksize,
                                 quant_type="nf4", dtype=out_dtype,
                                 offset=q.offset.reshape(()) if double_quant else None,
                                 state2=state2 if double_quant else None)
        with torch._dynamo.config.patch(disable=True):
            assert torch.equal(got, bnb_f.dequantize_4bit(q.packed, state).reshape(-1))  # (1-D: bnb returns [1, n])


