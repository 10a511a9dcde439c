"""Distributed QLoRA on this machine: per-rank base-weight bytes and step time, 1 process vs 2 (FSDP2, DDP).

A small Llama built from a config (all linear layers of the blocks NF4 + LoRA r=16), one training step =
forward + backward + PagedAdamW step on a [batch, seq] micro-batch per rank. Reported, not targeted: on a
2-core CPU two gloo processes share the cores, so the step time says little about GPUs (docs/distributed.md
has the plan for real hardware); the bytes are what sharding is for. Correctness is checked once before
timing: rank 0's first-step loss under FSDP2 and DDP equals the single-process loss on the same batch.

Columns: base bytes/rank = the NF4 storage a rank holds (packed codes + absmax, sharded under FSDP2, plus the
replicated fp32 constants); all-gather/step = the NF4 bytes a rank receives per step under FSDP2 with
reshard_after_forward (each block gathered for forward and again for backward: 2 x (world-1)/world x total);
tokens/s counts every rank's micro-batch (2 processes train on twice the tokens per step).

Run: python bench/bench_distributed.py [--quick]     (or import and call run(quick=True))
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import print_table

import lowrank_ext as L

SHAPE = {"hidden": 256, "layers": 4, "inter": 688, "vocab": 512}
BATCH, SEQ = 2, 128


def _model():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"],
                                   intermediate_size=SHAPE["inter"], num_hidden_layers=SHAPE["layers"],
                                   num_attention_heads=SHAPE["hidden"] // 64, num_key_value_heads=2,
                                   max_position_embeddings=SEQ)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg)
    L.inject(m, L.LoRAConfig(r=16, alpha=32, target_modules="all-linear", quantize="nf4"))
    return m


def _batch(step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, SHAPE["vocab"], (BATCH, SEQ), generator=g)


def _train(model, rank: int, steps: int) -> tuple[float, float]:
    """(first loss, median step seconds)."""
    opt = L.optim.PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    first, times = None, []
    for s in range(steps + 1):  # step 0 is the warm-up (and the correctness check)
        ids = _batch(s, rank)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s == 0:
            first = loss.item()
        else:
            times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def _worker(rank: int, world: int, port: int, parallel: str, steps: int, out: str) -> None:
    import torch.distributed as dist

    from lowrank_ext import distributed as LD

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m = _model()
        m = LD.shard_model(m) if parallel == "fsdp" else LD.wrap_ddp(m)
        local, total = LD.nf4_bytes(m)
        first, step_s = _train(m, rank, steps)
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"local": local, "total": total, "first": first, "step_s": step_s}, f)
    finally:
        dist.destroy_process_group()


def _spawn(parallel: str, steps: int) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mktemp(suffix=".json")
    mp.start_processes(_worker, args=(2, port, parallel, steps, out), nprocs=2, start_method="spawn")
    with open(out) as f:
        res = json.load(f)
    os.unlink(out)
    return res


def run(quick: bool = False) -> list[list[object]]:
    steps = 3 if quick else 10
    torch.set_num_threads(1)  # what each of the 2 processes gets: a fair 1-process baseline
    m = _model()
    local1, total = L.distributed.nf4_bytes(m)
    first1, step1 = _train(m, 0, steps)
    params = sum(p.numel() for mod in m.modules() if isinstance(mod, L.nn.linear4bit.NF4WeightHolder)
                 for p in mod.nf4_parameters())
    rows = [["1 process", 1, local1, 1.0, 0, step1, 1.0, BATCH * SEQ / step1]]
    for parallel in ("fsdp", "ddp"):
        r = _spawn(parallel, steps)
        if r["first"] != first1:  # rank 0's batch is the single process's batch, the weights the same
            raise AssertionError(f"bench_distributed: {parallel} first loss {r['first']} != 1 process {first1}")
        gather = 2 * params * (2 - 1) // 2 if parallel == "fsdp" else 0  # 2 passes x (world-1)/world x sharded B
        rows.append([f"2 processes {parallel.upper()}", 2, r["local"], r["local"] / local1, gather, r["step_s"],
                     r["step_s"] / step1, 2 * BATCH * SEQ / r["step_s"]])
    print_table(f"distributed QLoRA step, Llama {SHAPE} (NF4 storage {total} B, of which {params} B sharded), "
                f"micro-batch [{BATCH}, {SEQ}] per rank, gloo, 1 thread per process",
                ["config", "ranks", "base bytes/rank", "vs 1 proc", "all-gather B/step", "step s", "vs 1 proc",
                 "tokens/s (all ranks)"], rows)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    run(ap.parse_args().quick)
