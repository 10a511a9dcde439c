"""Tensor-core NF4 GEMMs (csrc/cuda/nf4_mma*.cu, nf4_mma_kernel.cuh): mma.sync m16n8k16, cp.async, ldmatrix.

Two kinds of tests:
  * here, without a GPU: nvcc turns the kernel files into PTX/SASS and we check that the tensor-core
    kernels really are tensor-core kernels (mma.sync, cp.async, ldmatrix; HMMA/LDGSTS/LDSM in the built
    .so), that ptxas reports no spills for sm80/86/89/90, and that no cuBLAS or dense-W path hides there;
  * on a CUDA GPU (skipped otherwise): the fused ops (M > 16, fp16/bf16, which the dispatcher routes to
    these kernels) against float64 math on awkward shapes, with the error held to at most 2x PyTorch's own
    error at that precision (cuBLAS on the same dequantized operands), and a profiler check that the
    mma kernel is the one that ran — or, for K % 8 != 0, that it did not.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

import lowrank_ext
from lowrank_ext import quantize_nf4

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
MMA_FILES = ["nf4_mma_bf16.cu", "nf4_mma_fp16.cu"]
MMA_SOURCES = ["nf4_mma.cu", "nf4_mma_kernel.cuh", *MMA_FILES]
CUDA_OK = torch.cuda.is_available() and lowrank_ext.has_cuda_kernels()
needs_cuda = pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and CUDA kernels")
needs_sources = pytest.mark.skipif(
    not (CUDA_DIR / "nf4_mma_kernel.cuh").exists(), reason="needs the source tree"
)
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


# ---------------------------------------------------------------------------------------------------
# Without a GPU: what nvcc makes of the kernel files
# ---------------------------------------------------------------------------------------------------
def _nvcc(src: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        "nvcc",
        "-std=c++20",
        "-O3",
        "--expt-relaxed-constexpr",
        f"-I{ROOT / 'csrc' / 'include'}",
        *args,
        str(CUDA_DIR / src),
    ]
    res = subprocess.run(cmd, cwd=tmp_path, check=False, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    return res


def _ptx_functions(ptx: str) -> dict[str, str]:
    """Entry name -> body of each .entry in a PTX file."""
    parts = re.split(r"\.visible \.entry\s+", ptx)[1:]
    return {p.split("(", 1)[0].strip(): p for p in parts}


@needs_sources
@needs_nvcc
@pytest.mark.parametrize("src,ptx_type", [("nf4_mma_bf16.cu", "bf16"), ("nf4_mma_fp16.cu", "f16")])
def test_ptx_uses_tensor_cores_and_async_copies(src, ptx_type, tmp_path):
    _nvcc(src, tmp_path, "-arch=sm_80", "-ptx", "-o", "k.ptx")
    ptx = (tmp_path / "k.ptx").read_text()
    kernels = {k: v for k, v in _ptx_functions(ptx).items() if "nf4_mma_kernel" in k}
    assert len(kernels) == 2, f"expected the NT and NN kernels, got {list(kernels)}"
    for name, body in kernels.items():
        assert f"mma.sync.aligned.m16n8k16.row.col.f32.{ptx_type}.{ptx_type}.f32" in body, name
        assert "cp.async.cg.shared.global" in body, name  # activation tiles, 16 bytes
        assert "cp.async.ca.shared.global" in body, name  # packed NF4 words, 4 bytes
        assert "cp.async.wait_group" in body and "cp.async.commit_group" in body, name
        assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in body, name
        assert "bar.sync" in body, name
    nn = [b for k, b in kernels.items() if "Lb1E" in k]  # template argument kNN = true
    assert len(nn) == 1 and "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in nn[0]
    # No calls out of the kernels (no cuBLAS device API, no printf/malloc): everything is inline.
    assert ".extern .func" not in ptx and "call" not in "".join(kernels.values()).replace("call.uni", "")


@needs_sources
@needs_nvcc
@pytest.mark.parametrize("src", MMA_FILES)
def test_ptxas_no_spills_on_every_default_arch(src, tmp_path):
    archs = ["80", "86", "89", "90"]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    res = _nvcc(src, tmp_path, *gencode, "-Xptxas=-v", "-c", "-o", "k.o")
    report = res.stdout + res.stderr
    props = re.findall(
        r"Compiling entry function '(\S*nf4_mma_kernel\S*)' for 'sm_(\d+)'.*?"
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
        report,
        flags=re.DOTALL,
    )
    assert sorted({arch for _, arch, *_ in props}) == archs, report
    assert len(props) == 2 * len(archs), report
    for name, arch, stack, stores, loads in props:
        assert (stack, stores, loads) == ("0", "0", "0"), (
            f"{name} sm_{arch}: stack {stack}, spills {stores}/{loads}"
        )


@needs_sources
def test_mma_sources_call_no_cublas_and_no_dense_weight():
    for f in MMA_SOURCES:
        text = (CUDA_DIR / f).read_text()
        code = "\n".join(line.split("//", 1)[0] for line in text.splitlines())  # comments may name them
        for banned in (
            "cublas",
            "at::mm",
            "at::matmul",
            "at::linear",
            "dequantize_nf4",
            "cudaMalloc",
            "ATen/",
        ):
            assert banned.lower() not in code.lower(), f"{f} uses {banned}"


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("triton")  # triton wheels carry one; find it without importing triton
    if spec and spec.submodule_search_locations:
        cand = Path(spec.submodule_search_locations[0]) / "backends" / "nvidia" / "bin" / "cuobjdump"
        if cand.exists() and os.access(cand, os.X_OK):
            return str(cand)
    return None


@pytest.mark.skipif(not lowrank_ext.has_cuda_kernels(), reason="the build has no CUDA kernels")
@pytest.mark.skipif(_cuobjdump() is None, reason="needs cuobjdump")
def test_built_library_has_tensor_core_sass():
    so = lowrank_ext._C.__file__
    arch = "sm_90" if "9.0" in ";".join(lowrank_ext.build_info()["cuda_archs"]) else "sm_80"
    res = subprocess.run(
        [_cuobjdump(), "-sass", "-arch", arch, so], check=False, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr
    funcs = re.split(r"\n\s*Function : ", res.stdout)[1:]
    mma = [f for f in funcs if "nf4_mma_kernel" in f.split("\n", 1)[0]]
    assert len(mma) == 4, "expected NT/NN x bf16/fp16 tensor-core kernels in the .so"
    for f in mma:
        assert "HMMA.16816.F32" in f and "LDGSTS" in f and "LDSM" in f, f.split("\n", 1)[0]


# ---------------------------------------------------------------------------------------------------
# On a GPU: the fused ops (routed to these kernels for M > 16, fp16/bf16) vs float64 math
# ---------------------------------------------------------------------------------------------------
def _kernels_run(fn) -> list[str]:
    """Names of the CUDA kernels `fn()` launched."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _assert_path(names: list[str], mma: bool = True) -> None:
    """The tensor-core kernel ran (mma=True) or did not. An empty list means the profiler saw no kernel at
    all (no CUPTI on this machine): the path cannot be checked there, the numbers still are."""
    if not names:
        warnings.warn("torch.profiler recorded no CUDA kernels; the kernel path is unchecked")
        return
    used = any("nf4_mma_kernel" in n for n in names)
    assert used == mma, f"tensor-core kernel {'not ' if mma else ''}used: {names}"


