"""`python -m lowrank_ext bench [--quick] [--only nf4,linear] [--chart PATH]`: run the repo's benchmarks.

Each `bench/bench_<name>.py` that defines `run(quick: bool)` is imported and run in a fixed order
(nf4, linear, optim, layers, then any others). A bench prints its own tables (bench/_timing.py's
print_table: shape, time, GB/s, ratio to each baseline measured in the same run). For the chart it
returns a list of rows, one per shape:

    {"shape": "4096x4096 M=1", "ours": 0.00051, "baselines": {"F.linear": 0.0031, "bnb": 0.0093}}

(seconds; rows without "ours" or "baselines" are ignored for the chart, and so is a bench returning
None). A bench may instead return the text of bench/_timing.py's print_table: then the column whose
header starts with "ours" and ends in a time unit (s, ms, us, ns) is our time, every other column
with a time unit is a baseline, and the first column names the shape. The chart (matplotlib, the `plot` extra) has one panel per bench: for each shape a bar of our
time and one of each baseline's, log scale, with the speed-up (baseline / ours) written above it.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
import time
from pathlib import Path

__all__ = ["BENCH_ORDER", "collect_rows", "discover", "plot_chart", "run_bench"]

BENCH_ORDER = ("nf4", "linear", "optim", "layers")


def _default_bench_dir() -> Path:
    """bench/ of the source checkout this package runs from (this file is <checkout>/lowrank_ext/finetune/...),
    else ./bench (an installed package ships no benches: run from a checkout or pass --bench-dir)."""
    checkout = Path(__file__).resolve().parents[2] / "bench"
    return checkout if checkout.is_dir() else Path.cwd() / "bench"


def discover(bench_dir: Path) -> dict[str, Path]:
    """{name: path} of bench_<name>.py files, in BENCH_ORDER then alphabetical."""
    found = {p.stem[len("bench_"):]: p for p in sorted(bench_dir.glob("bench_*.py"))}
    order = [n for n in BENCH_ORDER if n in found] + [n for n in sorted(found) if n not in BENCH_ORDER]
    return {n: found[n] for n in order}


def _load(name: str, path: Path):
    for d in (str(path.parent.parent), str(path.parent)):  # `from bench._timing import ...` and `from _timing ...`
        if d not in sys.path:
            sys.path.insert(0, d)
    spec = importlib.util.spec_from_file_location(f"bench.bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def _rows_from_table(text: str) -> list[dict]:
    """Chart rows parsed from print_table's text (columns separated by 2+ spaces, a dashed rule under
    the header)."""
    lines = text.splitlines()
    rule = next((i for i, ln in enumerate(lines) if ln.strip() and set(ln.replace(" ", "")) == {"-"}), None)
    if rule is None or rule == 0:
        return []
    header = re.split(r"\s{2,}", lines[rule - 1].strip())
    units = {j: _UNITS.get(h.split()[-1]) for j, h in enumerate(header) if len(h.split()) > 1}
    ours = next((j for j, h in enumerate(header) if h.lower().startswith("ours") and units.get(j)), None)
    if ours is None:
        return []
    rows = []
    for ln in lines[rule + 1:]:
        cells = re.split(r"\s{2,}", ln.strip())
        if len(cells) != len(header):
            continue
        try:
            t_ours = float(cells[ours]) * units[ours]
            base = {header[j].rsplit(" ", 1)[0]: float(cells[j]) * u for j, u in units.items() if u and j != ours}
        except ValueError:
            continue
        if base:
            rows.append({"shape": cells[0], "ours": t_ours, "baselines": base})
    return rows


def collect_rows(result: object) -> list[dict]:
    """The chart rows of a bench's return value (see the module docstring); [] when it has none."""
    if isinstance(result, str):
        return collect_rows(_rows_from_table(result))
    if not isinstance(result, (list, tuple)):
        return []
    rows = []
    for r in result:
        if (isinstance(r, dict) and isinstance(r.get("ours"), (int, float)) and isinstance(r.get("baselines"), dict)
                and r["baselines"]):
            rows.append({"shape": str(r.get("shape", len(rows))), "ours": float(r["ours"]),
                         "baselines": {str(k): float(v) for k, v in r["baselines"].items()
                                       if isinstance(v, (int, float)) and math.isfinite(v)}})
    return rows


def plot_chart(results: dict[str, list[dict]], path: str | Path) -> Path | None:
    """One panel per bench: grouped bars (ours + each baseline) per shape, ms on a log axis."""
    results = {k: v for k, v in results.items() if v}
    if not results:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(11, 3.6 * len(results)), squeeze=False)
    for ax, (name, rows) in zip(axes[:, 0], results.items()):
        baselines = sorted({b for r in rows for b in r["baselines"]})
        series = ["ours (lowrank_ext)"] + baselines
        width = 0.8 / len(series)
        for j, s in enumerate(series):
            xs, ys = [], []
            for i, r in enumerate(rows):
                t = r["ours"] if j == 0 else r["baselines"].get(s)
                if t is not None and t > 0:
                    xs.append(i + (j - (len(series) - 1) / 2) * width)
                    ys.append(t * 1e3)
            bars = ax.bar(xs, ys, width, label=s)
            if j > 0:  # speed-up over this baseline, above its bar
                for bar, i in zip(bars, [i for i, r in enumerate(rows) if r["baselines"].get(s, 0) > 0]):
                    ax.annotate(f"{rows[i]['baselines'][s] / rows[i]['ours']:.2g}x",
                                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(range(len(rows)), [r["shape"] for r in rows], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("time (ms, lower is better)")
        ax.set_title(f"bench_{name}: our time vs each baseline (label: baseline / ours)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_bench(quick: bool = False, only: str | None = None, chart: str | Path | None = "lowrank-bench.png",
              bench_dir: str | Path | None = None) -> dict[str, list[dict]]:
    """Run the benches (all, or the comma-separated `only`), print their tables, write the chart."""
    d = Path(bench_dir) if bench_dir else _default_bench_dir()
    if not d.is_dir():
        raise FileNotFoundError(f"lowrank_ext bench: --bench-dir must be a directory with bench_*.py files, got "
                                f"{str(d)!r} (run from a source checkout, or pass --bench-dir)")
    benches = discover(d)
    if only:
        wanted = [w.strip() for w in only.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in benches]
        if unknown:
            raise ValueError(f"lowrank_ext bench: --only must name benches in {sorted(benches)}, got {unknown}")
        benches = {n: benches[n] for n in wanted}
    results: dict[str, list[dict]] = {}
    for name, path in benches.items():
        mod = _load(name, path)
        if not callable(getattr(mod, "run", None)):
            print(f"=== bench_{name}: no run(quick) function, skipped", flush=True)
            continue
        print(f"=== bench_{name} ({'quick' if quick else 'full'})", flush=True)
        t0 = time.perf_counter()
        result = mod.run(quick)
        # a bench may say how its rows chart (chart_rows); else the generic forms of collect_rows
        results[name] = collect_rows(getattr(mod, "chart_rows", collect_rows)(result))
        print(f"=== bench_{name}: {time.perf_counter() - t0:.1f}s", flush=True)
    if not benches:
        print(f"no bench_*.py files in {d}", flush=True)
    if chart:
        try:
            out = plot_chart(results, chart)
        except ImportError:
            print("chart skipped: matplotlib is not installed (pip install 'lowrank_ext[plot]')", flush=True)
        else:
            print(f"chart: {out}" if out else "chart skipped: no bench returned chart rows", flush=True)
    return results
