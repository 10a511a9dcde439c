"""bench/sass_budget.py: the steady-state loop finder, the ptxas -v parser and the budgets (issue 21, §2).

The counting itself is checked on a SASS listing checked into tests/data/ (cuobjdump -sass of
tests/data/sass_loops_kernel.cu for sm_80, whose source has loops of known mma counts), and on hand-written
listings for the cases that listing lacks (an out-of-line divergence stub that jumps back into a loop).
Expected loop bounds come from reading the listing; instruction counts from the addresses (every sm_70+
SASS instruction is 16 bytes), not from the parser under test.
"""
import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data")


def _load_script():
    spec = importlib.util.spec_from_file_location("sass_budget", os.path.join(REPO, "bench", "sass_budget.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sass_budget"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


sb = _load_script()


def n_instr(start: int, end: int) -> int:
    return (end - start) // 16 + 1  # sm_70+: 16 bytes per instruction


def _listing() -> str:
    with open(os.path.join(DATA, "sass_loops_kernel.sm_80.sass")) as f:
        return f.read()


def test_loops_of_checked_in_listing():
    funcs = sb.parse_sass(_listing())
    assert list(funcs) == ["_Z17sass_loops_kernelPK5uint4Pfiiii"]
    instrs = funcs["_Z17sass_loops_kernelPK5uint4Pfiiii"]
    assert len(instrs) == n_instr(0x0, 0x670)  # 0x5a0: the final `BRA 0x5a0`, then NOP padding to 0x670
    loops = {(lp.start_addr, lp.end_addr): lp for lp in sb.find_loops(instrs)}
    # read off the listing: side loop 0x160..0x200 (1 HMMA) inside outer 0xf0..0x230; steady 0x2f0..0x450
    # (SHFL + 2 HMMA); scalar 0x490..0x510; the end-of-function self-branch 0x5a0
    assert set(loops) == {(0x160, 0x200), (0xF0, 0x230), (0x2F0, 0x450), (0x490, 0x510), (0x5A0, 0x5A0)}
    for (s, e), lp in loops.items():
        assert lp.instructions == n_instr(s, e)
    assert [loops[k].hmma for k in sorted(loops)] == [1, 1, 2, 0, 0]  # 0xf0, 0x160, 0x2f0, 0x490, 0x5a0
    assert loops[(0xF0, 0x230)].has_inner_hmma_loop and not loops[(0x160, 0x200)].has_inner_hmma_loop
    steady = sb.steady_state_loops(instrs)
    assert [(lp.start_addr, lp.end_addr, lp.hmma) for lp in steady] == [(0x2F0, 0x450, 2)]


def _synthetic(body: list[str], name: str = "_Z3fooPf") -> str:
    lines = [f"\t\tFunction : {name}"]
    for i, text in enumerate(body):
        lines.append(f"        /*{16 * i:04x}*/                   {text} ;   /* 0x0000000000000000 */")
        lines.append("                                                   /* 0x0000000000000000 */")
    return "\n".join(lines)


# A loop 0x10..0x60 with a warp shuffle whose slow path is out of line (0x90..0xb0) and jumps back into
# the loop at 0x30 through a subroutine call (0xc0..0xd0, RET), as ptxas lays out __shfl_sync's BRA.DIV.
STUB_LISTING = [
    "MOV R0, RZ",                      # 0x00
    "IADD3 R0, R0, 0x1, RZ",           # 0x10  loop head
    "BRA.DIV ~URZ, 0x90",              # 0x20
    "SHFL.IDX PT, R2, R0, RZ, 0x1f",   # 0x30  re-entry from the stub
    "HMMA.16816.F32.BF16 R4, R8, R12, R4",  # 0x40
    "ISETP.GE.AND P0, PT, R0, 0x8, PT",     # 0x50
    "@!P0 BRA 0x10",                   # 0x60  the loop's back edge
    "EXIT",                            # 0x70
    "BRA 0x80",                        # 0x80  end-of-function self-branch
    "MOV R16, 0xb0",                   # 0x90  stub
    "CALL.REL.NOINC 0xc0",             # 0xa0
    "BRA 0x30",                        # 0xb0  backward by address, but not a loop: 0x30 does not dominate it
    "WARPSYNC R5",                     # 0xc0  subroutine
    "RET.REL.NODEC R16 0x0",           # 0xd0
]


def test_out_of_line_stub_is_not_a_loop():
    instrs = sb.parse_sass(_synthetic(STUB_LISTING))["_Z3fooPf"]
    loops = sb.find_loops(instrs)
    assert {(lp.start_addr, lp.end_addr) for lp in loops} == {(0x10, 0x60), (0x80, 0x80)}
    steady = sb.steady_state_loops(instrs)
    assert [(lp.start_addr, lp.end_addr, lp.instructions, lp.hmma) for lp in steady] == [(0x10, 0x60, 6, 1)]


def test_ties_are_all_reported_and_the_worst_checked():
    # two innermost loops with one HMMA each (e.g. a runtime variant compiled twice): 3 and 5 instructions
    body = ["MOV R0, RZ",
            "HMMA.16816.F32.BF16 R4, R8, R12, R4", "ISETP.GE.AND P0, PT, R0, 0x8, PT", "@!P0 BRA 0x10",
            "HMMA.16816.F32.BF16 R4, R8, R12, R4", "NOP", "NOP", "ISETP.GE.AND P0, PT, R0, 0x8, PT",
            "@!P0 BRA 0x40", "EXIT"]
    sass = _synthetic(body, "_ZN11lowrank_ext3mma14nf4_mma_kernelIfLb0EEEvv")
    steady = sb.steady_state_loops(sb.parse_sass(sass)["_ZN11lowrank_ext3mma14nf4_mma_kernelIfLb0EEEvv"])
    assert [(lp.start_addr, lp.instructions) for lp in steady] == [(0x10, 3), (0x40, 5)]
    ptxas = ("ptxas info    : Compiling entry function '_ZN11lowrank_ext3mma14nf4_mma_kernelIfLb0EEEvv' for 'sm_80'\n"
             "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
             "ptxas info    : Used 96 registers, used 1 barriers\n")
    (rep,) = sb.analyze(sass, ptxas, "80", "x.cu")
    assert rep.kind == "gemm" and rep.loop_instructions == 5 and rep.metric == 5.0 and rep.failures == []
    assert "0x10-0x30" in rep.loop_addr and "0x40-0x80" in rep.loop_addr


def test_budgets_and_ptxas_failures():
    gemm = "_ZN11lowrank_ext3mma14nf4_mma_kernelI6__halfLb1EEEvNS_15NF4MatmulParamsEi"
    gemv = "_ZN11lowrank_ext4cuda15nf4_gemv_kernelI6__halfEEvNS0_8GemvArgsE"
    # loop 0x10..0x70: 7 instructions, 1 HMMA
    body = ["MOV R0, RZ", "HMMA.16816.F32.F16 R4, R8, R12, R4", "NOP", "NOP", "NOP", "NOP",
            "ISETP.GE.AND P0, PT, R0, 0x8, PT", "@!P0 BRA 0x10", "EXIT"]
    # the GEMV's loop: 7 instructions, one 128-bit weight load per warp (512 B of codes)
    gemv_body = [*body[:2], "LDG.E.EF.128 R16, desc[UR4][R2.64]", *body[3:]]
    sass = _synthetic(body, gemm) + "\n" + _synthetic(gemv_body, gemv)
    ptxas = (f"ptxas info    : Compiling entry function '{gemm}' for 'sm_90'\n"
             f"ptxas info    : Function properties for {gemm}\n"
             "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
             "ptxas info    : Used 128 registers, used 1 barriers, 524 bytes cmem[0]\n"
             f"ptxas info    : Compiling entry function '{gemv}' for 'sm_90'\n"
             f"ptxas info    : Function properties for {gemv}\n"
             "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
             "ptxas info    : Used 40 registers, used 1 barriers\n")
    info = sb.parse_ptxas(ptxas)
    assert (info[gemm].registers, info[gemm].stack, info[gemm].spill_stores, info[gemm].spill_loads) == (128, 8, 4, 12)
    assert (info[gemv].registers, info[gemv].stack, info[gemv].spill_stores) == (40, 0, 0)
    reps = {r.kind: r for r in sb.analyze(sass, ptxas, "90", "x.cu")}
    assert reps["gemm"].metric == 7.0  # 7 instructions / 1 HMMA > 5
    assert any("per HMMA" in f for f in reps["gemm"].failures)
    assert {f.split()[0] for f in reps["gemm"].failures} >= {"7.00", "spill", "stack"}
    assert reps["gemv"].metric == 7 * 2048 / 512  # 1 LDG.128 per warp = 512 B of codes: 7 instr per 512 B
    assert reps["gemv"].failures == []
    # a GEMV loop without a weight load cannot be measured per byte: it fails instead of passing as "0 per 2 KB"
    (no_load,) = sb.analyze(_synthetic(body, gemv), ptxas, "90", "x.cu")
    assert no_load.metric == float("inf") and any("per 2 KB" in f for f in no_load.failures)


def _tools_or_skip():
    nvcc, cuobjdump = sb.find_nvcc(), sb.find_cuobjdump()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME)")
    if cuobjdump is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but cuobjdump is missing: " + sb.INSTALL_HINT)
        pytest.skip(sb.INSTALL_HINT)
    return nvcc, cuobjdump


def test_compiled_kernel_loops(tmp_path):
    """The loop finder on a freshly compiled kernel (this nvcc): the 2-mma loop is the steady state."""
    nvcc, cuobjdump = _tools_or_skip()
    sass, ptxas = sb.compile_and_dump("sass_loops_kernel.cu", "80", DATA, str(tmp_path), nvcc, cuobjdump)
    (rep,) = sb.analyze(sass, ptxas, "80", "sass_loops_kernel.cu")
    assert rep.kind == "other" and rep.loop_hmma == 2 and rep.loop_instructions > 2
    assert rep.registers > 0 and rep.spill_stores == 0 and rep.stack == 0
    funcs = sb.parse_sass(sass)
    hmma_loops = sorted(lp.hmma for lp in sb.find_loops(funcs[rep.mangled]) if lp.hmma)
    assert hmma_loops == [1, 1, 2]  # side, outer (containing side), steady


@pytest.mark.slow
def test_repo_kernels_meet_sass_budgets():
    """The budgets of issue 21 on the repo's kernels, sm_80 and sm_90 (what bench/sass_budget.py exits 1 on)."""
    _tools_or_skip()
    reports = sb.measure(os.path.join(REPO, "csrc"), ["80", "90"])
    kinds = {(r.arch, r.kind) for r in reports}
    assert {("80", "gemm"), ("90", "gemm"), ("80", "gemv"), ("90", "gemv")} <= kinds
    missed = [f"sm_{r.arch} {r.kernel}: {'; '.join(r.failures)}" for r in reports if r.failures]
    assert not missed, "\n" + sb.format_table(reports)


def test_a_loop_around_an_hmma_loop_is_not_the_steady_state():
    # outer 0x10..0x60 holds 2 HMMA, one of them in the inner loop 0x20..0x40: the inner one is innermost
    body = ["MOV R0, RZ",
            "HMMA.16816.F32.BF16 R4, R8, R12, R4",  # 0x10 outer head
            "HMMA.16816.F32.BF16 R4, R8, R12, R4",  # 0x20 inner head
            "ISETP.GE.AND P1, PT, R1, 0x8, PT",
            "@!P1 BRA 0x20",                        # 0x40
            "ISETP.GE.AND P0, PT, R0, 0x8, PT",
            "@!P0 BRA 0x10",                        # 0x60
            "EXIT"]
    instrs = sb.parse_sass(_synthetic(body))["_Z3fooPf"]
    assert [(lp.start_addr, lp.end_addr, lp.hmma) for lp in sb.steady_state_loops(instrs)] == [(0x20, 0x40, 1)]


def test_a_steady_state_loop_with_an_inner_loop_fails():
    # the HMMA loop 0x10..0x70 holds a loop 0x30..0x40 without HMMA: its static count is not per iteration
    body = ["MOV R0, RZ",
            "HMMA.16816.F32.BF16 R4, R8, R12, R4",  # 0x10
            "IADD3 R1, R1, 0x1, RZ",                # 0x20
            "ISETP.GE.AND P1, PT, R1, 0x8, PT",     # 0x30 inner head
            "@!P1 BRA 0x30",                        # 0x40
            "NOP",
            "ISETP.GE.AND P0, PT, R0, 0x8, PT",
            "@!P0 BRA 0x10",                        # 0x70
            "EXIT"]
    name = "_ZN11lowrank_ext3mma14nf4_mma_kernelIfLb0EEEvv"
    ptxas = (f"ptxas info    : Compiling entry function '{name}' for 'sm_80'\n"
             "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
             "ptxas info    : Used 32 registers\n")
    (rep,) = sb.analyze(_synthetic(body, name), ptxas, "80", "x.cu")
    assert rep.loop_hmma == 1 and rep.loop_inner_loops == 1
    assert rep.metric == 7.0 and any("inner loops" in f for f in rep.failures)


def test_cuobjdump_is_found_in_the_pypi_wheel_layout(tmp_path, monkeypatch):
    """`pip install nvidia-cuda-cuobjdump` puts it in site-packages/nvidia/cu13/bin, not on PATH."""
    site = tmp_path / "site-packages"
    exe = site / "nvidia" / "cu13" / "bin" / "cuobjdump"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no cuobjdump (and no nvcc beside one) on PATH
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(sb, "find_nvcc", lambda: None)
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    assert sb.find_cuobjdump() == str(exe)
