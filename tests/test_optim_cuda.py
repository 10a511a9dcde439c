"""CUDA side of the optimizers: managed (paged) state memory, paging by prefetch, the fused kernels vs the
CPU ops and torch.optim.AdamW. Skips without a GPU. Oversubscription (state larger than free GPU memory)
is opt-in only (LOWRANK_EXT_TEST_OVERSUBSCRIBE=1): asking a shared GPU for more managed memory than it has
free can hang it (docs/kernels.md, optimizers and paged memory)."""

from __future__ import annotations

import gc
import os

import pytest
import torch

import lowrank_ext
from lowrank_ext import ops
from lowrank_ext._reference.optim import optim_maps
from lowrank_ext.optim import AdamW8bit, PagedAdamW, PagedAdamW8bit

CUDA_OK = torch.cuda.is_available() and lowrank_ext.has_cuda_kernels()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and CUDA kernels")]

HYPER = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}
OP_HYPER = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2}
HOST, NEVER = -1, -2


def _can_prefetch() -> bool:
    return ops.paged_prefetch_supported(torch.cuda.current_device())


def test_paged_zeros_are_managed_and_page_by_prefetch():
    like = torch.empty(1024, 1024, device="cuda")
    t = ops.paged_zeros_like(like, torch.float32)
    assert t.is_cuda and t.shape == like.shape and t.dtype == torch.float32
    assert ops.paged_is_managed(t) and not ops.paged_is_managed(like)
    assert torch.count_nonzero(t).item() == 0
    dev = torch.cuda.current_device()
    if not _can_prefetch():  # WDDM / some vGPU: prefetch is a no-op, pages migrate on demand
        ops.paged_prefetch(t, HOST)
        t.add_(1.5)
        assert torch.all(t == 1.5).item() and ops.paged_last_prefetch_location(t) == NEVER
        return
    ops.paged_prefetch(t, HOST)
    torch.cuda.synchronize()
    assert ops.paged_last_prefetch_location(t) == HOST
    t.add_(1.5)  # the GPU touches host-resident pages: they migrate on demand
    ops.paged_prefetch(t, dev)
    torch.cuda.synchronize()
    assert ops.paged_last_prefetch_location(t) == dev
    assert torch.all(t == 1.5).item()
    assert ops.paged_last_prefetch_location(like) == NEVER


def test_paged_memory_freed_on_delete():
    nbytes = 256 << 20
    like = torch.empty(nbytes // 4, device="cuda")
    torch.cuda.synchronize()
    free0, _ = torch.cuda.mem_get_info()
    t = ops.paged_zeros_like(like, torch.float32)
    ops.paged_prefetch(t, torch.cuda.current_device())
    torch.cuda.synchronize()
    free1, _ = torch.cuda.mem_get_info()
    assert free0 - free1 >= nbytes * 0.9  # resident on the GPU
    del t
    gc.collect()
    torch.cuda.synchronize()
    free2, _ = torch.cuda.mem_get_info()
    assert free2 - free1 >= nbytes * 0.9  # cudaFree ran in the deleter


def _assert_same_bits(gpu: list[torch.Tensor], cpu: list[torch.Tensor], what: str) -> None:
    for i, (b, a) in enumerate(zip(gpu, cpu)):
        b = b.cpu()
        same = (b == a) | (torch.isnan(b) & torch.isnan(a)) if a.is_floating_point() else b == a
        assert bool(same.all()), f"{what}: tensor {i} differs in {int((~same).sum())} of {a.numel()} elements"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_kernels_match_cpu_exactly(dtype):
    """CUDA and CPU AdamW states agree bit for bit, step after step: the CUDA kernels write every fp32
    operation as an explicitly rounded intrinsic (__fmul_rn, __fadd_rn, ...) in the order of cpu/adamw.cpp,
    which is built with -ffp-contract=off (no FMAs on either side)."""
    n = 256 * 40 + 17
    gen = torch.Generator().manual_seed(0)
    p = (torch.randn(n, generator=gen) * 0.1).to(dtype)
    grads = [(torch.randn(n, generator=gen) * 0.01).to(dtype) for _ in range(5)]
    m, v = torch.randn(n, generator=gen) * 1e-3, torch.rand(n, generator=gen) * 1e-5
    v[:7] = 0.0  # sqrt(0) / bc2 + eps
    cpu = [t.clone() for t in (p, m, v)]
    gpu = [t.cuda() for t in (p, m, v)]
    for t, g in enumerate(grads, start=1):
        ops.adamw_step(cpu[0], g, cpu[1], cpu[2], step=t, **OP_HYPER)
        assert lowrank_ext.last_kernel_path("adamw") in ("avx2", "scalar")
        ops.adamw_step(gpu[0], g.cuda(), gpu[1], gpu[2], step=t, **OP_HYPER)
        assert lowrank_ext.last_kernel_path("adamw") == "adamw32"  # the CUDA kernel ran, not a CPU fallback
        _assert_same_bits(gpu, cpu, f"adamw_step, step {t}")
    q1, q2 = optim_maps()
    s1 = torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)
    s2 = torch.randint(128, 256, (n,), generator=gen, dtype=torch.uint8)
    a1, a2 = torch.rand(41, generator=gen) * 1e-2, torch.rand(41, generator=gen) * 1e-4
    a1[3] = 0.0  # an all-zero block
    cpu = [t.clone() for t in (p, s1, s2, a1, a2)]
    gpu = [t.cuda() for t in (p, s1, s2, a1, a2)]
    for t, g in enumerate(grads, start=1):
        ops.adamw8bit_step(cpu[0], g, *cpu[1:], q1, q2, step=t, **OP_HYPER)
        assert lowrank_ext.last_kernel_path("adamw") in ("avx2", "scalar")  # the CPU kernel, not a reference
        ops.adamw8bit_step(gpu[0], g.cuda(), *gpu[1:], q1.cuda(), q2.cuda(), step=t, **OP_HYPER)
        assert lowrank_ext.last_kernel_path("adamw") == "adamw8bit"
        _assert_same_bits(gpu, cpu, f"adamw8bit_step, step {t}")


