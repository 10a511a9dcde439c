#!/usr/bin/env bash
# bench/gpu_check.sh — the one prepared GPU check, sized for ONE call of the device tool (at most 600 s,
# build included) on a lent H200 box: 16 cores, torch 2.11 + Python 3.12, nvcc, ninja, pytest, no network,
# no bitsandbytes unless carried (below). From the repository root:
#
#     bash bench/gpu_check.sh [--quick]            (OUT=dir chooses the output folder; default /tmp/lowrank_ext_gpu)
#
# Phases, each under its own timeout, all inside LRX_GPU_BUDGET_S (default 570 s: 30 s of margin below the
# 600 s call limit); a phase never gets more than the time left, and the results file is rewritten after
# every phase, so a kill at any point still leaves what ran:
#
#     phase            cap     what
#     machine          20 s    nvidia-smi, torch / CUDA / Python, ninja present?, torch.version.cuda vs nvcc major
#     bitsandbytes     30 s    install the carried wheel into /tmp (not into $OUT) when bitsandbytes is missing
#     build           240 s    pip install --no-build-isolation --no-index ., TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16
#     doctor           60 s    python -m lowrank_ext doctor --json (every op x device x dtype; exit 1 = FAIL rows)
#     tests           200 s    pytest -k "cuda and not ptx" -m "not slow" --durations=30 (911 cases; the static
#                              nvcc/ptxas checks need no GPU and run in CI); the GPU-only files first
#     bench      <= 200 s      bench/bench_gpu.py --budget-s (GEMV bandwidth, training layer, bnb + PEFT, paged
#                              AdamW); whatever is left, so the tests never lose time to it
# Typical (estimated, not yet measured: no GPU run so far): build ~90 s with 16 jobs, doctor ~15 s. The
# --durations table of the first run is what to size the test phase by.
#
# Output in $OUT: gpu_results.md (the dated results table: phases, doctor, tests, bench), build.log,
# doctor.json / doctor.txt, tests.log, tests.xml (pytest's junit, written at the end), tests_partial.xml
# (junit rewritten after every test by bench/_pytest_progress.py: survives a killed pytest),
# tests_current.txt (the test running when it was killed), bench.md / bench.log, phases.tsv.
#
# bitsandbytes for the GPU comparison. The box has none and no network, so its wheel travels with the
# tree: on a machine with network, from the repository root,
#     pip download bitsandbytes==0.50.2 --no-deps -d .whl --python-version 3.12 \
#         --platform manylinux_2_24_x86_64 --only-binary=:all:
# (43 MB, py3-none-manylinux_2_24_x86_64: CUDA 11.8-13.2 libraries inside). `.whl/` is git-ignored, and the
# device tool sends only the tracked and non-ignored files plus the ignored paths named in `carry` (64 MiB in
# all), so the call must name it:  run(command="bash bench/gpu_check.sh", carry=[".whl"]).
# It is installed with `pip install --no-deps --no-index --target /tmp/lrx_site` and put on PYTHONPATH
# (its dependencies numpy and packaging come with torch's environment). Without it, every bitsandbytes
# column is the stand-in "dequantize_nf4 + cuBLAS", labelled as such in the tables.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-/tmp/lowrank_ext_gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
QUICK=""
[ "${1:-}" = "--quick" ] && QUICK="--quick"
BUDGET="${LRX_GPU_BUDGET_S:-570}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" LOWRANK_EXT_CUDA=1
export PIP_BREAK_SYSTEM_PACKAGES=1  # an image's system Python may be "externally managed"
start=$SECONDS
: > "$OUT/phases.tsv"
date -u +"%Y-%m-%d %H:%M UTC" > "$OUT/date.txt"

