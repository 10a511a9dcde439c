#!/usr/bin/env python3
"""SASS instruction budgets of the CUDA kernels' steady-state loops (issue 21, section 2). No GPU needed.

Compiles the torch-free kernel translation units (csrc/cuda/nf4_mma_bf16.cu, nf4_mma_fp16.cu, nf4_gemv.cu)
with nvcc -cubin for each arch, with setup.py's nvcc flags (-O3 -std=c++20 --expt-relaxed-constexpr
-lineinfo) plus -Xptxas -v (registers, spill stores / loads, stack frame per kernel), disassembles the
cubin with cuobjdump -sass and measures each kernel's steady-state main loop.

The loop rule. A loop is a backward branch: a BRA (predicated or not) at address a whose target t <= a
and t dominates a in the control-flow graph (every path from the kernel's entry to a passes through t: a
natural loop's back edge; this rejects the jumps back from out-of-line slow paths that ptxas places after
the kernel, e.g. __shfl_sync's BRA.DIV stubs). Its body is every instruction from t to a inclusive (ptxas
lays a loop out contiguously at [target, branch]; the out-of-line stubs, which run only when a warp has
diverged, are not counted). The steady-state loop of a kernel
is the innermost loop that contains HMMA instructions — a loop with HMMA none of whose nested loops
(another loop strictly inside its range) has any — and among several such loops the one(s) with the most
HMMA: the k-tile loop issues a whole tile's mma.sync's, while side loops (the GEMM's low-rank steps) issue
fewer. When several loops tie (a runtime variant compiled as a second copy of the loop) each is reported
and the worst one is checked. Instructions counted: every SASS instruction in the body (NOPs included). The
static count is the count per iteration only if the body has no loop of its own: a steady-state loop that
contains another loop fails the check.

Metrics and targets (exit status 1 when one is missed):
  GEMM (nf4_mma_kernel*):  loop instructions / HMMA in the loop               <= 5
  GEMV (nf4_gemv_kernel*): loop instructions per 2 KB of NF4 weights           <= 600
      the GEMV reads every weight byte exactly once, with 128-bit loads (LDG.E...128: 32 lanes x 16 B =
      512 B per warp instruction), and nothing else in its loop is a 128-bit global load (x arrives by
      cp.async = LDGSTS, scales by 8/32-bit loads), so bytes per iteration = 512 x those loads and
      instructions per 2 KB = loop instructions x 2048 / (512 x loads). Counting loads, not HMMA, keeps the
      metric right for every variant (at M <= 8 one HMMA covers 128 B of weights, above it 64 B); for the
      GEMV every innermost HMMA loop (one per runtime variant) is checked, not only those with the most HMMA.
  every kernel: 0 bytes spill stores, 0 bytes spill loads, 0 bytes stack frame.

Usage: python bench/sass_budget.py [--csrc DIR] [--arch 80 90] [--json FILE]
Tools: nvcc (PATH or CUDA_HOME/bin); cuobjdump from the toolkit or the PyPI wheels
  pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm    (binaries in site-packages/nvidia/cu13/bin)
Exit status: 0 all targets met, 1 a target missed, 2 a tool is missing or a compile failed.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import asdict, dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("cuda/nf4_mma_bf16.cu", "cuda/nf4_mma_fp16.cu", "cuda/nf4_gemv.cu")  # relative to csrc
NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas", "-v"]  # setup.py's + -v
GEMM_MAX_PER_HMMA = 5.0
GEMV_MAX_PER_2KB = 600.0
WEIGHT_BYTES_PER_WIDE_LOAD = 512  # one LDG.E.128 per warp: 32 lanes x 16 bytes of packed NF4 codes
INSTALL_HINT = (
    "cuobjdump not found: put the CUDA toolkit's bin on PATH, or\n"
    "  pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm\n"
    "(the binaries land in site-packages/nvidia/cu13/bin, which this script searches)"
)


class ToolMissing(RuntimeError):
    pass


# ---- tools --------------------------------------------------------------------------------------------
def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


def find_cuobjdump() -> str | None:
    """cuobjdump on PATH, beside nvcc, or from the nvidia-cuda-cuobjdump wheel in any site-packages."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    nvcc = find_nvcc()
    if nvcc:
        beside = os.path.join(os.path.dirname(os.path.realpath(nvcc)), "cuobjdump")
        if os.path.isfile(beside):
            return beside
    # sys.path's order first (the interpreter's own precedence), then this environment's install paths
    roots = [p for p in sys.path if p.endswith("site-packages")]
    roots += [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    for root in dict.fromkeys(roots):
        for cand in sorted(glob.glob(os.path.join(root, "nvidia", "*", "bin", "cuobjdump"))):
            if os.access(cand, os.X_OK):
                return cand
    return None


# ---- ptxas -v -----------------------------------------------------------------------------------------
@dataclass
class PtxasInfo:
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    stack: int = -1


_RE_ENTRY = re.compile(r"(?:Compiling entry function|Function properties for) '?([A-Za-z0-9_$.]+)'?")
_RE_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(text: str) -> dict[str, PtxasInfo]:
    """ptxas -v output -> per mangled function name: registers, spill stores / loads (bytes), stack frame."""
    info: dict[str, PtxasInfo] = {}
    current = None
    for line in text.splitlines():
        m = _RE_ENTRY.search(line)
        if m:
            current = info.setdefault(m.group(1), PtxasInfo())
            continue
        if current is None:
            continue
        m = _RE_FRAME.search(line)
        if m:
            current.stack, current.spill_stores, current.spill_loads = (int(g) for g in m.groups())
        m = _RE_REGS.search(line)
        if m:
            current.registers = int(m.group(1))
    return info


# ---- SASS listing -------------------------------------------------------------------------------------
@dataclass
class Instr:
    addr: int
    opcode: str  # full opcode with modifiers, predicate removed: "HMMA.16816.F32.BF16", "BRA"
    text: str    # the instruction as printed (predicate and operands)

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


_RE_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_RE_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_RE_PRED = re.compile(r"^@!?U?P[0-9T]+\s+")


def parse_sass(text: str) -> dict[str, list[Instr]]:
    """cuobjdump -sass output -> per function (mangled name) its instructions in address order."""
    funcs: dict[str, list[Instr]] = {}
    current: list[Instr] | None = None
    for line in text.splitlines():
        m = _RE_FUNC.match(line)
        if m:
            current = funcs.setdefault(m.group(1), [])
            continue
        m = _RE_INSTR.match(line)
        if m and current is not None:
            body = _RE_PRED.sub("", m.group(2).strip())
            opcode = body.split()[0] if body else ""
            current.append(Instr(int(m.group(1), 16), opcode, m.group(2).strip()))
    return funcs


_RE_TARGET = re.compile(r"\b(0x[0-9a-fA-F]+)\s*$")


def branch_target(ins: Instr) -> int | None:
    """Target of a direct jump (`BRA 0x2520`, `@P0 BRA 0x5d0`, `BRA.DIV ~URZ, 0x..`, `CALL.REL.NOINC 0x..`)."""
    if ins.base not in ("BRA", "CALL") or (ins.base == "CALL" and "NOINC" not in ins.opcode):
        return None
    m = _RE_TARGET.search(ins.text)
    return int(m.group(1), 16) if m else None


def _conditional(ins: Instr) -> bool:
    """A predicated instruction (`@P0 ...`), or a branch with a condition operand (`BRA.DIV ~URZ, 0x..`)."""
    if ins.text.startswith("@") and not ins.text.startswith("@PT "):
        return True
    return "," in ins.text


def _successors(instrs: list[Instr]) -> list[list[int]]:
    """Control-flow successors (instruction indices) of every instruction."""
    index_of = {ins.addr: i for i, ins in enumerate(instrs)}
    succ = []
    for i, ins in enumerate(instrs):
        out = []
        target = branch_target(ins)
        if target is not None and target in index_of:
            out.append(index_of[target])
        # A call (CALL.REL.NOINC: a subroutine, or ptxas' jump out of a loop) may come back: both edges.
        ends_flow = ins.base == "BRA" or ins.base in ("EXIT", "RET", "BRX", "JMX", "JMP", "TRAP")
        if (not ends_flow or _conditional(ins)) and i + 1 < len(instrs):
            out.append(i + 1)
        succ.append(out)
    return succ


def _dominates(succ: list[list[int]], header: int, node: int) -> bool:
    """Whether every path from the entry (instruction 0) to `node` passes through `header`."""
    if header == node or header == 0:
        return True
    seen, todo = {0}, [0]  # everything reachable from the entry without passing through the header
    while todo:
        for nxt in succ[todo.pop()]:
            if nxt != header and nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return node not in seen


@dataclass
class Loop:
    start: int  # index of the first instruction (the branch target)
    end: int    # index of the backward branch
    start_addr: int
    end_addr: int
    instructions: int
    hmma: int
    wide_loads: int = 0  # 128-bit global loads (LDG ... .128): the GEMV's weight reads
    has_inner_hmma_loop: bool = False
    inner_loops: int = 0  # loops strictly inside this one (their bodies run more often than once per iteration)


def find_loops(instrs: list[Instr]) -> list[Loop]:
    """Every loop: a backward jump a -> t (t <= a) whose target dominates it (a natural loop's back edge).

    The dominance test rejects the jumps back from out-of-line code: ptxas places the slow path of a
    warp-synchronous instruction (BRA.DIV -> stub -> BRA back into the loop) after the kernel's end, and
    such a stub's jump back is "backward" only by address. Counted: the contiguous range [t, a] — the
    out-of-line stubs, which run only when the warp has diverged, are not part of it.
    """
    index_of = {ins.addr: i for i, ins in enumerate(instrs)}
    succ = _successors(instrs)
    loops = []
    for i, ins in enumerate(instrs):
        t = branch_target(ins)
        if t is None or t > ins.addr or t not in index_of or not _dominates(succ, index_of[t], i):
            continue
        s = index_of[t]
        body = instrs[s : i + 1]
        loops.append(Loop(s, i, t, ins.addr, len(body), sum(b.base == "HMMA" for b in body),
                          sum(b.base == "LDG" and ".128" in b.opcode for b in body)))
    for outer in loops:
        inside = [inner for inner in loops if outer.start <= inner.start and inner.end <= outer.end
                  and (inner.start, inner.end) != (outer.start, outer.end)]
        outer.has_inner_hmma_loop = any(inner.hmma > 0 for inner in inside)
        outer.inner_loops = len({(inner.start, inner.end) for inner in inside})
    return loops


def steady_state_loops(instrs: list[Instr], every_variant: bool = False) -> list[Loop]:
    """The innermost HMMA loops with the most HMMA — or all of them with `every_variant` (the GEMV's runtime
    variants: see the module docstring); [] when none."""
    innermost = [lp for lp in find_loops(instrs) if lp.hmma > 0 and not lp.has_inner_hmma_loop]
    if not innermost:
        return []
    most = 1 if every_variant else max(lp.hmma for lp in innermost)
    unique = {(lp.start, lp.end): lp for lp in innermost if lp.hmma >= most}  # a loop with 2 back-branches once
    return [unique[k] for k in sorted(unique)]


# ---- measurement --------------------------------------------------------------------------------------
@dataclass
class KernelReport:
    arch: str
    source: str
    kernel: str      # demangled when c++filt is available
    mangled: str
    kind: str        # "gemm", "gemv" or "other"
    loop_instructions: int | None
    loop_hmma: int | None
    loop_addr: str | None
    loop_inner_loops: int | None  # > 0 fails: the static count would not be the count per iteration
    metric: float | None  # instructions per HMMA (gemm) or per 2 KB of NF4 weights (gemv)
    target: float | None
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    failures: list[str] = field(default_factory=list)


def kind_of(name: str) -> str:
    if "nf4_mma_kernel" in name:
        return "gemm"
    if "nf4_gemv_kernel" in name:
        return "gemv"
    return "other"


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False).stdout
    lines = out.splitlines()
    return {n: (lines[i] if i < len(lines) else n) for i, n in enumerate(names)}


