#!/usr/bin/env bash
# The test command (what .ci/run calls after scripts/setup.sh): the whole suite against the installed
# package. CUDA cases skip without a GPU (the summary lists each skip reason with how many tests it skipped).
# Extra arguments go to pytest (e.g. -k nf4, -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && source .venv/bin/activate
# -rs: the skip reasons, grouped (one line per reason with its count); -p no:benchmark: with or without pytest-benchmark
python -m pytest tests -q -rs -p no:cacheprovider -p no:benchmark "$@"
