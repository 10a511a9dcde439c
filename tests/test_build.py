"""The build: build_info() reports what was compiled, and a broken/mismatched build fails loudly on import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowrank_ext
from lowrank_ext import _build_config

# Where the imported package lives (the source tree for an in-place build, site-packages when installed):
# subprocesses import that same copy.
PKG_ROOT = str(Path(lowrank_ext.__file__).resolve().parents[1])


def test_build_info_keys_and_values():
    info = lowrank_ext.build_info()
    assert set(info) == {"torch_built_with", "torch_installed", "cuda", "cuda_runtime", "cuda_archs", "cpu_flags",
                         "avx2", "fma", "openmp", "cuda_available_now", "cpu_isa", "cpu_isa_detected"}
    assert info["cpu_isa_detected"] in ("avx2", "avx512", "avx512bf16", "amx")  # tests/test_cpu_isa.py checks which
    assert info["torch_installed"] == torch.__version__
    assert torch.__version__.split("+")[0] == info["torch_built_with"]  # compiled against this torch
    assert info["cuda"] is lowrank_ext.has_cuda_kernels() is bool(_build_config.WITH_CUDA)
    if info["cuda"]:
        assert info["cuda_runtime"].isdigit() and int(info["cuda_runtime"]) >= 11000
        assert info["cuda_archs"] and all(a[0].isdigit() for a in info["cuda_archs"])
    else:
        assert info["cuda_runtime"] == "none" and info["cuda_archs"] == []
    # the compiler saw the CPU flags setup.py recorded
    if "-mavx2" in info["cpu_flags"]:
        assert info["avx2"] and info["fma"]
    elif info["cpu_flags"] == "":  # LOWRANK_EXT_CPU_ARCH=generic: the scalar paths
        assert not info["avx2"]
    assert info["openmp"] is True  # setup.py always builds with -fopenmp (at::parallel_for)
    assert info["cuda_available_now"] == torch.cuda.is_available()


def test_ops_are_registered():
    for name in ("quantize_nf4", "double_quant", "dequantize_nf4", "dequantize_nf4_out", "build_flags"):
        assert hasattr(torch.ops.lowrank_ext, name), name


def _import_with(prelude: str) -> subprocess.CompletedProcess:
    code = prelude + "\nimport lowrank_ext\n"
    env = {**os.environ, "PYTHONPATH": PKG_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=PKG_ROOT,
                          timeout=300, check=False)


def test_import_fails_loudly_on_torch_mismatch():
    # A _build_config recording another torch version (what a stale build after a torch upgrade looks like).
    prelude = (
        "import sys, types\n"
        "cfg = types.ModuleType('lowrank_ext._build_config')\n"
        "cfg.TORCH_VERSION = '0.0.1'; cfg.TORCH_CUDA_VERSION = None; cfg.WITH_CUDA = False\n"
        "cfg.CUDA_ARCHS = ''; cfg.CPU_FLAGS = ''\n"
        "sys.modules['lowrank_ext._build_config'] = cfg\n"
    )
    r = _import_with(prelude)
    assert r.returncode != 0
    assert "ImportError: lowrank_ext: the compiled extension was built for torch 0.0.1, but torch " in r.stderr
    assert "is installed; rebuild it with: pip install --no-build-isolation" in r.stderr


def test_import_fails_loudly_without_compiled_library():
    r = _import_with("import sys\nsys.modules['lowrank_ext._C'] = None  # as if _C were missing\n")
    assert r.returncode != 0
    assert "ImportError: lowrank_ext: the compiled extension lowrank_ext._C could not be loaded" in r.stderr
    assert "It is missing or was built for another torch/Python; rebuild it with" in r.stderr


def test_import_succeeds_normally():
    r = _import_with("")
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_build_present_when_gpu():
    assert lowrank_ext.build_info()["cuda"], "a GPU is visible but the CUDA kernels were not compiled"


ROOT = Path(__file__).resolve().parents[1]
_VALIDATE = """
import sys, warnings
from setuptools.config.pyprojecttoml import read_configuration
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    cfg = read_configuration(sys.argv[1], expand=False)
assert "license" not in cfg["project"] and "license" in cfg["project"]["dynamic"], cfg["project"]
deprecated = [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]
assert not deprecated, deprecated  # a deprecation warning is a failure too
print("ok")
"""


@pytest.mark.parametrize("python", ["this", "system"])
def test_pyproject_validates_on_old_and_new_setuptools(python):
    """pyproject.toml leaves the license to setup.py (dynamic): `license = "Apache-2.0"` needs setuptools
    >= 77 and fails before compiling anything on older ones, and the `{text = ...}` table warns on new ones.
    Checked with this interpreter's setuptools and, where there is one, the system Python's (older)."""
    exe = sys.executable
    if python == "system":
        exe = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.path.exists(p)), None)
        if exe is None:
            pytest.skip("no system Python")
    r = subprocess.run([exe, "-c", _VALIDATE, str(ROOT / "pyproject.toml")], capture_output=True, text=True,
                       timeout=120, check=False)
    if r.returncode != 0 and "No module named 'setuptools'" in r.stderr:
        pytest.skip(f"{exe} has no setuptools")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_setup_py_license_form_matches_setuptools():
    import setuptools

    text = (ROOT / "setup.py").read_text()
    assert 'return {"license_expression": "Apache-2.0"} if major >= 77 else {"license": "Apache-2.0"}' in text
    assert int(setuptools.__version__.split(".")[0]) >= 64  # pyproject's build requirement