def loop_metric(kind: str, loop: Loop) -> tuple[float | None, float | None]:
    if kind == "gemm":
        return loop.instructions / loop.hmma, GEMM_MAX_PER_HMMA
    if kind == "gemv":
        if loop.wide_loads == 0:  # no weight read in the loop: not a steady state this metric can describe
            return float("inf"), GEMV_MAX_PER_2KB
        return loop.instructions * 2048 / (WEIGHT_BYTES_PER_WIDE_LOAD * loop.wide_loads), GEMV_MAX_PER_2KB
    return None, None


def analyze(sass: str, ptxas: str, arch: str, source: str) -> list[KernelReport]:
    """Reports for every kernel of one cubin (its SASS listing and its ptxas -v output)."""
    funcs = parse_sass(sass)
    infos = parse_ptxas(ptxas)
    names = demangle(sorted(funcs))
    reports = []
    for mangled in sorted(funcs):
        kind = kind_of(mangled)
        info = infos.get(mangled, PtxasInfo())
        loops = steady_state_loops(funcs[mangled], every_variant=kind == "gemv")
        worst = max(loops, key=lambda lp: loop_metric(kind, lp)[0] or lp.instructions / lp.hmma) if loops else None
        metric, target = loop_metric(kind, worst) if worst else (None, None)
        rep = KernelReport(
            arch=arch, source=source, kernel=names[mangled], mangled=mangled, kind=kind,
            loop_instructions=worst.instructions if worst else None, loop_hmma=worst.hmma if worst else None,
            loop_addr=(", ".join(f"{lp.start_addr:#x}-{lp.end_addr:#x}" for lp in loops) or None),
            loop_inner_loops=max((lp.inner_loops for lp in loops), default=None),
            metric=metric, target=target, registers=info.registers, spill_stores=info.spill_stores,
            spill_loads=info.spill_loads, stack=info.stack,
        )
        if kind in ("gemm", "gemv") and worst is None:
            rep.failures.append("no HMMA loop found")
        if loops and max(lp.inner_loops for lp in loops) > 0:
            rep.failures.append("the steady-state loop has inner loops (its static count is not per iteration)")
        if metric is not None and metric > target:
            rep.failures.append(f"{metric:.2f} > {target:g} {'per HMMA' if kind == 'gemm' else 'per 2 KB'}")
        if info.registers < 0:
            rep.failures.append("no ptxas -v record")
        for what, value in (("spill stores", info.spill_stores), ("spill loads", info.spill_loads),
                            ("stack", info.stack)):
            if value > 0:
                rep.failures.append(f"{what} {value} B")
        reports.append(rep)
    return reports