def _weight(N: int, K: int, bs: int, dq: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = quantize_nf4(torch.randn(N, K, generator=g), blocksize=bs, double_quant=dq)
    return w, w.to("cuda")


def _check_close(ours: torch.Tensor, torch_own: torch.Tensor, ref64: torch.Tensor, what: str) -> None:
    """Our error vs float64 must be at most 2x PyTorch's own error at this precision (+ a tiny floor)."""
    err = (ours.double().cpu() - ref64).abs().max().item()
    err_torch = (torch_own.double().cpu() - ref64).abs().max().item()
    floor = 1e-6 * ref64.abs().max().item()
    assert torch.isfinite(ours).all(), what
    assert err <= 2 * err_torch + floor, f"{what}: max error {err:.4g} vs torch's {err_torch:.4g}"


# (M, N, K): M > 16 (tensor-core path); K and N off the 64/128 tiles, K off the blocksize; M off 128.
SHAPES = [(17, 192, 200), (130, 264, 136), (257, 136, 1000)]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("bs,dq", [(32, True), (64, False), (4096, True)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_nt_forward_vs_float64(dtype, M, N, K, bs, dq, with_bias):
    w, wc = _weight(N, K, bs, dq, seed=M + N + K)
    W = w.dequantize(dtype)  # the kernel's operand: fp32 level * scale, rounded once
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype) if with_bias else None
    xc, bc = x.cuda(), (bias.cuda() if with_bias else None)
    y = None

    def run():
        nonlocal y
        y = torch.ops.lowrank_ext.nf4_linear(xc, *wc.tensors(), bs, N, bc)

    _assert_path(_kernels_run(run))
    ref = x.double() @ W.double().T + (bias.double() if with_bias else 0)
    own = torch.nn.functional.linear(xc, W.cuda(), bc)
    _check_close(y, own, ref, f"nt {dtype} {M}x{N}x{K} bs={bs} dq={dq}")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("bs,dq", [(32, False), (64, True), (1024, True)])
def test_nn_grad_input_vs_float64(dtype, M, N, K, bs, dq):
    if N % 8:
        pytest.skip("NN needs N % 8 == 0")
    w, wc = _weight(N, K, bs, dq, seed=M * N + K)
    W = w.dequantize(dtype)
    gy = torch.randn(M, N, generator=torch.Generator().manual_seed(2)).to(dtype)
    gyc = gy.cuda()
    gx = None

    def run():
        nonlocal gx
        gx = torch.ops.lowrank_ext.nf4_linear_grad_input(gyc, *wc.tensors(), bs, K)

    _assert_path(_kernels_run(run))
    _check_close(gx, gyc @ W.cuda(), gy.double() @ W.double(), f"nn {dtype} {M}x{N}x{K} bs={bs} dq={dq}")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("r", [4, 16, 72])  # r not a multiple of 16; r > 64 takes two rank chunks
@pytest.mark.parametrize("M,N,K", [(33, 200, 264), (300, 1032, 520)])
def test_lora_forward_and_backward_vs_float64(dtype, r, M, N, K):
    bs, s = 64, 0.75
    w, wc = _weight(N, K, bs, True, seed=r + M)
    W = w.dequantize(dtype).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, K, generator=g).to(dtype)
    A = (torch.randn(r, K, generator=g) / K**0.5).to(dtype)
    B = (torch.randn(N, r, generator=g) / r**0.5).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    gy = torch.randn(M, N, generator=g).to(dtype)
    xc, Ac, Bc, bc, gyc = x.cuda(), A.cuda(), B.cuda(), bias.cuda(), gy.cuda()
    out = {}

    def fwd():
        out["y"], out["u"] = torch.ops.lowrank_ext.nf4_lora_linear(
            xc, xc, *wc.tensors(), bs, N, Ac, Bc, s, bc
        )

    def bwd():
        out["gx"], *_ = torch.ops.lowrank_ext.nf4_lora_linear_backward(
            gyc, xc, out["u"], *wc.tensors(), bs, K, Ac, Bc, s, True
        )

    _assert_path(_kernels_run(fwd))
    _assert_path(_kernels_run(bwd))
    x64, A64, B64, gy64 = x.double(), A.double(), B.double(), gy.double()
    u64 = x64 @ A64.T
    y64 = x64 @ W.T + s * u64 @ B64.T + bias.double()
    gx64 = gy64 @ W + (s * gy64 @ B64) @ A64  # gy·deq(W) + gu·A, gu = s·gy·B
    Wc = W.to(dtype).cuda()
    u_t = xc @ Ac.T
    y_t = torch.nn.functional.linear(xc, Wc, bc) + s * (u_t @ Bc.T)
    gx_t = gyc @ Wc + (s * (gyc @ Bc)) @ Ac
    _check_close(out["y"], y_t, y64, f"lora fwd {dtype} r={r} {M}x{N}x{K}")
    _check_close(out["gx"], gx_t, gx64, f"lora bwd {dtype} r={r} {M}x{N}x{K}")


@needs_cuda
def test_strided_rows_vs_float64():
    """x with a row stride larger than K (a column slice of a wider, 16-byte aligned tensor)."""
    M, N, K, bs, dtype = 70, 136, 192, 64, torch.bfloat16
    w, wc = _weight(N, K, bs, True, seed=9)
    W = w.dequantize(dtype)
    wide = torch.randn(M, K + 24, generator=torch.Generator().manual_seed(8)).to(dtype)
    x = wide[:, 8 : 8 + K]  # lda = K + 24, base offset 16 bytes
    xc = wide.cuda()[:, 8 : 8 + K]
    y = {}

    def run():
        y["y"] = torch.ops.lowrank_ext.nf4_linear(xc, *wc.tensors(), bs, N, None)

    _assert_path(_kernels_run(run))
    _check_close(y["y"], xc @ W.cuda().T, x.double() @ W.double().T, "strided x")


@needs_cuda
@pytest.mark.parametrize("op", ["nt", "nn"])
def test_unsupported_k_falls_back_and_stays_correct(op):
    """K % 8 != 0: launch_nf4_mma_* returns false (launches nothing); the result is still right."""
    M, N, K, bs, dtype = 40, 64, 196, 64, torch.bfloat16
    w, wc = _weight(N, K, bs, False, seed=7)
    W = w.dequantize(dtype).double()
    a = torch.randn(M, K if op == "nt" else N, generator=torch.Generator().manual_seed(4)).to(dtype)
    ac = a.cuda()
    res = {}

    def run():
        if op == "nt":
            res["o"] = torch.ops.lowrank_ext.nf4_linear(ac, *wc.tensors(), bs, N, None)
        else:
            res["o"] = torch.ops.lowrank_ext.nf4_linear_grad_input(ac, *wc.tensors(), bs, K)

    _assert_path(_kernels_run(run), mma=False)
    ref = a.double() @ (W.T if op == "nt" else W)
    own = ac @ (W.T if op == "nt" else W).to(dtype).cuda()
    _check_close(res["o"], own, ref, f"fallback {op}")


@needs_cuda
@pytest.mark.slow
@pytest.mark.parametrize("M,N,K", [(512, 4096, 4096), (2048, 11008, 4096), (2048, 4096, 11008)])
def test_llama_shapes(M, N, K):
    dtype, bs = torch.bfloat16, 64
    w, wc = _weight(N, K, bs, True, seed=11)
    W = w.dequantize(dtype)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(5)).to(dtype)
    gy = torch.randn(M, N, generator=torch.Generator().manual_seed(6)).to(dtype)
    xc, gyc, Wc = x.cuda(), gy.cuda(), W.cuda()
    y = torch.ops.lowrank_ext.nf4_linear(xc, *wc.tensors(), bs, N, None)
    gx = torch.ops.lowrank_ext.nf4_linear_grad_input(gyc, *wc.tensors(), bs, K)
    # float64 reference on the GPU (CPU float64 at these sizes is slow here)
    ref_y = xc.double() @ Wc.double().T
    ref_gx = gyc.double() @ Wc.double()
    for ours, own, ref, what in ((y, xc @ Wc.T, ref_y, "y"), (gx, gyc @ Wc, ref_gx, "gx")):
        err = (ours.double() - ref).abs().max().item()
        err_t = (own.double() - ref).abs().max().item()
        assert err <= 2 * err_t + 1e-6 * ref.abs().max().item(), f"{what}: {err:.4g} vs torch {err_t:.4g}"
