"""Validation of a whole run config before anything is compiled.

Every bad value stops the run with a ConfigError naming the field, the value and
what is allowed. Unknown fields are errors too: a misspelt override must never
be silently ignored.
"""
from __future__ import annotations

import os
import tempfile

import jax
import ml_collections

from amd_jax import config_base
from amd_jax.models import vit
from amd_jax.train import guard


class ConfigError(ValueError):
  """A config field holds a value the run cannot use."""


def _fail(field: str, value, allowed: str):
  raise ConfigError(f"config.{field}={value!r} is not valid: {allowed}")


def known_fields(method_name: str) -> ml_collections.ConfigDict:
  """The base config plus the fields the chosen method adds (Method.extra_config())."""
  from amd_jax import methods  # pylint: disable=g-import-not-at-top
  known = config_base.base_config()
  cls = methods.get_method_class(method_name)
  extra = getattr(cls, "extra_config", None)
  if extra is not None:
    for key, value in extra().items():
      known[key] = value
  return known


def check_no_unknown_fields(config, known, prefix: str = ""):
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in known:
      allowed = ", ".join(sorted(known.keys()))
      raise ConfigError(f"config.{name} is not a known field (misspelt?). Fields here: {allowed}")
    value, ref = config[key], known[key]
    if isinstance(value, ml_collections.ConfigDict) and isinstance(ref, ml_collections.ConfigDict):
      check_no_unknown_fields(value, ref, name + ".")


def _check_choice(field: str, value, choices):
  if value not in choices:
    _fail(field, value, f"allowed: {', '.join(map(str, choices))}")


def _check_positive(field: str, value):
  if not value > 0:
    _fail(field, value, "must be > 0")


def validate_model(config, model_cfg=None, field: str = "model"):
  """Check one model description (config.model, or another one such as config.teacher.model)."""
  m = config.model if model_cfg is None else model_cfg
  _check_choice(f"{field}.variant", m.variant, list(vit.VARIANTS))
  width, depth, heads = vit.resolve_variant(m.variant, m.width, m.depth, m.num_heads)
  if width % heads:
    _fail(f"{field}.num_heads", heads, f"must divide the width {width}")
  _check_choice(f"{field}.qkv_bias", m.qkv_bias, ["fused", "qv", "none"])
  _check_choice(f"{field}.pos_emb", m.pos_emb, ["sincos2d", "sincos1d"])
  if m.pos_emb == "sincos2d" and width % 4:
    _fail(f"{field}.width", width, "sincos2d position embeddings need a width divisible by 4")
  _check_choice(f"{field}.dtype", m.dtype, ["float32", "bfloat16"])
  _check_choice(f"{field}.remat", m.remat, list(vit.REMAT_POLICIES))
  if not 0.0 <= m.drop_path < 1.0:
    _fail(f"{field}.drop_path", m.drop_path, "must be in [0, 1)")
  _check_positive(f"{field}.patch_size", m.patch_size)
  _check_positive(f"{field}.mlp_ratio", m.mlp_ratio)
  _check_choice(f"{field}.attention", m.attention, ["xla", "cudnn"])
  data = config.data
  if data.image_size % m.patch_size:
    _fail("data.image_size", data.image_size, f"must be divisible by {field}.patch_size={m.patch_size}")
  if data.modality == "video":
    _check_positive(f"{field}.tubelet_size", m.tubelet_size)
    if data.num_frames % m.tubelet_size:
      _fail("data.num_frames", data.num_frames, f"must be divisible by {field}.tubelet_size={m.tubelet_size}")
  return width, depth, heads


