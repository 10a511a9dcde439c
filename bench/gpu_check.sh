#!/usr/bin/env bash
# bench/gpu_check.sh — the one prepared GPU check, for a lent H200 (torch 2.11, Python 3.12, no network,
# no bitsandbytes): build lowrank_ext from this source tree, run the CUDA tests, run bench/bench_gpu.py.
# Everything lands in $OUT (the device tool's output folder; default /tmp/lowrank_ext_gpu):
#   build.log, tests.log, bench.log, gpu_results.md (tables + test summary).
# Budget: the whole script stays inside 10 minutes (build <= 3.5 min with MAX_JOBS=16 for sm90 only,
# tests <= 200 s, benchmark <= 150 s, each phase under its own timeout; typically ~5 min in all).
#
#   usage (from the repository root):  bash bench/gpu_check.sh [--quick]
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-/tmp/lowrank_ext_gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
QUICK="${1:-}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" LOWRANK_EXT_CUDA=1
export PIP_BREAK_SYSTEM_PACKAGES=1  # an image's system Python may be "externally managed"
start=$SECONDS
phase() { echo "== $1 [$((SECONDS - start)) s]"; }

phase "machine"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

phase "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
cd "$REPO"
rm -rf build lowrank_ext/_C*.so  # a build from another machine will not load here
if ! timeout 210 "$PY" -m pip install -v --no-build-isolation --no-deps --no-index . > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  echo "BUILD FAILED (full log: $OUT/build.log)" | tee "$OUT/gpu_results.md"
  exit 1
fi
grep -E "ptxas.*(warning|[1-9][0-9]* bytes spill)" "$OUT/build.log" | head -20  # spills in any kernel
# run outside the source tree so the installed package (with its freshly built _C) is imported
cd /tmp
"$PY" -c "import lowrank_ext; print(lowrank_ext.build_info())" 2>&1 | tee "$OUT/build_info.txt"

phase "CUDA tests"
# every CUDA case of the suite: the CUDA test files and the `device`-parametrized cuda cases elsewhere
timeout 200 "$PY" -m pytest "$REPO/tests" -k cuda -m "not slow" -q -p no:cacheprovider -rfEs --benchmark-disable \
  --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
test_rc=$?
tail -40 "$OUT/tests.log"

phase "benchmark"
timeout 150 "$PY" "$REPO/bench/bench_gpu.py" --out "$OUT/gpu_results.md" $QUICK 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}

{
  echo
  echo "## CUDA tests (pytest tests -k cuda -m 'not slow', exit code $test_rc)"
  echo
  echo '```'
  grep -E "passed|failed|error" "$OUT/tests.log" | tail -5
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40
  echo '```'
  echo
  echo "bench exit code $bench_rc; total $((SECONDS - start)) s"
} >> "$OUT/gpu_results.md"
phase "done (tests rc=$test_rc, bench rc=$bench_rc)"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
