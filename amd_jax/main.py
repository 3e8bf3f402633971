"""Command line: python -m amd_jax.main --config configs/X.py[:arg] --workdir DIR [--config.a.b=v ...].

Exit status: 0 done (or already complete); 2 configuration error (nothing ran, nothing written that
matters); 3 stopped on a NaN/Inf (nan_policy; checkpoints untouched); 4 checkpoint fault (none can be
restored, or one cannot be read or written: the message names the path); 143 / 130 stopped by SIGTERM /
SIGINT after checkpointing the step reached (rerun the same command to resume); 1 anything else.
Every stop but the last ends in one `amd_jax: ...` message on stderr, without a traceback.
"""
from __future__ import annotations

import os
import sys

# Before TensorFlow, XLA or libtpu load: their C++ banners and host probing are noise here (--verbose keeps them).
if "--verbose" not in sys.argv:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from amd_jax import errors  # pylint: disable=g-import-not-at-top,wrong-import-position

EXIT_CODES = {"config": 2, "nonfinite": 3, "checkpoint": 4, "SIGTERM": 143, "SIGINT": 130}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an amd_jax config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and config.json "
                               "(a local path or a gs:// URL).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Keep other libraries' log lines (TensorFlow, XLA, orbax, ...).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    stop(f"unexpected arguments: {' '.join(argv[1:])}", EXIT_CODES["config"])
  # The loop and what it brings (JAX, orbax, grain) load after the flags are known good.
  from amd_jax.train import checkpoint, distributed, guard, loop, metrics, preemption  # pylint: disable=g-import-not-at-top
  metrics.quiet_library_logs(verbose=_VERBOSE.value)
  distributed.maybe_initialize()
  try:
    final = loop.run(_CONFIG.value, _WORKDIR.value)
  except errors.ConfigError as e:
    stop(f"configuration error: {e}", EXIT_CODES["config"])
  except guard.NonFiniteError as e:
    stop(f"stopped: {e}", EXIT_CODES["nonfinite"])
  except checkpoint.CheckpointError as e:
    stop(f"checkpoint fault: {e}", EXIT_CODES["checkpoint"])
  except preemption.Preempted as e:   # resumable: the step reached is saved (or nothing new was done)
    stop(str(e), e.exit_code, abandon_threads=bool(e.during))
  print("final metrics:\n" + "\n".join(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}"
                                       for k, v in sorted(final.items())), flush=True)


def _config_error_text(error: BaseException) -> str:
  """One line from what ml_collections / absl raise while loading a config file or applying an override."""
  inner = error
  while inner.__cause__ is not None or inner.__context__ is not None:
    inner = inner.__cause__ or inner.__context__
  text = inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)
  return " ".join(str(text).split())


def parse_flags(argv):
  """absl's flag parsing; a config file that cannot be loaded, a misspelt config argument or an unknown
  --config.x.y field ends in one line (exit 2) instead of a traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:   # ml_collections: an override names no config field
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    stop(f"configuration error: unknown config field in {', '.join(overrides) or 'the overrides'}: "
         f"{_config_error_text(e)}", EXIT_CODES["config"])
  except (flags.Error, OSError, ValueError, ImportError, SyntaxError) as e:   # the file or its argument
    config_arg = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
    stop(f"configuration error: cannot load the config{f' {config_arg!r}' if config_arg else ''}: "
         f"{_config_error_text(e)}", EXIT_CODES["config"])


def stop(message: str, code: int, abandon_threads: bool = False):
  """End with `message` on stderr and exit status `code` (see the module doc), no traceback.

  abandon_threads: a worker thread is still inside a compile or restore that a signal interrupted; waiting
  for it at interpreter exit would delay the stop by the rest of that phase.
  """
  print(f"amd_jax: {message}", file=sys.stderr, flush=True)
  if abandon_threads:
    sys.stdout.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
