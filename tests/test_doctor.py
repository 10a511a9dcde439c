"""`python -m lowrank_ext doctor`: runs in-process and as a subprocess (--json), the JSON schema, the kernel
paths it reports, and that it FAILs (exit 1) when a tolerance or a kernel is broken on purpose — a doctor
that cannot fail would be a defect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowrank_ext
from lowrank_ext.finetune import cli, doctor

ROOT = Path(__file__).resolve().parents[1]
CHECK_KEYS = {"op", "device", "dtype", "path", "max_error", "tolerance", "ok", "time_ms", "note"}
CPU_ONLY = ["--device", "cpu"]
OPS = {"quantize_nf4", "double_quant", "dequantize_nf4", "dequantize_nf4_out", "nf4_lora_linear",
       "nf4_lora_linear_backward", "nf4_row_sqnorm", "adamw_step", "adamw8bit_step"}


@pytest.fixture(scope="module")
def cpu_report():
    return doctor.run(["cpu"])


def _assert_schema(report: dict) -> None:
    assert report["schema"] == doctor.SCHEMA == "lowrank_ext.doctor/1"
    assert set(report) >= {"ok", "build", "devices", "checked_devices", "checks", "failures", "notes", "total_s"}
    assert {"torch_installed", "torch_built_with", "cuda", "cuda_archs", "cpu_flags", "avx2", "python",
            "torch_cuda", "torch_cpu_capability"} <= set(report["build"])
    assert report["devices"][0]["device"] == "cpu" and "features" in report["devices"][0]
    for c in report["checks"]:
        assert set(c) == CHECK_KEYS, c
        assert isinstance(c["ok"], bool) and c["time_ms"] >= 0
        assert c["max_error"] is None or isinstance(c["max_error"], float)
    assert report["failures"] == sum(not c["ok"] for c in report["checks"])
    assert report["ok"] == (report["failures"] == 0)


def test_cpu_report_passes_and_covers_every_op_family_and_dtype(cpu_report):
    _assert_schema(cpu_report)
    bad = [c for c in cpu_report["checks"] if not c["ok"]]
    assert not bad, bad
    assert {c["op"] for c in cpu_report["checks"]} >= OPS
    for op in OPS - {"double_quant", "nf4_row_sqnorm"}:
        assert {c["dtype"] for c in cpu_report["checks"] if c["op"] == op} == {"fp32", "fp16", "bf16"}, op
    assert cpu_report["total_s"] < 60


def test_paths_are_the_kernels_that_ran(cpu_report):
    rows = {(c["op"], c["dtype"], c["note"].split()[0]): c["path"] for c in cpu_report["checks"]}
    feats = doctor._cpu_features()
    avx512 = {"avx512f", "avx512bw"} <= set(feats) and os.environ.get("LOWRANK_EXT_CPU_ISA") != "avx2"
    # K = 256, a multiple of the blocksize: the blocked AVX-512 GEMV where the CPU has AVX-512
    gemv = "gemv-avx512-blocked" if avx512 else ("gemv-avx2" if lowrank_ext.build_info()["avx2"] else "gemv-scalar")
    assert rows[("nf4_lora_linear", "fp32", "M=1")] == gemv  # M <= 8 fp32 compute: the streaming GEMV
    bf16 = "panel-bf16" if lowrank_ext.native_bf16_matmul() else "panel"  # bf16 panels on bf16 hardware
    assert rows[("nf4_lora_linear", "bf16", "M=33")] == bf16
    assert rows[("nf4_lora_linear_backward", "fp16", "M=33:")] == "panel"
    isa = "avx2" if lowrank_ext.build_info()["avx2"] else "scalar"
    assert {c["path"] for c in cpu_report["checks"] if c["op"] in ("quantize_nf4", "adamw_step")} == {isa}


def test_text_report_in_process(capsys):
    rc = cli.main(["doctor", *CPU_ONLY])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "lowrank_ext doctor" in out and "devices:" in out and "cpu:" in out
    header = next(line for line in out.splitlines() if line.startswith("op "))
    for col in ("device", "dtype", "path", "max error", "tolerance", "result", "time"):
        assert col in header
    assert "all checks passed" in out and "FAIL" not in out


def test_subprocess_json():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "lowrank_ext", "doctor", "--json", *CPU_ONLY], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(res.stdout)
    _assert_schema(report)
    assert report["ok"] and report["checked_devices"] == ["cpu"]


def test_broken_tolerance_fails_with_exit_1(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "TOL_FACTOR", 0.0)
    monkeypatch.setattr(doctor, "FLOOR_ULPS", 0.0)
    rc = cli.main(["doctor", "--json", *CPU_ONLY])
    report = json.loads(capsys.readouterr().out)
    assert rc == 1 and not report["ok"]
    failed = {c["op"] for c in report["checks"] if not c["ok"]}
    assert "nf4_lora_linear" in failed  # a real fp32 error above a zero tolerance
    assert "quantize_nf4" not in failed  # exact checks stay exact


def test_broken_kernel_fails_with_exit_1(monkeypatch, capsys):
    real = lowrank_ext.ops.nf4_lora_linear

    def off_by_a_bit(*args, **kwargs):
        return real(*args, **kwargs) * 1.01

    monkeypatch.setattr(lowrank_ext.ops, "nf4_lora_linear", off_by_a_bit)
    from lowrank_ext.ops import nf4 as ops_nf4

    real_deq = ops_nf4.dequantize_nf4
    monkeypatch.setattr(ops_nf4, "dequantize_nf4", lambda *a: real_deq(*a).neg_())
    rc = cli.main(["doctor", *CPU_ONLY])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL nf4_lora_linear [cpu, fp32]" in out and "FAIL dequantize_nf4 [cpu, bf16]" in out
    assert "check(s) FAILED" in out


def test_a_check_that_raises_is_a_failure(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(lowrank_ext.ops, "adamw_step", boom)
    report = doctor.run(["cpu"])
    rows = [c for c in report["checks"] if c["op"] == "adamw_step"]
    assert rows and all(not c["ok"] and "kernel exploded" in c["note"] and c["max_error"] is None for c in rows)
    assert not report["ok"]


def test_cuda_device_flag_without_gpu(capsys):
    if torch.cuda.is_available() and lowrank_ext.has_cuda_kernels():
        pytest.skip("a GPU is present: --device cuda is valid here")
    assert cli.main(["doctor", "--device", "cuda"]) == 2
    assert "--device cuda must have a CUDA GPU" in capsys.readouterr().err


def test_paths_bound_catches_an_unrounded_path():
    """The cross-path check (CUDA rows) on synthetic data: two paths that round the same products agree;
    one that keeps W in fp32 (the old SIMT behaviour) changes far more outputs than the 10% allowed."""
    g = torch.Generator().manual_seed(0)
    k = 512
    x = torch.randn(8, k, generator=g).bfloat16().double()
    w = (torch.randn(64, k, generator=g) * 0.05).double()
    w_bf = w.bfloat16().double()
    y_rounded = (x @ w_bf.t()).float()
    y_other_order = (x.flip(1) @ w_bf.flip(1).t()).float()
    y_unrounded = (x @ w.t()).float()
    s_abs = x.abs() @ w.abs().t()
    ys = [t.bfloat16() for t in (y_rounded, y_other_order)]
    assert doctor.paths_bound(ys, s_abs, torch.bfloat16) <= 1.0
    differ = (y_rounded.bfloat16() != y_unrounded.bfloat16()).float().mean().item()
    assert differ > 0.30  # the doctor's "outputs differ" limit (10%) flags the unrounded path
