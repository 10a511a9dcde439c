#!/usr/bin/env bash
# bench/gpu_check.sh — the one prepared GPU check, sized for ONE call of the device tool on a lent H100 or H200
# (16 cores, torch 2.11 + CUDA 13.0, Python 3.12, nvcc, ninja, pytest, no network, no bitsandbytes unless
# carried). From the repository root:
#
#     bash bench/gpu_check.sh [--quick]            (OUT=dir: the output folder; default /tmp/lowrank_ext_gpu)
#     device tool:  run(command="OUT=$OUT bash bench/gpu_check.sh", timeout_s=600, carry=[".whl"])
#
# What comes back. The device tool returns at most 8 files from $OUT (16 MiB each, at most 2 folders deep), so
# this script writes AT MOST 7, all at the top of $OUT:
#     gpu_results.md   the dated results table: warnings, phases, doctor, tests, benchmarks, SASS budget
#     tests.log        pytest's output
#     tests.xml        pytest's junit (the partial one, rewritten after every test, if pytest was killed)
#     doctor.json      python -m lowrank_ext doctor --json
#     bench.md         bench/bench_gpu.py's tables
#     build_tail.log   the last 150 lines of the build log and every ptxas spill / warning line
#     rest.tar.gz      everything else: the full build log, nvidia-smi, the machine probe, phases.tsv, bench.log,
#                      doctor.err, sass_budget.txt, tests_current.txt, ...
# Every phase writes into a scratch folder ($WORK, outside $OUT); publish() copies the 7 files to $OUT after every
# phase and again from the EXIT trap, and a TERM / INT stops the running phase and publishes at once: a kill at
# any point leaves the table of what ran. Phases run in the background under `wait`, because bash runs a trap
# only after a foreground child ends.
#
# Time. The whole script stays under LRX_GPU_BUDGET_S (default 540 s: 60 s below the tool's 600 s limit). Each
# phase gets min(its cap, time left - 15 s); every probe has its own timeout; bench_gpu.py gets --budget-s and
# checks that deadline inside its loops.
#     phase          cap     what
#     machine        75 s    nvidia-smi (15 s), one python probe (60 s): Python, torch, CUDA, GPU, ninja; nvcc (15 s)
#     bitsandbytes   30 s    install the carried wheel into /tmp (not into $OUT) when bitsandbytes is missing
#     build         240 s    pip install --no-build-isolation --no-deps --no-index ., TORCH_CUDA_ARCH_LIST=9.0
#                            (sm_90; no sm_90a: the kernels use no wgmma), MAX_JOBS=16
#     doctor         60 s    python -m lowrank_ext doctor --json (every op x device x dtype; exit 1 = FAIL rows)
#     tests         200 s    pytest -k "cuda and not ptx" -m "not slow" (the static nvcc/ptxas checks run in CI)
#     bench         180 s    bench/bench_gpu.py --budget-s (GEMV bandwidth, training layer, bnb + PEFT, AdamW)
#     sass           60 s    bench/sass_budget.py, when the file exists (optional; CI runs it too)
# Warnings at the top of the table: the torch here differs from the one the project pins (scripts/setup.sh,
# 2.14.1: results hold for the torch they ran with), a phase skipped for lack of time. Without a GPU visible to
# torch the script stops after the machine phase (it would only rebuild this checkout's extension).
#
# bitsandbytes for the GPU comparison: carry its wheel (.whl/ is git-ignored; name it in `carry`), downloaded on
# a machine with network with
#     pip download bitsandbytes==0.50.2 --no-deps -d .whl --python-version 3.12 \
#         --platform manylinux_2_24_x86_64 --only-binary=:all:
# Without it every bitsandbytes column is the stand-in "dequantize_nf4 + cuBLAS", labelled as such.
#
# Tested without a GPU by tests/test_gpu_check.py: it puts fake nvidia-smi / nvcc on PATH and a fake python in
# PYTHON (both knobs below are ordinary ones); the script has no test mode.
#     PYTHON            the interpreter (default python3)       LRX_GPU_WORK   the scratch folder (default: mktemp)
#     LRX_GPU_BUDGET_S  the time budget in seconds (540)        OUT            the output folder
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-/tmp/lowrank_ext_gpu}"
PY="${PYTHON:-python3}"
QUICK=""
[ "${1:-}" = "--quick" ] && QUICK="--quick"
BUDGET="${LRX_GPU_BUDGET_S:-540}"
mkdir -p "$OUT"
WORK="${LRX_GPU_WORK:-$(mktemp -d /tmp/lrx_gpu_work.XXXXXX)}"
mkdir -p "$WORK"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" LOWRANK_EXT_CUDA=1
export PIP_BREAK_SYSTEM_PACKAGES=1  # an image's system Python may be "externally managed"
# The torch the project pins (scripts/setup.sh); the lent machines have their own (2.11).
TARGET_TORCH="$(grep -o 'torch==[0-9][0-9.]*' "$REPO/scripts/setup.sh" 2>/dev/null | head -1 | cut -d= -f3)"
TARGET_TORCH="${TARGET_TORCH:-2.14.1}"
start=$SECONDS
: > "$WORK/phases.tsv"
: > "$WORK/warnings.txt"
date -u +"%Y-%m-%d %H:%M UTC" > "$WORK/date.txt"

