#!/usr/bin/env bash
# The tests' shared compilation cache (tests/conftest.py `compilation_cache`), priced on one command: the same
# tiny run (configs/test_tiny.py) twice without jax's persistent cache, then twice with one (the second run reads
# the first's compiled programs). Prints wall/user seconds and the step's compile time of each. Run it alone.
# Usage: bash benchmarks/compile_cache_ab.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2 AMD_JAX_PROGRESS=0
run() {  # label, workdir, extra env...
  local label=$1 workdir=$2; shift 2
  env "$@" /usr/bin/time -f "$label: %e s wall, %U s user" "$python" -m amd_jax.main \
      --config configs/test_tiny.py --workdir "$workdir" 2>&1 | grep -E "step compiled|wall" | sed 's/^.*amd_jax: //'
}
run "no cache, run 1" "$scratch/a1"
run "no cache, run 2" "$scratch/a2"
cache=(JAX_COMPILATION_CACHE_DIR="$scratch/cache" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0)
run "cache, run 1 (fills it)" "$scratch/b1" "${cache[@]}"
run "cache, run 2 (reads it)" "$scratch/b2" "${cache[@]}"
