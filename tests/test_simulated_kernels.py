"""The CUDA kernels' own source, executed on the CPU by the host simulator (tests/sim/, docs/kernels.md
"Simulated execution"), against float64 math, our CPU ops and bitsandbytes — no GPU needed.

csrc/cuda/*.cuh are compiled a second time with g++ -DLRX_CUDA_SIM: device_ops.cuh's PTX (cp.async, ldmatrix,
mma.sync), the warp shuffles, barriers and atomics come from the simulator, which runs each CTA's threads as
fibers and implements every instruction from the PTX ISA's documented layouts. Launch geometry comes from the
kernels' headers (mma::grid_of, plan_gemv, kernel_scalars ...), never from a copy here.

  * the simulator itself: mma / ldmatrix (.trans) against the PTX ISA fragment tables written out below,
    fp16/bf16 conversions against torch, and defects it must report (deadlock, divergent barrier, a missing
    cp.async wait ...);
  * every kernel on awkward shapes, with the CUDA tests' bounds (tests/test_cuda_mma.py,
    test_cuda_kernels.py, test_optim_cuda.py): GEMM NT/NN with LoRA and bias, GEMV with 1 and several
    splits, SIMT, quantize / double quant / dequantize bit for bit, AdamW 32/8-bit bit for bit;
  * a mutation test: a copy of csrc/ with a deliberately wrong layout must make these tests fail.

Every test name contains `simulated` (pytest -k simulated). $LRX_SIM_CSRC=/path/to/csrc runs them against
another source tree. Without a C++ compiler they skip (with CI=true they fail).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import _sim
import pytest
import torch
from conftest import IN_CI

import lowrank_ext
from lowrank_ext._reference.nf4 import dynamic_map
from lowrank_ext._reference.optim import optim_maps

ops = torch.ops.lowrank_ext
HALF = [torch.bfloat16, torch.float16]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def sim() -> _sim.Sim:
    if _sim.build_mod.compiler() is None:
        if IN_CI:
            pytest.fail("the simulated kernel tests need a C++ compiler (g++ or $CXX); CI must have one")
        pytest.skip("needs a C++ compiler (g++ or $CXX) to build the kernel simulator")
    return _sim.Sim.load()


# ---------------------------------------------------------------------------------------------------
# The simulator's own instructions vs the PTX ISA
# ---------------------------------------------------------------------------------------------------
# PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type" (.f16 / .bf16), written out as the ISA
# states them: groupID = lane >> 2, threadID_in_group = lane % 4; element i of a fragment lives in register
# i // 2, in its low half when i is even.
def ptx_a_rowcol(lane: int, i: int) -> tuple[int, int]:  # a0..a7 of the 16x16 A (row major)
    g, t = lane >> 2, lane % 4
    row = g if (i < 2 or 4 <= i < 6) else g + 8
    col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def ptx_b_rowcol(lane: int, i: int) -> tuple[int, int]:  # b0..b3 of the 16x8 B (column major)
    g, t = lane >> 2, lane % 4
    return t * 2 + (i & 1) + (8 if i >= 2 else 0), g


def ptx_c_rowcol(lane: int, i: int) -> tuple[int, int]:  # c0..c3 / d0..d3 of the 16x8 fp32 accumulator
    g, t = lane >> 2, lane % 4
    return (g if i < 2 else g + 8), t * 2 + (i & 1)


def _bits16(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return v.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF


def _regs(mat: torch.Tensor, nelem: int, rowcol, dtype) -> torch.Tensor:
    """Pack a matrix into per-lane registers [32, nelem // 2] following a fragment table."""
    bits = _bits16(mat, dtype)
    regs = torch.zeros(32, nelem // 2, dtype=torch.int64)
    for lane in range(32):
        for i in range(nelem):
            r, c = rowcol(lane, i)
            regs[lane, i // 2] |= bits[r, c] << (16 * (i % 2))
    return regs


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_simulated_mma_matches_ptx_fragment_tables(sim, dtype):
    g = torch.Generator().manual_seed(5)
    # small integers: every product and sum is exact in fp32, so D must equal A·B + C exactly
    A = torch.randint(-16, 17, (16, 16), generator=g).float()
    B = torch.randint(-16, 17, (16, 8), generator=g).float()
    C = torch.randint(-100, 101, (16, 8), generator=g).float()
    c = torch.tensor([[C[ptx_c_rowcol(lane, i)] for i in range(4)] for lane in range(32)])
    d = sim.probe_mma(_regs(A, 8, ptx_a_rowcol, dtype), _regs(B, 4, ptx_b_rowcol, dtype), c, dtype == torch.bfloat16)
    D = torch.full((16, 8), float("nan"))
    for lane in range(32):
        for i in range(4):
            D[ptx_c_rowcol(lane, i)] = d[lane, i]
    assert torch.equal(D, A @ B + C)
    # and a fractional case, where the fp32 rounding of the sum shows: within one fp32 rounding of float64
    A = torch.randn(16, 16, generator=g).to(dtype).float()
    B = torch.randn(16, 8, generator=g).to(dtype).float()
    C = torch.randn(16, 8, generator=g)
    c = torch.tensor([[C[ptx_c_rowcol(lane, i)] for i in range(4)] for lane in range(32)])
    d = sim.probe_mma(_regs(A, 8, ptx_a_rowcol, dtype), _regs(B, 4, ptx_b_rowcol, dtype), c, dtype == torch.bfloat16)
    ref = A.double() @ B.double() + C.double()
    for lane in range(32):
        for i in range(4):
            assert d[lane, i].item() == pytest.approx(ref[ptx_c_rowcol(lane, i)].item(), rel=2**-23, abs=1e-6)


# PTX ISA, "ldmatrix": for .x4, threads 8i .. 8i+7 hold the addresses of rows 0..7 of matrix i; each thread
# receives, per matrix i (register i), the two b16 elements of row lane/4 at columns 2(lane%4), 2(lane%4)+1;
# with .trans, of column lane/4 at rows 2(lane%4), 2(lane%4)+1 (lower-numbered element in the low half).
def ptx_ldmatrix_rowcol(lane: int, half: int, trans: bool) -> tuple[int, int]:
    r, c = lane // 4, 2 * (lane % 4) + half
    return (c, r) if trans else (r, c)


@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
def test_simulated_ldmatrix_matches_ptx_fragment_tables(sim, trans):
    g = torch.Generator().manual_seed(6)
    words = torch.randperm(40 * 8, generator=g).to(torch.int16)  # 40 rows of 8 distinct b16 values
    rows = torch.randperm(40, generator=g)[:32]  # lane l's row address: a scattered 16-byte row slot
    r = sim.probe_ldmatrix(words, rows * 8, trans)
    for lane in range(32):
        for i in range(4):
            want = 0
            for half in range(2):
                row, col = ptx_ldmatrix_rowcol(lane, half, trans)
                want |= (int(words[rows[8 * i + row] * 8 + col]) & 0xFFFF) << (16 * half)
            assert int(r[lane, i]) == want, f"lane {lane} register {i}"


def test_simulated_half_conversions_round_to_nearest_even(sim):
    f16_max, tiny = 65504.0, 2.0**-24
    special = [0.0, -0.0, 1.0, -1.5, float("inf"), -float("inf"), f16_max, 65519.0, 65520.0, 1e-8, tiny, tiny / 2,
               tiny * 1.5, 3 * tiny / 2, 2.0**-14, 2.0**-14 * (1 - 2**-11), 1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8,
               1 + 3 * 2**-8, 3.0e38, -3.4e38, 1e-40]
    x = torch.cat([torch.tensor(special), torch.randn(4000, generator=torch.Generator().manual_seed(1)) * 300,
                   torch.randn(1000, generator=torch.Generator().manual_seed(2)) * 1e-6])
    f16, bf16, f16b, bf16b = sim.probe_convert(x)
    assert torch.equal(f16, x.half().view(torch.int16))
    assert torch.equal(bf16, x.bfloat16().view(torch.int16))
    assert torch.equal(f16b, x.half().float()) and torch.equal(bf16b, x.bfloat16().float())
    nan = torch.tensor([float("nan"), -float("nan")])
    f16, bf16, f16b, bf16b = sim.probe_convert(nan)
    assert torch.isnan(f16b).all() and torch.isnan(bf16b).all()  # NaN stays NaN


def test_simulated_warp_shuffles_and_votes(sim):
    """CUDA C++ Programming Guide, warp shuffle / vote functions: a lane outside the source segment keeps
    its own value (down/up); width splits the warp into independent segments."""
    out = sim.probe_warp()
    for t in range(32):
        v = [100 + i for i in range(32)]
        seg16 = t // 16 * 16
        want = [
            v[(t * 7) % 32],
            v[t // 8 * 8 + 3],
            v[t ^ 5],
            v[t + 3] if t + 3 < seg16 + 16 else v[t],
            v[t - 2] if t >= 2 else v[t],
            sum(1 << i for i in range(32) if i % 3 == 0),  # bit i = lane i's predicate (bit 31 clear)
            1 + 2 + 0,
        ]
        x, y, s = (0x33221100 + t).to_bytes(4, "little"), (0x77665544).to_bytes(4, "little"), 0x3715 + t % 4
        both = x + y  # __byte_perm: byte n of the result = byte (s >> 4n) & 7 of {y, x}
        want.append(int.from_bytes(bytes(both[(s >> (4 * n)) & 7] for n in range(4)), "little", signed=True))
        assert out[t].tolist() == want, f"lane {t}"


def test_simulated_half_pairs_put_x_in_the_low_half(sim):
    a, b = 1.2345678, -3.75e-3
    bits, back = sim.probe_pairs(a, b)
    h = [int(v) & 0xFFFF for v in torch.tensor([a, b]).half().view(torch.int16)]
    bf = [int(v) & 0xFFFF for v in torch.tensor([a, b]).bfloat16().view(torch.int16)]
    assert bits.tolist() == [h[0] | h[1] << 16, bf[0] | bf[1] << 16, h[1] | h[0] << 16, bf[1] | bf[0] << 16]
    hr, bfr = torch.tensor([a, b]).half().float().tolist(), torch.tensor([a, b]).bfloat16().float().tolist()
    assert back.tolist() == hr + bfr + hr + bfr


@pytest.mark.parametrize("which,expected", [
    (0, "divergent __syncthreads"),
    (1, "deadlock"),
    (2, "__trap"),  # the cp.async data never landed without cp.async.wait_group: poisoned shared memory
    (3, ""),        # the same kernel with the wait: no error
    (4, "warp divergence"),
    (5, "__trap"),
])
def test_simulated_defects_are_reported(sim, which, expected):
    msg = sim.probe_defect(which)
    if expected:
        assert expected in msg, msg
        assert "sim_probe.cpp:" in msg  # the call site is named
    else:
        assert msg == ""


# ---------------------------------------------------------------------------------------------------
# GEMM (nf4_mma_kernel.cuh): forward NT (+ LoRA, + bias) and grad-input NN (+ gu·A)
# ---------------------------------------------------------------------------------------------------
def _check_close(ours, ref64, torch_own, what, factor):
    """|ours - fp64| <= factor x |torch's own result at this precision - fp64| + 1e-6 x max |fp64| (the CUDA
    tests' bound: tests/test_cuda_mma.py uses 2x, test_cuda_kernels.py 4x). An indexing or layout bug shows as
    an O(1) relative error, far outside it."""
    assert not torch.isnan(ours).any(), f"{what}: NaN in the output (unwritten or poisoned data)"
    err = (ours.double() - ref64).abs().max().item()
    err_torch = (torch_own.double() - ref64).abs().max().item()
    floor = 1e-6 * ref64.abs().max().item() + 1e-12
    assert err <= factor * err_torch + floor, f"{what}: max error {err:.4g} vs torch's {err_torch:.4g}"


def _weight(N, K, bs, dq, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return lowrank_ext.quantize_nf4((torch.randn(N, K, generator=g) / K**0.5).to(dtype), blocksize=bs,
                                    double_quant=dq)


def check_gemm_nt(sim, dtype, M, N, K, bs, dq, r, with_bias, seed=0, kernel="mma"):
    """y = x · deq(W)ᵀ + s · u · Bᵀ + bias on the simulated kernel vs float64 (u = the LoRA input, [M, r])."""
    w = _weight(N, K, bs, dq, seed=M + N + K)
    W = w.dequantize(dtype)  # the kernel's operand: fp32 level * scale, rounded once
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=g).to(dtype)
    s = 0.75
    u = torch.randn(M, r, generator=g).to(dtype) if r else None
    B = (torch.randn(N, r, generator=g) / r**0.5).to(dtype) if r else None
    bias = torch.randn(N, generator=g).to(dtype) if with_bias else None
    run = sim.mma if kernel == "mma" else sim.simt
    y, st = run(x, w, lora=(u, B, s) if r else None, bias=bias, seed=seed)
    ref = x.double() @ W.double().T
    own = x.float() @ W.float().T if dtype == torch.float32 else torch.nn.functional.linear(x, W)
    if r:
        ref = ref + s * u.double() @ B.double().T
        own = own + (s * u) @ B.T
    if with_bias:
        ref, own = ref + bias.double(), own + bias
    _check_close(y, ref, own, f"{kernel} NT {dtype} {M}x{N}x{K} bs={bs} dq={dq} r={r}", 2 if kernel == "mma" else 4)
    return st


def check_gemm_nn(sim, dtype, M, N, K, bs, dq, r, seed=0, kernel="mma"):
    """gx = gy · deq(W) + gu · A on the simulated kernel vs float64."""
    w = _weight(N, K, bs, dq, seed=M * N + K)
    W = w.dequantize(dtype)
    g = torch.Generator().manual_seed(2)
    gy = torch.randn(M, N, generator=g).to(dtype)
    gu = torch.randn(M, r, generator=g).to(dtype) if r else None
    A = (torch.randn(r, K, generator=g) / K**0.5).to(dtype) if r else None
    run = sim.mma if kernel == "mma" else sim.simt
    gx, st = run(gy, w, nn=True, lora=(gu, A, 1.0) if r else None, seed=seed)
    ref, own = gy.double() @ W.double(), gy @ W
    if r:
        ref, own = ref + gu.double() @ A.double(), own + gu @ A
    _check_close(gx, ref, own, f"{kernel} NN {dtype} {M}x{N}x{K} bs={bs} dq={dq} r={r}", 2 if kernel == "mma" else 4)
    return st


# (M, N, K, blocksize, double quant, LoRA rank, bias): M = 1 and off the 128 tile, N off 128, K off 64 and off
# the blocksize; r = 0, 5, 17, 80 (not multiples of 16; 80 takes two 64-rank chunks); blocksizes 32 .. 4096.
GEMM_NT = [
    (1, 136, 72, 32, True, 0, True),
    (17, 192, 200, 4096, True, 5, False),
    (130, 264, 136, 64, False, 17, True),
    (33, 72, 264, 128, True, 80, True),
]
GEMM_NN = [
    (1, 64, 200, 32, False, 0),
    (130, 264, 136, 64, True, 17),
    (33, 200, 264, 4096, True, 80),
    (40, 136, 72, 256, False, 5),
]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("M,N,K,bs,dq,r,bias", GEMM_NT)
def test_simulated_gemm_forward_nt(sim, dtype, M, N, K, bs, dq, r, bias):
    check_gemm_nt(sim, dtype, M, N, K, bs, dq, r, bias)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("M,N,K,bs,dq,r", GEMM_NN)
def test_simulated_gemm_grad_input_nn(sim, dtype, M, N, K, bs, dq, r):
    check_gemm_nn(sim, dtype, M, N, K, bs, dq, r)


def test_simulated_gemm_strided_rows_and_block_order(sim):
    """x a column slice of a wider tensor (lda = K + 24); the result does not depend on the order of the CTAs."""
    M, N, K, bs, dtype = 70, 136, 192, 64, torch.bfloat16
    w = _weight(N, K, bs, True, seed=9)
    W = w.dequantize(dtype)
    wide = torch.randn(M, K + 24, generator=torch.Generator().manual_seed(8)).to(dtype)
    x = wide[:, 8 : 8 + K]
    y1, _ = sim.mma(x, w, seed=1)
    y2, _ = sim.mma(x, w, seed=2)
    _check_close(y1, x.double() @ W.double().T, x @ W.T, "strided x", 2)
    assert torch.equal(y1, y2)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("bs", [32, 64, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("M,N,K", [(257, 136, 1000), (129, 392, 520)])
def test_simulated_gemm_sweep(sim, dtype, bs, M, N, K):
    check_gemm_nt(sim, dtype, M, N, K, bs, bs % 64 == 0, 72, True)
    check_gemm_nn(sim, dtype, M, N, K, bs, bs % 128 != 0, 72)


# ---------------------------------------------------------------------------------------------------
# GEMV (nf4_gemv_kernel.cuh, M <= 16) with split-K from plan_gemv
# ---------------------------------------------------------------------------------------------------
def check_gemv(sim, dtype, M, N, K, sm_count, splits, r=8, bs=64, dq=True, with_bias=True, seed=0):
    w = _weight(N, K, bs, dq, seed=N + K)
    W = w.dequantize(dtype)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, K, generator=g).to(dtype)
    s = 1.5
    u = torch.randn(M, r, generator=g).to(dtype) if r else None
    B = (torch.randn(N, r, generator=g) / max(r, 1) ** 0.5).to(dtype) if r else None
    bias = torch.randn(N, generator=g).to(dtype) if with_bias else None
    y, st = sim.gemv(x, w, sm_count=sm_count, lora=(u, B, s) if r else None, bias=bias, seed=seed)
    # splits: "1" or "several" (the case's point), or None (either); exact counts are plan_gemv's business
    got = st["plan"][2]
    assert splits is None or (got == 1) == (splits == "1"), (
        f"plan_gemv({N}, {K}, {sm_count}) = (row_groups, kslice, splits) {st['plan']}: the case wants {splits}")
    ref, own = x.double() @ W.double().T, torch.nn.functional.linear(x, W)
    if r:
        ref, own = ref + s * u.double() @ B.double().T, own + (s * u) @ B.T
    if with_bias:
        ref, own = ref + bias.double(), own + bias
    _check_close(y, ref, own, f"gemv {dtype} M={M} {N}x{K} splits={splits}", 4)
    return y, st


# (M, N, K, sm_count, splits plan_gemv must choose, LoRA rank): 1 split (N fills a 1-SM GPU), several splits
# (a small N on 132 SMs)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("M,N,K,sm_count,splits,r", [
    (1, 1000, 576, 1, "1", 17),
    (16, 520, 1024, 1, "1", 80),
    (5, 192, 1024, 132, "several", 5),
    (13, 136, 2560, 132, "several", 17),
    (3, 1000, 2048, 1, None, 1),
])
def test_simulated_gemv(sim, dtype, M, N, K, sm_count, splits, r):
    check_gemv(sim, dtype, M, N, K, sm_count, splits, r=r)


@pytest.mark.parametrize("bs,dq", [(32, False), (128, True), (4096, True)])
def test_simulated_gemv_blocksizes(sim, bs, dq):
    check_gemv(sim, torch.bfloat16, 3, 320, 1024, 132, "several", r=0, bs=bs, dq=dq, with_bias=False)


def test_simulated_gemv_split_k_is_deterministic_in_any_block_order(sim):
    """The last CTA of a row group sums the partials in split order, whichever CTA arrives last."""
    y1, _ = check_gemv(sim, torch.bfloat16, 4, 264, 2048, 132, "several", seed=1)
    y2, _ = check_gemv(sim, torch.bfloat16, 4, 264, 2048, 132, "several", seed=12345)
    assert torch.equal(y1, y2)


# ---------------------------------------------------------------------------------------------------
# SIMT fp32 GEMM (nf4_simt_kernel.cuh) and the row sqnorm
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K,bs", [(1, 72, 196, 32), (70, 130, 100, 128)])  # K % 8 != 0: only SIMT takes it
def test_simulated_simt_gemm(sim, dtype, M, N, K, bs):
    check_gemm_nt(sim, dtype, M, N, K, bs, True, 17, True, kernel="simt")
    check_gemm_nn(sim, dtype, M, N, K, bs, False, 5, kernel="simt")


@pytest.mark.parametrize("dq", [False, True])
def test_simulated_row_sqnorm(sim, dq):
    w = _weight(40, 200, 64, dq, seed=4)
    sq = sim.row_sqnorm(w)
    ref = (w.dequantize(torch.float32).double() ** 2).sum(1)
    torch.testing.assert_close(sq.double(), ref, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------------
# NF4 format kernels (nf4_kernel.cuh): bit for bit with the CPU ops and bitsandbytes
# ---------------------------------------------------------------------------------------------------
def _hard_weight(numel, dtype, bs, seed=0):
    from test_nf4 import hard_weight  # randn with outliers, all-zero blocks, a zero partial tail

    return hard_weight((numel,), dtype, bs, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bs,numel", [(32, 1), (64, 7), (64, 1000), (128, 33 * 65), (4096, 3 * 4096 + 17),
                                      (2048, 5000), (256, 256 * 300 + 3)])
def test_simulated_quantize_and_double_quant_match_cpu(sim, dtype, bs, numel):
    x = _hard_weight(numel, dtype, bs, seed=bs + numel)
    packed, absmax, bad = sim.quantize(x, bs)
    p_cpu, a_cpu = ops.quantize_nf4(x, bs)
    assert bad == 2**63 - 1
    assert torch.equal(packed, p_cpu) and torch.equal(absmax, a_cpu)
    # double quant, given the CPU's offset (CUDA takes torch's mean: test_cuda_kernels.py's bound)
    nmap = dynamic_map(signed=True)
    q_cpu, a2_cpu, off_cpu = ops.double_quant(a_cpu, nmap)
    q, a2 = sim.double_quant(absmax, nmap, off_cpu)
    assert torch.equal(q, q_cpu) and torch.equal(a2, a2_cpu)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bs", [64, 4096])
def test_simulated_quantize_matches_bitsandbytes(sim, dtype, bs):
    from conftest import require
    from test_nf4 import BNB_VERSION, assert_absmax_equal, bnb_quantize

    bnbF = require("bitsandbytes.functional", BNB_VERSION)
    x = _hard_weight(3 * bs + 34, dtype, bs, seed=bs)
    packed, absmax, _ = sim.quantize(x, bs)
    p_ref, st = bnb_quantize(bnbF, x, bs, double_quant=False)
    assert torch.equal(packed, p_ref)
    assert_absmax_equal(absmax, st.absmax, x.numel(), bs)


def test_simulated_quantize_reports_the_first_non_finite_block(sim):
    x = torch.randn(64 * 10)
    x[64 * 7 + 3] = float("inf")
    x[64 * 4 + 9] = float("nan")
    assert sim.quantize(x, 64)[2] == 4


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bs,dq", [(32, False), (64, True), (4096, True)])
@pytest.mark.parametrize("numel", [16 * 300, 33 * 65])  # a multiple of 16, and a partial last group
@pytest.mark.parametrize("shift", [0, 1], ids=["aligned", "misaligned"])
def test_simulated_dequantize_matches_cpu(sim, out_dtype, bs, dq, numel, shift):
    """deq into a 16-byte aligned buffer (vector stores) and into one offset by an element (scalar stores)."""
    w = lowrank_ext.quantize_nf4(_hard_weight(numel, torch.float32, bs, seed=numel), bs, dq)
    buf = torch.full((numel + 16,), float("nan"), dtype=out_dtype)
    base = (-buf.data_ptr() // buf.element_size()) % (16 // buf.element_size())  # first 16-byte aligned element
    out = buf[base + shift : base + shift + numel]
    aligned = sim.dequantize(w, out)
    assert aligned == (shift == 0)
    assert torch.equal(out, ops.dequantize_nf4(*w.tensors(), bs, numel, out_dtype))
    # the bytes around the view are untouched
    assert torch.isnan(buf[: base + shift].float()).all() and torch.isnan(buf[base + shift + numel :].float()).all()


# ---------------------------------------------------------------------------------------------------
# AdamW (adamw_kernel.cuh): bit for bit with the CPU ops, close to torch.optim.AdamW
# ---------------------------------------------------------------------------------------------------
OP_HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a == b).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_simulated_adamw32_matches_cpu_and_torch(sim, dtype):
    n = 256 * 9 + 17  # sm_count = 1: 8 CTAs grid-stride over 10 blocks' worth of elements
    gen = torch.Generator().manual_seed(0)
    p = (torch.randn(n, generator=gen) * 0.1).to(dtype)
    grads = [(torch.randn(n, generator=gen) * 0.01).to(dtype) for _ in range(3)]
    m, v = torch.randn(n, generator=gen) * 1e-3, torch.rand(n, generator=gen) * 1e-5
    v[:7] = 0.0
    cpu = [t.clone() for t in (p, m, v)]
    sim_state = [t.clone() for t in (p, m, v)]
    for t, g in enumerate(grads, start=1):
        ops.adamw_step(cpu[0], g, cpu[1], cpu[2], step=t, **OP_HYPER)
        sim.adamw32(sim_state[0], g, sim_state[1], sim_state[2], step=t, sm_count=1, seed=t, **OP_HYPER)
        for i, (a, b) in enumerate(zip(sim_state, cpu)):
            assert _same_bits(a, b), f"adamw32 {dtype}: tensor {i} differs from the CPU op at step {t}"
    if dtype == torch.float32:  # and torch.optim.AdamW from zero state
        p0 = torch.randn(n, generator=gen)
        ref = torch.nn.Parameter(p0.clone())
        opt = torch.optim.AdamW([ref], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
        ps, ms, vs = p0.clone(), torch.zeros(n), torch.zeros(n)
        for t, g in enumerate(grads, start=1):
            ref.grad = g.float().clone()
            opt.step()
            sim.adamw32(ps, g.float(), ms, vs, step=t, **OP_HYPER)
        torch.testing.assert_close(ps, ref.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_simulated_adamw8bit_matches_cpu(sim, dtype):
    n = 256 * 6 + 17
    gen = torch.Generator().manual_seed(1)
    p = (torch.randn(n, generator=gen) * 0.1).to(dtype)
    grads = [(torch.randn(n, generator=gen) * 0.01).to(dtype) for _ in range(3)]
    q1, q2 = optim_maps()
    s1 = torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)
    s2 = torch.randint(128, 256, (n,), generator=gen, dtype=torch.uint8)
    a1, a2 = torch.rand(7, generator=gen) * 1e-2, torch.rand(7, generator=gen) * 1e-4
    a1[3] = 0.0  # an all-zero block
    cpu = [t.clone() for t in (p, s1, s2, a1, a2)]
    st = [t.clone() for t in (p, s1, s2, a1, a2)]
    for t, g in enumerate(grads, start=1):
        ops.adamw8bit_step(cpu[0], g, *cpu[1:], q1, q2, step=t, **OP_HYPER)
        sim.adamw8bit(st[0], g, *st[1:], q1, q2, step=t, seed=t, **OP_HYPER)
        for i, (a, b) in enumerate(zip(st, cpu)):
            assert _same_bits(a, b), f"adamw8bit {dtype}: tensor {i} differs from the CPU op at step {t}"


# ---------------------------------------------------------------------------------------------------
# Mutation test: the suite must catch a wrong layout in the kernels' source
# ---------------------------------------------------------------------------------------------------
# (rule, file under csrc/, regex, replacement, how often it must match, unit, the check that must now fail).
# Each rule names what it breaks; when the kernels change and a pattern no longer matches, the test fails
# naming the rule: update the pattern here (the mutated meaning must stay the same).
MUTATIONS = [
    ("gemm: decoded nibble order swapped (odd code at the even element)", "cuda/nf4_mma_kernel.cuh",
     r"Op<T>::pack\(e0, e1\)", "Op<T>::pack(e1, e0)", 1, "mma",
     lambda s: check_gemm_nt(s, torch.bfloat16, 33, 136, 72, 64, True, 0, False)),
    ("gemv: decoded nibble order swapped (the byte table puts the even element's level second)", "cuda/nf4_gemv_kernel.cuh",
     r"GemvLevelPair v\{kNF4CodebookDev\[j\], lo\}", "GemvLevelPair v{lo, kNF4CodebookDev[j]}", 1, "gemv",
     lambda s: check_gemv(s, torch.bfloat16, 5, 192, 1024, 132, "several")),
    ("gemm NN: ldmatrix .trans flipped in the decoded-W (B operand) load", "cuda/nf4_mma_kernel.cuh",
     r"ldmatrix_x4<true>\(r, sB", "ldmatrix_x4<false>(r, sB", 1, "mma",
     lambda s: check_gemm_nn(s, torch.bfloat16, 33, 136, 72, 64, True, 0)),
    ("gemm: swizzle XOR removed on the A-operand ldmatrix read only (stores stay swizzled)",
     "cuda/nf4_mma_kernel.cuh", r"return swz_a\(wm \* kWarpM \+ \(lane & 15\), ks \* 2 \+ \(lane >> 4\)\);",
     "return (wm * kWarpM + (lane & 15)) * kBK + (ks * 2 + (lane >> 4)) * 8;", 1, "mma",
     lambda s: check_gemm_nt(s, torch.bfloat16, 33, 136, 72, 64, True, 0, False)),
    # pipeline and synchronization: what only an execution with real barriers and async copies can show
    ("gemm: cp.async.wait_group leaves the current tile's group in flight", "cuda/nf4_mma_kernel.cuh",
     r"cp_async_wait<kStages - 2>\(\);", "cp_async_wait<kStages - 1>();", 1, "mma",
     lambda s: check_gemm_nt(s, torch.bfloat16, 33, 136, 200, 64, True, 0, False)),
    ("gemm: the barrier between the decode of Bd and its ldmatrix reads removed", "cuda/nf4_mma_kernel.cuh",
     r"(g\.decode\([^;]*\);[^\n]*\n\s*)__syncthreads\(\);", r"\1", 1, "mma",
     lambda s: check_gemm_nt(s, torch.bfloat16, 33, 136, 200, 64, True, 0, False)),
    ("gemm: the barrier before the next LoRA rank chunk overwrites the tiles removed", "cuda/nf4_mma_kernel.cuh",
     r"(g\.mma_steps\(acc, sA, sB, ksteps, wm, wn, lane\);\s*)__syncthreads\(\);", r"\1", 1, "mma",
     lambda s: check_gemm_nt(s, torch.bfloat16, 33, 136, 72, 64, True, 80, False)),
    ("gemv: split-K's last CTA test off by one (no CTA runs the epilogue)", "cuda/nf4_gemv_kernel.cuh",
     r"== args\.splits - 1;", "== args.splits;", 1, "gemv",
     lambda s: check_gemv(s, torch.bfloat16, 5, 192, 1024, 132, "several")),
    ("gemv: split-K counter not reset for the next launch", "cuda/nf4_gemv_kernel.cuh",
     r"if \(tid == 0\) args\.counters\[blockIdx\.x\] = 0;", ";", 1, "gemv",
     lambda s: check_gemv(s, torch.bfloat16, 5, 192, 1024, 132, "several")),
]
# Removing the XOR inside swz() itself changes every producer and consumer of the tiles alike: a layout
# that is still consistent (only the bank conflicts come back), so the results must stay exact — checked too.
EQUIVALENT_MUTATIONS = [
    ("gemm: swizzle XOR removed in swz() (all tiles unswizzled alike)", "cuda/nf4_mma_kernel.cuh",
     r"\(\(chunk \^ \(row & 7\)\) << 3\)", "(chunk << 3)", 1, "mma",
     lambda s: check_gemm_nt(s, torch.bfloat16, 33, 136, 72, 64, True, 17, True)),
]


def _mutated_sim(tmp_path: Path, rule, file, pattern, repl, count, unit) -> _sim.Sim:
    src = _sim.build_mod.default_csrc()
    dst = tmp_path / "csrc"
    shutil.copytree(src / "include", dst / "include")
    shutil.copytree(src / "cuda", dst / "cuda")
    path = dst / file
    text, n = re.subn(pattern, repl, path.read_text())
    assert n == count, (f"mutation rule '{rule}' no longer applies: /{pattern}/ matched {n} times in csrc/{file} "
                        f"(expected {count}); update MUTATIONS in tests/test_simulated_kernels.py")
    path.write_text(text)
    return _sim.Sim.load(dst, units=[unit])


@pytest.mark.parametrize("rule,file,pattern,repl,count,unit,check", MUTATIONS, ids=[f"{i}-" + m[0].split(":")[0]
                                                                                 for i, m in enumerate(MUTATIONS)])
def test_simulated_suite_catches_mutation(sim, tmp_path, rule, file, pattern, repl, count, unit, check):
    check(sim)  # the unmutated kernel passes the very check that must fail below
    mutant = _mutated_sim(tmp_path, rule, file, pattern, repl, count, unit)
    with pytest.raises((AssertionError, _sim.SimError)):
        check(mutant)


@pytest.mark.parametrize("rule,file,pattern,repl,count,unit,check", EQUIVALENT_MUTATIONS, ids=["swz"])
def test_simulated_equivalent_mutation_still_passes(sim, tmp_path, rule, file, pattern, repl, count, unit, check):
    check(_mutated_sim(tmp_path, rule, file, pattern, repl, count, unit))
