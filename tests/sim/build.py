"""Build the CUDA-kernel host simulator library (tests/sim/*.cpp + csrc/cuda/*.cuh as host C++) with g++.

    build(csrc=None, units=None) -> Path of a shared library (load it with ctypes)

The kernels' source root is `csrc` (a path), else $LRX_SIM_CSRC, else this checkout's csrc/ — so one can run the
simulated tests against another worktree's kernels, and the mutation test builds a mutated copy. `units` picks
the entry-point files (default: all); the runtime is always in. Objects and libraries are cached under
build/sim/ (or $LRX_SIM_BUILD_DIR) by a hash of the compiler, the flags and every source they may include, so a
warm run costs nothing and an edit rebuilds. No CUDA toolkit is involved: the simulator provides the CUDA names.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SIM_DIR = Path(__file__).resolve().parent
ROOT = SIM_DIR.parents[1]
UNITS = {
    "probe": "sim_probe.cpp",
    "mma": "sim_mma.cpp",
    "gemv": "sim_gemv.cpp",
    "nf4": "sim_nf4.cpp",
    "adamw": "sim_adamw.cpp",
    "fused": "sim_fused.cpp",
}
RUNTIME = "sim_runtime.cpp"
LINKER_SCRIPT = "lrx_shared.ld"  # gathers the static __shared__ variables into one poisonable section
# -ffp-contract=off: a*b+c stays two roundings (the kernels spell out every fused op they want);
# -fno-strict-aliasing: the kernels reinterpret registers (uint32_t <-> __half2) as CUDA allows.
FLAGS = ["-std=c++20", "-O1", "-g0", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing", "-DLRX_CUDA_SIM",
         *os.environ.get("LRX_SIM_CXXFLAGS", "").split()]  # extra flags, e.g. -fsanitize=undefined


class SimBuildError(RuntimeError):
    pass


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def default_csrc() -> Path:
    return Path(os.environ.get("LRX_SIM_CSRC") or ROOT / "csrc").resolve()


def _sources_digest(csrc: Path | None, cxx: str) -> str:
    """Hash of the compiler, the flags and every file a unit may include (sim sources; csrc headers unless
    csrc is None: the runtime includes none of them)."""
    h = hashlib.sha256()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    h.update(version.encode() + "\0".join(FLAGS).encode())
    files = sorted(SIM_DIR.glob("*.h")) + sorted(SIM_DIR.glob("*.cpp")) + [SIM_DIR / LINKER_SCRIPT]
    if csrc is not None:
        for sub in ("include", "cuda"):
            files += sorted(p for p in (csrc / sub).rglob("*") if p.suffix in (".h", ".cuh"))
    for p in files:
        h.update(str(p.relative_to(p.parents[1])).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:20]


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SimBuildError(f"simulator build failed:\n{' '.join(cmd)}\n{res.stdout}\n{res.stderr[-6000:]}")


def build(csrc: str | Path | None = None, units: list[str] | None = None, build_dir: Path | None = None) -> Path:
    cxx = compiler()
    if cxx is None:
        raise SimBuildError("no C++ compiler (g++ or $CXX) on PATH")
    csrc = Path(csrc).resolve() if csrc is not None else default_csrc()
    if not (csrc / "cuda" / "device_ops.cuh").exists():
        raise SimBuildError(f"{csrc} is not a kernel source root (no cuda/device_ops.cuh)")
    units = sorted(units or UNITS)
    unknown = set(units) - set(UNITS)
    if unknown:
        raise SimBuildError(f"unknown simulator units {sorted(unknown)}; known: {sorted(UNITS)}")
    out = Path(build_dir or os.environ.get("LRX_SIM_BUILD_DIR") or ROOT / "build" / "sim")
    out.mkdir(parents=True, exist_ok=True)
    digest = _sources_digest(csrc, cxx)
    lib = out / f"lrx_sim_{digest}_{'-'.join(units)}.so"
    if lib.exists():
        return lib
    include = [f"-I{csrc / 'include'}", f"-I{csrc / 'cuda'}", f"-I{SIM_DIR}"]

    runtime_digest = _sources_digest(None, cxx)  # the runtime does not depend on the kernels

    def compile_one(src: str) -> Path:
        obj = out / f"{Path(src).stem}_{runtime_digest if src == RUNTIME else digest}.o"
        if not obj.exists():
            with tempfile.NamedTemporaryFile(dir=out, suffix=".o", delete=False) as tmp:
                pass
            _run([cxx, *FLAGS, *include, "-c", str(SIM_DIR / src), "-o", tmp.name])
            os.replace(tmp.name, obj)  # atomic: a concurrent build never sees half an object
        return obj

    jobs = max(1, int(os.environ.get("LRX_SIM_JOBS", "2")))
    with ThreadPoolExecutor(jobs) as pool:
        objs = list(pool.map(compile_one, [RUNTIME, *(UNITS[u] for u in units)]))
    with tempfile.NamedTemporaryFile(dir=out, suffix=".so", delete=False) as tmp:
        pass
    _run([cxx, "-shared", *FLAGS, *map(str, objs), f"-Wl,-T,{SIM_DIR / LINKER_SCRIPT}", "-o", tmp.name])
    os.replace(tmp.name, lib)
    return lib


if __name__ == "__main__":
    import sys

    print(build(sys.argv[1] if len(sys.argv) > 1 else None))
