"""CUDA kernels: NF4 format ops bit-exact with the CPU, the fused linear ops against float64 math on every
dispatch path (tensor-core GEMV M <= 16, tensor-core GEMM M > 16, SIMT fp32 / forced), opcheck, torch.compile,
CUDA graphs, memory. Everything needing a GPU skips without one; `test_cubins_for_every_arch` runs here.

Paths are forced with LOWRANK_EXT_FORCE_KERNEL=gemv|mma|simt (csrc/cuda/nf4_linear.cu); the default picks by
shape. Tolerances: |ours - fp64| <= 4 x |torch's own result at that precision - fp64| + 1e-5 x max |fp64|.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

import lowrank_ext
from lowrank_ext._reference.nf4 import NF4_CODEBOOK, dynamic_map

CUDA_OK = torch.cuda.is_available() and lowrank_ext.has_cuda_kernels()
pytestmark = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and a CUDA build of lowrank_ext")
ops = torch.ops.lowrank_ext
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@contextlib.contextmanager
def force_kernel(path: str | None):
    old = os.environ.get("LOWRANK_EXT_FORCE_KERNEL")
    if path is None:
        os.environ.pop("LOWRANK_EXT_FORCE_KERNEL", None)
    else:
        os.environ["LOWRANK_EXT_FORCE_KERNEL"] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LOWRANK_EXT_FORCE_KERNEL", None)
        else:
            os.environ["LOWRANK_EXT_FORCE_KERNEL"] = old


def _weight_input(numel: int, dtype: torch.dtype, blocksize: int, seed: int = 0) -> torch.Tensor:
    """randn with outliers and, when there is room, an all-zero block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g)
    x[torch.randint(0, numel, (max(1, numel // 500),), generator=g)] *= 40.0
    if numel >= 3 * blocksize:
        x[blocksize : 2 * blocksize] = 0.0
    return x.to(dtype)


# ------------------------------------------------------------------------------------------------
# NF4 format: CUDA == CPU, byte for byte
# ------------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("numel", [1, 7, 1000, 33 * 65, 3 * 4096 + 17])
def test_quantize_matches_cpu(dtype, blocksize, numel):
    x = _weight_input(numel, dtype, blocksize)
    p_cpu, a_cpu = ops.quantize_nf4(x, blocksize)
    p_gpu, a_gpu = ops.quantize_nf4(x.cuda(), blocksize)
    assert torch.equal(a_gpu.cpu(), a_cpu)
    assert torch.equal(p_gpu.cpu(), p_cpu)


@needs_cuda
def test_quantize_non_contiguous_input():
    w = torch.randn(96, 160)
    p_cpu, a_cpu = ops.quantize_nf4(w.t().contiguous(), 64)
    p_gpu, a_gpu = ops.quantize_nf4(w.cuda().t(), 64)
    assert torch.equal(p_gpu.cpu(), p_cpu) and torch.equal(a_gpu.cpu(), a_cpu)


@needs_cuda
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_quantize_rejects_non_finite(bad):
    x = torch.randn(1000, device="cuda")
    x[700] = bad
    with pytest.raises(
        ValueError,
        match=r"lowrank_ext::quantize_nf4: x must contain only finite values, got NaN/Inf in block 10 ",
    ):
        ops.quantize_nf4(x, 64)


@needs_cuda
@pytest.mark.parametrize("nb", [1, 255, 256, 1000, 70000])
def test_double_quant_exact_given_the_offset(nb):
    g = torch.Generator().manual_seed(nb)
    absmax = torch.rand(nb, generator=g) * 3 + 0.01
    absmax[nb // 2] = 50.0  # an outlier block
    qmap = dynamic_map()
    q_gpu, a2_gpu, off_gpu = (t.cpu() for t in ops.double_quant(absmax.cuda(), qmap.cuda()))
    q_cpu, a2_cpu, off_cpu = ops.double_quant(absmax, qmap)
    # offset: torch's CUDA mean (a different summation order than the CPU's): equal up to rounding
    torch.testing.assert_close(off_gpu, off_cpu, rtol=2e-6, atol=0)
    # given that offset, everything else is exact: recompute it in fp32 with single roundings
    c = absmax - off_gpu
    pad = torch.zeros(-(-nb // 256) * 256)
    pad[:nb] = c.abs()
    a2_ref = pad.view(-1, 256).amax(1)
    assert torch.equal(a2_gpu, a2_ref)
    s = c * (1.0 / a2_ref).repeat_interleave(256)[:nb]
    q_ref = (qmap[None, :] - s[:, None]).abs().argmin(dim=1)  # argmin: first minimum = lowest code
    assert torch.equal(q_gpu.long(), q_ref)
    if torch.equal(off_gpu, off_cpu):
        assert torch.equal(q_gpu, q_cpu) and torch.equal(a2_gpu, a2_cpu)


def _bundle(w: lowrank_ext.NF4Weight) -> tuple:
    return (w.packed, w.absmax, w.nested_absmax, w.nested_map, w.offset, w.blocksize)


@needs_cuda
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("numel", [1, 17, 4096 + 33, 70001])
def test_dequantize_matches_cpu_and_reference(double_quant, out_dtype, blocksize, numel):
    w = lowrank_ext.quantize_nf4(_weight_input(numel, torch.float32, blocksize), blocksize, double_quant)
    out_gpu = ops.dequantize_nf4(*_bundle(w.to("cuda")), numel, out_dtype).cpu()
    # the spec: NF4[code] * absmax_hat in fp32 (absmax_hat = map[q] * absmax2 + offset, two roundings)
    codes = torch.stack([w.packed.view(-1) >> 4, w.packed.view(-1) & 15], 1).view(-1)[:numel].long()
    if double_quant:
        scale = w.nested_map[w.absmax.long()] * w.nested_absmax.repeat_interleave(256)[: w.absmax.numel()]
        scale = scale + w.offset
    else:
        scale = w.absmax
    ref = (NF4_CODEBOOK[codes] * scale.repeat_interleave(blocksize)[:numel]).to(out_dtype)
    assert torch.equal(out_gpu, ref)
    out_cpu = ops.dequantize_nf4(*_bundle(w), numel, out_dtype)
    # If this fails only with double_quant, the CPU build contracts map*absmax2+offset into an FMA
    # (compile the CPU kernels with -ffp-contract=off).
    assert torch.equal(out_gpu, out_cpu)


@needs_cuda
def test_dequantize_unaligned_packed():
    w = lowrank_ext.quantize_nf4(torch.randn(64, 96), 64, double_quant=False).to("cuda")
    shifted = torch.empty(w.packed.numel() + 1, dtype=torch.uint8, device="cuda")
    shifted[1:] = w.packed.view(-1)
    out = ops.dequantize_nf4(shifted[1:], w.absmax, None, None, None, 64, 64 * 96, torch.float32)
    assert torch.equal(out, ops.dequantize_nf4(*_bundle(w), 64 * 96, torch.float32))


@needs_cuda
def test_format_errors_on_cuda():
    w = lowrank_ext.quantize_nf4(torch.randn(64, 64), 64).to("cuda")
    with pytest.raises(ValueError, match=r"lowrank_ext::quantize_nf4: blocksize must be one of .*, got 48"):
        ops.quantize_nf4(torch.randn(64, device="cuda"), 48)
    with pytest.raises(TypeError, match=r"lowrank_ext::quantize_nf4: x must be float32, float16 or bfloat16"):
        ops.quantize_nf4(torch.randn(64, device="cuda", dtype=torch.float64), 64)
    with pytest.raises(
        ValueError, match=r"lowrank_ext::dequantize_nf4: absmax must be on the same device as packed"
    ):
        ops.dequantize_nf4(
            w.packed, w.absmax.cpu(), w.nested_absmax, w.nested_map, w.offset, 64, 4096, torch.float32
        )
    with pytest.raises(ValueError, match=r"lowrank_ext::double_quant: nested_map must be on the same device"):
        ops.double_quant(torch.rand(10, device="cuda"), dynamic_map())
    with pytest.raises(ValueError, match=r"lowrank_ext::double_quant: nested_map must be sorted ascending, got map\[0\]"):
        ops.double_quant(torch.rand(10, device="cuda"), dynamic_map().flip(0).cuda())


@needs_cuda
def test_format_opcheck_and_compile():
    x = torch.randn(32, 96, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(ops.quantize_nf4.default, (x, 64))
    packed, absmax = ops.quantize_nf4(x, 64)
    torch.library.opcheck(ops.double_quant.default, (absmax, dynamic_map().cuda()))
    torch.library.opcheck(
        ops.dequantize_nf4.default, (packed, absmax, None, None, None, 64, x.numel(), torch.bfloat16)
    )

    qmap = dynamic_map().cuda()

    def roundtrip(t):
        packed, absmax = ops.quantize_nf4(t, 64)
        q, a2, off = ops.double_quant(absmax, qmap)
        return ops.dequantize_nf4(packed, q, a2, qmap, off, 64, t.numel(), torch.float32)

    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), roundtrip(x))


# ------------------------------------------------------------------------------------------------
# Fused linear ops vs float64 math
# ------------------------------------------------------------------------------------------------


def _make_case(M, N, K, r, dtype, blocksize=64, double_quant=True, bias=True, seed=0, lead=()):
    g = torch.Generator().manual_seed(seed)
    w32 = torch.randn(N, K, generator=g) / K**0.5
    w_cpu = lowrank_ext.quantize_nf4(w32.to(dtype), blocksize, double_quant)
    deq64 = w_cpu.dequantize(torch.float32).to("cuda", torch.float64)  # the CPU's fp32 code × scale
    w = w_cpu.to("cuda")
    x = torch.randn(*lead, M, K, generator=g).to("cuda", dtype)
    A = (torch.randn(r, K, generator=g) / K**0.5).to("cuda", dtype)
    B = (torch.randn(N, r, generator=g) / r**0.5).to("cuda", dtype)
    b = torch.randn(N, generator=g).to("cuda", dtype) if bias else None
    return w, deq64, x, A, B, b


def _check_close(ours, ref64, torch_result, what):
    """ours within 4x torch's own error at this precision (plus a floor of 1e-5 of the magnitude: far below
    any indexing/scale bug, which shows as an O(1) relative error)."""
    err = (ours.double() - ref64).abs().max().item()
    err_torch = (torch_result.double() - ref64).abs().max().item()
    floor = 1e-5 * ref64.abs().max().item() + 1e-12
    assert err <= 4 * err_torch + floor, f"{what}: max error {err:.3g} vs torch's {err_torch:.3g}"


def _forward_check(M, N, K, r, dtype, path, blocksize=64, double_quant=True, bias=True):
    w, deq64, x, A, B, b = _make_case(M, N, K, r, dtype, blocksize, double_quant, bias)
    s = 2.0
    with force_kernel(path):
        y, u = ops.nf4_lora_linear(x, x, *_bundle(w), N, A, B, s, b)
        y_plain = ops.nf4_linear(x, *_bundle(w), N, b)
    x64 = x.double()  # float64 references on the GPU (real LLM shapes are too slow in fp64 on a CPU)
    u64 = x64 @ A.double().T
    y64 = x64 @ deq64.T + (b.double() if bias else 0)
    deq_t = deq64.to(dtype)
    y_t = torch.nn.functional.linear(x, deq_t, b)
    _check_close(y_plain, y64, y_t, "nf4_linear")
    ylora64 = y64 + s * u64 @ B.double().T
    ylora_t = y_t + s * (x @ A.T) @ B.T
    _check_close(y, ylora64, ylora_t, "nf4_lora_linear")
    assert y.shape == (M, N) and u.shape == (M, r) and y.dtype == dtype


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 5, 8, 13, 16])
@pytest.mark.parametrize("N,K", [(192, 256), (1000, 576), (256, 4096)])
def test_gemv_forward(dtype, M, N, K):
    _forward_check(M, N, K, 8, dtype, "gemv")


@needs_cuda
@pytest.mark.parametrize("blocksize", [32, 128, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
def test_gemv_blocksizes(blocksize, double_quant):
    _forward_check(3, 320, 1024, 4, torch.bfloat16, "gemv", blocksize, double_quant, bias=False)


@needs_cuda
def test_gemv_is_deterministic_and_graph_capturable():
    w, _, x, A, B, b = _make_case(4, 512, 4096, 16, torch.bfloat16)
    with force_kernel("gemv"):
        y1, _ = ops.nf4_lora_linear(x, x, *_bundle(w), 512, A, B, 1.5, b)
        y2, _ = ops.nf4_lora_linear(x, x, *_bundle(w), 512, A, B, 1.5, b)
        assert torch.equal(y1, y2)  # split-K partials are summed in a fixed order
        graph = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            ops.nf4_lora_linear(x, x, *_bundle(w), 512, A, B, 1.5, b)  # warm-up outside capture
            with torch.cuda.graph(graph):
                y_graph, _ = ops.nf4_lora_linear(x, x, *_bundle(w), 512, A, B, 1.5, b)
        torch.cuda.current_stream().wait_stream(s)
        for _ in range(3):  # replays reuse the split-K counters: they must be left at zero
            graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y_graph, y1)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 5, 64, 130])
@pytest.mark.parametrize("N,K", [(192, 200), (300, 193), (1024, 768)])
def test_simt_forward(dtype, M, N, K):
    _forward_check(M, N, K, 4, dtype, "simt")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [17, 64, 130, 512])
def test_default_path_large_m(dtype, M):
    _forward_check(M, 1024, 1024, 16, dtype, None)  # tensor cores where launch_nf4_mma_nt accepts


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forced_mma_forward(dtype):
    _forward_check(256, 512, 1024, 16, dtype, "mma")


@needs_cuda
@pytest.mark.parametrize("path", [None, "simt"])
def test_3d_and_non_contiguous_x(path):
    # The ops take 2-D x (as on the CPU); the Python wrapper flattens leading dims.
    w, deq64, x, A, B, b = _make_case(5, 384, 512, 8, torch.bfloat16, lead=(3,))
    with force_kernel(path):
        y = lowrank_ext.ops.nf4_lora_linear(x, w, A, B, 2.0, b)
    x64 = x.double()
    y64 = x64 @ deq64.T + 2.0 * (x64 @ A.double().T) @ B.double().T + b.double()
    y_t = torch.nn.functional.linear(x, deq64.to(x.dtype), b) + 2.0 * (x @ A.T) @ B.T
    _check_close(y, y64, y_t, "3-D x through the wrapper")
    assert y.shape == (3, 5, 384)
    with pytest.raises(ValueError, match=re.escape(
        "lowrank_ext::nf4_linear: x must be 2-D, got 3-D tensor of shape [3, 5, 512]"
    )):
        ops.nf4_linear(x, *_bundle(w), 384, b)
    w, deq64, x, _, _, b = _make_case(8, 256, 512, 8, torch.float32)
    xt = x.t().contiguous().t()  # same values, column-major strides
    xs = torch.randn(8, 1024, device="cuda")[:, ::2]  # stride 2 in the last dim
    for xx in (xt, xs):
        with force_kernel(path):
            y = ops.nf4_linear(xx, *_bundle(w), 256, b)
        ref = xx.double() @ deq64.T + b.double()
        _check_close(y, ref, torch.nn.functional.linear(xx, deq64.float(), b), "strided x")


def _backward_check(M, N, K, r, dtype, path, into_x):
    w, deq64, x, A, B, _ = _make_case(M, N, K, r, dtype, bias=False)
    s = 0.5
    gy = torch.randn(M, N, device="cuda", dtype=dtype)
    _, u = ops.nf4_lora_linear(x, x, *_bundle(w), N, A, B, s, None)
    with force_kernel(path):
        gx, gA, gB, gxl = ops.nf4_lora_linear_backward(gy, x, u, *_bundle(w), K, A, B, s, into_x)
        gx_plain = ops.nf4_linear_grad_input(gy, *_bundle(w), K)
    gy64, x64, A64, B64, u64 = (t.double() for t in (gy, x, A, B, u))
    gu64 = s * gy64 @ B64
    gx64 = gy64 @ deq64
    deq_t = deq64.to(dtype)
    gx_t = gy @ deq_t
    gu_t = s * gy @ B
    _check_close(gx_plain, gx64, gx_t, "grad_input")
    _check_close(gB, s * gy64.T @ u64, s * gy.T @ u, "grad_B")
    _check_close(gA, gu64.T @ x64, gu_t.T @ x, "grad_A")
    if into_x:
        _check_close(gx, gx64 + gu64 @ A64, gx_t + gu_t @ A, "grad_x (fused)")
        assert gxl.numel() == 0
    else:
        _check_close(gx, gx64, gx_t, "grad_x")
        _check_close(gxl, gu64 @ A64, gu_t @ A, "grad_x_lora")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 5, 64, 130])
