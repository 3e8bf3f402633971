#!/usr/bin/env bash
# Sets up and runs the quickstart: a teacher MAE, an AMD student and an MAE student on
# Fashion-MNIST, then kNN / linear-probe evaluation of each next to two controls.
# Usage: bash scripts/quickstart.sh [WORKDIR]   (default: workdirs/quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workdir="${1:-workdirs/quickstart}"
export TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/python -m amd_jax.quickstart --workdir "$workdir"
