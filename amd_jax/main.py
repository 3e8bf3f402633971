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
from amd_jax.train import hardware  # pylint: disable=g-import-not-at-top,wrong-import-position

if "--verbose" in sys.argv:
  os.environ["AMD_JAX_VERBOSE"] = "1"
else:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # libtpu on a host without a TPU: skip it rather than let it probe (and print) at JAX's start.
  os.environ.setdefault("JAX_PLATFORMS", hardware.platforms_without_absent_tpu() or "")

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from amd_jax import config_files, errors  # pylint: disable=g-import-not-at-top,wrong-import-position

EXIT_CODES = {"config": 2, "nonfinite": 3, "checkpoint": 4, "SIGTERM": 143, "SIGINT": 130}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an amd_jax config file, or the name of a "
                                          "shipped one (amd_vit_s_ssv2:runlocal).", lock_config=True)
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


def _one_line(error: BaseException) -> str:
  text = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
  text = text.encode().decode("unicode_escape") if "\\n" in text else text   # a repr'd KeyError inside
  return "; ".join(part.strip().strip("'") for part in text.strip("'").splitlines() if part.strip())


def _root_cause(error: BaseException) -> BaseException:
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  return error


def parse_flags(argv):
  """absl's flag parsing; a config file that cannot be loaded, a misspelt config argument or an unknown
  --config.x.y field ends in one line (exit 2) instead of a traceback."""
  try:
    argv = config_files.resolve_flag(argv)   # --config NAME: a shipped config (amd_jax/configs)
  except errors.ConfigError as e:
    stop(f"configuration error: {e}", EXIT_CODES["config"])
  overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
  config_arg = ([a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")] or [None])[-1]
  try:
    rest = flags.FLAGS(argv)
    if _CONFIG.value is not None:
      _CONFIG.value.keys()   # a file that could not be loaded raises only when its config is first used
    return rest
  except (AttributeError, KeyError) as e:   # ml_collections: an override names no config field
    stop(f"configuration error: unknown config field in {', '.join(overrides) or 'the overrides'}: "
         f"{_one_line(e)}", EXIT_CODES["config"])
  except flags.UnrecognizedFlagError as e:
    stop(f"configuration error: {_one_line(e)}", EXIT_CODES["config"])
  except (flags.Error, OSError, ValueError, ImportError, SyntaxError) as e:   # the file or its argument
    path = config_arg.split(":", 1)[0] if config_arg else ""
    reason = f"no such file: {path}" if path and not os.path.exists(path) else _one_line(_root_cause(e))
    stop(f"configuration error: cannot load the config{f' {config_arg!r}' if config_arg else ''}: {reason}",
         EXIT_CODES["config"])


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
