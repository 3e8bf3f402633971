"""Validation of a whole run config before anything is compiled, and what may change when a run resumes.

Every bad value stops the run with an amd_jax.errors.ConfigError naming the field, the value
and what is allowed. Unknown fields are errors too: a misspelt override must never be
silently ignored.
"""
from __future__ import annotations

import json

import jax
import ml_collections

from amd_jax import errors, methods
from amd_jax.data import pipeline
from amd_jax.errors import ConfigError, fail
from amd_jax.models import check as model_check
from amd_jax.train import guard, sharding

__all__ = ["ConfigError", "validate", "known_fields", "check_no_unknown_fields", "resume_changes"]

known_fields = methods.known_fields


def check_no_unknown_fields(config, known, prefix: str = ""):
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in known:
      allowed = ", ".join(sorted(known.keys()))
      raise ConfigError(f"config.{name} is not a known field (misspelt?). Fields here: {allowed}")
    value, ref = config[key], known[key]
    if isinstance(value, ml_collections.ConfigDict) and isinstance(ref, ml_collections.ConfigDict):
      check_no_unknown_fields(value, ref, name + ".")


def _check_run_fields(config) -> None:
  errors.check_positive("batch_size", config.batch_size)
  n_dev, n_proc = jax.device_count(), jax.process_count()
  if config.batch_size % n_dev:
    fail("batch_size", config.batch_size, f"must be divisible by the number of devices ({n_dev})")
  if config.batch_size % n_proc:
    fail("batch_size", config.batch_size, f"must be divisible by the number of processes ({n_proc})")
  if (config.total_steps > 0) == (config.num_epochs > 0):
    raise ConfigError(f"give exactly one of config.total_steps (now {config.total_steps}) and config.num_epochs "
                      f"(now {config.num_epochs}) as a positive number; set the other to -1")
  for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    if config[field] < 1:
      fail(field, config[field], "must be >= 1")
  if config.image_every_steps < 0:
    fail("image_every_steps", config.image_every_steps, "must be >= 0 (0 disables the TensorBoard pictures)")
  errors.check_choice("shard_teacher", config.shard_teacher, ["auto", "sharded", "replicated"])
  errors.check_choice("nan_policy", config.nan_policy, guard.POLICIES)
  errors.check_int("nan_max_skips", config.nan_max_skips, 1)
  for field in ("every_steps", "batch_size"):
    if config.eval[field] < 0:
      fail(f"eval.{field}", config.eval[field], "must be >= 0 (0: see config_base)")
  if config.eval.batch_size % n_dev:
    fail("eval.batch_size", config.eval.batch_size, f"must be divisible by the number of devices ({n_dev})")
  try:
    steps = [int(s) for s in str(config.profile_steps).replace(" ", "").split(",") if s]
  except ValueError:
    steps = None
  if steps is None or (steps and (len(steps) != 2 or not 0 < steps[0] <= steps[1])):
    fail("profile_steps", config.profile_steps, "expected 'A,B' with 0 < A <= B (trace steps A..B), or ''")


def _check_optim(o) -> None:
  if o.lr <= 0 and o.base_lr <= 0:
    fail("optim.base_lr", o.base_lr, "must be > 0 (or set optim.lr > 0)")
  for field in ("b1", "b2"):
    errors.check_range(f"optim.{field}", o[field], 0.0, 1.0)
  if o.weight_decay < 0:
    fail("optim.weight_decay", o.weight_decay, "must be >= 0")
  errors.check_positive("optim.eps", o.eps)
  if o.grad_clip < 0:
    fail("optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")
  if o.min_lr < 0:
    fail("optim.min_lr", o.min_lr, "must be >= 0")
  errors.check_range("optim.ema_decay", o.ema_decay, 0.0, 1.0, meaning="0 disables the EMA of the weights")
  given = [f for f in ("warmup_steps", "warmup_epochs", "warmup_fraction") if o[f] >= 0]
  if len(given) > 1:
    raise ConfigError(f"give at most one of config.optim.warmup_steps / warmup_epochs / warmup_fraction (now "
                      f"{', '.join(f'{f}={o[f]}' for f in given)}); leave the others at -1")
  if o.warmup_fraction >= 0:
    errors.check_range("optim.warmup_fraction", o.warmup_fraction, 0.0, 1.0,
                       meaning="the share of the run's steps spent warming up")