@pytest.mark.parametrize("side_stream", [False, True])
def test_prefetch_batch_moves_every_managed_tensor(side_stream):
    """paged_prefetch_batch: one call moves every managed tensor of the list (to the host, then back), skips
    ordinary CUDA tensors, and keeps the values. CUDA 13 takes cudaMemPrefetchBatchAsync: on a side stream
    directly; on torch's default (legacy) stream, which that API refuses, on a pool stream fenced by events
    (from 8 tensors on; fewer take one cudaMemPrefetchAsync each): 9 tensors here, so both run the batch API."""
    dev = torch.cuda.current_device()
    like = torch.empty(3 << 18, device="cuda")  # 1-3 MiB each: no two tensors share a page
    paged = [ops.paged_zeros_like(like[: (1 << 18) * (i % 3 + 1)], torch.float32) for i in range(9)]
    plain = torch.zeros(1000, device="cuda")
    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i, t in enumerate(paged):
            t.fill_(float(i + 1))
        ops.paged_prefetch_batch([*paged, plain], HOST)
        stream.synchronize()
        want = HOST if _can_prefetch() else NEVER
        assert [ops.paged_last_prefetch_location(t) for t in paged] == [want] * 9
        assert ops.paged_last_prefetch_location(plain) == NEVER
        ops.paged_prefetch_batch(paged, dev)
        stream.synchronize()
        assert [ops.paged_last_prefetch_location(t) for t in paged] == [dev if _can_prefetch() else NEVER] * 9
        ops.paged_prefetch_batch(paged[:2], HOST)  # below 8 on the default stream: the per-tensor loop
        stream.synchronize()
        moved_back = dev if _can_prefetch() else NEVER
        assert [ops.paged_last_prefetch_location(t) for t in paged[:3]] == [want, want, moved_back]
    for i, t in enumerate(paged):
        assert torch.all(t == float(i + 1)).item()
    ops.paged_prefetch_batch([], dev)  # nothing to do
    with pytest.raises(ValueError, match=r"lowrank_ext::paged_prefetch_batch: tensors\[1\] must be on cuda:\d+ "
                                         r"like tensors\[0\], got cpu"):
        ops.paged_prefetch_batch([paged[0], torch.zeros(4)], dev)


def test_paged_optimizer_prefetches_once_per_step(monkeypatch):
    """Every paged state tensor of a step goes to the GPU in ONE paged_prefetch_batch call, before the updates."""
    calls: list[int] = []
    real = ops.paged_prefetch_batch

    def counting(tensors, device):
        calls.append(len(tensors))
        real(tensors, device)

    monkeypatch.setattr(ops, "paged_prefetch_batch", counting)
    params = [torch.nn.Parameter(torch.randn(64, 128, device="cuda")) for _ in range(5)]
    opt = PagedAdamW(params, **HYPER)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.step()
    assert calls == [10, 10]  # 5 params x (exp_avg, exp_avg_sq), one call per step
    assert all(ops.paged_is_managed(opt.state[p]["exp_avg"]) for p in params)


def test_prefetch_support_is_reported():
    dev = torch.cuda.current_device()
    assert isinstance(ops.paged_prefetch_supported(dev), bool)
    with pytest.raises(ValueError, match=r"lowrank_ext::paged_prefetch_supported: device must be a GPU ordinal"):
        ops.paged_prefetch_supported(-1)


