#!/usr/bin/env bash
# CI's packaging check (.ci/run calls it after scripts/setup.sh): what a user gets from the source distribution.
#   1. build the sdist (python -m build --sdist, no isolation: .venv's torch and setuptools)
#   2. check it ships every source and header, the docs, LICENSE and the test helpers, and no generated file
#   3. build a CPU-only wheel FROM the sdist (LOWRANK_EXT_CUDA=0, pip wheel --no-build-isolation against .venv)
#   4. install that wheel into a fresh venv holding only torch 2.14.1 + numpy (+ pytest for step 5), from the
#      same package source scripts/setup.sh uses (pip's configured index; its cache makes this a copy)
#   5. from a directory outside the checkout: `python -m lowrank_ext doctor --device cpu` and a smoke subset of the
#      shipped tests (NF4 format and ops against their float64 references: no optional dependency needed)
# Prints the time of each step. WORK=dir keeps the work directory (default: a temporary one, removed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
t0=$(date +%s)
say() { echo "=== sdist [$(( $(date +%s) - t0 ))s] $*"; }
[ -x .venv/bin/python ] && source .venv/bin/activate
TORCH_VERSION=$(python -c "import torch; print(torch.__version__.split('+')[0])")

if [ -n "${WORK:-}" ]; then mkdir -p "$WORK"; else WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT; fi
rm -rf "$WORK/dist" "$WORK/wheel" "$WORK/run"
mkdir -p "$WORK/dist" "$WORK/wheel" "$WORK/run"

say "building the sdist"
python -m pip install -q build
python -m build --sdist --no-isolation -o "$WORK/dist" . > "$WORK/sdist.log" 2>&1 || { tail -n 40 "$WORK/sdist.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/lowrank_ext-*.tar.gz)

say "checking its contents ($(basename "$SDIST"))"
tar tzf "$SDIST" | sed 's|^[^/]*/||' | sort > "$WORK/sdist_files.txt"
missing=$(git ls-files csrc docs tests LICENSE MANIFEST.in setup.py build_helpers.py pyproject.toml README.md \
          | sort | comm -23 - "$WORK/sdist_files.txt")
if [ -n "$missing" ]; then echo "the sdist lacks tracked files:"; echo "$missing"; exit 1; fi
if grep -E '(^|/)(_build_config\.py|build\.log)$|\.so$|\.o$' "$WORK/sdist_files.txt"; then
  echo "the sdist ships generated files (above)"; exit 1
fi

say "building a CPU-only wheel from the sdist (LOWRANK_EXT_CUDA=0, MAX_JOBS=${MAX_JOBS:-2})"
LOWRANK_EXT_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} python -m pip wheel -v --no-build-isolation --no-deps -w "$WORK/wheel" \
  "$SDIST" > "$WORK/wheel.log" 2>&1 || { tail -n 60 "$WORK/wheel.log"; exit 1; }
WHEEL=$(ls "$WORK"/wheel/lowrank_ext-*.whl)
echo "  objects compiled: $(grep -cE '^\s*\[[0-9]+/[0-9]+\] (c\+\+|.*nvcc)' "$WORK/wheel.log" || true)"

say "a fresh venv with torch==$TORCH_VERSION, numpy, pytest and the wheel $(basename "$WHEEL")"
if [ ! -x "$WORK/venv/bin/python" ] || ! "$WORK/venv/bin/python" -c "import torch" 2>/dev/null; then
  "${PYTHON:-python3}" -m venv "$WORK/venv"
  "$WORK/venv/bin/python" -m pip install -q "torch==$TORCH_VERSION" numpy pytest
fi
"$WORK/venv/bin/python" -m pip install -q --force-reinstall --no-deps "$WHEEL"
"$WORK/venv/bin/python" -m pip check  # the wheel's requirements are met by torch + numpy alone

say "doctor, from outside the checkout"
tar xzf "$SDIST" -C "$WORK/run"
cp -r "$WORK"/run/lowrank_ext-*/tests "$WORK/run/tests"
cd "$WORK/run"
env -u CI -u PYTHONPATH OMP_NUM_THREADS=1 "$WORK/venv/bin/python" -m lowrank_ext doctor --device cpu > doctor.txt 2>&1 \
  || { cat doctor.txt; echo "doctor failed"; exit 1; }
tail -n 3 doctor.txt
"$WORK/venv/bin/python" - <<EOF
import lowrank_ext, os
where = os.path.dirname(lowrank_ext.__file__)
assert where.startswith("$WORK/venv"), f"imported lowrank_ext from {where}, not the fresh venv"
print("  lowrank_ext from", where, lowrank_ext.build_info()["torch_built_with"])
EOF

say "smoke tests (the shipped tests, run against the installed wheel)"
# CI unset: a test needing an optional oracle (bitsandbytes, PEFT) skips here, it is not a lost check
env -u CI -u PYTHONPATH OMP_NUM_THREADS=1 "$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider -rs \
  tests/test_nf4.py tests/test_build.py \
  -k "float64 or round_trip or nonfinite or _errors or nested_codes or build_info or registered or import_" \
  -m "not slow"
cd "$ROOT"
say "done"
