"""Launch overhead, checked on the CPU: the per-device caches that keep driver queries out of every GEMM launch
(csrc/cuda/per_device.h, used by nf4_mma.cu's supported() and nf4_mma_launch.cuh's shared-memory opt-in), and
the paged optimizer's one prefetch call per step (lowrank_ext/optim.py: _plan_prefetch and step()).

per_device.h is torch- and CUDA-free: this file compiles it with g++ into a small program whose "driver query"
is a counter, and runs it. The CUDA side (a real GPU, real prefetches) is in test_optim_cuda.py.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lowrank_ext import ops
from lowrank_ext import optim as lrx_optim
from lowrank_ext.optim import PagedAdamW, PagedAdamW8bit

ROOT = Path(__file__).resolve().parents[1]

# Each check prints "name ok" or "name FAIL <detail>"; main returns the number of failures.
PROGRAM = r"""
#include "per_device.h"

#include <atomic>
#include <cstdio>
#include <stdexcept>
#include <thread>
#include <vector>

using lowrank_ext::PerDevice;
using lowrank_ext::PerDeviceFlag;
using lowrank_ext::kMaxCachedDevices;

static int failures = 0;
static void check(const char* name, bool ok, long detail) {
  std::printf("%s %s %ld\n", name, ok ? "ok" : "FAIL", detail);
  failures += !ok;
}

int main() {
  {  // once per device, across many calls: the "driver query" runs once per ordinal
    PerDevice<int> cache;
    std::atomic<int> queries{0};
    auto query = [&](int d) { ++queries; return 100 + d; };
    bool values = true;
    for (int rep = 0; rep < 1000; ++rep)
      for (int d = 0; d < 4; ++d) values &= cache.get(d, query) == 100 + d;
    check("once_per_device", queries == 4 && values, queries.load());
  }
  {  // 16 threads racing on 3 devices: still exactly one query per device, every caller sees its value
    PerDevice<int> cache;
    std::atomic<int> queries{0}, wrong{0};
    auto query = [&](int d) { ++queries; std::this_thread::yield(); return 7 * d + 1; };
    std::vector<std::thread> ts;
    for (int t = 0; t < 16; ++t)
      ts.emplace_back([&] {
        for (int rep = 0; rep < 200; ++rep)
          for (int d = 0; d < 3; ++d) wrong += cache.get(d, query) != 7 * d + 1;
      });
    for (auto& t : ts) t.join();
    check("threads_once_per_device", queries == 3 && wrong == 0, queries.load());
  }
  {  // a query that throws stores nothing: the next call queries again (C10_CUDA_CHECK in nf4_mma.cu)
    PerDevice<int> cache;
    int queries = 0;
    try {
      cache.get(1, [&](int) -> int { ++queries; throw std::runtime_error("driver error"); });
    } catch (const std::runtime_error&) {
    }
    const int v = cache.get(1, [&](int) { ++queries; return 5; });
    const int again = cache.get(1, [&](int) { ++queries; return 6; });
    check("throw_retries", queries == 2 && v == 5 && again == 5, queries);
  }
  {  // ordinals outside the table are never cached (correct, only slower)
    PerDevice<int> cache;
    int queries = 0;
    for (int rep = 0; rep < 3; ++rep) cache.get(kMaxCachedDevices, [&](int) { return ++queries; });
    for (int rep = 0; rep < 3; ++rep) cache.get(-1, [&](int) { return ++queries; });
    check("out_of_range_uncached", queries == 6, queries);
  }
  {  // the flag: per device, set only when told (after a successful set-up)
    PerDeviceFlag flag;
    const bool before = flag.test(0) || flag.test(2);
    flag.set(2);
    const bool after = flag.test(2) && !flag.test(0) && !flag.test(3);
    flag.set(kMaxCachedDevices);  // ignored, never true
    check("flag", !before && after && !flag.test(kMaxCachedDevices) && !flag.test(-1), 0);
  }
  return failures;
}
"""


@pytest.fixture(scope="module")
def cache_program(tmp_path_factory) -> Path:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("per_device")
    src, exe = d / "per_device_test.cpp", d / "per_device_test"
    src.write_text(PROGRAM)
    subprocess.run([cxx, "-std=c++17", "-O1", "-pthread", f"-I{ROOT / 'csrc' / 'cuda'}", str(src), "-o", str(exe)],
                   check=True, capture_output=True, timeout=300)
    return exe


def test_per_device_cache_queries_once_per_device(cache_program):
    run = subprocess.run([str(cache_program)], capture_output=True, text=True, timeout=60, check=False)
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    assert set(lines) == {"once_per_device", "threads_once_per_device", "throw_retries", "out_of_range_uncached",
                          "flag"}, run.stdout + run.stderr
    assert run.returncode == 0 and all(v.startswith("ok") for v in lines.values()), run.stdout


def test_launch_paths_use_the_cache():
    """The launch paths take their device facts from per_device.h: no cudaDeviceGetAttribute and no
    cudaFuncSetAttribute outside a cache's compute/set-up, i.e. none per launch."""
    mma = (ROOT / "csrc/cuda/nf4_mma.cu").read_text()
    body = mma[mma.index("bool supported("):mma.index("}  // namespace", mma.index("bool supported("))]
    assert "cudaDeviceGetAttribute" not in body and "device_runs_mma(dev)" in body
    assert "static PerDevice<bool> cache;" in mma
    launch = (ROOT / "csrc/cuda/nf4_mma_launch.cuh").read_text()
    assert launch.count("cudaFuncSetAttribute") == 1 and "if (!smem_configured.test(dev))" in launch


