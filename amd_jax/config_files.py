"""Config files by name or by path.

The repository's configs/ folder is installed with the library as the package `amd_jax.configs`, so the shipped
configs are there in a wheel as in a checkout. `--config` takes either form:

  --config amd_vit_s_ssv2:runlocal          a shipped config by name (`.py` may be added)
  --config path/to/my_config.py:arg         any config file, as ml_collections loads it

From Python, `load('quickstart:stage=mae,runlocal')` gives the ConfigDict that --config gives.

A path that exists is always taken as the path; a bare name that is no file is looked up among the shipped
configs (`names()` lists them). Nothing here imports JAX or another amd_jax module but `errors`.
"""
from __future__ import annotations

import importlib.resources
import importlib.util
import os
from typing import Sequence

from amd_jax import errors

PACKAGE = "amd_jax.configs"
SUFFIX = ".py"


def shipped_dir() -> str:
  """The folder holding the shipped config files (configs/ of a checkout, amd_jax/configs of a wheel)."""
  return str(importlib.resources.files(PACKAGE))


def names() -> list[str]:
  """Names of the shipped configs, sorted: ['amd_vit_b_in1k', ..., 'test_tiny', ...]."""
  folder = shipped_dir()
  return sorted(f[:-len(SUFFIX)] for f in os.listdir(folder)
                if f.endswith(SUFFIX) and not f.startswith("_") and os.path.isfile(os.path.join(folder, f)))


def path_of(name: str) -> str:
  """The file of the shipped config `name` ('quickstart' or 'quickstart.py'); ConfigError if there is none."""
  stem = name[:-len(SUFFIX)] if name.endswith(SUFFIX) else name
  shipped = names()
  if stem not in shipped:
    raise errors.ConfigError(f"no config file {name!r} and no shipped config of that name; shipped configs: "
                             f"{', '.join(shipped)}")
  return os.path.join(shipped_dir(), stem + SUFFIX)


def _looks_like_name(file_part: str) -> bool:
  """A bare name ('quickstart', 'quickstart.py'), not a path with folders."""
  return bool(file_part) and os.sep not in file_part and "/" not in file_part


def resolve(spec: str) -> str:
  """'name[:arg]' or 'path[:arg]' -> 'path[:arg]', the form ml_collections' config_flags loads.

  An existing file is kept as given. A bare name is a shipped config. A path that does not exist raises
  ConfigError, naming the shipped config of the same name when there is one (a checkout's `configs/x.py` typed
  outside the checkout).
  """
  file_part, sep, arg = spec.partition(":")
  if os.path.isfile(file_part):
    return spec
  if _looks_like_name(file_part):
    return path_of(file_part) + sep + arg
  stem = os.path.basename(file_part)
  stem = stem[:-len(SUFFIX)] if stem.endswith(SUFFIX) else stem
  hint = (f"; the shipped config of that name is `--config {stem}{sep}{arg}`" if stem in names()
          else f"; shipped configs (by name): {', '.join(names())}")
  raise errors.ConfigError(f"no config file {file_part!r}{hint}")


def resolve_flag(argv: Sequence[str], flag: str = "config") -> list[str]:
  """argv with the value of --<flag>=X (or `--<flag> X`) resolved by `resolve`; other arguments unchanged."""
  out = list(argv)
  for i, arg in enumerate(out):
    for dashes in ("--", "-"):
      if arg.startswith(f"{dashes}{flag}="):
        out[i] = f"{dashes}{flag}=" + resolve(arg.split("=", 1)[1])
      elif arg == f"{dashes}{flag}" and i + 1 < len(out):
        out[i + 1] = resolve(out[i + 1])
  return out


def load(spec: str):
  """The ConfigDict of `--config spec` (a shipped name or a path, with its optional `:arg`), before any
  --config.a.b=v override: the file's get_config(arg), or get_config() when there is no `:`."""
  path, sep, arg = resolve(spec).partition(":")
  stem = os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(f"amd_jax_config_{stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if sep else module.get_config()