left() { echo $((BUDGET - (SECONDS - start))); }
# cap N: N seconds, or what is left of the budget minus 10 s for the results (at least 1)
cap() { local l=$(( $(left) - 10 )); [ "$l" -lt "$1" ] && echo $(( l > 1 ? l : 1 )) || echo "$1"; }
t_phase=0
begin() { t_phase=$SECONDS; echo "== $1 [$((SECONDS - start)) s, $(left) s left]"; }
# end NAME STATUS NOTE: record the phase and rewrite gpu_results.md
end() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$((SECONDS - t_phase))" "${3:-}" >> "$OUT/phases.tsv"
  "$PY" "$REPO/bench/gpu_results.py" "$OUT" > /dev/null 2>&1 || echo "(gpu_results.py failed)"
}

# ------------------------------------------------------------------ machine
begin machine
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 \
  | tee "$OUT/nvidia-smi.txt"
"$PY" - <<'EOF' 2>&1 | tee "$OUT/machine.txt"
import platform, shutil, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| torch CUDA", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
print("ninja:", shutil.which("ninja") or "MISSING (a serial build overruns the budget: pip install ninja)")
try:
    import pytest_benchmark  # noqa: F401
    print("pytest-benchmark: installed (disabled for the tests with -p no:benchmark)")
except ImportError:
    print("pytest-benchmark: not installed (not needed)")
EOF
# the nvcc the build will use: CUDA_HOME / CUDA_PATH, else /usr/local/cuda (setup.py prefers it), else PATH
cuda_root="${CUDA_HOME:-${CUDA_PATH:-}}"
if [ -n "$cuda_root" ]; then nvcc_bin="$cuda_root/bin/nvcc"
elif [ -x /usr/local/cuda/bin/nvcc ]; then nvcc_bin=/usr/local/cuda/bin/nvcc
else nvcc_bin="$(command -v nvcc || echo nvcc)"; fi
nvcc_ver=$("$nvcc_bin" --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1.\2/p')
torch_cuda=$("$PY" -c "import torch; print(torch.version.cuda or '')" 2>/dev/null)
echo "nvcc: ${nvcc_ver:-MISSING} ($nvcc_bin), CUDA_HOME=${CUDA_HOME:-unset}" | tee -a "$OUT/machine.txt"
msg=""
if [ -z "$torch_cuda" ]; then
  msg="torch $("$PY" -c 'import torch; print(torch.__version__)' 2>&1 | tail -1) is not a CUDA build (torch.version.cuda is None)"
elif [ -z "$nvcc_ver" ]; then
  msg="no nvcc at $nvcc_bin: the CUDA kernels cannot be built (set CUDA_HOME to a CUDA ${torch_cuda%%.*}.x toolkit)"
elif [ "${nvcc_ver%%.*}" != "${torch_cuda%%.*}" ]; then
  msg="torch.version.cuda is $torch_cuda but nvcc ($nvcc_bin) is $nvcc_ver: torch's extension builder refuses a CUDA \
major version other than torch's. Set CUDA_HOME to a CUDA ${torch_cuda%%.*}.x toolkit, or use the torch build for CUDA \
${nvcc_ver%%.*}."
fi
if [ -n "$msg" ]; then
  echo "ERROR: $msg" | tee -a "$OUT/machine.txt"
  end machine FAIL "$msg"
  exit 1
fi
end machine ok "nvcc $nvcc_ver, torch CUDA $torch_cuda"

# ------------------------------------------------------------------ bitsandbytes (carried wheel)
begin bitsandbytes
bnb_note=""
if "$PY" -c "import bitsandbytes" > /dev/null 2>&1; then
  bnb_note="installed: $("$PY" -c 'import bitsandbytes; print(bitsandbytes.__version__)' 2>/dev/null)"
else
  whl=$(ls "$REPO"/.whl/bitsandbytes-*.whl 2>/dev/null | head -1)
  if [ -n "$whl" ] && timeout "$(cap 30)" "$PY" -m pip install -q --no-deps --no-index --target /tmp/lrx_site "$whl" \
      > "$OUT/bnb_install.log" 2>&1; then
    export PYTHONPATH="/tmp/lrx_site${PYTHONPATH:+:$PYTHONPATH}"
    bnb_note="from the carried wheel $(basename "$whl")"
  else
    bnb_note="not available (no carried .whl/bitsandbytes-*.whl or its install failed): stand-ins are labelled"
  fi
fi
echo "bitsandbytes: $bnb_note"
end bitsandbytes ok "$bnb_note"

# ------------------------------------------------------------------ build
begin "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
cd "$REPO"
rm -rf build lowrank_ext/_C*.so  # a build from another machine will not load here
if ! timeout "$(cap 240)" "$PY" -m pip install -v --no-build-isolation --no-deps --no-index . > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  end build FAIL "see build.log (timeout or compile error)"
  exit 1
fi
grep -E "ptxas.*(warning|[1-9][0-9]* bytes spill)" "$OUT/build.log" | head -20  # spills in any kernel
end build ok "$(grep -c 'bytes spill stores' "$OUT/build.log") ptxas reports"
# run outside the source tree so the installed package (with its freshly built _C) is imported
cd /tmp

# ------------------------------------------------------------------ doctor
begin doctor
timeout "$(cap 60)" "$PY" -m lowrank_ext doctor --json > "$OUT/doctor.json" 2> "$OUT/doctor.err"
doctor_rc=$?
"$PY" -c "import json, sys; from lowrank_ext.finetune.doctor import format_report; \
print(format_report(json.load(open(sys.argv[1]))))" "$OUT/doctor.json" > "$OUT/doctor.txt" 2>&1
cat "$OUT/doctor.txt"; tail -5 "$OUT/doctor.err"
end doctor "$([ $doctor_rc -eq 0 ] && echo ok || echo FAIL)" "exit $doctor_rc"

# ------------------------------------------------------------------ CUDA tests
begin "CUDA tests"
# Every CUDA case of the suite (the CUDA test files and the `device`-parametrized cuda cases elsewhere),
# without the static nvcc/ptxas checks (they need no GPU and run in CI). SIGINT first so pytest writes its
# summary and junit, then a kill; tests_partial.xml has every finished test either way.
T="$REPO/tests"
files=("$T/test_cuda_kernels.py" "$T/test_optim_cuda.py" "$T/test_cuda_mma.py" "$T/test_linear.py" "$T/test_nf4.py"
       "$T/test_layers.py" "$T/test_nf4_weight.py" "$T/test_optim.py" "$T/test_build.py" "$T/test_doctor.py")
for f in "$T"/test_*.py; do  # then every other test file (pytest -k keeps only their CUDA cases)
  case " ${files[*]} " in *" $f "*) ;; *) files+=("$f") ;; esac
