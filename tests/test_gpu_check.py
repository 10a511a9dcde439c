"""bench/gpu_check.sh without a GPU: the script runs for real against fakes — nvidia-smi and nvcc on PATH /
CUDA_HOME, and a fake `python` (PYTHON=...) that answers the probe, the build, the doctor, pytest and the
benchmark the way the real ones write their files. The device tool returns at most 8 files from $OUT (2 folders
deep): the script must leave at most 7 there, the results table among them, after a full run, a run cut short by
its time budget, a failed machine check, and a SIGTERM in the middle of the tests.

The script and gpu_results.py are copied into a scratch repository: the script's build phase deletes build/ and
lowrank_ext/_C*.so of the repository it runs in.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"gpu_results.md", "tests.log", "tests.xml", "doctor.json", "bench.md", "build_tail.log", "rest.tar.gz"}

FAKE_PYTHON = r'''
"""A fake interpreter for bench/gpu_check.sh: every call is logged; each phase's program is imitated."""
import json, os, sys, time

args = sys.argv[1:]
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(" ".join(args) + "\n")
mode = os.environ.get("FAKE_MODE", "ok")


def opt(prefix):
    return next((a[len(prefix):] for a in args if a.startswith(prefix)), None)


def junit(path, n):
    cases = "".join(f'<testcase classname="tests.test_fake" name="test_{{i}}_cuda" time="0.01"/>' for i in range(n))
    with open(path, "w") as f:
        f.write(f'<?xml version="1.0"?><testsuites><testsuite tests="{{n}}">{{cases}}</testsuite></testsuites>')


if args and args[0].endswith("gpu_results.py"):  # standard library only: the real interpreter runs it
    os.execv("{real}", ["{real}", *args])
if args and args[0].endswith("probe.py"):
    print("python=3.12.3\nninja=/usr/bin/ninja\ntorch=" + os.environ.get("FAKE_TORCH", "2.11.0+cu130"))
    print("torch_cuda=13.0\ngpu=" + os.environ.get("FAKE_GPU", "NVIDIA H100 80GB HBM3, sm_90, 132 SMs, 79 GiB"))
    sys.exit(0)
if args[:1] == ["-c"]:  # import bitsandbytes: not installed
    sys.exit(1)
if args[:2] == ["-m", "pip"]:
    print("building 'lowrank_ext._C' extension\nptxas info    : 0 bytes spill stores, 0 bytes spill loads")
    sys.exit(0)
if args[:2] == ["-m", "lowrank_ext"]:
    print(json.dumps({{"checks": [{{"op": "nf4_linear", "device": "cuda", "dtype": "bf16", "path": "mma",
                                  "max_error": 1e-3, "tolerance": 1e-2, "ok": True, "time_ms": 3.0, "note": ""}}],
                      "failures": 0, "total_s": 1.0, "devices": [{{"device": "cuda:0", "name": "H100"}}]}}))
    sys.exit(0)
if args[:2] == ["-m", "pytest"]:
    work = os.environ["LRX_PROGRESS_DIR"]
    junit(os.path.join(work, "tests_partial.xml"), 3)  # as bench/_pytest_progress.py does after each test
    with open(os.path.join(work, "tests_current.txt"), "w") as f:
        f.write("tests/test_fake.py::test_3_cuda")
    print("...", flush=True)
    try:
        if mode == "hang_tests":
            time.sleep(120)
    except KeyboardInterrupt:  # pytest on SIGINT: the summary and the junit of what ran
        with open(os.path.join(work, "tests_current.txt"), "w") as f:
            f.write("(interrupted) tests/test_fake.py::test_3_cuda")
        junit(opt("--junitxml="), 3)
        print("!!! KeyboardInterrupt !!!\n3 passed in 1.0s (interrupted)")
        sys.exit(2)
    junit(opt("--junitxml="), 4)
    with open(os.path.join(work, "tests_current.txt"), "w") as f:
        f.write("(finished, exit status 0)")
    print("4 passed in 1.0s")
    sys.exit(0)
