"""Command line: python -m amd_jax.main --config configs/X.py --workdir DIR [--config.a.b=v ...]."""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# Exit status: 0 done; 2 configuration error (nothing ran); 3 stopped on a NaN/Inf (nan_policy='stop';
# checkpoints untouched); 4 no checkpoint in the workdir can be restored; 143 / 130 stopped by SIGTERM /
# SIGINT after checkpointing the step reached (rerun the same command to resume); 1 anything else.
EXIT_CODES = {"config": 2, "nonfinite": 3, "checkpoint": 4, "SIGTERM": 143, "SIGINT": 130}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an amd_jax config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and config.json.")
flags.mark_flags_as_required(["config", "workdir"])


def _hide_accelerators_from_tensorflow():
  # tfds and clu's TensorBoard writer import TensorFlow; keep it off the GPUs/TPUs JAX owns.
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
  except Exception:  # pylint: disable=broad-except
    pass


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from amd_jax.train import metrics  # pylint: disable=g-import-not-at-top
  metrics.quiet_library_logs()
  _hide_accelerators_from_tensorflow()
  from amd_jax import config_validation  # pylint: disable=g-import-not-at-top
  from amd_jax.train import checkpoint, distributed, guard, loop, preemption  # pylint: disable=g-import-not-at-top
  distributed.maybe_initialize()
  config = _CONFIG.value
  try:
    config_validation.validate(config)
    loop.run(config, _WORKDIR.value)
  except config_validation.ConfigError as e:
    _stop(f"configuration error: {e}", EXIT_CODES["config"])
  except guard.NonFiniteError as e:
    _stop(f"stopped: {e}", EXIT_CODES["nonfinite"])
  except checkpoint.CheckpointError as e:
    _stop(f"cannot resume: {e}", EXIT_CODES["checkpoint"])
  except preemption.Preempted as e:   # stopped on request after a checkpoint: resumable
    _stop(str(e), e.exit_code)


def _parse_flags(argv):
  """absl's flag parsing, with a misspelt --config.x.y override ending in one line instead of a traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:   # ml_collections: the override names no config field
    inner = e.args[0] if e.args else e
    detail = (inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)).replace("\n", "; ")
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    _stop(f"configuration error: unknown config field in {', '.join(overrides) or 'the overrides'}: {detail}",
          EXIT_CODES["config"])


def _stop(message: str, code: int):
  """End with `message` on stderr and exit status `code` (see EXIT_CODES), no traceback."""
  logging.error("%s", message)
  print(f"amd_jax: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main, flags_parser=_parse_flags)
