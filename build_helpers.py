"""Build-time decisions of setup.py that need no torch, so tests can call them directly (tests/test_build.py).

    cuda_decision(...)   LOWRANK_EXT_CUDA=auto|0|1 -> build the CUDA kernels or not, for which archs, and the
                         one line that says so
    is_build_command()   whether this setup.py run compiles (sdist / egg_info / dist_info only read metadata:
                         they must neither probe the GPU nor write lowrank_ext/_build_config.py)
    persistent_build_temp()  the build directory ninja reuses between builds (incremental setup)

Not installed with the package: setup.py imports it from the source tree (MANIFEST.in ships it in the sdist).
"""

from __future__ import annotations

import os
import sys
import sysconfig
from dataclasses import dataclass

DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"  # LOWRANK_EXT_CUDA=1 without TORCH_CUDA_ARCH_LIST: every supported family

# setuptools commands that compile the extension (PEP 517: build_wheel runs bdist_wheel, build_editable runs
# editable_wheel; pip's legacy paths run install / develop). sdist, egg_info and dist_info do not.
_BUILD_COMMANDS = ("build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop", "bdist_egg")


@dataclass(frozen=True)
class CudaDecision:
    with_cuda: bool
    archs: str  # TORCH_CUDA_ARCH_LIST to build for ("" without CUDA)
    message: str  # one line for the build output


def cuda_decision(mode: str, torch_cuda: str | None, cuda_home: str | None, gpu_capabilities: list[tuple[int, int]],
                  arch_list_env: str | None) -> CudaDecision:
    """What LOWRANK_EXT_CUDA=`mode` builds.

    0     CPU kernels only.
    1     CUDA kernels too, for TORCH_CUDA_ARCH_LIST or else every default arch (CI, wheel builders); an error
          (ValueError) when torch is a CPU build or no CUDA toolkit was found.
    auto  CUDA kernels only where they can run or were asked for: a visible GPU (built for its own arch,
          e.g. 8.6 for an RTX 3090) or TORCH_CUDA_ARCH_LIST set; otherwise CPU only, saying how to build CUDA
          anyway. Also CPU only when torch is a CPU build or no toolkit is found.
    `gpu_capabilities`: (major, minor) of each visible GPU (torch.cuda.get_device_capability); only consulted
    for auto, and only when torch and the toolkit could build CUDA code."""
    mode = mode.strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"lowrank_ext: LOWRANK_EXT_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return CudaDecision(False, "", "lowrank_ext: LOWRANK_EXT_CUDA=0: building the CPU kernels only")
    why_not = ("torch is a CPU build" if torch_cuda is None
               else "no CUDA toolkit was found (set CUDA_HOME)" if cuda_home is None else None)
    arch_list = (arch_list_env or "").strip()
    if mode == "1":
        if why_not:
            raise ValueError(f"lowrank_ext: LOWRANK_EXT_CUDA=1 but {why_not}")
        archs = arch_list or DEFAULT_ARCHS
        return CudaDecision(True, archs, f"lowrank_ext: LOWRANK_EXT_CUDA=1: building the CUDA kernels for {archs}"
                                         + ("" if arch_list else " (the default archs; TORCH_CUDA_ARCH_LIST narrows it)"))
    if why_not:
        return CudaDecision(False, "", f"lowrank_ext: building the CPU kernels only ({why_not})")
    if arch_list:
        return CudaDecision(True, arch_list, f"lowrank_ext: building the CUDA kernels for TORCH_CUDA_ARCH_LIST={arch_list}")
    if gpu_capabilities:
        archs = ";".join(sorted({f"{major}.{minor}" for major, minor in gpu_capabilities}))
        return CudaDecision(True, archs, f"lowrank_ext: building the CUDA kernels for this machine's GPU "
                                         f"(sm {archs}; TORCH_CUDA_ARCH_LIST=... or LOWRANK_EXT_CUDA=1 for others)")
    return CudaDecision(False, "", "lowrank_ext: no CUDA GPU visible, building the CPU kernels only (to build the CUDA "
                                   "kernels anyway: LOWRANK_EXT_CUDA=1, or TORCH_CUDA_ARCH_LIST=\"8.0;9.0\")")


def is_build_command(argv: list[str] | None = None) -> bool:
    """True when this setup.py invocation compiles the extension (see _BUILD_COMMANDS)."""
    args = sys.argv[1:] if argv is None else argv
    return any(a in _BUILD_COMMANDS for a in args)


def persistent_build_temp(root: str) -> str:
    """`root`/build/temp-<platform>-<python>: the object files and build.ninja of every build of this checkout.

    setuptools gives an editable build (pip install -e) a fresh temporary build directory each time, so ninja
    would recompile everything; in this fixed one ninja compares each object with its sources, headers (the
    compiler's dependency files) and command line, and compiles only what changed ("ninja: no work to do"
    when nothing did). LOWRANK_EXT_BUILD_DIR overrides it."""
    override = os.environ.get("LOWRANK_EXT_BUILD_DIR")
    if override:
        return os.path.abspath(override)
    tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
    return os.path.join(root, "build", f"temp-{tag}")


def persistent_build_ext(base: type, root: str, before_build=None) -> type:
    """A subclass of the build_ext command `base` (torch's BuildExtension) that builds in
    persistent_build_temp(root) whatever build directory setuptools chose, and calls before_build(command)
    first (setup.py writes lowrank_ext/_build_config.py there: only a real build writes it)."""

    class PersistentBuildExt(base):
        def finalize_options(self) -> None:
            super().finalize_options()
            self.build_temp = persistent_build_temp(root)

        def run(self) -> None:
            if before_build is not None:
                before_build(self)
            super().run()

    return PersistentBuildExt
