#!/usr/bin/env bash
#SBATCH --job-name=amd_jax
#SBATCH --nodes=2
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
# Train on GPUs under SLURM: one process per GPU (--ntasks-per-node = GPUs per node, the default
# above) or one process per node (--ntasks-per-node=1; it drives all the node's GPUs).
#
#   mkdir -p logs && sbatch launch/gpu_slurm.sh --config configs/X.py --workdir /shared/runs/x [--config.a.b=v ...]
#   sbatch --nodes=4 --ntasks-per-node=1 launch/gpu_slurm.sh --config ... --workdir ...
#
# Submitted with sbatch, the script re-runs itself once per task through srun. Each task then sets
#   JAX_COORDINATOR_ADDRESS  first node of SLURM_JOB_NODELIST : AMD_JAX_PORT (default 12000 + job id % 20000)
#   JAX_NUM_PROCESSES        SLURM_NTASKS          JAX_PROCESS_ID  SLURM_PROCID
#   JAX_LOCAL_DEVICE_IDS     its GPU (per-GPU tasks) or all the node's GPUs (per-node tasks)
# and runs python -m amd_jax.main with the arguments given. The workdir must be on a file system
# every node sees. Per-task logs: AMD_JAX_LOGDIR (default logs/)/amd_jax-<job>-task<n>.log.
# AMD_JAX_DRY_RUN=1 prints a task's environment and command instead of running it.
set -euo pipefail

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "submit this script with sbatch (or run it inside an allocation through srun with AMD_JAX_SRUN_TASK=1)" >&2
  exit 2
fi

logdir=${AMD_JAX_LOGDIR:-logs}
if [[ -z "${AMD_JAX_SRUN_TASK:-}" ]]; then   # the batch shell: start one task per process
  mkdir -p "$logdir"
  # sbatch runs a spooled copy of this script that only the first node has: give the tasks one on
  # the shared file system.
  task_script="$logdir/amd_jax-$SLURM_JOB_ID.sh"
  cp "$0" "$task_script"
  exec srun --kill-on-bad-exit=1 --output="$logdir/amd_jax-%j-task%t.log" \
    env AMD_JAX_SRUN_TASK=1 bash "$task_script" "$@"
fi

coordinator=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')   # awk reads all: no SIGPIPE
port=${AMD_JAX_PORT:-$((12000 + SLURM_JOB_ID % 20000))}
export JAX_COORDINATOR_ADDRESS="$coordinator:$port"
export JAX_NUM_PROCESSES="$SLURM_NTASKS"
export JAX_PROCESS_ID="$SLURM_PROCID"

nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
per_node=${SLURM_NTASKS_PER_NODE:-$((SLURM_NTASKS / nodes))}
per_node=${per_node%%(*}   # SLURM may write e.g. '8(x2)'
visible=${CUDA_VISIBLE_DEVICES:-}
if ((per_node > 1)); then
  # One GPU per task: SLURM_LOCALID among the node's GPUs, or the only one when SLURM bound it.
  if [[ -n "$visible" && "$visible" != *,* ]]; then
    export JAX_LOCAL_DEVICE_IDS=0
  else
    export JAX_LOCAL_DEVICE_IDS="$SLURM_LOCALID"
  fi
else
  # One task drives all the node's GPUs (without this, JAX's SLURM detection would give it GPU 0 only).
  gpus=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
  export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))
fi

train=(python -m amd_jax.main "$@")
if [[ -n "${AMD_JAX_DRY_RUN:-}" ]]; then
  env | grep -E '^JAX_(COORDINATOR_ADDRESS|NUM_PROCESSES|PROCESS_ID|LOCAL_DEVICE_IDS)=' | sort
  echo "${train[*]}"
  exit 0
fi
echo "task $SLURM_PROCID of $SLURM_NTASKS on $(hostname): coordinator $JAX_COORDINATOR_ADDRESS," \
  "local devices $JAX_LOCAL_DEVICE_IDS"
exec "${train[@]}"
