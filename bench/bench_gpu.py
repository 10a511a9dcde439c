"""GPU benchmark of the NF4 linear kernels (run by bench/gpu_check.sh on a lent H200; any CUDA GPU works).

Two tables, every ratio measured side by side in this one run:

1. Small M (decode): nf4_linear at M = 1..16 for 4096x4096, 4096x14336 and 14336x4096 (N x K). Each timing
   rotates over distinct copies of the weight totalling > 240 MB (more than 4x the H200's 60 MB L2, so the
   weights come from HBM, not the cache) and replays a CUDA graph of those calls (no launch overhead).
   Reported: us per call, effective GB/s (packed W + scales + x + y) and % of the device-to-device copy
   bandwidth measured at the start (bytes read + written); dense bf16 cuBLAS F.linear (same rotation) for scale.
2. Training (M = 2048..8192, bf16, r = 16): forward and forward+backward of one QLoRA layer, ours vs a dense
   bf16 cuBLAS LoRA layer and vs dequantize-then-cuBLAS (what bitsandbytes + PEFT do: dequantize W in the
   forward and again in the backward, cuBLAS, separate LoRA GEMMs). Goals (issue 3): forward <= 1.25x dense,
   forward+backward >= 1.5x faster than dequantize-then-cuBLAS.
The kernel column names the CUDA kernel that ran (from the profiler), so a silent fallback is visible.

usage: python bench/bench_gpu.py [--out results.md] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from _timing import print_table

import lowrank_ext

ops = torch.ops.lowrank_ext
ROTATE_BYTES = 256 * 2**20  # > 240 MB of distinct weights per timing


def event_time(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of fn() measured with CUDA events (one event pair per call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (1 GiB buffers)."""
    n = 2**30 // 4
    src = torch.empty(n, dtype=torch.float32, device="cuda").fill_(1.0)
    dst = torch.empty_like(src)
    t = event_time(lambda: dst.copy_(src), reps=20)
    return 2 * n * 4 / t


def graph_time(calls: list, replays: int = 10) -> float:
    """Seconds per call of a CUDA graph that runs every closure in `calls` once (median of replays)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:  # warm-up (allocator, cuBLAS workspaces) outside the capture
            c()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    t = event_time(graph.replay, reps=replays, warmup=1)
    del graph
    return t / len(calls)


def kernel_names(fn) -> str:
    """Names of the CUDA kernels fn() launches (shortened), to show which path ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            n = e.name
            for key in ("nf4_gemv_kernel", "nf4_simt_kernel", "nf4_mma", "gemm", "gemv", "Kernel"):
                if key in n:
                    n = key if key != "Kernel" else n[:24]
                    break
            if n not in names:
                names.append(n[:28])
    return "+".join(names)


def bundle(w: lowrank_ext.NF4Weight) -> tuple:
    return (w.packed, w.absmax, w.nested_absmax, w.nested_map, w.offset, w.blocksize)


def clone_bundle(b: tuple) -> tuple:
    return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in b)


def nf4_bytes(b: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in b if isinstance(t, torch.Tensor))


