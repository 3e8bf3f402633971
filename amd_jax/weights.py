"""The one place that reads runs and weights: a run's saved config and checkpoints, PyTorch files,
Hugging Face directories, converted .npz files, and fitting what was read to the tree a model expects.

Sources a user may give for a teacher, a fine-tuning start or a run's initial weights:
  an amd_jax workdir        (config.json + checkpoints/; the latest step unless told otherwise)
  a PyTorch file            (.pth/.pt/.bin/.safetensors in official MAE / VideoMAE / AMD or transformers naming)
  a save_pretrained folder  (transformers' config.json + model.safetensors / pytorch_model.bin)
  an .npz from `python -m amd_jax.convert to_flax`
  'random'                  (teachers only, asked for by name: benchmarks and tests)
Any of them may be a gs:// URL. Weights that do not fit stop the run with the missing,
unexpected and mis-shaped keys (a WeightsMismatchError, a configuration error: nothing
is ever silently random).

This module sits below the methods: it knows models and the converter, never a method.
Callers that need a run's config merged over today's defaults pass the defaults
(amd_jax.methods.known_fields) in.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from amd_jax import convert, paths
from amd_jax.errors import ConfigError
from amd_jax.models import vit

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
RANDOM = "random"   # an explicitly random teacher (benchmarks and tests only)


class WeightsMismatchError(ConfigError):
  """Weights that do not fit the configured architecture, or a source without a part the run needs."""


# --------------------------------------------------------------------------- runs


def checkpoint_dir(workdir: str) -> str:
  return paths.join(paths.resolve(workdir), CHECKPOINT_DIR)


def is_run(source: str) -> bool:
  """Whether `source` is the workdir of an amd_jax run: it holds checkpoints/, or a config.json of ours (a
  transformers save_pretrained folder holds a config.json too, of its own kind: 'model_type', no 'method')."""
  if not paths.isdir(source):
    return False
  if paths.isdir(paths.join(source, CHECKPOINT_DIR)):
    return True
  try:
    saved = read_run_config(source)
  except (ValueError, OSError):
    return False
  return isinstance(saved, dict) and "method" in saved


def read_run_config(workdir: str) -> dict | None:
  """config.json of a run as saved (a dict), or None when the workdir has none."""
  path = paths.join(workdir, CONFIG_FILE)
  if not paths.isfile(path):
    return None
  return json.loads(paths.read_text(path))


def merge_config(defaults: ml_collections.ConfigDict, saved: Mapping) -> ml_collections.ConfigDict:
  """Saved values over today's defaults: a run written by an older amd_jax lacks newer fields."""
  for key, value in saved.items():
    if key in defaults and isinstance(value, Mapping) and isinstance(defaults[key], ml_collections.ConfigDict):
      merge_config(defaults[key], value)
    elif key in defaults:
      defaults[key] = value
  return defaults