left() { echo $((BUDGET - (SECONDS - start))); }
# cap N: N seconds, or the time left minus 15 s for publishing (at least 1)
cap() { local l=$(( $(left) - 15 )); [ "$l" -lt "$1" ] && echo $(( l > 1 ? l : 1 )) || echo "$1"; }
warn() { echo "WARNING: $*" | tee -a "$WORK/warnings.txt"; }

# ------------------------------------------------------------------ publishing (<= 7 files in $OUT)
PUBLISHED=(gpu_results.md tests.log doctor.json bench.md build_tail.log)
publish() {
  if [ -s "$WORK/build.log" ]; then
    { tail -n 150 "$WORK/build.log"; echo "---- ptxas spill / warning lines ----"
      grep -E "ptxas.*(warning|bytes spill)" "$WORK/build.log" | head -200; } > "$WORK/build_tail.log"
  fi
  if ! timeout 30 "$PY" "$REPO/bench/gpu_results.py" "$WORK" > /dev/null 2> "$WORK/gpu_results.err"; then
    { echo "# lowrank_ext GPU check — $(cat "$WORK/date.txt")"; echo
      echo "(bench/gpu_results.py failed: $(tail -1 "$WORK/gpu_results.err")); phases:"; echo '```'
      cat "$WORK/warnings.txt" "$WORK/phases.tsv"; echo '```'; } > "$WORK/gpu_results.md"
  fi
  local f
  for f in "${PUBLISHED[@]}"; do [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/$f"; done
  if [ -f "$WORK/tests.xml" ]; then cp "$WORK/tests.xml" "$OUT/tests.xml"
  elif [ -f "$WORK/tests_partial.xml" ]; then cp "$WORK/tests_partial.xml" "$OUT/tests.xml"; fi
  local ex=(--exclude=./rest.tar.gz --exclude=./tests.xml)
  for f in "${PUBLISHED[@]}"; do ex+=("--exclude=./$f"); done
  timeout 30 tar -czf "$WORK/rest.tar.gz" "${ex[@]}" -C "$WORK" . 2> /dev/null && cp "$WORK/rest.tar.gz" "$OUT/rest.tar.gz"
}

# ------------------------------------------------------------------ phases, background children, signals
CHILD=""
# run_bg STDOUT STDERR CMD...: run CMD in the background (STDERR may be STDOUT), wait; its exit status.
# A non-interactive bash starts background commands with SIGINT ignored; `trap - INT` gives it back, so pytest
# still turns a SIGINT (from timeout -s INT or on_signal) into its summary and junit.
run_bg() {
  local o=$1 e=$2; shift 2
  if [ "$o" = "$e" ]; then (trap - INT QUIT; exec "$@") > "$o" 2>&1 & else (trap - INT QUIT; exec "$@") > "$o" 2> "$e" & fi
  CHILD=$!
  wait "$CHILD"
  local rc=$?
  CHILD=""
  return $rc
}
on_signal() {
  trap - TERM INT
  echo "== killed by SIG$1 [$((SECONDS - start)) s]"
  if [ -n "$CHILD" ]; then  # let it write what it has (pytest: its junit on SIGINT), then stop it
    kill -INT "$CHILD" 2> /dev/null
    local i
    for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$CHILD" 2> /dev/null || break; sleep 0.3; done
    kill -KILL "$CHILD" 2> /dev/null
  fi
  printf '%s\tKILLED\t%s\t%s\n' "${phase:-?}" "$((SECONDS - t_phase))" "SIG$1 at $((SECONDS - start)) s" \
    >> "$WORK/phases.tsv"
  exit 143  # the EXIT trap publishes
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap publish EXIT

phase="" t_phase=$SECONDS
begin() { phase=$1; t_phase=$SECONDS; echo "== $1 [$((SECONDS - start)) s, $(left) s left]"; }
# end STATUS NOTE: record the phase and publish
end() {
  printf '%s\t%s\t%s\t%s\n' "$phase" "$1" "$((SECONDS - t_phase))" "${2:-}" >> "$WORK/phases.tsv"
  phase=""
  publish
}
# late NAME NEED: true (and recorded) when fewer than NEED seconds are left for phase NAME
late() {
  if [ "$(left)" -lt "$2" ]; then
    printf '%s\tskipped\t0\tonly %s s left\n' "$1" "$(left)" >> "$WORK/phases.tsv"
    warn "phase $1 skipped: only $(left) s of the ${BUDGET} s budget left"
    return 0
  fi
  return 1
}

# ------------------------------------------------------------------ machine
begin machine
run_bg "$WORK/nvidia-smi.txt" "$WORK/nvidia-smi.txt" timeout 15 nvidia-smi \
  --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv
cat "$WORK/nvidia-smi.txt"
cat > "$WORK/probe.py" << 'EOF'
import platform
import shutil

print("python=" + platform.python_version())
print("ninja=" + (shutil.which("ninja") or "MISSING (a serial build overruns the budget)"))
try:
    import torch

    print("torch=" + torch.__version__)
    print("torch_cuda=" + (torch.version.cuda or ""))
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"gpu={p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
    else:
        print("gpu=none")
except Exception as e:  # a broken torch is reported, not fatal to the probe
    print(f"torch_error={type(e).__name__}: {e}")
EOF
run_bg "$WORK/machine.txt" "$WORK/machine.txt" timeout 60 "$PY" "$WORK/probe.py"
probe_rc=$?
kv() { sed -n "s/^$1=//p" "$WORK/machine.txt" | head -1; }
torch_ver="$(kv torch)" torch_cuda="$(kv torch_cuda)" gpu="$(kv gpu)"
# the nvcc the build will use: CUDA_HOME / CUDA_PATH, else /usr/local/cuda (setup.py prefers it), else PATH
cuda_root="${CUDA_HOME:-${CUDA_PATH:-}}"
if [ -n "$cuda_root" ]; then nvcc_bin="$cuda_root/bin/nvcc"
elif [ -x /usr/local/cuda/bin/nvcc ]; then nvcc_bin=/usr/local/cuda/bin/nvcc
else nvcc_bin="$(command -v nvcc || echo nvcc)"; fi
nvcc_ver=$(timeout 15 "$nvcc_bin" --version 2> /dev/null | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1.\2/p')
echo "nvcc=${nvcc_ver:-MISSING} ($nvcc_bin), CUDA_HOME=${CUDA_HOME:-unset}, target_torch=$TARGET_TORCH" \
  >> "$WORK/machine.txt"
cat "$WORK/machine.txt"
[ -n "$torch_ver" ] && [ "${torch_ver%%+*}" != "$TARGET_TORCH" ] && \
  warn "torch ${torch_ver} here; the project pins torch ${TARGET_TORCH} (scripts/setup.sh). The extension is built \
here against ${torch_ver}, and these results hold for it, not for ${TARGET_TORCH}."
msg=""
if [ $probe_rc -ne 0 ] || [ -z "$torch_ver" ]; then
  msg="the python probe failed (exit $probe_rc): $(tail -1 "$WORK/machine.txt")"
elif [ "$gpu" = "none" ]; then  # nothing to check; and the build would replace this checkout's _C*.so
  msg="torch sees no GPU: nothing to check here (the CPU suite is scripts/test.sh)"
elif [ -z "$torch_cuda" ]; then
  msg="torch $torch_ver is not a CUDA build (torch.version.cuda is None)"
elif [ -z "$nvcc_ver" ]; then
  msg="no nvcc at $nvcc_bin: the CUDA kernels cannot be built (set CUDA_HOME to a CUDA ${torch_cuda%%.*}.x toolkit)"
elif [ "${nvcc_ver%%.*}" != "${torch_cuda%%.*}" ]; then
  msg="torch.version.cuda is $torch_cuda but nvcc ($nvcc_bin) is $nvcc_ver: torch's extension builder refuses a \
CUDA major version other than torch's. Set CUDA_HOME to a CUDA ${torch_cuda%%.*}.x toolkit."
fi
if [ -n "$msg" ]; then
  warn "$msg"
  end FAIL "$msg"
  exit 1
fi
end ok "torch $torch_ver (CUDA $torch_cuda), nvcc $nvcc_ver, $gpu"

# ------------------------------------------------------------------ bitsandbytes (carried wheel)
begin bitsandbytes
if bnb_ver=$(timeout 30 "$PY" -c "import bitsandbytes; print(bitsandbytes.__version__)" 2> /dev/null); then
  bnb_note="installed: $bnb_ver"
else
  whl=$(ls "$REPO"/.whl/bitsandbytes-*.whl 2> /dev/null | head -1)
  if [ -n "$whl" ] && run_bg "$WORK/bnb_install.log" "$WORK/bnb_install.log" timeout "$(cap 30)" \
      "$PY" -m pip install -q --no-deps --no-index --target /tmp/lrx_site "$whl"; then
    export PYTHONPATH="/tmp/lrx_site${PYTHONPATH:+:$PYTHONPATH}"
    bnb_note="from the carried wheel $(basename "$whl")"
  else
    bnb_note="not available (no carried .whl/bitsandbytes-*.whl, or its install failed): stand-ins are labelled"
  fi
fi
echo "bitsandbytes: $bnb_note"
end ok "$bnb_note"

# ------------------------------------------------------------------ build
late build 60 && exit 1
begin "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
cd "$REPO" || exit 1
rm -rf build lowrank_ext/_C*.so  # a build from another machine will not load here
run_bg "$WORK/build.log" "$WORK/build.log" timeout "$(cap 240)" \
  "$PY" -m pip install -v --no-build-isolation --no-deps --no-index .
build_rc=$?
if [ $build_rc -ne 0 ]; then
  tail -40 "$WORK/build.log"
  end FAIL "exit $build_rc$([ $build_rc -eq 124 ] && echo ' (timeout)'): see build_tail.log"
  exit 1
fi
end ok "$(grep -c 'bytes spill stores' "$WORK/build.log") ptxas spill reports"
# run outside the source tree so the installed package (with its freshly built _C) is imported
cd /tmp || exit 1

# ------------------------------------------------------------------ doctor
doctor_rc=-1
if ! late doctor 30; then
  begin doctor
  run_bg "$WORK/doctor.json" "$WORK/doctor.err" timeout "$(cap 60)" "$PY" -m lowrank_ext doctor --json
  doctor_rc=$?
  tail -5 "$WORK/doctor.err"
  end "$([ $doctor_rc -eq 0 ] && echo ok || echo FAIL)" "exit $doctor_rc"
fi

# ------------------------------------------------------------------ CUDA tests
# Every CUDA case of the suite (the CUDA test files first, then the `device`-parametrized cuda cases elsewhere).
# SIGINT at the cap so pytest writes its summary and junit; tests_partial.xml has every finished test anyway.
test_rc=-1
if ! late tests 40; then
  begin "CUDA tests"
  T="$REPO/tests"
  files=("$T/test_cuda_kernels.py" "$T/test_optim_cuda.py" "$T/test_cuda_mma.py" "$T/test_linear.py" "$T/test_nf4.py"
         "$T/test_layers.py" "$T/test_nf4_weight.py" "$T/test_optim.py" "$T/test_build.py" "$T/test_doctor.py")
  for f in "$T"/test_*.py; do  # then every other test file (pytest -k keeps only their CUDA cases)
    case " ${files[*]} " in *" $f "*) ;; *) files+=("$f") ;; esac
  done
  run_bg "$WORK/tests.log" "$WORK/tests.log" env PYTHONPATH="$REPO/bench${PYTHONPATH:+:$PYTHONPATH}" \
    LRX_PROGRESS_DIR="$WORK" timeout -s INT -k 15 "$(cap 200)" "$PY" -m pytest "${files[@]}" \
    -k "cuda and not ptx" -m "not slow" -q -p no:cacheprovider -p no:benchmark -p _pytest_progress -rfEs \
    --durations=30 --junitxml="$WORK/tests.xml"
  test_rc=$?
  tail -30 "$WORK/tests.log"
  end "$([ $test_rc -eq 0 ] && echo ok || echo FAIL)" "pytest exit $test_rc$([ $test_rc -ge 124 ] && echo ' (timeout)')"
fi

# ------------------------------------------------------------------ benchmark
bench_rc=-1
if ! late bench 45; then
  begin benchmark
  b=$(cap 180)
  run_bg "$WORK/bench.log" "$WORK/bench.log" timeout -s INT -k 10 "$b" \
    "$PY" "$REPO/bench/bench_gpu.py" --out "$WORK/bench.md" --budget-s $((b - 25)) $QUICK
  bench_rc=$?
  tail -40 "$WORK/bench.log"
  end "$([ "$bench_rc" -eq 0 ] && echo ok || echo FAIL)" "exit $bench_rc"
fi

# ------------------------------------------------------------------ SASS budget (optional)
if [ -f "$REPO/bench/sass_budget.py" ] && ! late sass 20; then
  begin "sass budget"
  run_bg "$WORK/sass_budget.txt" "$WORK/sass_budget.txt" timeout "$(cap 60)" "$PY" "$REPO/bench/sass_budget.py"
  sass_rc=$?
  tail -20 "$WORK/sass_budget.txt"
  end "$([ $sass_rc -eq 0 ] && echo ok || echo FAIL)" "exit $sass_rc (optional)"
fi

echo "== done [$((SECONDS - start)) s] doctor rc=$doctor_rc tests rc=$test_rc bench rc=$bench_rc; results: $OUT/gpu_results.md"
trap - EXIT
publish
cat "$OUT/gpu_results.md"
[ "$doctor_rc" -eq 0 ] && [ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
