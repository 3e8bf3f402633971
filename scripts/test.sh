#!/usr/bin/env bash
# Sets up (scripts/setup.sh test) and runs the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,tfds,tpu
# Tests that need many devices start their own subprocesses with
# XLA_FLAGS=--xla_force_host_platform_device_count=8.
export TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/python -m pytest -q -n 2 --durations=15 tests "$@"