def compile_and_dump(src: str, arch: str, csrc: str, workdir: str, nvcc: str, cuobjdump: str) -> tuple[str, str]:
    """nvcc -cubin for sm_<arch> -> (cuobjdump -sass listing, ptxas -v output)."""
    cubin = os.path.join(workdir, f"{os.path.basename(src)}.sm_{arch}.cubin")
    cmd = [nvcc, "-cubin", *NVCC_FLAGS, f"-I{os.path.join(csrc, 'include')}", f"-I{os.path.join(csrc, 'cuda')}",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", os.path.join(csrc, src), "-o", cubin]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed for {src} sm_{arch}:\n{' '.join(cmd)}\n{res.stdout}{res.stderr}")
    dump = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=False)
    if dump.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass failed for {cubin}:\n{dump.stderr}")
    return dump.stdout, res.stdout + res.stderr


def measure(csrc: str, archs: list[str], sources=SOURCES) -> list[KernelReport]:
    nvcc = find_nvcc()
    if nvcc is None:
        raise ToolMissing("nvcc not found (PATH, CUDA_HOME/bin, /usr/local/cuda/bin)")
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        raise ToolMissing(INSTALL_HINT)
    reports = []
    with tempfile.TemporaryDirectory(prefix="sass_budget_") as work:
        for arch in archs:
            for src in sources:
                sass, ptxas = compile_and_dump(src, arch, csrc, work, nvcc, cuobjdump)
                reports.extend(analyze(sass, ptxas, arch, src))
    return reports