@pytest.mark.parametrize("into_x", [True, False])
def test_backward(dtype, M, into_x):
    _backward_check(M, 384, 320, 8, dtype, None, into_x)


@needs_cuda
@pytest.mark.parametrize("M,N,K", [(7, 300, 193), (64, 256, 512)])
def test_backward_simt(M, N, K):
    _backward_check(M, N, K, 4, torch.bfloat16, "simt", True)
    _backward_check(M, N, K, 4, torch.float32, "simt", False)


@needs_cuda
@pytest.mark.parametrize("double_quant", [False, True])
def test_row_sqnorm(double_quant):
    w_cpu = lowrank_ext.quantize_nf4(torch.randn(300, 193), 64, double_quant)
    sq = ops.nf4_row_sqnorm(*_bundle(w_cpu.to("cuda")), 300, 193)
    ref = (w_cpu.dequantize(torch.float32).double() ** 2).sum(1)
    torch.testing.assert_close(sq.cpu().double(), ref, rtol=1e-5, atol=0)


@needs_cuda
@pytest.mark.slow
@pytest.mark.parametrize("N,K", [(4096, 4096), (14336, 4096), (4096, 14336), (576, 1536)])
@pytest.mark.parametrize("M", [1, 16, 2048])
def test_llm_shapes(N, K, M):
    _forward_check(M, N, K, 16, torch.bfloat16, None, double_quant=True, bias=False)


