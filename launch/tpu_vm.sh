#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM (a single host or a pod slice) from your workstation.
#
#   launch/tpu_vm.sh --tpu NAME --zone ZONE [--project PROJECT] --config configs/X.py --workdir gs://BUCKET/run \
#       [--repo '~/amd_jax'] [--sync] [--setup CMD | --no_setup] [--logdir DIR] [-- --config.a.b=v ...]
#
# One `gcloud compute tpus tpu-vm ssh --worker=all` starts `python -m amd_jax.main` on all workers at
# once (they must start together: jax.distributed waits for every process). AMD_JAX_DISTRIBUTED=1 makes
# each process call jax.distributed.initialize(), which reads the coordinator, process count and
# id from the TPU metadata server. The workdir must be shared by all workers (a gs:// bucket).
#   --repo   directory of the amd_jax checkout on the workers (default ~/amd_jax)
#   --sync   first copy this checkout's committed files there (git archive HEAD + scp --worker=all)
#   --setup  shell command run in --repo before training; default: install the checkout with its TPU extra
#            (python3 -m pip install -e '.[tpu]': jax with the libtpu it was built for); --no_setup: none
# Every output line is prefixed with its worker number; the stream is saved in
# LOGDIR/all_workers.log and split into LOGDIR/worker_<n>.log (default LOGDIR: logs/tpu_<name>_<time>).
set -euo pipefail

usage() { sed -n '2,18p' "$0" >&2; exit 2; }

tpu="" zone="" project="" config="" workdir="" repo='~/amd_jax' logdir="" sync=0
setup="python3 -m pip install -q -e '.[tpu]'"
while (($# > 0)); do
  case "$1" in
    --tpu) tpu=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --workdir) workdir=$2; shift 2 ;;
    --repo) repo=$2; shift 2 ;;
    --setup) setup=$2; shift 2 ;;
    --no_setup) setup=""; shift ;;
    --logdir) logdir=$2; shift 2 ;;
    --sync) sync=1; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
[[ -n "$tpu" && -n "$zone" && -n "$config" && -n "$workdir" ]] || { echo "--tpu, --zone, --config and --workdir are required" >&2; usage; }

gcloud_tpu=(compute tpus tpu-vm)
where=("--zone=$zone")
[[ -n "$project" ]] && where+=("--project=$project")

if ((sync)); then
  archive=$(mktemp -t amd_jax_src.XXXXXX.tar.gz)
  git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
  gcloud "${gcloud_tpu[@]}" scp "$archive" "$tpu:/tmp/amd_jax_src.tar.gz" "${where[@]}" --worker=all
  gcloud "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --worker=all \
    --command="mkdir -p $repo && tar -xzf /tmp/amd_jax_src.tar.gz -C $repo"
  rm -f "$archive"
fi

# The training command, each argument quoted for the remote shell.
train=(python -m amd_jax.main --config "$config" --workdir "$workdir" "$@")
quoted=$(printf ' %q' "${train[@]}")
remote="set -o pipefail; cd $repo"
[[ -n "$setup" ]] && remote+=" && $setup"
# The worker number comes from the TPU metadata server (the same source jax.distributed uses).
remote+=" && w=\$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)"
remote+=" && AMD_JAX_DISTRIBUTED=1 TF_CPP_MIN_LOG_LEVEL=2${quoted} 2>&1 | sed -u \"s/^/[worker \$w] /\""

logdir=${logdir:-logs/tpu_${tpu}_$(date +%Y%m%d_%H%M%S)}
mkdir -p "$logdir"
echo "running on all workers of $tpu:${quoted}"
echo "logs: $logdir"
set +e
gcloud "${gcloud_tpu[@]}" ssh "$tpu" "${where[@]}" --worker=all --command="$remote" 2>&1 | tee "$logdir/all_workers.log"
status=${PIPESTATUS[0]}
set -e
awk -v dir="$logdir" '/^\[worker [^]]*\] / {
  id = $2; sub(/\]$/, "", id); line = $0; sub(/^\[worker [^]]*\] /, "", line)
  print line > (dir "/worker_" id ".log")
}' "$logdir/all_workers.log"
if ((status != 0)); then
  echo "a worker failed (gcloud exit status $status); see $logdir/worker_*.log" >&2
fi
exit "$status"
