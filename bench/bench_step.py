"""One optimizer step of `python -m lowrank_ext finetune`, ours against PEFT on the dense model, and where its time goes.

    python bench/bench_step.py [--dtype fp32|bf16|both] [--steps 5] [--warmup 1] [--threads 2]
                               [--seq-len 128] [--batch-size 4] [--quick]

Three configurations of the default job (SmolLM2-135M-Instruct, LoRA r=16 on the seven projections, dropout 0.05,
PagedAdamW, gradient checkpointing on, batch 4 x 128 tokens), each built by the finetune command's own code
(cli._plan / _load_model / _load_data / _build / _make_trainer), so the bench times exactly what finetune trains:
  ours                 the default: NF4 base + our LoRA layers, fused model ops (lowrank_ext.patch_model)
  ours, unfused        --no-fused-model-ops
  PEFT dense           --backend peft --no-quantize (PEFT LoRA on the fp32 model, same optimizer)
in fp32 and in bf16 autocast (--dtype bf16, as finetune runs it; by default only where the CPU multiplies bf16
natively: AVX512-BF16 / AMX). One step = the Trainer's step (forward + backward of the micro-batch, gradient
clipping, optimizer.step, zero_grad, scheduler) + the malloc_trim finetune runs after each step. Steps of the three
configurations alternate (the order rotates each round), so a drift in the machine's load hits all of them; the
median of --steps timed steps after --warmup is reported, and ours / PEFT against the issue-22 target of 0.7x.

Then one more step of each runs under torch.profiler, and its CPU time is split into groups (step_breakdown): each
profiled op's self time goes to the group of its innermost classified ancestor (or itself), except that everything
under the optimizer ranges is "optimizer"; what no group claims is "other", listed by its largest op names.
`--quick` runs a tiny random Llama (SmolLM2's tokenizer) for a smoke test (tests/test_bench_step.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))  # the repo root, for an in-place build
from _timing import cpu_name, print_table

import lowrank_ext
from lowrank_ext.finetune import cli
from lowrank_ext.finetune.memory import trim_freed_memory

CONFIGS = {  # name -> the finetune arguments that select it; every other setting is finetune's default
    "ours": [],
    "ours, unfused": ["--no-fused-model-ops"],
    "PEFT dense": ["--backend", "peft", "--no-quantize"],
}
BASELINE = "PEFT dense"
TARGET = 0.7  # issue 22: the default job's time per step <= 0.7x PEFT's on the dense model

# ---- the profile's groups ----------------------------------------------------------------------------------------
GROUPS = ("matmul", "fused ops", "attention", "cross-entropy", "optimizer", "casts/copies", "dropout", "other")
STEP_RANGE = "bench_step: step"  # the root of a profiled step; its total is the profiled total
CLIP_RANGE = "bench_step: clip_grad_norm"  # the trainer's gradient clipping (torch gives it no range of its own)
LOSS_RANGE = "bench_step: chunked head + cross-entropy"  # finetune/memory.py's _chunked_ce (ours, checkpointing on)
_MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul", "aten::mv",
           "aten::addmv"}
_ATTENTION = ("scaled_dot_product",)  # aten::scaled_dot_product_attention, its CPU flash kernel and backward
_FUSED = ("rms_norm", "rope", "swiglu")  # lowrank_ext::rms_norm, add_rms_norm, rope, swiglu and their _backward
_CROSS_ENTROPY = {"aten::cross_entropy_loss", "aten::log_softmax", "aten::_log_softmax",
                  "aten::_log_softmax_backward_data", "aten::nll_loss", "aten::nll_loss_nd", "aten::nll_loss_forward",
                  "aten::nll_loss_backward", "aten::softmax", "aten::_softmax", "aten::_softmax_backward_data"}
_CASTS = {"aten::to", "aten::_to_copy", "aten::copy_"}
_DROPOUT = {"aten::dropout", "aten::native_dropout", "aten::bernoulli_", "aten::bernoulli", "aten::feature_dropout",
            "aten::native_dropout_backward"}


def own_group(name: str) -> str | None:
    """The group an op or range belongs to by its own name (None: it takes its ancestors' group)."""
    if name.startswith("Optimizer.") or name == CLIP_RANGE:  # torch's Optimizer.step#X.step / zero_grad ranges
        return "optimizer"
    if name in _MATMUL or name.startswith(("lowrank_ext::nf4", "lowrank_ext::dequantize")):
        return "matmul"
    if name.startswith("lowrank_ext::") and any(op in name for op in _FUSED):
        return "fused ops"
    if any(op in name for op in _ATTENTION):
        return "attention"
    if name in _CROSS_ENTROPY or name == LOSS_RANGE:  # (the head's matmuls inside the range are matmul)
        return "cross-entropy"
    if name in _CASTS:
        return "casts/copies"
    if name in _DROPOUT:
        return "dropout"
    return None


def _other_key(name: str) -> str:
    """How time no group claims is listed: by op name, autograd's bookkeeping and the Python between ops lumped."""
    if name.startswith("autograd::engine::evaluate_function") or "Backward" in name:  # (a custom op's too)
        return "autograd engine (node overhead)"
    if name == STEP_RANGE:
        return "Python + unprofiled (the step's own time)"
    return name


@dataclass
class Breakdown:
    """Self CPU time (microseconds) of one profiled step, per group, and per op name within "other"."""
    total_us: float  # the step range's total CPU time: what the groups must add up to
    groups: dict[str, float]
    other: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0  # wall time of the profiled step (profiler overhead included)


def step_breakdown(events, root_name: str = STEP_RANGE) -> Breakdown:
    """Split the profiled step(s) named `root_name` in `events` (torch.profiler's prof.events()) into GROUPS.

    Walks each root's tree: an event's self time goes to its own group if its name has one, else to its nearest
    classified ancestor's (aten::t inside aten::linear is matmul; aten::empty inside a lowrank_ext op is that op's),
    except that everything under an optimizer range is optimizer. Checkpointed forwards recomputed inside an
    autograd node are classified op by op (the node itself has no group)."""
    roots = [e for e in events if e.name == root_name and e.cpu_parent is None]
    if not roots:
        raise ValueError(f"bench_step: events must hold a profiled range {root_name!r}, got none among "
                         f"{len(events)} events")
    groups = dict.fromkeys(GROUPS, 0.0)
    other: dict[str, float] = defaultdict(float)
    total = 0.0
    for root in roots:
        total += root.cpu_time_total
        stack = [(root, None, None)]  # (event, inherited group, outermost unclassified aten op name)
        while stack:
            ev, inherited, op_name = stack.pop()
            own = own_group(ev.name)
            group = "optimizer" if inherited == "optimizer" else own or inherited
            if op_name is None and ev.name.startswith(("aten::", "lowrank_ext::")):
                op_name = ev.name
            if group is None:
                other[_other_key(op_name or ev.name)] += ev.self_cpu_time_total
                groups["other"] += ev.self_cpu_time_total
            else:
                groups[group] += ev.self_cpu_time_total
            stack.extend((child, group, op_name) for child in ev.cpu_children)
    return Breakdown(total_us=total, groups=groups, other=dict(other))


# ---- the configurations, built by the finetune command's own code -------------------------------------------------
def finetune_args(model: str, dtype: str, config_argv: list[str], seq_len: int, batch_size: int, steps: int,
                  output: Path):
    """The finetune command's parsed arguments for one configuration (finetune's defaults for everything else)."""
    return cli.build_parser().parse_args([
        "finetune", "--model", model, "--dtype", dtype, "--seq-len", str(seq_len), "--batch-size", str(batch_size),
        "--steps", str(steps), "--output", str(output), "--no-progress", "--gen-tokens", "0", "--eval-blocks", "1",
        *config_argv])


def build_trainer(a):
    """What `finetune` builds before its first step (plan, model, data, adapters, checkpointing, trainer); its
    progress lines are swallowed (an error still raises)."""
    with contextlib.redirect_stdout(io.StringIO()):
        plan = cli._plan(a, None)
        lm, _ = cli._load_model(a, plan)
        data = cli._load_data(a, plan, lm.tokenizer)
        job = cli._build(a, plan, None, lm, data)
        trainer = cli._make_trainer(a, plan, None, data, job)
    clip = trainer._clip_gradients  # give the clipping a profiler range (torch's optimizer has its own)

    def clip_in_range():
        with record_function(CLIP_RANGE):
            return clip()

    trainer._clip_gradients = clip_in_range
    trainer.model.train()
    return trainer


@contextlib.contextmanager
def chunked_loss_in_range():
    """Run finetune's chunked head + loss (memory._chunked_ce, which chunked_lm_loss calls by its module-global
    name) inside a profiler range, so its softmax / logsumexp / exp arithmetic counts as cross-entropy."""
    from lowrank_ext.finetune import memory

    plain = memory._chunked_ce

    def in_range(*args, **kwargs):
        with record_function(LOSS_RANGE):
            return plain(*args, **kwargs)

    memory._chunked_ce = in_range
    try:
        yield
    finally:
        memory._chunked_ce = plain


def one_step(trainer) -> float:
    """Seconds of one finetune step: the Trainer's step, then the malloc_trim finetune runs after each step."""
    t0 = time.perf_counter()
    trainer._step()
    trim_freed_memory()
    return time.perf_counter() - t0


def profiled_step(trainer) -> Breakdown:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        with record_function(STEP_RANGE):
            trainer._step()
            trim_freed_memory()
        wall = time.perf_counter() - t0
    b = step_breakdown(prof.events())
    b.wall_s = wall
    return b


def tiny_model_dir(path: Path) -> str:
    """--quick: a random 2-layer Llama (hidden 32) with SmolLM2's tokenizer, saved as a --model directory."""
    import transformers

    from lowrank_ext.finetune.models import _cached_smollm2

    tok = transformers.AutoTokenizer.from_pretrained(str(_cached_smollm2()[0]))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True, eos_token_id=tok.eos_token_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


@dataclass
class DtypeResult:
    dtype: str
    times: dict[str, list[float]]  # config -> seconds of each timed step
    breakdowns: dict[str, Breakdown]

    def median(self, config: str) -> float:
        return statistics.median(self.times[config])

    def ratio(self, config: str) -> float:
        """config / PEFT: the median over rounds of the ratio of steps taken side by side (a drift cancels)."""
        return statistics.median(t / b for t, b in zip(self.times[config], self.times[BASELINE]))


def run_dtype(model: str, dtype: str, steps: int, warmup: int, seq_len: int, batch_size: int,
              configs: dict[str, list[str]] = CONFIGS) -> DtypeResult:
    with tempfile.TemporaryDirectory(prefix="bench_step-") as tmp:
        trainers = {}
        for i, (name, argv) in enumerate(configs.items()):
            a = finetune_args(model, dtype, argv, seq_len, batch_size, warmup + steps + 2, Path(tmp) / f"out{i}")
            trainers[name] = build_trainer(a)
        names = list(trainers)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(warmup + steps):
            order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
            for n in order:
                t = one_step(trainers[n])
                if r >= warmup:
                    times[n].append(t)
        with chunked_loss_in_range():
            breakdowns = {n: profiled_step(trainers[n]) for n in names}
    return DtypeResult(dtype=dtype, times=times, breakdowns=breakdowns)


# ---- printing -------------------------------------------------------------------------------------------------------
def print_result(res: DtypeResult, label: str) -> None:
    names = list(res.times)
    rows = []
    for n in names:
        ts = res.times[n]
        row = [n, res.median(n), min(ts), max(ts), len(ts)]
        if n != BASELINE and BASELINE in res.times:
            r = res.ratio(n)
            row += [f"{r:.2f}x", "yes" if r <= TARGET else "no"]
        else:
            row += ["1", ""]
        rows.append(row)
    print_table(f"{label} {res.dtype}: seconds per optimizer step (median of alternated steps)",
                ["config", "s/step", "min", "max", "steps", f"vs {BASELINE}", f"<= {TARGET}x"], rows)
    head = ["group"] + [f"{n} ms" for n in names] + [f"{n} %" for n in names]
    rows = []
    for g in GROUPS:
        rows.append([g] + [res.breakdowns[n].groups[g] / 1e3 for n in names]
                    + [f"{100 * res.breakdowns[n].groups[g] / res.breakdowns[n].total_us:.1f}" for n in names])
    rows.append(["profiled total"] + [res.breakdowns[n].total_us / 1e3 for n in names] + ["100"] * len(names))
    rows.append(["wall (profiled)"] + [res.breakdowns[n].wall_s * 1e3 for n in names] + [""] * len(names))
    print_table(f"{label} {res.dtype}: one profiled step, self CPU time by group", head, rows)
    for n in names:
        b = res.breakdowns[n]
        top = sorted(b.other.items(), key=lambda kv: -kv[1])[:6]
        print(f"  other in {n}: " + ", ".join(f"{k} {v / 1e3:.0f} ms" for k, v in top), flush=True)


def main(argv: list[str] | None = None) -> dict[str, DtypeResult]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both",
                    help="both: fp32, and bf16 where the CPU multiplies bf16 natively")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration first (optimizer state, oneDNN primitives)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="a tiny random Llama: a smoke test of the bench itself")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        ap.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    torch.set_num_threads(args.threads)
    from lowrank_ext._extension import native_bf16_matmul

    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    if args.dtype == "both" and not native_bf16_matmul("cpu"):
        print("bf16 skipped: this CPU has no native bf16 matmul (AVX512-BF16 / AMX)", flush=True)
        dtypes = ["fp32"]
    load = os.getloadavg()
    print(f"CPU: {cpu_name()}; lowrank_ext.cpu_isa() = {lowrank_ext.cpu_isa()}; torch threads "
          f"{torch.get_num_threads()}; batch {args.batch_size} x {args.seq_len} tokens; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_step-model-") as tmp:
        model = tiny_model_dir(Path(tmp)) if args.quick else "smollm2"
        label = "tiny Llama" if args.quick else "SmolLM2-135M"
        for dtype in dtypes:
            res = run_dtype(model, dtype, args.steps, args.warmup, args.seq_len, args.batch_size)
            print_result(res, label)
            results[dtype] = res
    print(f"load average after: {os.getloadavg()[0]:.2f}", flush=True)
    return results


if __name__ == "__main__":
    main()