@needs_cuda
def test_linear_errors_on_cuda():
    """The shared checks (nf4_linear_args.h) on CUDA: the CPU's wording (test_linear.py), no float64."""
    w, _, x, A, B, b = _make_case(4, 64, 128, 4, torch.bfloat16)
    gy = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    u = torch.randn(4, 4, device="cuda", dtype=torch.bfloat16)
    V, T = ValueError, TypeError
    cases = [  # (call, exception, message)
        (lambda: ops.nf4_linear(x[:, :96], *_bundle(w), 64, None), V,
         "nf4_linear: packed must hold ceil(out_features * in_features / 2) = 3072 bytes for [64, 96], got 4096"),
        (lambda: ops.nf4_linear(x, *_bundle(w), 64, b.float()), T,
         "nf4_linear: bias must have x's dtype BFloat16, got Float"),
        (lambda: ops.nf4_linear(x, *_bundle(w), 64, b[:32]), V,
         "nf4_linear: bias must have shape [64] (out_features), got [32]"),
        (lambda: ops.nf4_lora_linear(x, x, *_bundle(w), 64, A, B[:, :3], 1.0, None), V,
         "nf4_lora_linear: lora_B must have shape [64, 4] (out_features, r = lora_A.shape[0]), got [64, 3]"),
        (lambda: ops.nf4_lora_linear(x, x, *_bundle(w), 64, A[:, :64], B, 1.0, None), V,
         "nf4_lora_linear: lora_A must have shape [4, 128] (r, in_features), got [4, 64]"),
        (lambda: ops.nf4_lora_linear(x, x[:2], *_bundle(w), 64, A, B, 1.0, None), V,
         "nf4_lora_linear: x_lora must have shape [4, 128] (x's shape), got [2, 128]"),
        (lambda: ops.nf4_lora_linear(x, x, *_bundle(w), 64, A, B, float("nan"), None), V,
         "nf4_lora_linear: scaling must be finite, got nan"),
        (lambda: ops.nf4_lora_linear_backward(gy, x, u[:, :3], *_bundle(w), 128, A, B, 1.0, True), V,
         "nf4_lora_linear_backward: u must have shape [4, 4] (grad_y.shape[0], r), got [4, 3]"),
        (lambda: ops.nf4_linear_grad_input(gy[None], *_bundle(w), 128), V,
         "nf4_linear_grad_input: grad_y must be 2-D, got 3-D tensor of shape [1, 4, 64]"),
        (lambda: ops.nf4_linear(x[None], *_bundle(w), 64, None), V,
         "nf4_linear: x must be 2-D, got 3-D tensor of shape [1, 4, 128]"),
        (lambda: ops.nf4_linear(x, *_bundle(w.to("cpu")), 64, None), V,
         "nf4_linear: packed must be on the same device as x (cuda:0), got cpu"),
        (lambda: ops.nf4_lora_linear(x, x, *_bundle(w), 64, A.cpu(), B, 1.0, None), V,
         "nf4_lora_linear: lora_A must be on the same device as x (cuda:0), got cpu"),
        (lambda: ops.nf4_linear(x.double(), *_bundle(w), 64, None), T,
         "nf4_linear: x must be float32, float16 or bfloat16, got Double"),
    ]
    for call, exc, msg in cases:
        with pytest.raises(exc, match="^" + re.escape("lowrank_ext::" + msg)):
            call()
    with (
        pytest.raises(
            ValueError, match=r"LOWRANK_EXT_FORCE_KERNEL=gemv must be used with fp16/bf16, M <= 16"
        ),
        force_kernel("gemv"),
    ):
        ops.nf4_linear(x.float(), *_bundle(w), 64, None)