# ---- the paged optimizer: one prefetch call per step -------------------------------------------------
GPU0, GPU1 = torch.device("cuda", 0), torch.device("cuda", 1)


def _budget(limit: int):
    return lambda device: limit


def test_plan_prefetch_chunks():
    plan = lrx_optim._plan_prefetch
    assert plan([], _budget(100)) == []
    # one GPU under the budget: one chunk (updates that page nothing join it)
    assert plan([(GPU0, 10), (None, 0), (GPU0, 20), (GPU0, 30)], _budget(100)) == [(0, 4)]
    assert plan([(None, 0), (None, 0)], _budget(100)) == [(0, 2)]
    # over the budget: a new chunk starts before the update that would exceed it
    assert plan([(GPU0, 40), (GPU0, 40), (GPU0, 40), (GPU0, 40)], _budget(100)) == [(0, 2), (2, 4)]
    # a single update above the budget is a chunk of its own, never an empty chunk
    assert plan([(GPU0, 500), (GPU0, 10), (None, 0), (GPU0, 500)], _budget(100)) == [(0, 1), (1, 3), (3, 4)]
    # a device change starts a chunk (one prefetch call names one device)
    assert plan([(GPU0, 1), (GPU1, 1), (GPU1, 1), (GPU0, 1)], _budget(100)) == [(0, 1), (1, 3), (3, 4)]


class _Recorder:
    """Stands in for the CUDA ops on the CPU: what step() asks for, in order."""

    def __init__(self, monkeypatch, budget: int):
        self.events: list[tuple] = []
        real_step, real_step8 = ops.adamw_step, ops.adamw8bit_step
        monkeypatch.setattr(ops, "paged_prefetch_batch",
                            lambda ts, dev: self.events.append(("prefetch", tuple(t.data_ptr() for t in ts), dev)))
        monkeypatch.setattr(ops, "adamw_step", lambda p, *a, **k: (self.events.append(("update",)),
                                                                   real_step(p, *a, **k)))
        monkeypatch.setattr(ops, "adamw8bit_step", lambda p, *a, **k: (self.events.append(("update",)),
                                                                       real_step8(p, *a, **k)))
        # CPU params page like CUDA ones here: the planning and call pattern are device-independent
        monkeypatch.setattr(lrx_optim._FusedAdamW, "_pages",
                            lambda self, p: self._paged and p.numel() >= self.min_8bit_size)
        monkeypatch.setattr(lrx_optim._FusedAdamW, "_prefetch_budget", lambda self, device: budget)
        # the "device" a prefetch names: here the numel of the param it was taken from (checks which one)
        monkeypatch.setattr(lrx_optim, "_device_index", lambda t: t.numel())