if args and args[0].endswith("bench_gpu.py"):
    with open(args[args.index("--out") + 1], "w") as f:
        f.write("### Small-M GEMV\n\n| N x K | M | us/call |\n|---|---|---|\n| 4096x4096 | 1 | 9.0 |\n")
    print("bench ok")
    sys.exit(0)
print("fake python: unexpected call", args, file=sys.stderr)
sys.exit(3)
'''


def _fake_env(tmp: Path, nvcc_release: str = "13.0") -> tuple[Path, dict[str, str]]:
    repo = tmp / "repo"
    for rel in ("bench/gpu_check.sh", "bench/gpu_results.py", "scripts/setup.sh"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, repo / rel)
    (repo / "tests").mkdir()
    fake = tmp / "fakebin"
    (fake / "cuda" / "bin").mkdir(parents=True)
    (fake / "fake_python.py").write_text(FAKE_PYTHON.format(real=sys.executable))
    scripts = {  # a sh wrapper, not a #! line to the interpreter (those are cut at 127 characters on Linux)
        fake / "python": f'#!/bin/sh\nexec "{sys.executable}" "{fake / "fake_python.py"}" "$@"\n',
        fake / "nvidia-smi": "#!/bin/sh\necho 'name, driver_version'\necho 'NVIDIA H100 80GB HBM3, 580.159.04'\n",
        fake / "cuda" / "bin" / "nvcc": f"#!/bin/sh\necho 'Cuda compilation tools, release {nvcc_release}, V{nvcc_release}.88'\n",
    }
    for path, text in scripts.items():
        path.write_text(text)
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CUDA_PATH")}
    env.update(PATH=f"{fake}:{env['PATH']}", PYTHON=str(fake / "python"), CUDA_HOME=str(fake / "cuda"),
               OUT=str(tmp / "out"), LRX_GPU_WORK=str(tmp / "work"), FAKE_CALLS=str(tmp / "calls.txt"))
    return repo, env


def _check_out(out: Path) -> str:
    """At most 7 plain files, only the published names, the results table among them; returns the table."""
    entries = sorted(out.iterdir())
    assert len(entries) <= 7, [e.name for e in entries]
    assert all(e.is_file() for e in entries) and {e.name for e in entries} <= ALLOWED, [e.name for e in entries]
    assert (out / "gpu_results.md").is_file()
    return (out / "gpu_results.md").read_text()


@pytest.mark.parametrize("torch_version", ["2.11.0+cu130", "2.14.1+cu130"])
def test_full_run_leaves_seven_files(tmp_path, torch_version):
    repo, env = _fake_env(tmp_path)
    env["FAKE_TORCH"] = torch_version
    run = subprocess.run(["bash", str(repo / "bench/gpu_check.sh")], env=env, capture_output=True, text=True, check=False,
                         timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "out"
    table = _check_out(out)
    assert {e.name for e in out.iterdir()} == ALLOWED
    for phase in ("machine", "bitsandbytes", "build", "doctor", "CUDA tests", "benchmark"):
        assert f"| {phase}" in table and "FAIL" not in table, table
    assert "4 passed" in (out / "tests.log").read_text() and "test_3_cuda" in (out / "tests.xml").read_text()
    assert "killed while running" not in table and "interrupted" not in table
    assert "| nf4_linear | cuda | bf16 | mma |" in table and "| 4096x4096 | 1 | 9.0 |" in table
    warned = "WARNING: torch 2.11.0+cu130 here; the project pins torch 2.14.1" in table
    assert warned == (torch_version == "2.11.0+cu130"), table[:800]
    with tarfile.open(out / "rest.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"build.log", "nvidia-smi.txt", "machine.txt", "phases.tsv", "bench.log", "doctor.err"} <= names
    assert not names & (ALLOWED - {"rest.tar.gz"}), names  # the published files are not packed twice
    assert "sm_90" in (tmp_path / "work" / "machine.txt").read_text()
    calls = (tmp_path / "calls.txt").read_text()
    assert "-m pip install -v --no-build-isolation --no-deps --no-index ." in calls
    assert "--budget-s" in calls  # the benchmark gets the deadline


def test_sigterm_during_tests_still_publishes(tmp_path):
    """A TERM while pytest runs: the script stops it at once (pytest writes its junit on SIGINT), records the
    kill and publishes — no waiting for the child, still at most 7 files."""
    repo, env = _fake_env(tmp_path)
    env["FAKE_MODE"] = "hang_tests"
    proc = subprocess.Popen(["bash", str(repo / "bench/gpu_check.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        current = tmp_path / "work" / "tests_current.txt"
        deadline = time.time() + 60
        while not current.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert current.exists(), "the test phase never started"
        time.sleep(0.5)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
        assert time.time() - t0 < 15, "the script waited for its child instead of stopping it"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, output[-2000:]
    out = tmp_path / "out"
    table = _check_out(out)
    assert "| CUDA tests | KILLED |" in table and "SIGTERM" in table, table
    assert "interrupted (timeout or signal) while running: `tests/test_fake.py::test_3_cuda`" in table
    assert "interrupted" in (out / "tests.log").read_text()  # pytest's own summary after the SIGINT
    assert "test_2_cuda" in (out / "tests.xml").read_text()
    assert "benchmark" not in (tmp_path / "work" / "phases.tsv").read_text()


def test_time_budget_skips_what_does_not_fit(tmp_path):
    repo, env = _fake_env(tmp_path)
    env["LRX_GPU_BUDGET_S"] = "50"  # the build needs 60 s
    run = subprocess.run(["bash", str(repo / "bench/gpu_check.sh")], env=env, capture_output=True, text=True, check=False,
                         timeout=120)
    assert run.returncode != 0
    table = _check_out(tmp_path / "out")
    assert "| build | skipped |" in table and "WARNING: phase build skipped" in table, table
    assert "-m pip" not in (tmp_path / "calls.txt").read_text()


def test_nvcc_torch_version_mismatch_fails_the_machine_phase(tmp_path):
    repo, env = _fake_env(tmp_path, nvcc_release="12.8")
    run = subprocess.run(["bash", str(repo / "bench/gpu_check.sh")], env=env, capture_output=True, text=True, check=False,
                         timeout=120)
    assert run.returncode == 1
    table = _check_out(tmp_path / "out")
    assert "| machine | FAIL |" in table and "torch.version.cuda is 13.0 but nvcc" in table, table


def test_no_gpu_stops_before_the_build(tmp_path):
    """torch sees no GPU (a developer machine): the machine phase fails and nothing is built (the build would
    replace the checkout's own extension)."""
    repo, env = _fake_env(tmp_path)
    env["FAKE_GPU"] = "none"
    run = subprocess.run(["bash", str(repo / "bench/gpu_check.sh")], env=env, capture_output=True, text=True,
                         check=False, timeout=120)
    assert run.returncode == 1
    table = _check_out(tmp_path / "out")
    assert "| machine | FAIL |" in table and "torch sees no GPU" in table, table
    assert "-m pip" not in (tmp_path / "calls.txt").read_text()


def test_every_probe_has_a_timeout():
    """Each external probe or phase of the script runs under `timeout` (a hung nvidia-smi or python cannot eat
    the call's time)."""
    text = (ROOT / "bench/gpu_check.sh").read_text()
    code = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    for needle in ('nvidia-smi \\', '"$PY" "$WORK/probe.py"', '"$nvcc_bin" --version', '"$PY" -c "import bitsandbytes',
                   '-m pip install -v', '-m lowrank_ext doctor', '-m pytest', '"$PY" "$REPO/bench/bench_gpu.py"',
                   '"$PY" "$REPO/bench/sass_budget.py"'):
        lines = [i for i, ln in enumerate(code) if needle in ln]
        assert lines, needle
        for i in lines:
            assert "timeout" in code[i] or "timeout" in code[i - 1] or "timeout" in code[i - 2], (needle, code[i])
