"""Shows a build as it goes while keeping all of it in a log: `pip install -v ... 2>&1 | python build_progress.py LOG`.

Every input line goes to LOG. The terminal gets one short line per compiled object — ninja's status line
`[3/9 41s] c++ -MMD ... -c /path/csrc/cpu/nf4.cpp -o ...` becomes `[3/9 41s] csrc/cpu/nf4.cpp`
(NINJA_STATUS="[%f/%t %es] ", set by scripts/setup.sh, puts the elapsed seconds in it) — setup.py's own
`lowrank_ext: ...` lines, ninja's "no work to do", and every compiler error; and at the end one line:
how many objects were compiled, how many warnings the log holds, and the time. Standard library only.
"""

from __future__ import annotations

import re
import sys
import time

# ninja's status: "[done/total" then, with our NINJA_STATUS, " 12s" before the "]"; -v then prints the command
_STATUS = re.compile(r"^\s*\[(\d+)/(\d+)(?:\s+([\d.]+)s)?\]\s*(.*)$")
_SOURCE = re.compile(r"(?:^|\s)-c\s+(?:-c\s+)*([^-\s]\S*)")  # the file a compile command compiles (torch's
# ninja rule has "-c" twice for g++: once in its cflags, once before $in)
_WARNING = re.compile(r": warning:|warning #\d+|ptxas warning")  # gcc/g++, nvcc front end, ptxas
_OUTPUT = re.compile(r"(?:^|\s)-o\s+(\S+)")  # a link (or any command without -c): what it makes


def short_name(path: str) -> str:
    """`/any/where/csrc/cpu/nf4.cpp` -> `csrc/cpu/nf4.cpp` (from the last csrc/ on; else the file name)."""
    i = path.rfind("csrc/")
    return path[i:] if i >= 0 else path.rsplit("/", 1)[-1]


def progress_line(line: str) -> str | None:
    """The terminal line for one line of build output, or None for a line that stays in the log only."""
    m = _STATUS.match(line)
    if m:
        done, total, secs, command = m.groups()
        target = _SOURCE.search(command) or _OUTPUT.search(command)
        what = short_name(target.group(1)) if target else command[:60]
        return f"[{done}/{total}{f' {float(secs):.0f}s' if secs else ''}] {what}"
    text = line.strip()
    if text.startswith(("lowrank_ext", "ninja: no work to do")) or re.search(r"\berror\b[:\s]", text):
        return text
    return None


def is_compile_status(line: str) -> bool:
    """An object compiled (a ninja status line of a compile command, not a link)."""
    m = _STATUS.match(line)
    return bool(m and _SOURCE.search(m.group(4)))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: ... | python scripts/build_progress.py LOG", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    compiled = warnings = 0
    with open(argv[1], "w", encoding="utf-8") as log:
        for line in sys.stdin:
            log.write(line)
            log.flush()
            compiled += is_compile_status(line)
            warnings += bool(_WARNING.search(line))
            shown = progress_line(line)
            if shown is not None:
                print(f"  {shown}", flush=True)
    print(f"  build: {compiled} objects compiled, {warnings} compiler warnings in {argv[1]}, "
          f"{time.monotonic() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
