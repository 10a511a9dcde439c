"""One timing helper for every benchmark: warm-up, synchronize, median of many runs, and a table printer.

Ratios measured side by side in one run are what we compare (these machines are noisy).
"""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable

import torch

__all__ = ["Timer", "bench", "cpu_name", "print_table"]


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench(fn: Callable[[], object], *, warmup: int = 3, repeat: int = 20, min_time: float = 0.2,
          device: torch.device | str | None = "cpu") -> float:
    """Median seconds per call of `fn()` after `warmup` calls; runs at least `repeat` times and
    at least `min_time` seconds in total."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start_all < min_time:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * repeat:
            break
    return statistics.median(times)


class Timer:
    """Context manager measuring wall time of a block (synchronizing CUDA at both ends)."""

    def __init__(self, device: torch.device | str | None = "cpu") -> None:
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        _sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        _sync(self.device)
        self.seconds = time.perf_counter() - self._t0


def print_table(title: str, header: list[str], rows: list[list[object]]) -> str:
    """Print (and return) a plain-text table with right-aligned columns."""
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(cells[0], widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells[1:]]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def cpu_name() -> str:
    """The CPU's model name as lscpu reports it (benches name the machine their numbers come from)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
