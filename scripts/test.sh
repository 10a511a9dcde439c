#!/usr/bin/env bash
# The test command: runs the whole suite against the installed package (CUDA cases skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
# plain `pytest` (not `python -m pytest`) so the installed package is imported, not the source tree
pytest tests -q -p no:cacheprovider --benchmark-disable "$@"