def validate(config) -> None:
  """Raise ConfigError on the first problem found. Cheap: reads no data beyond file listings."""
  if config.method not in methods.REGISTRY:
    fail("method", config.method, f"allowed: {', '.join(sorted(methods.REGISTRY))}")
  check_no_unknown_fields(config, known_fields(config.method))
  errors.check_choice("data.modality", config.data.modality, ["image", "video"])
  model_check.validate_model(config.model, config.data)
  d = config.decoder
  errors.check_positive("decoder.width", d.width)
  if d.width % d.num_heads:
    fail("decoder.num_heads", d.num_heads, f"must divide decoder.width={d.width}")
  if d.depth < 0:
    fail("decoder.depth", d.depth, "must be >= 0")
  errors.check_range("mask.ratio", config.mask.ratio, 0.0, 1.0, closed_low=False)
  errors.check_choice("mask.kind", config.mask.kind, ["random", "tube"])
  if config.mask.kind == "tube" and config.data.modality != "video":
    fail("mask.kind", config.mask.kind, "tube masks need video data (config.data.modality='video')")
  _check_run_fields(config)
  _check_optim(config.optim)
  try:
    sharding.mesh_shape(config.mesh, jax.device_count())
  except ValueError as e:
    raise ConfigError(str(e)) from None
  try:
    pipeline.validate_data_config(config.data)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from None
  methods.get_method_class(config.method).validate_config(config)


# ------------------------------------------------------------------ resuming a workdir


# What a run IS: changing these under an existing workdir would mix two runs in one set of checkpoints.
_IDENTITY = ("method", "model.", "decoder.", "data.modality", "data.image_size", "data.channels", "data.num_frames",
             "data.mean", "data.std", "mask.", "norm_pix_loss")
# How a run is carried out, with no effect on what it computes: free to change on resume.
_OPERATIONAL = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "image_every_steps",
                "allow_config_change", "eval.", "mesh.", "shard_teacher", "nan_policy", "nan_max_skips",
                "profile_steps", "data.num_workers", "data.prefetch", "data.cache_max_bytes", "data.path",
                "data.video_root", "model.remat", "model.attention", "model.init_scheme", "teacher.model.remat",
                "teacher.model.attention", "teacher.model.init_scheme")


def _merged(defaults: dict, saved: dict) -> dict:
  out = dict(defaults)
  for key, value in saved.items():
    out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
  return out


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _kind(key: str, method_fields: tuple[str, ...]) -> str:
  if key.startswith(_OPERATIONAL):
    return "operational"
  if key.startswith(_IDENTITY) or key.split(".")[0] in method_fields:
    return "identity"
  return "setting"


def resume_changes(previous: dict, current: dict) -> tuple[list[str], list[str]]:
  """(identity changes, setting changes) between a workdir's saved config and this run's, each as
  'field: old -> new'. Identity: what the run is (method, model, masks, the method's own fields such
  as teacher.* and amd.*); settings: how it is trained (optimizer, schedule, batch size, seed, data
  augmentation). Operational fields (logging, checkpoint cadence, mesh, evaluation) are free."""
  method_fields = set()
  for config in (previous, current):
    name = config.get("method")
    if name in methods.REGISTRY:
      method_fields.update(methods.method_field_names(name))
  if previous.get("method") in methods.REGISTRY:   # a field newer than the saved run: its default
    defaults = json.loads(methods.known_fields(previous["method"]).to_json_best_effort())
    previous = _merged(defaults, previous)
  a, b = _flatten(previous), _flatten(current)
  identity, settings = [], []
  for key in sorted(set(a) | set(b)):
    if a.get(key) == b.get(key):
      continue
    kind = _kind(key, tuple(method_fields))
    change = f"{key}: {a.get(key, '(absent)')!r} -> {b.get(key, '(absent)')!r}"
    if kind == "identity":
      identity.append(change)
    elif kind == "setting":
      settings.append(change)
  return identity, settings
