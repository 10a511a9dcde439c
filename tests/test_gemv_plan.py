"""The small-M GEMV's split plan (csrc/cuda/gemv_plan.h: plan_gemv, gemv_ctas_per_sm), as plain C++.

No GPU and no extension build: a 20-line driver is compiled with g++ against the header the CUDA launcher
(csrc/cuda/nf4_linear.cu) and the kernel simulator use, and prints the plans for the shapes asked. The checks:
the issue's real shapes (a 128256 x 8192 LM head needs no split on 132 SMs; 28672 x 8192 at most 3), small N
split until the GPU is filled, every plan well formed (kslice a multiple of 128, no empty split), and the chosen
split is the argmin of the cost model written in gemv_plan.h, evaluated here by brute force over every split
count (the header compares only three candidates).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import IN_CI

ROOT = Path(__file__).resolve().parents[1]
CUDA_SRC = ROOT / "csrc" / "cuda"
H100_SMS, A100_SMS = 132, 108
CHUNK, MIN_SLICE, ROWS_PER_CTA = 128, 256, 128  # gemv_plan.h: kGemvKChunk, kGemvMinKSlice, kGemvRowsPerCta

DRIVER = r"""
#include <cstdio>
#include "gemv_plan.h"
// stdin: lines "plan N K sm_count M ctas_per_sm" or "ctas smem_per_sm reserved"; stdout: one answer per line
int main() {
  char what[8];
  while (std::scanf("%7s", what) == 1) {
    if (what[0] == 'p') {
      long long N, K, M; int sms, ctas;
      if (std::scanf("%lld %lld %d %lld %d", &N, &K, &sms, &M, &ctas) != 5) return 2;
      const auto plan = lowrank_ext::cuda::plan_gemv(N, K, sms, M, ctas);
      std::printf("%lld %d %d\n", (long long)plan.row_groups, plan.kslice, plan.splits);
    } else {
      unsigned long long smem, reserved;
      if (std::scanf("%llu %llu", &smem, &reserved) != 2) return 2;
      std::printf("%d\n", lowrank_ext::cuda::gemv_ctas_per_sm(smem, reserved));
    }
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def plan_driver(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        msg = "test_gemv_plan needs a C++ compiler (g++ or $CXX)"
        pytest.fail(msg) if IN_CI else pytest.skip(msg)
    d = tmp_path_factory.mktemp("gemv_plan")
    (d / "driver.cpp").write_text(DRIVER)
    exe = d / "driver"
    subprocess.run([cxx, "-std=c++20", "-O1", f"-I{CUDA_SRC}", str(d / "driver.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)

    def run(lines: list[str]) -> list[list[int]]:
        out = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True)
        return [[int(v) for v in line.split()] for line in out.stdout.splitlines()]

    return run


def plans(run, shapes, sms=H100_SMS, ctas=4):
    """{(N, K, M): (row_groups, kslice, splits)} from the C++ plan_gemv."""
    got = run([f"plan {N} {K} {sms} {M} {ctas}" for N, K, M in shapes])
    return {shape: tuple(p) for shape, p in zip(shapes, got)}


def model_time(N, K, M, splits, sms, ctas):
    """gemv_plan.h's cost model, written out independently: (weight + partial bytes) / fill."""
    row_groups = math.ceil(N / ROWS_PER_CTA)
    partial = 2 * splits * M * N * 4 if splits > 1 else 0
    fill = min(1.0, row_groups * splits / (ctas * sms))
    return (N * K / 2 + partial) / fill


REAL_SHAPES = [  # (N, K): Llama-3-8B/70B projections, the LM heads, small adapters' bases
    (128256, 8192), (128256, 4096), (28672, 8192), (8192, 28672), (8192, 8192), (1024, 8192), (14336, 4096),
    (4096, 14336), (4096, 4096), (1024, 4096), (11008, 4096), (4096, 11008), (512, 4096), (256, 1024),
    (128, 8192), (64, 64), (4096, 96), (300, 4128),
]


def test_plan_issue_shapes_on_132_sms(plan_driver):
    got = plans(plan_driver, [(128256, 8192, 16), (28672, 8192, 16), (128256, 8192, 1), (28672, 8192, 1)])
    # The LM head's 1002 row groups already fill 4 x 132 CTA slots: no split, no partials.
    assert got[(128256, 8192, 16)] == (1002, 8192, 1)
    assert got[(128256, 8192, 1)] == (1002, 8192, 1)
    # 224 row groups fill 42% of the slots: split, but not past the first count that fills them (3).
    for M in (1, 16):
        rows, kslice, splits = got[(28672, 8192, M)]
        assert rows == 224 and 2 <= splits <= 3 and kslice * splits >= 8192


def test_plan_small_n_splits_until_the_gpu_is_filled(plan_driver):
    for sms in (H100_SMS, A100_SMS):
        slots = 4 * sms
        for N, K in [(4096, 4096), (1024, 4096), (4096, 14336), (512, 8192), (128, 8192), (4096, 1024)]:
            rows, kslice, splits = plans(plan_driver, [(N, K, 1)], sms)[(N, K, 1)]
            assert rows < slots and splits > 1, (N, K, sms)
            # every slot busy, or the slices are as short as allowed (256)
            assert rows * splits >= slots or kslice == MIN_SLICE, (N, K, sms, splits)
            # and no more splits than the first count that fills them (past it only partials grow): the next
            # longer slice would leave slots idle
            assert rows * math.ceil(K / (kslice + CHUNK)) < slots, (N, K, sms, splits)


def test_plan_is_well_formed(plan_driver):
    shapes = [(N, K, M) for N, K in REAL_SHAPES for M in (1, 5, 16)]
    for sms, ctas in ((H100_SMS, 4), (A100_SMS, 3), (1, 1), (16, 4)):
        for (N, K, M), (rows, kslice, splits) in plans(plan_driver, shapes, sms, ctas).items():
            assert rows == math.ceil(N / ROWS_PER_CTA)
            assert kslice % CHUNK == 0 and kslice > 0
            assert splits == math.ceil(K / kslice)  # covers K ...
            assert (splits - 1) * kslice < K  # ... with no empty split
            assert kslice == CHUNK * math.ceil(math.ceil(K / splits) / CHUNK)  # slices as even as they can be
            assert splits == 1 or kslice >= MIN_SLICE  # a split is long enough to amortize the CTA's setup
            if rows >= ctas * sms:
                assert splits == 1, (N, K, M, sms)  # the row groups alone fill the GPU: no partials


def slice_lengths(K):
    """Every k-slice a plan may use: multiples of 128 from min(256, K rounded up) to K rounded up."""
    whole = CHUNK * math.ceil(K / CHUNK)
    return range(min(MIN_SLICE, whole), whole + 1, CHUNK)


def test_plan_minimizes_the_documented_cost(plan_driver):
    shapes = [(N, K, M) for N, K in REAL_SHAPES for M in (1, 8, 16)]
    for sms, ctas in ((H100_SMS, 4), (A100_SMS, 3), (8, 2), (1, 1)):
        for (N, K, M), (rows, kslice, splits) in plans(plan_driver, shapes, sms, ctas).items():
            assert kslice in slice_lengths(K)
            best = min(model_time(N, K, M, math.ceil(K / ks), sms, ctas) for ks in slice_lengths(K))
            assert model_time(N, K, M, splits, sms, ctas) <= best * (1 + 1e-12), (N, K, M, sms, splits)


def test_plan_ctas_per_sm_from_shared_memory(plan_driver):
    # cudaDeviceProp: sharedMemPerMultiprocessor, reservedSharedMemPerBlock (1 KB on sm_80 / sm_90)
    h100, a100, small, tiny = plan_driver(["ctas 233472 1024", "ctas 167936 1024", "ctas 102400 1024", "ctas 1 0"])
    assert h100 == [4]  # 4 x (48 + 1) KB = 196 KB <= 228 KB; registers cap it at 4
    assert a100 == [3]  # 164 KB: 3 CTAs
    assert small == [2]
    assert tiny == [1]  # never 0 (the plan divides by it)
