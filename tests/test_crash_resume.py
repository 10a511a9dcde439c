"""Crash safety of `python -m lowrank_ext finetune`: a real run, SIGKILLed at points chosen at random (fixed
seeds), including in the middle of a checkpoint write, resumed with `--resume`, ends bit-identical to an
uninterrupted run of the same command (same adapter tensors, optimizer state, RNG, loss history and
final held-out loss). After every kill the checkpoint under its final name is complete.

The run is a tiny random Llama with a byte-level tokenizer (tests/_tiny_models.py, no downloads) on a
local .txt file, one CPU thread. The test hook LOWRANK_EXT_TEST_SLOW_WRITE (lowrank_ext/_atomic.py)
holds each checkpoint between "temporary file written and synced" and "renamed", so kills land there."""

from __future__ import annotations

import os
import queue
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import require

from lowrank_ext.finetune import cli
from lowrank_ext._atomic import SLOW_WRITE_ENV

require("transformers")
safetensors_torch = require("safetensors.torch")
from _tiny_models import save_tiny_llama_dir

REPO = Path(__file__).resolve().parent.parent
STEPS, EVERY = 24, 3
ARGS = ["--dataset", "data.txt", "--steps", str(STEPS), "--checkpoint-every", str(EVERY), "--seq-len", "32",
        "--batch-size", "4", "--eval-blocks", "2", "--lr", "1e-2", "--warmup", "2", "--rank", "8", "--alpha", "16",
        "--dropout", "0.1", "--gen-tokens", "0", "--no-progress", "--device", "cpu", "--seed", "3"]
SLOW_WRITE = "0.25"  # seconds each checkpoint waits before its rename in the killed runs
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
       "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("crash")
    save_tiny_llama_dir(d / "tiny")
    r = random.Random(0)
    words = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on"]
    docs = [" ".join(r.choice(words) for _ in range(r.randint(15, 40))).capitalize() + "." for _ in range(200)]
    (d / "data.txt").write_text("\n\n".join(docs))
    return d


class Run:
    """One `finetune` subprocess; its stdout lines are timestamped by a reader thread."""

    def __init__(self, cwd: Path, out: str, extra: list[str], slow_write: bool) -> None:
        env = {**ENV, SLOW_WRITE_ENV: SLOW_WRITE} if slow_write else {k: v for k, v in ENV.items() if k != SLOW_WRITE_ENV}
        cmd = [sys.executable, "-m", "lowrank_ext", "finetune", "--model", "tiny", "--output", out, *ARGS, *extra]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.readers = [threading.Thread(target=self._read, daemon=True),
                        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True)]
        for t in self.readers:
            t.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put((time.monotonic() - self.t0, line))

    def wait_line(self, prefix: str, timeout: float = 120) -> float | None:
        """Seconds since start when a line starting with `prefix` came; None if the process ended first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                t, line = self.lines.get(timeout=0.01)
            except queue.Empty:
                if self.proc.poll() is not None and not self.readers[0].is_alive() and self.lines.empty():
                    return None
                continue
            self.stdout.append(line)
            if line.startswith(prefix):
                return t
        raise TimeoutError(f"no line {prefix!r} within {timeout}s")

    def finish(self, timeout: float = 180) -> tuple[int, str, str]:
        """Wait for the process; (returncode, all stdout, all stderr)."""
        rc = self.proc.wait(timeout=timeout)
        for t in self.readers:
            t.join(timeout=30)
        while not self.lines.empty():
            self.stdout.append(self.lines.get()[1])
        return rc, "".join(self.stdout), "".join(self.stderr)


def _summary(stdout: str) -> list[str]:
    """The printed result lines a user reads (losses), minus timings."""
    return [line.strip() for line in stdout.splitlines() if "loss" in line and ("->" in line or "matches" in line)]


def _final_state(out: Path) -> dict:
    ckpt = torch.load(out / "checkpoint" / "trainer_state.pt", map_location="cpu", weights_only=True)
    return {"adapter": safetensors_torch.load_file(str(out / "adapter_model.safetensors")),
            "params": ckpt["params"], "optimizer": ckpt["optimizer"]["state"], "rng": ckpt["rng"],
            "steps": ckpt["step"], "eval_before": ckpt["eval_before"],
            "losses": [h["loss"] for h in ckpt["history"]], "grad_norms": [h["grad_norm"] for h in ckpt["history"]]}


def _assert_identical(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            _assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _checkpoint_is_complete(out: Path) -> int | None:
    """The step of the checkpoint under its final name (None when there is none); it must load whole."""
    path = out / "checkpoint" / "trainer_state.pt"
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["format"].startswith("lowrank_ext.train/") and len(state["history"]) == state["step"]
    assert state["step"] % EVERY == 0 or state["step"] == STEPS
    return state["step"]


def _temp_files(out: Path) -> list[Path]:
    d = out / "checkpoint"
    return sorted(d.glob(".trainer_state.pt.*.tmp")) if d.is_dir() else []


@pytest.fixture(scope="module")
def reference(workdir):
    """The uninterrupted run, and when its phases happened: training starts at the "data:" line; its
    last checkpoint is written at the final checkpoint file's mtime; then adapter save and reload check."""
    run = Run(workdir, "ref", [], slow_write=False)
    t_train = run.wait_line("data:")
    rc, stdout, err = run.finish()
    assert rc == 0, err[-3000:]
    t_end = time.monotonic() - run.t0
    since_last_ckpt = time.time() - (workdir / "ref" / "checkpoint" / "trainer_state.pt").stat().st_mtime
    return {"state": _final_state(workdir / "ref"), "summary": _summary(stdout), "t_train": t_train,
            "t_trained": t_end - since_last_ckpt, "t_end": t_end}


