"""Shared test fixtures: devices to run on (CUDA cases skip without a GPU), and `require` for optional
test dependencies (a skip on a developer's machine, a failure in CI)."""

import importlib
import os

import pytest
import torch

import lowrank_ext

CUDA_OK = torch.cuda.is_available() and lowrank_ext.has_cuda_kernels()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and CUDA kernels"))]

# CI (.ci/run, with CI=true) installs the pinned test dependencies (scripts/setup.sh): there a missing or
# differently versioned oracle is a lost check, so `require` fails instead of skipping.
def ci_from_env(env=os.environ) -> bool:
    return env.get("CI", "").strip().lower() in ("1", "true", "yes")


IN_CI = ci_from_env()


def require(module: str, version: str | None = None):
    """Import and return `module` for a test (or a whole test file, at module level). When it is missing,
    or `version` is given and the distribution's `__version__` is not exactly it, the test skips — or,
    with CI=true, fails, naming what is missing."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        problem = f"needs {module}{'==' + version if version else ''}, which is not importable ({e})"
    else:
        found = getattr(importlib.import_module(module.split(".")[0]), "__version__", None)
        if version is None or found == version:
            return mod
        problem = f"pins {module.split('.')[0]}=={version} (its CPU code paths are the oracle), found {found}"
    if IN_CI:
        pytest.fail(f"{problem}; CI=true installs the pinned test dependencies (scripts/setup.sh), so this "
                    "is a lost oracle, not a skip", pytrace=False)
    pytest.skip(problem, allow_module_level=True)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
