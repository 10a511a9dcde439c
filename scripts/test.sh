#!/usr/bin/env bash
# The test command (what .ci/run calls after scripts/setup.sh): the whole suite against the installed
# package. CUDA cases skip without a GPU. Extra arguments go to pytest (e.g. -k nf4, -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && source .venv/bin/activate
python -m pytest tests -q -p no:cacheprovider -p no:benchmark "$@"  # -p no:benchmark: with or without pytest-benchmark