@needs_cuda
def test_no_dense_weight_in_memory():
    """Forward + backward at M = 16 and 256 never allocate anything near an N x K weight (bf16: 32 MB)."""
    N = K = 4096
    w, _, _, A, B, b = _make_case(1, N, K, 16, torch.bfloat16)
    for M in (16, 256):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        gy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _, u = ops.nf4_lora_linear(x, x, *_bundle(w), N, A, B, 1.0, b)
        ops.nf4_lora_linear_backward(gy, x, u, *_bundle(w), K, A, B, 1.0, True)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        assert peak < N * K, (
            f"M={M}: peak {peak / 2**20:.1f} MiB, a dense bf16 W is {2 * N * K / 2**20:.0f} MiB"
        )


# ------------------------------------------------------------------------------------------------
# opcheck / torch.compile through the Python wrappers (lowrank_ext/ops/linear.py registers the fakes)
# ------------------------------------------------------------------------------------------------


def _need_linear_wrappers():
    if not hasattr(lowrank_ext.ops, "nf4_lora_linear"):
        pytest.skip("lowrank_ext.ops.nf4_lora_linear (fake kernels, autograd) is not in this build")


@needs_cuda
@pytest.mark.parametrize("M", [3, 40])
def test_linear_opcheck_cuda(M):
    _need_linear_wrappers()
    w, _, x, A, B, b = _make_case(M, 128, 256, 4, torch.bfloat16)
    torch.library.opcheck(ops.nf4_linear.default, (x, *_bundle(w), 128, b))
    torch.library.opcheck(ops.nf4_lora_linear.default, (x, x, *_bundle(w), 128, A, B, 2.0, b))
    y, u = ops.nf4_lora_linear(x, x, *_bundle(w), 128, A, B, 2.0, b)
    gy = torch.randn_like(y)
    torch.library.opcheck(ops.nf4_lora_linear_backward.default, (gy, x, u, *_bundle(w), 256, A, B, 2.0, True))
    torch.library.opcheck(ops.nf4_linear_grad_input.default, (gy, *_bundle(w), 256))
    torch.library.opcheck(ops.nf4_row_sqnorm.default, (*_bundle(w), 128, 256))