def _kill_plan(seed: int, reference: dict) -> list[tuple[str, float]]:
    """Kill points, in order (each resumed run is killed at the next one):
      ("startup", s)  s seconds after launch, before training starts (before any checkpoint);
      ("write", n)    while the n-th checkpoint of that run is being written (its temporary file exists);
      ("train", f)    f·(the remaining training time) after training starts: mid-step or mid-write;
      ("tail", s)     s seconds after training starts, uniform up to the end of the reference run: in
                      training, the final save, the adapter files or the reload check.
    Times come from the reference run (plus the hook's delays)."""
    r = random.Random(seed)
    hooks = STEPS // EVERY * float(SLOW_WRITE)
    tail = reference["t_end"] - reference["t_train"] + hooks
    return [("startup", r.uniform(0.5, reference["t_train"])), ("write", r.randint(1, 3)), ("train", r.random()),
            ("write", 1), ("train", r.random()), ("tail", r.uniform(0.0, tail))]


def _wait(run: Run, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and run.proc.poll() is None:
        time.sleep(0.005)


@pytest.mark.parametrize("seed", [7])
def test_sigkill_anywhere_then_resume_is_bit_identical(workdir, reference, seed):
    out = workdir / f"killed{seed}"
    log: list[tuple] = []
    train_span = reference["t_trained"] - reference["t_train"] + STEPS // EVERY * float(SLOW_WRITE)
    run = stdout = None
    for kind, when in _kill_plan(seed, reference):
        step_before = _checkpoint_is_complete(out) or 0
        run = Run(workdir, out.name, ["--resume"] if log else [], slow_write=True)  # the user's recovery: --resume
        if kind == "startup":
            _wait(run, when)
        elif run.wait_line("data:") is not None:  # (None: the run ended before training)
            if kind == "train":
                _wait(run, when * train_span * (STEPS - step_before) / STEPS)
            elif kind == "tail":
                _wait(run, when)
            else:  # the n-th new temporary checkpoint file: kill while it is being written
                seen, known = 0, set(_temp_files(out))  # (a stray one from an earlier kill does not count)
                while run.proc.poll() is None and seen < when:
                    new = set(_temp_files(out)) - known
                    seen, known = seen + len(new), known | new
                    time.sleep(0.002)
        finished = run.proc.poll() is not None
        run.proc.kill()
        rc, stdout, err = run.finish()
        if log and log[-1][0] == "startup" and log[-1][3] is None and kind != "startup" and not finished:
            assert "starting at step 0" in stdout  # --resume after a kill before the first checkpoint
        if finished or rc == 0:  # ended before the kill point (or between poll and kill)
            assert rc == 0, (log, err[-3000:])
            break
        assert rc == -9, (rc, err[-3000:])
        log.append((kind, round(when, 3), "step", _checkpoint_is_complete(out), "temp", len(_temp_files(out))))
    else:
        run = Run(workdir, out.name, ["--resume"], slow_write=True)
        rc, stdout, err = run.finish()
        assert rc == 0, (log, err[-3000:])
    print("kills (kind, when, complete checkpoint's step after it, stray temp files):", log)
    assert len(log) >= 3, f"most kills must land before the run ends: {log}"
    assert any(k == "write" and t for k, *_, t in log), f"no kill landed during a checkpoint write: {log}"
    assert not _temp_files(out)  # the resumed run cleaned what the kills left
    assert _summary(stdout) == reference["summary"], log
    _assert_identical(_final_state(out), reference["state"], f"after kills {log}")


def test_nothing_saved_is_overwritten_without_overwrite(capsys, workdir, reference):
    out = workdir / "ref"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    rc = cli.main(["finetune", "--model", str(workdir / "tiny"), "--output", str(out), *ARGS])
    assert rc == 2 and "--output must be a new or empty directory (pass --overwrite" in capsys.readouterr().err
    # --resume into a directory of the user's that holds no checkpoint is refused too
    user = workdir / "user"
    user.mkdir()
    (user / "adapter_model.safetensors").write_bytes(b"the user's own adapter")
    (user / "checkpoint").mkdir()
    rc = cli.main(["finetune", "--model", str(workdir / "tiny"), "--output", str(user), *ARGS, "--resume"])
    assert rc == 2 and "--resume must point at a directory with a checkpoint" in capsys.readouterr().err
    assert (user / "adapter_model.safetensors").read_bytes() == b"the user's own adapter"
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_before_the_first_checkpoint_starts_at_step_0(capsys, workdir, reference):
    """What a run killed mid-way through its first checkpoint write leaves (an OUTPUT with a stray temporary
    checkpoint and nothing else): `--resume` starts at step 0, says so, and ends where the uninterrupted run
    did (in this process, on one thread like the subprocesses)."""
    out = workdir / "first-write"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / ".trainer_state.pt.x1y2z3.tmp").write_bytes(b"half a checkpoint")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cwd = os.getcwd()
        os.chdir(workdir)  # ARGS names data.txt relative to the work directory
        try:
            rc = cli.main(["finetune", "--model", "tiny", "--output", str(out), *ARGS, "--resume"])
        finally:
            os.chdir(cwd)
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    assert rc == 0 and "starting at step 0" in stdout
    assert not _temp_files(out)
    assert _summary(stdout) == reference["summary"]
    _assert_identical(_final_state(out), reference["state"], "resumed before the first checkpoint")