def validate(config) -> None:
  """Raise ConfigError on the first problem found. Cheap: reads no data beyond file listings."""
  from amd_jax import methods  # pylint: disable=g-import-not-at-top
  from amd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  if config.method not in methods.REGISTRY:
    _fail("method", config.method, f"allowed: {', '.join(sorted(methods.REGISTRY))}")
  check_no_unknown_fields(config, known_fields(config.method))

  _check_choice("data.modality", config.data.modality, ["image", "video"])
  validate_model(config)
  d = config.decoder
  _check_positive("decoder.width", d.width)
  if d.width % d.num_heads:
    _fail("decoder.num_heads", d.num_heads, f"must divide decoder.width={d.width}")
  if d.depth < 0:
    _fail("decoder.depth", d.depth, "must be >= 0")

  if not 0.0 < config.mask.ratio < 1.0:
    _fail("mask.ratio", config.mask.ratio, "must be in the open interval (0, 1)")
  _check_choice("mask.kind", config.mask.kind, ["random", "tube"])
  if config.mask.kind == "tube" and config.data.modality != "video":
    _fail("mask.kind", config.mask.kind, "tube masks need video data (config.data.modality='video')")

  _check_positive("batch_size", config.batch_size)
  n_dev, n_proc = jax.device_count(), jax.process_count()
  if config.batch_size % n_dev:
    _fail("batch_size", config.batch_size, f"must be divisible by the number of devices ({n_dev})")
  if config.batch_size % n_proc:
    _fail("batch_size", config.batch_size, f"must be divisible by the number of processes ({n_proc})")
  if (config.total_steps > 0) == (config.num_epochs > 0):
    raise ConfigError(f"give exactly one of config.total_steps (now {config.total_steps}) and config.num_epochs "
                      f"(now {config.num_epochs}) as a positive number; set the other to -1")
  for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    if config[field] < 1:
      _fail(field, config[field], "must be >= 1")

  o = config.optim
  if o.lr <= 0 and o.base_lr <= 0:
    _fail("optim.base_lr", o.base_lr, "must be > 0 (or set optim.lr > 0)")
  for field in ("b1", "b2"):
    if not 0.0 <= o[field] < 1.0:
      _fail(f"optim.{field}", o[field], "must be in [0, 1)")
  if o.weight_decay < 0:
    _fail("optim.weight_decay", o.weight_decay, "must be >= 0")
  if not o.eps > 0:
    _fail("optim.eps", o.eps, "must be > 0")
  _check_choice("shard_teacher", config.shard_teacher, ["auto", "sharded", "replicated"])
  _check_choice("nan_policy", config.nan_policy, guard.POLICIES)
  if o.grad_clip < 0:
    _fail("optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")
  if o.min_lr < 0:
    _fail("optim.min_lr", o.min_lr, "must be >= 0")
  if not 0.0 <= o.ema_decay < 1.0:
    _fail("optim.ema_decay", o.ema_decay, "must be in [0, 1) (0 disables the EMA of the weights)")
  if config.image_every_steps < 0:
    _fail("image_every_steps", config.image_every_steps, "must be >= 0 (0 disables the TensorBoard pictures)")
  for field in ("every_steps", "batch_size"):
    if config.eval[field] < 0:
      _fail(f"eval.{field}", config.eval[field], "must be >= 0 (0: see config_base)")
  if config.eval.batch_size % n_dev:
    _fail("eval.batch_size", config.eval.batch_size, f"must be divisible by the number of devices ({n_dev})")

  try:
    from amd_jax.train import sharding  # pylint: disable=g-import-not-at-top
    sharding.mesh_shape(config.mesh, n_dev)
  except ValueError as e:
    raise ConfigError(str(e)) from None

  try:
    pipeline.validate_data_config(config.data)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from None

  cls = methods.get_method_class(config.method)
  if hasattr(cls, "validate_config"):
    cls.validate_config(config)


# Fields that define what a run IS; changing them under an existing workdir would
# silently mix two runs.
IDENTITY_PREFIXES = ("method", "model.", "decoder.", "data.modality", "data.image_size", "data.channels",
                     "data.num_frames", "mask.", "teacher.", "amd.", "dmae.", "tinymim.", "g2sd.",
                     "finetune.", "distill.")


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def identity_diff(previous: dict, current: dict) -> list[str]:
  """Identity fields that differ between two configs, as 'field: old -> new'."""
  a, b = _flatten(previous), _flatten(current)
  diffs = []
  for key in sorted(set(a) | set(b)):
    if key.startswith(IDENTITY_PREFIXES) and a.get(key) != b.get(key):
      diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
  return diffs


def check_workdir_writable(workdir: str) -> None:
  """Create `workdir` if needed and write a file in it; a ConfigError says why not."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_test_"):
      pass
  except OSError as e:
    raise ConfigError(f"workdir {workdir!r} is not writable ({e.strerror}); choose another --workdir") from None