@needs_cuda
def test_linear_compile_fullgraph_cuda():
    _need_linear_wrappers()
    w, _, x, A, B, b = _make_case(6, 256, 512, 8, torch.bfloat16)
    A.requires_grad_(True)
    B.requires_grad_(True)
    x.requires_grad_(True)

    def step(x, A, B):
        return lowrank_ext.ops.nf4_lora_linear(x, w, A, B, 2.0, bias=b).float().square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grads_eager = torch.autograd.grad(step(x, A, B), (x, A, B))
    grads_comp = torch.autograd.grad(compiled(x, A, B), (x, A, B))
    for ge, gc in zip(grads_eager, grads_comp):
        torch.testing.assert_close(gc, ge)


# ------------------------------------------------------------------------------------------------
# The build: machine code for every arch (runs without a GPU)
# ------------------------------------------------------------------------------------------------


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates = [os.path.join(cuda_home, "bin", "cuobjdump")]
    with contextlib.suppress(ImportError):
        import triton  # its package carries a cuobjdump

        candidates.append(
            os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        )
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def test_cubins_for_every_arch():
    info = lowrank_ext.build_info()
    if not info["cuda"]:
        pytest.skip("this build has no CUDA kernels")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump found")
    so = glob.glob(os.path.join(os.path.dirname(lowrank_ext.__file__), "_C*.so"))
    assert so, "lowrank_ext/_C*.so not found"
    elf = subprocess.run([tool, "--list-elf", so[0]], capture_output=True, text=True, check=True).stdout
    for arch in info["cuda_archs"]:
        num = arch.replace("+PTX", "").replace(".", "")
        assert f"sm_{num}" in elf, f"no sm_{num} cubin in {so[0]}:\n{elf}"
        if arch.endswith("+PTX"):
            ptx = subprocess.run(
                [tool, "--list-ptx", so[0]], capture_output=True, text=True, check=True
            ).stdout
            assert f"sm_{num}" in ptx or f"compute_{num}" in ptx, f"no PTX for {arch}:\n{ptx}"
    gemv = "_ZN11lowrank_ext4cuda15nf4_gemv_kernelI13__nv_bfloat16EEvNS0_8GemvArgsE"
    sass = subprocess.run(
        [tool, "--dump-sass", "--function", gemv, so[0]], capture_output=True, text=True, check=True
    ).stdout
    assert "HMMA" in sass, "the small-M kernel must run on tensor cores (no HMMA in its SASS)"