done
PYTHONPATH="$REPO/bench${PYTHONPATH:+:$PYTHONPATH}" LRX_PROGRESS_DIR="$OUT" \
  timeout -s INT -k 15 "$(cap 200)" "$PY" -m pytest "${files[@]}" -k "cuda and not ptx" -m "not slow" -q \
  -p no:cacheprovider -p no:benchmark -p _pytest_progress -rfEs --durations=30 \
  --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
test_rc=$?
tail -45 "$OUT/tests.log"
end tests "$([ $test_rc -eq 0 ] && echo ok || echo FAIL)" "pytest exit $test_rc$([ $test_rc -ge 124 ] && echo ' (timeout)')"

# ------------------------------------------------------------------ benchmark
begin benchmark
budget_bench=$(cap 200)
timeout -s INT -k 10 "$budget_bench" "$PY" "$REPO/bench/bench_gpu.py" --out "$OUT/bench.md" \
  --budget-s $((budget_bench - 15)) $QUICK 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
end bench "$([ "$bench_rc" -eq 0 ] && echo ok || echo FAIL)" "exit $bench_rc"

echo "== done [$((SECONDS - start)) s] doctor rc=$doctor_rc tests rc=$test_rc bench rc=$bench_rc; results: $OUT/gpu_results.md"
[ "$doctor_rc" -eq 0 ] && [ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
