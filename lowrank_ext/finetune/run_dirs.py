"""Where `finetune` writes (no torch: `python -m lowrank_ext --help` imports this).

Without --output each run gets a new directory under ./lowrank-out, named by its start time, so the README's
command can run again and keeps every earlier result:

    ./lowrank-out/run-20261207-093012/      adapter_model.safetensors, adapter_config.json, checkpoint/
    ./lowrank-out/run-20261207-101544/      the next run (-2, -3, ... when two start within the same second)

`--resume` without --output continues the latest of them. An explicit --output keeps its meaning: that
directory, refused when it holds something unless --overwrite or --resume.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

__all__ = ["CHECKPOINT_FILE", "CHECKPOINT_SUBDIR", "DEFAULT_OUTPUT_ROOT", "latest_run", "new_run_dir"]

DEFAULT_OUTPUT_ROOT = "./lowrank-out"
CHECKPOINT_FILE = "trainer_state.pt"
CHECKPOINT_SUBDIR = "checkpoint"  # finetune's checkpoints live in OUTPUT/checkpoint (either trainer)
_RUN_NAME = re.compile(r"^run-(\d{8}-\d{6})(?:-(\d+))?$")


def _run_key(path: Path) -> tuple[str, int] | None:
    """(start time, same-second counter) of a run directory's name; None for anything else."""
    m = _RUN_NAME.match(path.name)
    return None if m is None else (m.group(1), int(m.group(2) or 1))


def new_run_dir(root: str | Path = DEFAULT_OUTPUT_ROOT, now: float | None = None) -> Path:
    """Create and return a new, empty run directory root/run-<YYYYmmdd-HHMMSS>[-N] (local time). mkdir without
    exist_ok is the claim: two runs started in the same second get -2, -3, ..., never the same directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    n = 1
    while True:
        candidate = root / (f"run-{stamp}" if n == 1 else f"run-{stamp}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1


def latest_run(root: str | Path = DEFAULT_OUTPUT_ROOT) -> Path | None:
    """The most recently started run directory under `root` (by the time in its name), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    runs = [(key, p) for p in root.iterdir() if p.is_dir() and (key := _run_key(p)) is not None]
    return max(runs)[1] if runs else None