# ------------------------------------------------------------------------------------------------
# GPU readiness (issue 13): alignment, subnormal clamp, workspace, paths, autocast — and static checks
# ------------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift", [1, 2, 3, 7])
@pytest.mark.parametrize("numel", [16 * 64, 4096 + 33, 70001])
def test_dequantize_out_misaligned_buffer(dtype, shift, numel):
    """An out= view that is not 16-byte aligned takes scalar stores (a vector store would raise
    "misaligned address" and kill the context); the values equal the CPU's, and CUDA still works after."""
    w = lowrank_ext.quantize_nf4(_weight_input(numel, torch.float32, 64), 64).to("cuda")
    base = torch.full((numel + shift,), float("nan"), dtype=dtype, device="cuda")
    out = base[shift:]
    assert out.data_ptr() % 16 != 0
    ops.dequantize_nf4_out(*_bundle(w), numel, out)
    assert lowrank_ext.last_kernel_path("dequantize") == "scalar-store"
    assert torch.equal(out.cpu(), ops.dequantize_nf4(*_bundle(w.to("cpu")), numel, dtype))
    aligned = torch.empty(numel, dtype=dtype, device="cuda")
    ops.dequantize_nf4_out(*_bundle(w), numel, aligned)
    assert lowrank_ext.last_kernel_path("dequantize") == "vec16"
    torch.cuda.synchronize()  # a sticky error would surface here
    assert torch.equal(aligned, out)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_subnormal_blocks_match_cpu(dtype):
    """absmax below 1e-38: the reciprocal uses max(absmax, 1e-38) as on the CPU and in bitsandbytes (an
    infinite reciprocal gave codes 0/15); absmax itself is stored unclamped."""
    x = torch.randn(64 * 5 + 6) * 1e-40
    x[64:128] = torch.randn(64)  # a normal block between subnormal ones; the partial tail is subnormal too
    x = x.to(dtype)
    p_gpu, a_gpu = ops.quantize_nf4(x.cuda(), 64)
    p_cpu, a_cpu = ops.quantize_nf4(x, 64)
    assert lowrank_ext.last_kernel_path("quantize") in ("avx2", "scalar")
    assert torch.equal(p_gpu.cpu(), p_cpu) and torch.equal(a_gpu.cpu(), a_cpu)
    assert float(a_cpu[0]) < 1e-38  # stored as is