@pytest.mark.parametrize("opt_cls,keys", [(PagedAdamW, ("exp_avg", "exp_avg_sq")),
                                          (PagedAdamW8bit, ("state1", "state2"))])
def test_paged_step_prefetches_once_per_step(monkeypatch, opt_cls, keys):
    rec = _Recorder(monkeypatch, budget=1 << 40)
    big = [torch.nn.Parameter(torch.randn(64, 80)) for _ in range(4)]  # 5120 >= 4096 elements: paged
    small = torch.nn.Parameter(torch.randn(10))                        # below min_8bit_size: not paged
    params = [small, *big]  # the first update pages nothing: the call must name a paged param's device
    opt = opt_cls([{"params": params[:3]}, {"params": params[3:], "lr": 1e-4}])  # two groups, one call
    for _ in range(3):
        rec.events.clear()
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        want = tuple(opt.state[p][k].data_ptr() for p in big for k in keys)
        assert rec.events[0] == ("prefetch", want, 64 * 80), rec.events[0]  # every paged tensor, in param order
        assert rec.events[1:] == [("update",)] * len(params)  # then the updates, no other prefetch
    assert all(int(opt.state[p]["step"]) == 3 for p in params)


def test_paged_step_chunks_interleave_prefetch_and_updates(monkeypatch):
    """Above the budget the step is split: each chunk's prefetch comes right before its own updates, so under
    oversubscription a prefetch does not evict pages that earlier updates have not used yet."""
    per_param = 2 * 64 * 80 * 4  # exp_avg + exp_avg_sq, fp32
    rec = _Recorder(monkeypatch, budget=2 * per_param)
    params = [torch.nn.Parameter(torch.randn(64, 80)) for _ in range(5)]
    opt = PagedAdamW(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    kinds = [e[0] for e in rec.events]
    assert kinds == ["prefetch", "update", "update", "prefetch", "update", "update", "prefetch", "update"]
    assert [len(e[1]) for e in rec.events if e[0] == "prefetch"] == [4, 4, 2]


def test_page_out_is_one_call_per_device(monkeypatch):
    """page_out sends a device's state tensors to the host in one call; with CPU state there is nothing to page."""
    calls = []
    monkeypatch.setattr(ops, "paged_prefetch_batch", lambda ts, dev: calls.append((len(ts), dev)))
    p = torch.nn.Parameter(torch.randn(64, 80))
    opt = PagedAdamW([p])
    p.grad = torch.randn_like(p)
    opt.step()
    opt.page_out()
    assert calls == []  # CPU state: nothing to page
    monkeypatch.setattr(lrx_optim._FusedAdamW, "_paged_tensors", lambda self: iter([torch.zeros(2)] * 3))
    opt.page_out()
    assert calls == [(3, -1)]


def test_paged_prefetch_batch_op_on_cpu():
    """The op on CPU tensors: a no-op that checks its device argument; an empty list is skipped in Python."""
    t = [torch.zeros(3), torch.zeros(5)]
    ops.paged_prefetch_batch(t, -1)
    ops.paged_prefetch_batch([], 0)
    with pytest.raises(ValueError, match=r"lowrank_ext::paged_prefetch_batch: device must be a device ordinal >= 0 "
                                         r"or -1 \(host\), got -3"):
        ops.paged_prefetch_batch(t, -3)
    torch.library.opcheck(torch.ops.lowrank_ext.paged_prefetch_batch, (t, -1))
