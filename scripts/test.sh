#!/usr/bin/env bash
# Sets up (scripts/setup.sh test,tfds,tpu), lints (ruff check) and runs the whole test suite on the CPU.
# Extra arguments go to pytest (e.g. -m "not slow", or one file).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,tfds,tpu
# Tests that need many devices start their own subprocesses with
# XLA_FLAGS=--xla_force_host_platform_device_count=8.
export TF_CPP_MIN_LOG_LEVEL=2
lint=0
.venv/bin/ruff check . || lint=$?
tests=0
.venv/bin/python -m pytest -q -n 2 --durations=15 tests "$@" || tests=$?
if [ "$lint" -ne 0 ]; then
  echo "ruff check found problems (listed before the tests)" >&2
fi
if [ "$tests" -ne 0 ]; then exit "$tests"; fi
exit "$lint"