@needs_cuda
def test_gemv_workspace_is_persistent():
    """Split-K GEMV calls allocate only their output once the (device, stream) workspace exists; a call
    that needs a larger workspace regrows it; results stay exact and deterministic."""
    w, _, x, _, _, b = _make_case(16, 256, 4096, 8, torch.bfloat16)  # 2 row groups: many K splits
    with force_kernel("gemv"):
        ref = ops.nf4_linear(x, *_bundle(w), 256, b).clone()
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()["allocation.all.allocated"]
        for _ in range(5):
            y = ops.nf4_linear(x, *_bundle(w), 256, b)
        torch.cuda.synchronize()
        assert torch.cuda.memory_stats()["allocation.all.allocated"] - before == 5  # y only, no scratch
        assert torch.equal(y, ref)
        w2, _, x2, _, _, _ = _make_case(16, 1024, 8192, 8, torch.bfloat16, seed=1)  # more partials: regrow
        y2 = ops.nf4_linear(x2, *_bundle(w2), 1024, None)
        assert torch.equal(ops.nf4_linear(x, *_bundle(w), 256, b), ref)
        assert torch.equal(ops.nf4_linear(x2, *_bundle(w2), 1024, None), y2)


@needs_cuda
def test_gemv_workspace_per_stream():
    """Two streams running split-K GEMVs at once use two workspaces: both results exact."""
    w, _, x, _, _, b = _make_case(8, 384, 4096, 8, torch.bfloat16)
    with force_kernel("gemv"):
        ref = ops.nf4_linear(x, *_bundle(w), 384, b).clone()
        streams = [torch.cuda.Stream() for _ in range(2)]
        outs = [[], []]
        for s in streams:
            s.wait_stream(torch.cuda.current_stream())
        for _ in range(20):
            for i, s in enumerate(streams):
                with torch.cuda.stream(s):
                    outs[i].append(ops.nf4_linear(x, *_bundle(w), 384, b))
        torch.cuda.synchronize()
    assert all(torch.equal(y, ref) for ys in outs for y in ys)


