"""A pytest plugin for bench/gpu_check.sh: results that survive a killed pytest.

pytest writes --junitxml only when the session ends, so a run killed by a timeout leaves nothing. This
plugin keeps, under $LRX_PROGRESS_DIR (default: the current directory):
  tests_partial.xml   a complete JUnit XML of every test finished so far, rewritten atomically
                      (temp file + rename) after each test;
  tests_current.txt   the test running now (after a kill: the one that hung or ran out of time; after
                      SIGINT: "(interrupted) <test>").
Load it with `-p _pytest_progress` and bench/ on PYTHONPATH. Only the standard library.
"""

from __future__ import annotations

import os
import time
from xml.sax.saxutils import escape, quoteattr

_dir = os.environ.get("LRX_PROGRESS_DIR", ".")
_results: list[tuple[str, str, float, str]] = []  # (nodeid, outcome, seconds, message)
_durations: dict[str, float] = {}
_start = time.time()


def _write(name: str, text: str) -> None:
    path = os.path.join(_dir, name)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _junit() -> str:
    counts = {k: sum(1 for r in _results if r[1] == k) for k in ("failed", "error", "skipped")}
    cases = []
    for nodeid, outcome, secs, msg in _results:
        path, _, name = nodeid.partition("::")
        cls = path.replace("/", ".").removesuffix(".py")
        body = ""
        if outcome in ("failed", "error", "skipped"):
            tag = {"failed": "failure", "error": "error", "skipped": "skipped"}[outcome]
            body = f"<{tag} message={quoteattr(msg[:500])}>{escape(msg[:4000])}</{tag}>"
        cases.append(f'  <testcase classname={quoteattr(cls)} name={quoteattr(name)} time="{secs:.3f}">{body}</testcase>')
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<testsuites><testsuite name="pytest (partial: written after each test)" tests="{len(_results)}" '
        f'failures="{counts["failed"]}" errors="{counts["error"]}" skipped="{counts["skipped"]}" '
        f'time="{time.time() - _start:.1f}">\n' + "\n".join(cases) + "\n</testsuite></testsuites>\n"
    )


_current = ""


def pytest_runtest_logstart(nodeid, location):
    global _current
    _current = nodeid
    _write("tests_current.txt", nodeid + "\n")


def pytest_runtest_logfinish(nodeid, location):
    global _current
    _current = ""


def pytest_runtest_logreport(report):
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration
    outcome = None
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcome = report.outcome
        if report.when == "setup" and report.failed:
            outcome = "error"
    elif report.when == "teardown" and report.failed:
        outcome = "error"
    if outcome is None:
        return
    msg = ""
    if report.skipped and isinstance(report.longrepr, tuple):
        msg = str(report.longrepr[2])
    elif not report.passed:
        msg = str(report.longreprtext)
    _results.append((report.nodeid, outcome, _durations[report.nodeid], msg))
    _write("tests_partial.xml", _junit())


def pytest_sessionfinish(session, exitstatus):
    if _current:  # stopped inside a test (SIGINT from the timeout): name it
        _write("tests_current.txt", f"(interrupted) {_current}\n")
    else:
        _write("tests_current.txt", f"(finished, exit status {int(exitstatus)})\n")