def gemv_row(N: int, K: int, M: int, weights: list[tuple], dense: list[torch.Tensor], bw: float) -> list:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b0 = weights[0]
    y = ops.nf4_linear(x, *b0, N, None)
    ref = F.linear(x.float(), dense[0].float())
    err = ((y.float() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, f"{N}x{K} M={M}: relative error {err}"
    t = graph_time([lambda wb=wb: ops.nf4_linear(x, *wb, N, None) for wb in weights])
    td = graph_time([lambda d=d: F.linear(x, d) for d in dense])
    moved = nf4_bytes(b0) + x.nbytes + M * N * 2
    kernel = kernel_names(lambda: ops.nf4_linear(x, *b0, N, None))
    return [f"{N}x{K}", M, kernel, t * 1e6, moved / t / 1e9, 100 * moved / t / bw, td * 1e6, td / t]


def gemv_table(shapes, ms, bw: float) -> tuple[list[str], list[list]]:
    header = ["N x K", "M", "kernel", "us/call", "GB/s", "% copy BW", "dense bf16 us", "dense/ours"]
    rows = []
    for N, K in shapes:
        w = lowrank_ext.quantize_nf4(
            torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5, 64, True
        )
        b0 = bundle(w)
        copies = max(2, -(-ROTATE_BYTES // nf4_bytes(b0)))
        weights = [b0] + [clone_bundle(b0) for _ in range(copies - 1)]
        dense0 = w.dequantize(torch.bfloat16)
        dcopies = max(2, -(-ROTATE_BYTES // dense0.nbytes))
        dense = [dense0] + [dense0.clone() for _ in range(dcopies - 1)]
        for M in ms:
            rows.append(gemv_row(N, K, M, weights, dense, bw))
        del weights, dense, dense0, w
        torch.cuda.empty_cache()
    return header, rows


def train_row(
    N: int, K: int, M: int, w: lowrank_ext.NF4Weight, A: torch.Tensor, B: torch.Tensor, s: float
) -> list:
    dt = torch.bfloat16
    wb = bundle(w)
    Wd = w.dequantize(dt)  # the dense baseline's weight (bf16 cuBLAS)
    x = torch.randn(M, K, device="cuda", dtype=dt)
    gy = torch.randn(M, N, device="cuda", dtype=dt)

    def ours_fwd():
        return ops.nf4_lora_linear(x, x, *wb, N, A, B, s, None)

    def ours_fb():
        _, u = ours_fwd()
        return ops.nf4_lora_linear_backward(gy, x, u, *wb, K, A, B, s, True)

    def dense_fwd(W=Wd):
        u = x @ A.t()
        return torch.addmm(F.linear(x, W), u, B.t(), alpha=s), u

    def dense_bwd(u, W=Wd):
        gu = (gy @ B).mul_(s)
        gx = torch.addmm(gy @ W, gu, A)
        return gx, gu.t() @ x, (gy.t() @ u).mul_(s)

    def dense_fb():
        _, u = dense_fwd()
        return dense_bwd(u)

    def deq_fb():  # bitsandbytes + PEFT: dequantize in forward, again in backward
        _, u = dense_fwd(w.dequantize(dt))
        return dense_bwd(u, w.dequantize(dt))

    y, _ = ours_fwd()
    y_ref, _ = dense_fwd()
    err = ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
    assert err < 1e-2, f"{N}x{K} M={M}: forward relative error {err}"
    gx = ours_fb()[0]
    gx_ref = dense_fb()[0]
    err = ((gx.float() - gx_ref.float()).norm() / gx_ref.float().norm()).item()
    assert err < 1e-2, f"{N}x{K} M={M}: grad_x relative error {err}"
    t_of, t_df = event_time(ours_fwd, 10), event_time(dense_fwd, 10)
    t_ob, t_db, t_qb = event_time(ours_fb, 10), event_time(dense_fb, 10), event_time(deq_fb, 10)
    fwd_k = kernel_names(lambda: ops.nf4_linear(x, *wb, N, None))
    bwd_k = kernel_names(lambda: ops.nf4_linear_grad_input(gy, *wb, K))
    return [
        f"{N}x{K}",
        M,
        fwd_k,
        bwd_k,
        t_of * 1e3,
        t_df * 1e3,
        t_of / t_df,
        t_ob * 1e3,
        t_db * 1e3,
        t_qb * 1e3,
        t_ob / t_db,
        t_qb / t_ob,
    ]


def training_table(shapes, ms, r: int = 16) -> tuple[list[str], list[list]]:
    header = [
        "N x K",
        "M",
        "fwd kernel",
        "bwd kernel",
        "ours fwd ms",
        "dense fwd ms",
        "fwd ours/dense",
        "ours f+b ms",
        "dense f+b ms",
        "deq+cuBLAS f+b ms",
        "f+b ours/dense",
        "f+b deq/ours",
    ]
    rows = []
    dt = torch.bfloat16
    s = 2.0
    for N, K in shapes:
        w = lowrank_ext.quantize_nf4(torch.randn(N, K, device="cuda", dtype=dt) / K**0.5, 64, True)
        A = torch.randn(r, K, device="cuda", dtype=dt) / K**0.5
        B = torch.randn(N, r, device="cuda", dtype=dt) / r**0.5
        for M in ms:
            rows.append(train_row(N, K, M, w, A, B, s))
        del w
        torch.cuda.empty_cache()
    return header, rows


def md_table(header, rows) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="write the tables as markdown here")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (smoke test)")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not lowrank_ext.has_cuda_kernels():
        print("bench_gpu: needs a CUDA GPU and a CUDA build of lowrank_ext")
        return 1
    t0 = time.time()
    prop = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    print(
        f"{prop.name}, {prop.multi_processor_count} SMs, free {free / 2**30:.1f} / {total / 2**30:.1f} GiB, "
        f"torch {torch.__version__}, build {lowrank_ext.build_info()}",
        flush=True,
    )
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    gemv_shapes = [(4096, 4096), (4096, 14336), (14336, 4096)]
    train_shapes = [(4096, 4096), (14336, 4096), (4096, 14336)]
    ms = list(range(1, 17))
    train_ms = [2048, 4096, 8192]
    if args.quick:
        gemv_shapes, ms, train_shapes, train_ms = gemv_shapes[:1], [1, 4, 16], train_shapes[:1], [2048]
    gh, gr = gemv_table(gemv_shapes, ms, bw)
    print_table(
        "small-M NF4 GEMV (bf16, blocksize 64, double quant; CUDA-graph replays over > 240 MB)", gh, gr
    )
    print(f"[{time.time() - t0:.0f} s]", flush=True)
    th, tr = training_table(train_shapes, train_ms)
    print_table(
        "training layer (bf16, r = 16): ours vs dense bf16 cuBLAS LoRA vs dequantize-then-cuBLAS", th, tr
    )
    print(f"[{time.time() - t0:.0f} s]", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(
                f"# lowrank_ext GPU results\n\n{prop.name}, {prop.multi_processor_count} SMs, torch "
                f"{torch.__version__}, CUDA {torch.version.cuda}\n\n"
                f"Device-to-device copy bandwidth (read + write), measured in this run: {bw / 1e12:.2f} TB/s\n\n"
                f"Command: `python bench/bench_gpu.py` (from bench/gpu_check.sh)\n\n"
                "## Small-M GEMV (nf4_linear, bf16, blocksize 64 + double quant)\n\n"
                "Goal: >= 75% of copy bandwidth. Rotating > 240 MB of distinct weights, CUDA-graph replays.\n\n"
                f"{md_table(gh, gr)}\n\n"
                "## Training layer (bf16, r = 16, forward and forward+backward)\n\n"
                "Goals: fwd ours/dense <= 1.25; f+b deq/ours >= 1.5.\n\n"
                f"{md_table(th, tr)}\n"
            )
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