def _ulp(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mant = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    tiny = {torch.float16: 2.0**-14, torch.bfloat16: 2.0**-126}[dtype]
    return torch.pow(2.0, torch.floor(torch.log2(t.abs().clamp_min(tiny))) - mant)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K,r", [(1, 320, 512, 16), (8, 1000, 576, 8), (16, 256, 4096, 64)])
def test_paths_agree_within_the_documented_bound(dtype, M, N, K, r):
    """docs/kernels.md, "Results across paths": gemv, mma and simt multiply the same rounded operands
    (deq(W) and s·u rounded once to the dtype), so for every pair of paths
        |y_p - y_q| <= ulp(max(|y_p|, |y_q|)) + 2^-20 · S,   S = Σ |x·deq(W)| + Σ |T(s·u)·B| + |bias|,
    and at most 10% of the outputs differ at all (the fp32 order alone changes ~0.3% in fp16, ~0% in bf16 on
    a CPU emulation; a path keeping W in fp32 changes ~42%)."""
    w, deq64, x, A, B, b = _make_case(M, N, K, r, dtype)
    ys = {}
    for path in ("gemv", "mma", "simt"):
        with force_kernel(path):
            ys[path] = ops.nf4_lora_linear(x, x, *_bundle(w), N, A, B, 1.5, b)[0].double()
            assert lowrank_ext.last_kernel_path("nt") == path
    su = (1.5 * (x.float() @ A.float().T)).to(dtype).double()
    s_abs = x.double().abs() @ deq64.abs().T + su.abs() @ B.double().abs().T + b.double().abs()
    names = list(ys)
    for i, p in enumerate(names):
        for q in names[i + 1:]:
            diff = (ys[p] - ys[q]).abs()
            bound = _ulp(torch.maximum(ys[p].abs(), ys[q].abs()), dtype) + 2.0**-20 * s_abs
            assert bool((diff <= bound).all()), f"{p} vs {q}: worst {(diff / bound).max().item():.2f} x the bound"
            assert (diff > 0).float().mean().item() <= 0.10, f"{p} vs {q}: too many outputs differ"


@needs_cuda
@pytest.mark.parametrize("M", [1, 64])
def test_autocast_cuda_takes_the_half_precision_kernels(M):
    """fp32 activations under torch.autocast("cuda") run the bf16 kernels (GEMV / mma), not fp32 SIMT."""
    w, _, x, A, B, b = _make_case(M, 512, 1024, 8, torch.float32)
    xs, As, Bs = (t.clone().requires_grad_(True) for t in (x, A, B))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = lowrank_ext.ops.nf4_lora_linear(xs, w, As, Bs, 2.0, b)
        assert lowrank_ext.last_kernel_path("nt") == ("gemv" if M <= 16 else "mma")
        y_aten = torch.nn.functional.linear(xs, w.dequantize(torch.float32), b)
    assert y.dtype == y_aten.dtype == torch.bfloat16
    y_explicit = lowrank_ext.ops.nf4_lora_linear(x.bfloat16(), w, A.bfloat16(), B.bfloat16(), 2.0, b.bfloat16())
    assert torch.equal(y, y_explicit)
    y.float().sum().backward()
    assert xs.grad.dtype == torch.float32 and As.grad is not None and Bs.grad is not None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_adamw_ptx_has_only_explicitly_rounded_float_math(tmp_path):
    """Static (no GPU): the AdamW kernels' PTX has no mul/add/sub/div/sqrt without .rn (which ptxas could
    fuse) and exactly one fma per update — the first moment's lerp, as the CPU's std::fma — so one fma per
    sqrt. That is what makes CUDA and the CPU (-ffp-contract=off) agree bit for bit."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = tmp_path / "adamw_ptx.cu"
    src.write_text(
        '#include "adamw_kernel.cuh"\n'
        "namespace o = lowrank_ext::optim_cuda;\n"
        "template __global__ void o::adamw32_kernel<float>(float*, const float*, float*, float*, int64_t,"
        " o::AdamWKernelScalars);\n"
        "template __global__ void o::adamw32_kernel<__nv_bfloat16>(__nv_bfloat16*, const __nv_bfloat16*, float*,"
        " float*, int64_t, o::AdamWKernelScalars);\n"
        "template __global__ void o::adamw8bit_kernel<float>(float*, const float*, uint8_t*, uint8_t*, float*,"
        " float*, const float*, const float*, int64_t, o::AdamWKernelScalars);\n"
    )
    cmd = ["nvcc", "-std=c++20", "-O3", "-arch=sm_80", "-ptx", f"-I{root}/csrc/cuda", f"-I{root}/csrc/include",
           str(src), "-o", str(tmp_path / "k.ptx")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr
    ptx = (tmp_path / "k.ptx").read_text()
    bodies = re.split(r"\.visible \.entry\s+", ptx)[1:]
    assert len(bodies) == 3
    for body in bodies:
        name = body.split("(", 1)[0]
        fmas = re.findall(r"\bfma\.\S*f32\b", body)
        assert set(fmas) <= {"fma.rn.f32"}, f"{name}: {sorted(set(fmas))}"
        assert len(fmas) == body.count("sqrt.rn.f32") > 0, f"{name}: a contracted multiply-add beside the lerp's"
        loose = re.findall(r"\b(?:mul|add|sub|div|sqrt)\.(?:approx\.|full\.)?(?:ftz\.)?f32\b", body)
        assert not loose, f"{name}: float ops without explicit rounding: {sorted(set(loose))}"
        assert "mul.rn.f32" in body and "add.rn.f32" in body
    assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx
