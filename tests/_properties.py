"""Shared parts of the property tests (tests/test_properties_*.py): hypothesis settings, seeds, weights.

The property tests check every CPU op against the float64 / plain-PyTorch references with hypothesis:
  test_properties_nf4.py     quantize_nf4 (+ double quant), dequantize_nf4 / _out vs lowrank_ext._reference.nf4
                             and bitsandbytes where it is exact
  test_properties_linear.py  nf4_linear, nf4_linear_grad_input, nf4_lora_linear forward + backward,
                             nf4_row_sqnorm vs float64 math on deq(W) (lowrank_ext._reference.linear)
  test_properties_optim.py   adamw_step, adamw8bit_step vs lowrank_ext._reference.optim
Drawn: shapes 1..300 rows and columns (K mostly not a multiple of the blocksize: blocks straddle rows),
every blocksize, plain and double quant, fp32/fp16/bf16 (and float64, the simple path), rank 1..80,
bias on/off, contiguous / transposed / strided / 3-D inputs, dropout masks, both CPU ISA paths, M on
both sides of the GEMV/panel switch. Tolerances are stated in each file.

Bounded: derandomized (CI sees the same examples every run), a fixed number of examples per test; all
three files run in well under 2 minutes on 2 cores. LOWRANK_EXT_FUZZ=<k> multiplies the example counts
by k and draws fresh random examples: a longer fuzzing session, not CI's.
"""

from __future__ import annotations

import os

import torch
from conftest import require

from lowrank_ext._reference.nf4 import NF4_CODEBOOK

hypothesis = require("hypothesis")
from hypothesis import HealthCheck, settings

EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 2.0**-52}
LOW = [torch.float32, torch.float16, torch.bfloat16]
SEEDS = (0, 2**31 - 1)  # st.integers(*SEEDS): a torch.Generator seed drawn by hypothesis

_FUZZ = int(os.environ.get("LOWRANK_EXT_FUZZ", "0") or 0)


def props(examples: int):
    """Settings of one property: `examples` examples (times LOWRANK_EXT_FUZZ when set), no deadline."""
    return settings(max_examples=examples * max(1, _FUZZ), deadline=None, derandomize=not _FUZZ, database=None,
                    print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def weight_values(shape: tuple[int, ...], kind: str, blocksize: int, seed: int, binades: int = 30) -> torch.Tensor:
    """fp32 weights of a kind that stresses the format: gaussian, per-block scales over ±`binades`,
    exact NF4 levels and midpoints (ties), small integers (many equal values), all-zero blocks."""
    g = gen(seed)
    n = torch.Size(shape).numel()
    x = torch.randn(n, generator=g)
    if kind == "scales":  # each block its own magnitude, 2^-binades .. 2^binades
        nb = -(-n // blocksize)
        e = torch.randint(-binades, binades + 1, (nb,), generator=g).float()
        x = x * torch.exp2(e).repeat_interleave(blocksize)[:n]
    elif kind == "levels":  # values exactly at NF4 levels and at midpoints between them, times a block max
        mids = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2
        pool = torch.cat([NF4_CODEBOOK, mids, -mids])
        x = pool[torch.randint(0, pool.numel(), (n,), generator=g)] * 3.0
        x[::blocksize] = 3.0  # the block's absmax: scaled values are the levels / midpoints exactly
    elif kind == "ints":
        x = torch.randint(-3, 4, (n,), generator=g).float()
    if kind != "levels" and n > 1:
        drop = torch.rand(-(-n // blocksize), generator=g) < 0.2  # some all-zero blocks
        x = x * (~drop).float().repeat_interleave(blocksize)[:n]
    return x.view(shape)