def short_name(name: str) -> str:
    name = re.sub(r"^void ", "", name)
    name = name.replace("lowrank_ext::", "").replace("__nv_bfloat16", "bf16").replace("__half", "fp16")
    return re.sub(r"\(.*\)$", "", name)


def format_table(reports: list[KernelReport]) -> str:
    head = ("arch", "kernel", "loop instr", "HMMA", "metric", "target", "regs", "spill st/ld", "stack", "status")
    rows = []
    for r in reports:
        unit = {"gemm": "/HMMA", "gemv": "/2KB"}.get(r.kind, "")
        rows.append((
            f"sm_{r.arch}", short_name(r.kernel),
            "-" if r.loop_instructions is None else str(r.loop_instructions),
            "-" if r.loop_hmma is None else str(r.loop_hmma),
            "-" if r.metric is None else f"{r.metric:.2f}{unit}",
            "-" if r.target is None else f"<= {r.target:g}",
            str(r.registers), f"{r.spill_stores}/{r.spill_loads}", str(r.stack),
            "ok" if not r.failures else "MISSED: " + "; ".join(r.failures),
        ))
    widths = [max(len(x[i]) for x in (head, *rows)) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--csrc", default=os.path.join(REPO, "csrc"), help="the csrc directory (default: the repo's)")
    ap.add_argument("--arch", nargs="+", default=["80", "90"], help="SM versions (default: 80 90)")
    ap.add_argument("--json", help="also write the reports to this JSON file")
    args = ap.parse_args(argv)
    archs = [a.replace("sm_", "").replace("sm", "") for a in args.arch]
    try:
        reports = measure(os.path.abspath(args.csrc), archs)
    except ToolMissing as e:
        print(f"sass_budget: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"sass_budget: {e}", file=sys.stderr)
        return 2
    print(format_table(reports))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in reports], f, indent=1)
    missed = [r for r in reports if r.failures]
    print(f"\n{len(reports) - len(missed)}/{len(reports)} kernels within budget "
          f"(GEMM <= {GEMM_MAX_PER_HMMA:g} instr/HMMA, GEMV <= {GEMV_MAX_PER_2KB:g} instr/2 KB, 0 spills, 0 stack)")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
