"""GPU benchmark of the NF4 linear kernels (run by bench/gpu_check.sh on a lent H200; any CUDA GPU works).

Two tables, every ratio measured side by side in this one run:

1. Small M (decode): nf4_linear at M = 1..16 for 4096x4096, 4096x14336 and 14336x4096 (N x K). Each timing
   rotates over distinct copies of the weight totalling > 240 MB (more than 4x the H200's 60 MB L2, so the
   weights come from HBM, not the cache) and replays a CUDA graph of those calls (no launch overhead).
   Reported: us per call, effective GB/s (packed W + scales + x + y) and % of the device-to-device copy
   bandwidth measured at the start (bytes read + written); dense bf16 cuBLAS F.linear (same rotation) for scale.
2. Training (M = 4096, 8192, bf16, r = 16): forward and forward+backward of one QLoRA layer (raw ops), ours vs
   a dense bf16 cuBLAS LoRA layer and vs dequantize-then-cuBLAS. Goal (DESIGN.md section 4): f+b within 1.1x
   of dense at M >= 4096.
3. QLoRA layer with autograd at M = 512..2048 vs real bitsandbytes Linear4bit + PEFT LoRA when bitsandbytes
   runs here (gpu_check.sh installs the carried wheel), else vs the stand-in dequantize_nf4 + cuBLAS, labelled
   "STAND-IN" in every row. Goal: >= 1.2x faster.
4. One optimizer step with the state resident: PagedAdamW / PagedAdamW8bit vs torch.optim.AdamW(fused=True), on
   one large tensor and on 448 LoRA-sized tensors (per-tensor overhead). Goal: PagedAdamW within 1.2x.
The kernel columns name the CUDA kernels that ran (from the profiler), so a silent fallback is visible.
--budget-s stops starting rows after that many seconds: every table loop checks the deadline before each row
(the rows left out say so); --out is rewritten after every table.

usage: python bench/bench_gpu.py [--out results.md] [--quick] [--budget-s S]
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


def gemv_table(shapes, ms, bw: float, deadline: float = float("inf")) -> tuple[list[str], list[list]]:
    header = ["N x K", "M", "kernel", "us/call", "GB/s", "% copy BW", "dense bf16 us", "dense/ours"]
    rows = []
    for N, K in shapes:
        if time.time() > deadline:
            rows += [[f"{N}x{K}", M, "skipped: time budget", *[float("nan")] * 5] for M in ms]
            continue
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
            if time.time() > deadline:
                rows.append([f"{N}x{K}", M, "skipped: time budget", *[float("nan")] * 5])
                continue
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

    def ours_fb_frozen_x():  # the first layer / frozen inputs: no grad-input NF4 GEMM (compute_grad_input=False)
        _, u = ours_fwd()
        return ops.nf4_lora_linear_backward(gy, x, u, *wb, K, A, B, s, True, False)

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
    t_oz = event_time(ours_fb_frozen_x, 10)
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
        t_oz * 1e3,
    ]


def training_table(shapes, ms, r: int = 16, deadline: float = float("inf")) -> tuple[list[str], list[list]]:
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
        "ours f+b, x frozen ms",
    ]
    rows = []
    dt = torch.bfloat16
    s = 2.0
    for N, K in shapes:
        w = lowrank_ext.quantize_nf4(torch.randn(N, K, device="cuda", dtype=dt) / K**0.5, 64, True)
        A = torch.randn(r, K, device="cuda", dtype=dt) / K**0.5
        B = torch.randn(N, r, device="cuda", dtype=dt) / r**0.5
        for M in ms:
            if time.time() > deadline:
                rows.append([f"{N}x{K}", M, "skipped: time budget", "", *[float("nan")] * 9])
                continue
            rows.append(train_row(N, K, M, w, A, B, s))
        del w
        torch.cuda.empty_cache()
    return header, rows


def bnb_peft_baseline(r: int):
    """A factory of real bitsandbytes Linear4bit + PEFT LoRA layers, or (None, why not)."""
    try:
        import bitsandbytes as bnb
        import peft
    except Exception as e:  # noqa: BLE001 - any failure means "use the labelled stand-in"
        return None, f"{type(e).__name__}: {e}"

    def make(w_dense: torch.Tensor, alpha: float):
        N, K = w_dense.shape
        lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                                quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(w_dense.cpu(), requires_grad=False, quant_type="nf4",
                                       compress_statistics=True, blocksize=64)
        model = torch.nn.Sequential()
        model.add_module("proj", lin.cuda())  # .cuda() quantizes with bitsandbytes' CUDA kernel
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0)
        pm = peft.get_peft_model(model, cfg)
        for name, prm in pm.named_parameters():
            if "lora_" in name:
                prm.data = prm.data.to(torch.bfloat16)  # bf16 adapters, as ours
        return pm

    try:  # a smoke test: the CUDA library of bitsandbytes loads and runs here
        make(torch.randn(64, 64, dtype=torch.bfloat16), 2.0 * r)(torch.randn(2, 64, device="cuda", dtype=torch.bfloat16))
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return make, f"bitsandbytes {bnb.__version__} + peft {peft.__version__}"


def peft_table(shapes, ms, r: int = 16, deadline: float = float("inf")) -> tuple[list[str], list[list], str]:
    """Training step (forward + backward, autograd) of one QLoRA layer: ours vs bitsandbytes + PEFT.
    Without bitsandbytes the baseline is the stand-in dequantize_nf4 + cuBLAS + separate LoRA GEMMs,
    labelled as such in every row."""
    make, why = bnb_peft_baseline(r)
    label = why if make is not None else f"STAND-IN deq+cuBLAS (no bitsandbytes: {why})"
    header = ["N x K", "M", "baseline", "ours f+b ms", "baseline f+b ms", "baseline/ours"]
    rows = []
    dt = torch.bfloat16
    s, alpha = 2.0, 2.0 * r
    for N, K in shapes:
        wd = torch.randn(N, K, device="cuda", dtype=dt) / K**0.5
        w = lowrank_ext.quantize_nf4(wd, 64, True)
        A = (torch.randn(r, K, device="cuda", dtype=dt) / K**0.5).requires_grad_()
        B = (torch.randn(N, r, device="cuda", dtype=dt) / r**0.5).requires_grad_()
        base = make(wd, alpha) if make is not None else None
        for M in ms:
            if time.time() > deadline:
                rows.append([f"{N}x{K}", M, "skipped: time budget", float("nan"), float("nan"), float("nan")])
                continue
            x = torch.randn(M, K, device="cuda", dtype=dt, requires_grad=True)
            gy = torch.randn(M, N, device="cuda", dtype=dt)

            def ours(x=x, gy=gy, w=w, A=A, B=B):
                lowrank_ext.ops.nf4_lora_linear(x, w, A, B, s).backward(gy)

            def baseline(x=x, gy=gy, w=w, A=A, B=B, base=base):
                if base is not None:
                    base(x).backward(gy)
                else:  # the stand-in: what bitsandbytes + PEFT do, with our dequantize
                    y = F.linear(x, w.dequantize(dt)) + s * F.linear(F.linear(x, A), B)
                    y.backward(gy)

            t_o, t_b = event_time(ours, 10), event_time(baseline, 10)
            rows.append([f"{N}x{K}", M, "bnb+PEFT" if base is not None else "STAND-IN", t_o * 1e3, t_b * 1e3,
                         t_b / t_o])
        torch.cuda.empty_cache()
    return header, rows, label


def optimizer_table(n_params: int, deadline: float = float("inf")) -> tuple[list[str], list[list]]:
    """One optimizer step, state resident on the GPU: PagedAdamW / PagedAdamW8bit vs AdamW(fused=True)."""
    from lowrank_ext.optim import PagedAdamW, PagedAdamW8bit

    header = ["params", "optimizer", "step ms", "torch fused ms", "ours/fused"]
    shape = (n_params // 4096, 4096)
    hyper = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}
    rows = []

    def step_time(opt_cls, **kw):
        p = torch.nn.Parameter(torch.randn(shape, device="cuda") * 0.02)
        p.grad = torch.randn_like(p) * 1e-3
        opt = opt_cls([p], **hyper, **kw)
        opt.step()  # creates (and pages in) the state
        t = event_time(opt.step, 10)
        del opt, p
        torch.cuda.empty_cache()
        return t

    t_ref = step_time(torch.optim.AdamW, fused=True)
    for cls in (PagedAdamW, PagedAdamW8bit):
        if time.time() > deadline:
            rows.append([f"{n_params / 1e6:.0f}M", cls.__name__, "skipped: time budget", t_ref * 1e3, float("nan")])
            continue
        t = step_time(cls)
        rows.append([f"{n_params / 1e6:.0f}M", cls.__name__, t * 1e3, t_ref * 1e3, t / t_ref])

    # Many small tensors: the LoRA A [16, 4096] and B [4096, 16] of 224 projections (448 tensors, 29M params):
    # per-tensor overhead (op calls, launches, the prefetch: one paged_prefetch_batch per step) dominates here.
    def many_time(opt_cls, **kw):
        ps = [torch.nn.Parameter(torch.randn(*(16, 4096) if i % 2 == 0 else (4096, 16), device="cuda") * 0.02)
              for i in range(448)]
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-3
        opt = opt_cls(ps, **hyper, **kw)
        opt.step()
        t = event_time(opt.step, 10)
        del opt, ps
        torch.cuda.empty_cache()
        return t

    if time.time() < deadline:
        t_ref_many = many_time(torch.optim.AdamW, fused=True)
        for cls in (PagedAdamW, PagedAdamW8bit):
            if time.time() > deadline:
                rows.append(["448 x 64K", cls.__name__, "skipped: time budget", t_ref_many * 1e3, float("nan")])
                continue
            t = many_time(cls)
            rows.append(["448 x 64K", cls.__name__, t * 1e3, t_ref_many * 1e3, t / t_ref_many])
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
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="stop starting new rows after this many seconds (rows left out say so)")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not lowrank_ext.has_cuda_kernels():
        print("bench_gpu: needs a CUDA GPU and a CUDA build of lowrank_ext")
        return 1
    t0 = time.time()
    deadline = t0 + args.budget_s
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
    ms = [1, 2, 4, 8, 16]
    train_shapes, train_ms = [(4096, 4096), (14336, 4096)], [4096, 8192]
    peft_shapes, peft_ms = [(4096, 4096), (14336, 4096)], [512, 1024, 2048]
    n_opt = 64 * 2**20
    if args.quick:
        gemv_shapes, ms, train_shapes, train_ms = gemv_shapes[:1], [1, 16], train_shapes[:1], [4096]
        peft_shapes, peft_ms, n_opt = peft_shapes[:1], [512], 16 * 2**20
    sections = []

    def write() -> None:  # after every table: a killed run keeps what it measured
        if not args.out:
            return
        head = (f"{prop.name}, {prop.multi_processor_count} SMs, torch {torch.__version__}, CUDA {torch.version.cuda}. "
                f"Device-to-device copy bandwidth (read + write), measured in this run: {bw / 1e12:.2f} TB/s. "
                f"Command: `python bench/bench_gpu.py` (from bench/gpu_check.sh).\n\n")
        with open(args.out, "w") as f:
            f.write(head + "\n\n".join(sections) + "\n")

    gh, gr = gemv_table(gemv_shapes, ms, bw, deadline=deadline)
    print_table("small-M NF4 GEMV (bf16, blocksize 64, double quant; CUDA-graph replays over > 240 MB)", gh, gr)
    sections.append("### Small-M GEMV (nf4_linear, bf16, blocksize 64 + double quant)\n\n"
                    "Goal (DESIGN.md section 4): >= 75% of copy bandwidth at M = 1..16, weights rotated beyond L2 "
                    f"(> 240 MB), CUDA-graph replays.\n\n{md_table(gh, gr)}")
    write()
    print(f"[{time.time() - t0:.0f} s]", flush=True)
    th, tr = training_table(train_shapes, train_ms, deadline=deadline)
    print_table("training layer (bf16, r = 16): ours vs dense bf16 cuBLAS LoRA vs dequantize-then-cuBLAS", th, tr)
    sections.append("### Training layer vs dense bf16 cuBLAS + LoRA (raw ops, bf16, r = 16)\n\n"
                    "Goal: forward + backward within 1.1x of dense (f+b ours/dense <= 1.1) at M >= 4096; never a "
                    "dense W in memory. (mma.sync kernels; wgmma on Hopper is the follow-up.)\n\n"
                    f"{md_table(th, tr)}")
    write()
    print(f"[{time.time() - t0:.0f} s]", flush=True)
    ph, pr, label = peft_table(peft_shapes, peft_ms, deadline=deadline)
    print_table(f"QLoRA layer f+b with autograd: ours vs {label}", ph, pr)
    sections.append("### QLoRA layer forward + backward (autograd) vs bitsandbytes + PEFT\n\n"
                    f"Baseline: {label}. Goal: >= 1.2x faster (baseline/ours >= 1.2) at M = 512-2048.\n\n"
                    f"{md_table(ph, pr)}")
    write()
    print(f"[{time.time() - t0:.0f} s]", flush=True)
    if time.time() < deadline:
        oh, orows = optimizer_table(n_opt, deadline=deadline)
        print_table("optimizer step, state resident: ours vs torch.optim.AdamW(fused=True)", oh, orows)
        sections.append("### Paged optimizer step (state resident) vs torch.optim.AdamW(fused=True)\n\n"
                        f"Goal: PagedAdamW within 1.2x (ours/fused <= 1.2).\n\n{md_table(oh, orows)}")
    else:
        sections.append("### Paged optimizer step\n\nskipped: time budget")
    write()
    print(f"[{time.time() - t0:.0f} s]", flush=True)
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
