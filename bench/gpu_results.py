"""Assemble gpu_results.md from what bench/gpu_check.sh left in its scratch folder (called after every phase and
from the script's EXIT trap, so a run killed at any point still has a dated results file; gpu_check.sh copies it
to $OUT). Standard library only: it must work when the build or torch failed.

usage: python bench/gpu_results.py WORK_DIR      (writes WORK_DIR/gpu_results.md)
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except OSError:
        return ""


def _phases(out: Path) -> list[str]:
    rows = [line.split("\t") for line in _read(out / "phases.tsv").splitlines() if line.strip()]
    lines = ["| phase | result | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3] if len(r) > 3 else ''} |" for r in rows]
    total = sum(int(r[2]) for r in rows if len(r) > 2 and r[2].isdigit())
    return [*lines, f"| total | | {total} | |"]


def _doctor(out: Path) -> list[str]:
    try:
        rep = json.loads(_read(out / "doctor.json"))
        rep["checks"], rep["failures"]  # a report without them is no report (KeyError)
    except (ValueError, KeyError, TypeError):
        err = _read(out / "doctor.err").strip().splitlines()[-5:]
        return ["(no doctor report)" + ("\n\n```\n" + "\n".join(err) + "\n```" if err else "")]
    devs = "; ".join(f"{d['device']}: {d['name']}" for d in rep.get("devices", []))
    lines = [f"{len(rep['checks'])} checks, {rep['failures']} failed, {rep['total_s']} s. Devices: {devs}.", "",
             "| op | device | dtype | path | max error | tolerance | result | ms |", "|---|---|---|---|---|---|---|---|"]

    def num(v):
        return "-" if v is None else ("0" if v == 0 else f"{v:.2e}")

    for c in rep["checks"]:
        lines.append(f"| {c['op']} | {c['device']} | {c['dtype']} | {c['path']} | {num(c['max_error'])} | "
                     f"{num(c['tolerance'])} | {'ok' if c['ok'] else '**FAIL**'} | {c['time_ms']:.0f} |")
    lines += [f"- FAIL {c['op']} [{c['device']}, {c['dtype']}]: {c['note']}" for c in rep["checks"] if not c["ok"]]
    lines += [f"- note: {n}" for n in rep.get("notes", [])]
    return lines


def _tests(out: Path) -> list[str]:
    xml = out / "tests.xml" if (out / "tests.xml").exists() else out / "tests_partial.xml"
    lines: list[str] = []
    try:
        root = ET.parse(xml).getroot()
        cases = list(root.iter("testcase"))
        status = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
        bad = []
        for c in cases:
            kinds = [ch.tag for ch in c]
            k = "failed" if "failure" in kinds else "error" if "error" in kinds else "skipped" if "skipped" in kinds else "passed"
            status[k] += 1
            if k in ("failed", "error"):
                bad.append(f"{c.get('classname')}::{c.get('name')}")
        lines.append(f"From `{xml.name}`: " + ", ".join(f"{v} {k}" for k, v in status.items()) + ".")
        lines += [f"- {k}" for k in bad[:60]]
    except (ET.ParseError, OSError):
        lines.append("(no junit file)")
    current = _read(out / "tests_current.txt").strip()
    if current.startswith("(interrupted)"):
        lines.append(f"- interrupted (timeout or signal) while running: `{current.split(' ', 1)[1]}`")
    elif current and not current.startswith("(finished"):
        lines.append(f"- killed while running: `{current}`")
    log = _read(out / "tests.log")
    summary = [ln for ln in log.splitlines() if re.search(r"\d+ (passed|failed)|no tests ran|error", ln)][-1:]
    dur = re.search(r"=+ slowest \d+ durations =+\n(.*?)(?:\n\s*\n|\n[=!])", log, flags=re.DOTALL)
    if summary:
        lines += ["", f"pytest: `{summary[0].strip('= ')}`"]
    if dur:
        lines += ["", "Slowest (pytest --durations=30):", "", "```", dur.group(1).strip(), "```"]
    return lines


def _warnings(out: Path) -> list[str]:
    lines = [ln.strip() for ln in _read(out / "warnings.txt").splitlines() if ln.strip()]
    return [*(f"- **{ln}**" if ln.startswith("WARNING") else f"- {ln}" for ln in lines), ""] if lines else []


def _sass(out: Path) -> list[str]:
    text = _read(out / "sass_budget.txt").strip()
    if not text:
        return []
    tail = "\n".join(text.splitlines()[-40:])
    return ["## SASS budget (`bench/sass_budget.py`, optional)", "", "```", tail, "```", ""]


def main(out_dir: str) -> int:
    out = Path(out_dir)
    date = _read(out / "date.txt").strip() or "(date unknown)"
    parts = [
        f"# lowrank_ext GPU check — {date}",
        "",
        *_warnings(out),
        "`bash bench/gpu_check.sh` (one device call). Files beside this one: tests.log, tests.xml (junit),",
        "doctor.json, bench.md, build_tail.log, rest.tar.gz (full build log, nvidia-smi, probe, phases, bench log).",
        "Machine:",
        "",
        "```",
        (_read(out / "nvidia-smi.txt") + _read(out / "machine.txt")).strip(),
        "```",
        "",
        "## Phases",
        "",
        *_phases(out),
        "",
        "## Doctor (`python -m lowrank_ext doctor`)",
        "",
        *_doctor(out),
        "",
        "## CUDA tests (`pytest -k 'cuda and not ptx' -m 'not slow'`)",
        "",
        *_tests(out),
        "",
        "## Benchmarks (`bench/bench_gpu.py`)",
        "",
        _read(out / "bench.md").strip() or "(not run)",
        "",
        *_sass(out),
    ]
    (out / "gpu_results.md").write_text("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
