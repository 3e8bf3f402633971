"""Multi-process start-up, gated: jax.distributed.initialize only where a multi-process run is detected."""
from __future__ import annotations

import os

import jax
from absl import logging

# Environment markers of launchers that start one process per host/GPU.
_MARKERS = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def wants_distributed() -> bool:
  if os.environ.get("AMD_JAX_DISTRIBUTED", "").lower() in ("0", "false", "no"):
    return False
  if os.environ.get("AMD_JAX_DISTRIBUTED", "").lower() in ("1", "true", "yes"):
    return True
  if os.environ.get("SLURM_NTASKS", "1") not in ("", "1"):
    return True
  workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if workers and len(workers.split(",")) > 1:
    return True
  return bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def maybe_initialize() -> None:
  if not wants_distributed():
    return
  kwargs = {}
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