def load_run(workdir: str, known_fields: Callable[[str], ml_collections.ConfigDict], step: int | None = None
             ) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, params) of the run in `workdir`: its config.json merged over known_fields(method), and the
  parameters of checkpoint `step` (default: the latest) as host arrays."""
  saved = read_run_config(workdir)
  if saved is None:
    raise FileNotFoundError(f"{workdir!r} holds no {CONFIG_FILE}: is it the workdir of an amd_jax run?")
  config = merge_config(known_fields(saved["method"]), saved)
  return config, load_params(workdir, step)


def load_params(workdir: str, step: int | None = None, subtree: str = "params"):
  """A subtree ('params', 'opt_state', ... or '' for the whole state) of a run's checkpoint, as host arrays.

  Restores onto this process's first device whatever mesh and process count wrote the checkpoint.
  """
  path = checkpoint_dir(workdir)
  if not paths.isdir(path):
    raise FileNotFoundError(f"no checkpoints under {path!r}: is {workdir!r} the workdir of an amd_jax run?")
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add("state", ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
  registry.add("data", ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
  registry.add("integrity", ocp.args.JsonRestore, ocp.JsonCheckpointHandler)   # known, so orbax does not warn
  manager = ocp.CheckpointManager(path, handler_registry=registry,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{path!r} holds no complete checkpoint")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    # Without a target orbax insists on the saved topology.
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          manager.item_metadata(step)["state"])
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  finally:
    manager.close()
  logging.info("loaded %s from %s at step %d", subtree or "the state", path, step)
  tree = state[subtree] if subtree else state
  return jax.tree.map(jax.device_get, tree)


# --------------------------------------------------------------------------- fitting


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = "/".join(str(getattr(p, "key", p)) for p in path)
    flat[key] = tuple(leaf.shape)
  return flat


def fit_report(expected, given) -> tuple[list[str], list[str], list[str]]:
  """(missing, unexpected, mis-shaped) keys of `given` against the `expected` (abstract) tree."""
  want, have = _flat_shapes(expected), _flat_shapes(given)
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  misshaped = sorted(f"{k}: expected {want[k]}, got {have[k]}" for k in set(want) & set(have) if want[k] != have[k])
  return missing, unexpected, misshaped


def check_fit(expected, given, source: str, what: str = "teacher", field: str = "config.teacher.model") -> None:
  """Raise WeightsMismatchError listing what does not fit."""
  missing, unexpected, misshaped = fit_report(expected, given)
  if missing or unexpected or misshaped:
    lines = [f"the {what} weights in {source!r} do not fit the configured architecture "
             f"(check {field}: variant, width, depth, patch size, qkv_bias, cls_token):"]
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
      if keys:
        shown = ", ".join(keys[:12]) + (f" ... (+{len(keys) - 12} more)" if len(keys) > 12 else "")
        lines.append(f"  {title} ({len(keys)}): {shown}")
    raise WeightsMismatchError("\n".join(lines))


def encoder_depth(model_cfg) -> int:
  return vit.resolve_variant(model_cfg.variant, model_cfg.width, model_cfg.depth, model_cfg.num_heads)[1]


def fit_encoder(params: Mapping, expected: Mapping, model_cfg) -> dict:
  """Encoder params in the block layout (scanned or not) `model_cfg` asks for, without a final norm the
  expected tree lacks (a distillation teacher reads raw block outputs; mean pooling uses fc_norm)."""
  params = dict(vit.match_layout(dict(params), bool(model_cfg.scan), encoder_depth(model_cfg)))
  if "norm" in params and "norm" not in expected:
    del params["norm"]
  return params


def as_float32(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


# --------------------------------------------------------------------------- sources


def describe_missing(source: str, field: str) -> str:
  return (f"{field}={source!r} is neither an amd_jax workdir, a weights file (.pth/.pt/.bin/.safetensors/.npz) "
          "nor a save_pretrained folder")


def _check_source(source: str, field: str) -> None:
  if not source:
    raise ConfigError(f"{field} is empty")
  if not paths.exists(source):
    raise ConfigError(f"{field}={source!r} does not exist")


def _torch_kwargs(data_cfg) -> dict:
  if data_cfg is None:
    return {}
  return dict(image_size=data_cfg.image_size, num_frames=data_cfg.num_frames, in_chans=data_cfg.channels,
              modality=data_cfg.modality)


def exists(source: str) -> bool:
  """Whether a weights source (a run, a file, a folder; local or a URL) exists."""
  return bool(source) and paths.exists(source)


def load_encoder(source: str, model_cfg, expected: Mapping, *, data_cfg=None, field: str,
                 hand_over: Callable[[dict], dict] | None = None, fresh_ok: Iterable[str] = (),
                 what: str = "pre-trained encoder", fit_field: str = "config.model") -> dict:
  """Encoder params from a run or a weights file, fitted to `expected` (an abstract encoder tree).

  hand_over: for a run, the function that takes its params to its encoder (default: params['encoder']).
  fresh_ok: keys of `expected` that a source may lack; they keep their values from `expected`
    (which must then hold arrays), e.g. a distillation token that pre-training never had.
  """
  _check_source(source, field)
  if paths.isdir(source) and is_run(source):
    params = load_params(source)
    encoder = hand_over(params) if hand_over else params.get("encoder")
    if encoder is None:
      raise WeightsMismatchError(f"{field}={source!r}: the run's params hold no 'encoder' (they hold "
                                 f"{', '.join(sorted(params))})")
  else:
    try:
      encoder = convert.load_torch_encoder(source, model_cfg, final_norm=None, **_torch_kwargs(data_cfg))
    except (convert.ConversionError, FileNotFoundError, ValueError) as e:
      raise WeightsMismatchError(f"{field}={source!r}: {e}") from None
  encoder = fit_encoder(encoder, expected, model_cfg)
  fresh = [k for k in expected if k not in encoder and k in tuple(fresh_ok)]
  for key in fresh:
    encoder[key] = np.asarray(expected[key])
  check_fit(expected, encoder, source, what=what, field=fit_field)
  if fresh:
    logging.info("%s: started fresh: %s", source, ", ".join(fresh))
  return as_float32(encoder)


# --------------------------------------------------------------------------- teachers


# Data fields a teacher run must share with the student: the teacher sees the student's pixels.
_TEACHER_DATA_FIELDS = ("mean", "std", "image_size", "channels")


def check_teacher_data(source: str, saved: Mapping | None, data_cfg, student_model_cfg) -> None:
  """A teacher run trained on other pixels (normalisation, size, channels) or patches stops the run."""
  if saved is None or data_cfg is None:
    return
  differences = []
  teacher_data = saved.get("data", {})
  for field in _TEACHER_DATA_FIELDS:
    if field in teacher_data and str(teacher_data[field]) != str(data_cfg[field]):
      differences.append(f"data.{field}: teacher {teacher_data[field]!r}, student {data_cfg[field]!r}")
  teacher_patch = saved.get("model", {}).get("patch_size")
  if student_model_cfg is not None and teacher_patch is not None and teacher_patch != student_model_cfg.patch_size:
    differences.append(f"model.patch_size: teacher {teacher_patch}, student {student_model_cfg.patch_size}")
  if differences:
    raise ConfigError(f"config.teacher.checkpoint={source!r} was trained on other inputs than this run's: "
                      f"{'; '.join(differences)}. Give the student the teacher's data settings, or another teacher.")


def load_teacher(teacher_cfg, abstract_params, *, parts: tuple[str, ...] = ("encoder",), data_cfg=None,
                 student_model_cfg=None, rng_init: Callable[[], Any] | None = None):
  """The frozen teacher's params for `abstract_params` (the method's teacher_init tree), as float32 host arrays.

  parts: ("encoder",) gives the bare encoder params; more (G2SD: ("encoder", "decoder")) give
  {part: params} for each, and a source without one of them stops the run.
  """
  parts = tuple(parts)
  source = teacher_cfg.checkpoint
  field = "config.teacher.checkpoint"
  if not source:
    raise ConfigError(f"{field} is empty: distillation needs a pre-trained teacher. Give the workdir of an "
                      "amd_jax run, an official .pth/.safetensors file, or a save_pretrained folder.")
  if source == RANDOM:
    logging.warning("%s='random': the teacher is RANDOMLY INITIALISED (benchmarks/tests).", field)
    if rng_init is None:
      raise ValueError("a random teacher needs an init function")
    return as_float32(rng_init())
  _check_source(source, field)
  encoder_only = parts == ("encoder",)
  expected_encoder = abstract_params if encoder_only else abstract_params["encoder"]
  if is_run(source):
    check_teacher_data(source, read_run_config(source), data_cfg, student_model_cfg)
    try:
      params = load_params(source)
    except FileNotFoundError as e:
      raise ConfigError(f"{field}={source!r}: {e}") from None
    missing = [p for p in parts if p not in params]
    if missing:
      raise WeightsMismatchError(
          f"{field}={source!r} holds no {' or '.join(map(repr, missing))} weights (its params hold: "
          f"{', '.join(sorted(params))}), but this method's teacher needs its {' and '.join(parts)}: give the "
          "workdir of a run that has them (for a G2SD teacher: an MAE run).")
    loaded = {p: params[p] for p in parts}
  elif encoder_only:
    try:
      loaded = {"encoder": convert.load_torch_encoder(source, teacher_cfg.model,
                                                      final_norm="norm" in expected_encoder,
                                                      **_torch_kwargs(data_cfg))}
    except (convert.ConversionError, FileNotFoundError, ValueError) as e:
      raise WeightsMismatchError(f"{field}={source!r}: {e}") from None
  else:
    loaded = _load_torch_parts(source, teacher_cfg, expected_encoder, parts, data_cfg)
  loaded["encoder"] = fit_encoder(loaded["encoder"], expected_encoder, teacher_cfg.model)
  params = loaded["encoder"] if encoder_only else loaded
  check_fit(abstract_params, params, source)
  return as_float32(params)


def _load_torch_parts(source: str, teacher_cfg, expected_encoder, parts, data_cfg) -> dict:
  """Several parts (encoder + decoder, or a classifier's head) of an official checkpoint."""
  image_size, num_frames, channels, video = 224, 16, 3, None
  if data_cfg is not None:
    image_size, num_frames, channels = data_cfg.image_size, data_cfg.num_frames, data_cfg.channels
    video = data_cfg.modality == "video"
  arch = convert.arch_from_config(teacher_cfg.model, decoder_cfg=teacher_cfg.get("decoder"), image_size=image_size,
                                  num_frames=num_frames, in_chans=channels, video=video,
                                  final_norm="norm" in expected_encoder)
  # A classifier teacher's fc_norm and head are the converter's 'classifier' part.
  convert_parts = tuple(dict.fromkeys("classifier" if p in ("fc_norm", "head") else p for p in parts))
  try:
    params, _ = convert.load_torch_checkpoint(source, arch, parts=convert_parts, scan=bool(teacher_cfg.model.scan))
  except (convert.ConversionError, FileNotFoundError, ValueError) as e:
    raise WeightsMismatchError(
        f"config.teacher.checkpoint={source!r} does not hold all this method's teacher needs ({' and '.join(parts)};"
        " for a G2SD teacher: an MAE checkpoint WITH its decoder, e.g. facebookresearch/mae's *_full.pth): "
        f"{e}") from None
  return {p: params[p] for p in parts}


# --------------------------------------------------------------------------- a run's initial weights


def load_initial_params(source: str, expected: Mapping, config, *, parts: tuple[str, ...]) -> dict:
  """Every part of the trained model from `source` (config.init): a run of the same method, a to_flax
  .npz, or a PyTorch checkpoint holding those parts (an official AMD student: encoder, decoder, projection
  heads and generators); fitted to `expected` (the method's init tree, whose top-level keys are `parts`)."""
  field = "config.init"
  _check_source(source, field)
  if is_run(source):
    params = load_params(source)
  elif source.endswith(".npz"):
    params, _ = convert.load_flax_params(source)
  else:
    arch = convert.mapping.arch_from_run_config(config, final_norm="norm" in expected.get("encoder", {}))
    converter_parts = [p for p in convert.mapping.PARTS if p != "classifier"]
    try:
      params, report = convert.load_torch_checkpoint(source, arch, parts=converter_parts if arch.amd else
                                                     [p for p in converter_parts if p != "amd"],
                                                     scan=bool(config.model.scan))
    except (convert.ConversionError, FileNotFoundError, ValueError) as e:
      raise WeightsMismatchError(f"{field}={source!r}: {e}") from None
    logging.info("%s: %s", source, report.summary())
  params = {k: v for k, v in dict(params).items() if k in parts}
  if "encoder" in params and "encoder" in expected:
    params["encoder"] = fit_encoder(params["encoder"], expected["encoder"], config.model)
  check_fit(expected, params, source, what="initial", field="config.model / the method's fields")
  return as_float32(params)
