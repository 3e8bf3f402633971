#!/usr/bin/env bash
# Sets up and runs the quickstart: pre-training on Fashion-MNIST, then frozen-feature evaluation.
# Usage: bash scripts/quickstart.sh [WORKDIR]   (default: workdirs/quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workdir="${1:-workdirs/quickstart}"
export TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/python -m amd_jax.main --config configs/quickstart.py --workdir "$workdir"