def test_paged_memory_and_cuda_graph_capture():
    """Never a cudaFree (nor a cudaMallocManaged) while the current stream captures: creating paged state
    there is refused clearly, a paged tensor that dies during capture is freed after it, and prefetch is
    skipped inside the graph. The capture itself stays valid."""
    like = torch.empty(1 << 20, device="cuda")
    doomed = ops.paged_zeros_like(like, torch.float32)
    keep = ops.paged_zeros_like(like, torch.float32)
    x = torch.ones(1024, device="cuda")
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = x * 2  # warm-up
        with torch.cuda.graph(graph):
            y = x * 2
            ops.paged_prefetch(keep, torch.cuda.current_device())  # skipped: a hint, not capturable
            del doomed  # its deleter runs now, inside the capture: queued, not freed
            with pytest.raises(ValueError, match=r"lowrank_ext::paged_zeros_like: the current stream must not be "
                                                 r"capturing a CUDA graph"):
                ops.paged_zeros_like(like, torch.float32)
    torch.cuda.current_stream().wait_stream(s)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.all(y == 2).item()
    torch.cuda.synchronize()
    free0, _ = torch.cuda.mem_get_info()
    ops.paged_prefetch(keep, torch.cuda.current_device())  # outside capture: frees the queued buffer too
    torch.cuda.synchronize()
    assert torch.cuda.mem_get_info()[0] >= free0
    del keep
    torch.cuda.synchronize()


@pytest.mark.parametrize("opt_cls", [PagedAdamW, PagedAdamW8bit, AdamW8bit])
def test_optimizer_on_cuda_matches_torch_and_pages(opt_cls):
    shape = (1024, 4097)
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(shape, generator=gen) * 0.1
    grads = [torch.randn(shape, generator=gen) * 0.01 for _ in range(20)]
    p, p_ref = torch.nn.Parameter(p0.cuda()), torch.nn.Parameter(p0.cuda())
    opt = opt_cls([p], **HYPER)
    ref = torch.optim.AdamW([p_ref], **HYPER)
    for i, g in enumerate(grads):
        p.grad, p_ref.grad = g.cuda(), g.cuda()
        opt.step()
        ref.step()
        if i == 10:
            opt.page_out()  # the next step prefetches the state back
            torch.cuda.synchronize()
            paged = [
                t
                for t in opt.state[p].values()
                if isinstance(t, torch.Tensor) and t.is_cuda and ops.paged_is_managed(t)
            ]
            assert bool(paged) == (opt_cls is not AdamW8bit)
            if _can_prefetch():
                assert all(ops.paged_last_prefetch_location(t) == HOST for t in paged)
    if opt_cls is PagedAdamW:
        torch.testing.assert_close(p, p_ref, atol=1e-6, rtol=1e-5)
    else:
        assert (p - p_ref).abs().mean() < 6e-5


def test_state_dict_moves_between_cpu_and_cuda():
    shape = (64, 100)
    p_cpu = torch.nn.Parameter(torch.randn(shape))
    opt = PagedAdamW8bit([p_cpu], **HYPER)
    p_cpu.grad = torch.randn(shape)
    opt.step()
    p_gpu = torch.nn.Parameter(p_cpu.detach().cuda())
    opt_gpu = PagedAdamW8bit([p_gpu], **HYPER)
    opt_gpu.load_state_dict(opt.state_dict())
    st = opt_gpu.state[p_gpu]
    assert (
        st["state1"].is_cuda and ops.paged_is_managed(st["state1"]) and st["absmax1"].dtype == torch.float32
    )
    g = torch.randn(shape)
    p_cpu.grad, p_gpu.grad = g, g.cuda()
    opt.step()
    opt_gpu.step()
    torch.testing.assert_close(p_gpu.cpu(), p_cpu.detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(
    os.environ.get("LOWRANK_EXT_TEST_OVERSUBSCRIBE") != "1",
    reason="oversubscribes the GPU; opt in with LOWRANK_EXT_TEST_OVERSUBSCRIBE=1 on a private GPU",
)
def test_paged_state_survives_oversubscription():
    free, _ = torch.cuda.mem_get_info()
    n = int(free * 1.25) // 8  # two fp32 moments: 1.25x the free memory in total
    p = torch.nn.Parameter(torch.zeros(n, device="cuda"))
    p.grad = torch.full_like(p, 1e-3)
    opt = PagedAdamW([p], **HYPER)
    opt.step()
    torch.cuda.synchronize()
    assert torch.isfinite(p[:1000]).all()
