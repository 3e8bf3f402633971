#!/usr/bin/env bash
# N processes of one command on this machine, joined by jax.distributed over localhost, each with
# simulated CPU devices: multi-process runs for tests and debugging without a cluster.
#
#   launch/local_multiprocess.sh [-n PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] [-l LOGDIR] [-t SECONDS] \
#       -- python -m amd_jax.main --config configs/test_tiny.py --workdir /tmp/run
#
# Every process gets JAX_COORDINATOR_ADDRESS=localhost:PORT, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i
# (amd_jax.train.distributed initialises from them), JAX_PLATFORMS=cpu and
# --xla_force_host_platform_device_count=D. Output goes to LOGDIR/process_<i>.log. The script waits
# for all; when one fails the others are stopped (they would wait for it in a collective), the
# logs' tails are printed and the script exits with the failing status. -t: per-process time limit.
set -uo pipefail

usage() { sed -n '2,13p' "$0" >&2; exit 2; }

num=2 devices=4 port="" logdir="" limit=0
while getopts "n:d:p:l:t:h" opt; do
  case "$opt" in
    n) num=$OPTARG ;;
    d) devices=$OPTARG ;;
    p) port=$OPTARG ;;
    l) logdir=$OPTARG ;;
    t) limit=$OPTARG ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
(($# > 0)) || usage
[[ "$num" =~ ^[1-9][0-9]*$ && "$devices" =~ ^[1-9][0-9]*$ ]] || { echo "-n and -d must be positive integers" >&2; exit 2; }

if [[ -z "$port" ]]; then   # a port nobody listens on now
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
fi
logdir=${logdir:-$(mktemp -d -t amd_jax_local.XXXXXX)}
mkdir -p "$logdir"

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
}
trap 'stop_all; exit 130' INT TERM

runner=()
((limit > 0)) && runner=(timeout --kill-after=10 "$limit")
for ((i = 0; i < num; i++)); do
  JAX_COORDINATOR_ADDRESS="localhost:$port" JAX_NUM_PROCESSES="$num" JAX_PROCESS_ID="$i" JAX_PLATFORMS=cpu \
    XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" \
    "${runner[@]}" "$@" >"$logdir/process_$i.log" 2>&1 &
  pids+=($!)
done
echo "started $num processes (pids ${pids[*]}) with $devices CPU devices each; coordinator localhost:$port;" \
  "logs in $logdir"

# Poll rather than `wait -n`: portable to older bash, and it tells which process ended.
status=0
running=("${!pids[@]}")
while ((${#running[@]} > 0 && status == 0)); do
  sleep 0.5
  still=()
  for i in "${running[@]}"; do
    if kill -0 "${pids[$i]}" 2>/dev/null; then
      still+=("$i")
    else
      wait "${pids[$i]}"
      rc=$?
      if ((rc != 0 && status == 0)); then
        status=$rc
        echo "process $i exited with status $rc; stopping the others" >&2
      fi
    fi
  done
  running=("${still[@]}")
done
if ((status != 0)); then
  stop_all
  wait
fi

if ((status != 0)); then
  for ((i = 0; i < num; i++)); do
    echo "----- process $i: last lines of $logdir/process_$i.log -----" >&2
    tail -n 40 "$logdir/process_$i.log" >&2
  done
  exit "$status"
fi
echo "all $num processes finished; logs in $logdir"
