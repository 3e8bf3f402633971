"""Multi-process start-up, gated: jax.distributed.initialize only where a multi-process run is detected or asked for.

Decided from the environment, in this order (docs/scaling.md):

1. AMD_JAX_DISTRIBUTED=0: never (one process, whatever else is set).
2. Explicit: JAX_COORDINATOR_ADDRESS (host:port of process 0) with JAX_NUM_PROCESSES and
   JAX_PROCESS_ID; the launch scripts in launch/ set these. JAX_LOCAL_DEVICE_IDS (read by
   JAX itself) picks the accelerators of a process.
3. AMD_JAX_DISTRIBUTED=1: always, letting JAX detect the cluster (SLURM, Open MPI, Cloud TPU).
4. Detected: an srun step of more than one task (SLURM_STEP_NUM_TASKS or SLURM_NTASKS > 1, with
   SLURM_PROCID); an Open MPI job of more than one rank; a Cloud TPU VM (a Google TPU on the PCI
   bus, or TPU_WORKER_HOSTNAMES / MEGASCALE_COORDINATOR_ADDRESS as GKE and multi-slice set them).
   JAX's own cluster detection then supplies coordinator, process count and id (on a TPU VM
   from the metadata server; a single-host VM becomes a one-process cluster).

Anything else is a single-process run and jax.distributed is left alone.
"""
from __future__ import annotations

import os
from typing import Mapping

import jax
from absl import logging

from amd_jax.train import hardware

_OFF = ("0", "false", "no")
_ON = ("1", "true", "yes")
on_cloud_tpu_vm = hardware.on_cloud_tpu_vm


def _int_env(env: Mapping[str, str], name: str) -> int:
  try:
    return int(env[name])
  except ValueError:
    raise ValueError(f"{name}={env[name]!r} must be an integer") from None


def _more_than_one(env: Mapping[str, str], *names: str) -> bool:
  for name in names:
    if env.get(name, "").strip():
      try:
        return int(env[name].split("(")[0]) > 1   # SLURM writes e.g. '8(x2)' for some counts
      except ValueError:
        return False
  return False


def plan(env: Mapping[str, str] | None = None, tpu_vm: bool | None = None) -> tuple[str, dict] | None:
  """(why, jax.distributed.initialize kwargs) for a multi-process run, None for a single process."""
  env = os.environ if env is None else env
  asked = env.get("AMD_JAX_DISTRIBUTED", "").strip().lower()
  if asked in _OFF:
    return None
  if asked and asked not in _ON:
    raise ValueError(f"AMD_JAX_DISTRIBUTED={env['AMD_JAX_DISTRIBUTED']!r}: allowed: 1/true/yes (initialise), "
                     "0/false/no (never), or unset (detect)")
  if env.get("JAX_COORDINATOR_ADDRESS"):
    kwargs = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"]}
    if "JAX_NUM_PROCESSES" in env:
      kwargs["num_processes"] = _int_env(env, "JAX_NUM_PROCESSES")
    if "JAX_PROCESS_ID" in env:
      kwargs["process_id"] = _int_env(env, "JAX_PROCESS_ID")
    n, i = kwargs.get("num_processes"), kwargs.get("process_id")
    if n is not None and (n < 1 or (i is not None and not 0 <= i < n)):
      raise ValueError(f"JAX_PROCESS_ID={i} must lie in [0, JAX_NUM_PROCESSES={n})")
    return "explicit coordinator", kwargs
  if asked in _ON:
    return "asked for (AMD_JAX_DISTRIBUTED)", {}
  if "SLURM_PROCID" in env and _more_than_one(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
    return "SLURM step with several tasks", {}
  if _more_than_one(env, "OMPI_COMM_WORLD_SIZE"):
    return "Open MPI job with several ranks", {}
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "multi-slice TPU", {}
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return "TPU pod (TPU_WORKER_HOSTNAMES)", {}
  if tpu_vm if tpu_vm is not None else on_cloud_tpu_vm():
    return "Cloud TPU VM", {}
  return None


def wants_distributed() -> bool:
  return plan() is not None


def maybe_initialize() -> None:
  decision = plan()
  if decision is None or jax.distributed.is_initialized():
    return
  why, kwargs = decision
  logging.info("jax.distributed.initialize(%s): %s", ", ".join(f"{k}={v}" for k, v in kwargs.items()), why)
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
