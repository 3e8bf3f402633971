"""Checkpoints: orbax CheckpointManager over {state, data iterator}, plus weight loading.

The data iterator's position is saved as JSON captured at the moment of the
save call (not later, in a background thread), so a restored run continues with
exactly the batches the interrupted run would have seen. Orbax writes each step
into a temporary directory and renames it when complete, so a save killed
halfway never looks like a checkpoint.

Resuming trusts a step only if its commit marker is there and it restores; an
unreadable latest step (truncated or missing files, a partial copy) is reported
and the previous one is tried, and so on. The steps passed over are moved, as
they are, to WORKDIR/unreadable_checkpoints/ (never deleted): orbax would
otherwise refuse to save those step numbers again.
"""
from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "unreadable_checkpoints"
COMMIT_MARKER = "commit_success.txt"   # written by orbax into a step directory before it is renamed into place


class CheckpointError(RuntimeError):
  """No checkpoint in the workdir can be restored."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


class Checkpointer:
  """Saves and restores TrainState + data-iterator state under WORKDIR/checkpoints/<step>/."""

  def __init__(self, workdir: str, every_steps: int, keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(every_steps, 1), max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
    self._last_saved: int | None = None

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iterator=None, force: bool = False) -> bool:
    """Start writing `step` (asynchronously); a step already saved is left alone."""
    if step == self._last_saved or step in self.manager.all_steps():
      return False
    # The writer runs in the background while training goes on, and the next step donates (reuses)
    # the state's buffers; on CPU the writer may read those buffers in place. A private copy keeps
    # what is written equal to the state of `step`.
    state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = ocp.args.JsonSave(data_iterator.get_state())
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      self._last_saved = step
    return saved

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restore into `abstract_state` (ShapeDtypeStructs with shardings); set the iterator's position."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if data_iterator is not None and restored.get("data") is not None:
      data_iterator.set_state(restored["data"])
    return restored["state"]

  def restore_latest(self, abstract_state, data_iterator=None):
    """(step, state) of the newest step that restores, trying older ones when a newer one fails.

    Raises CheckpointError naming every step and its error when none restores
    (then nothing is moved: the cause may be the config rather than the files).
    """
    failures = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        if not os.path.exists(os.path.join(self.directory, str(step), COMMIT_MARKER)):
          raise CheckpointError(f"no {COMMIT_MARKER}: the step was not completely written (or copied)")
        state = self.restore(step, abstract_state, data_iterator)
      except Exception as e:  # pylint: disable=broad-except
        reason = _first_line(e)
        logging.warning("checkpoint step %d in %s cannot be restored (%s); trying the previous one.",
                        step, self.directory, reason)
        failures.append((step, reason))
        continue
      if failures:
        self._set_aside([s for s, _ in failures])
      return step, state
    listed = "\n".join(f"  step {s}: {r}" for s, r in failures)
    raise CheckpointError(f"no checkpoint in {self.directory} can be restored (nothing was changed):\n{listed}\n"
                          "If the config changed, run it in a new --workdir; otherwise move the damaged steps away.")

  def _set_aside(self, steps: list[int]) -> None:
    """Move unreadable steps out of orbax's sight, unchanged, so their step numbers can be saved again."""
    target_root = os.path.join(os.path.dirname(self.directory), UNREADABLE_DIR)
    if jax.process_index() == 0:
      os.makedirs(target_root, exist_ok=True)
      for step in steps:
        target = os.path.join(target_root, str(step))
        n = 1
        while os.path.exists(target):
          n += 1
          target = os.path.join(target_root, f"{step}-{n}")
        shutil.move(os.path.join(self.directory, str(step)), target)
        logging.warning("moved unreadable checkpoint step %d to %s (kept as it was).", step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("amd_jax:set_aside_unreadable_checkpoints")
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _first_line(error: BaseException, limit: int = 300) -> str:
  """A short description of `error`: its root cause's first line (orbax wraps tensorstore errors
  in a message that runs to pages)."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = str(error).strip().splitlines()
  text = text[0] if text else ""
  text = f"{type(error).__name__}: {text}"
  return text if len(text) <= limit else text[:limit] + "..."


def load_params(workdir: str, step: int | None = None, subtree: str = "params"):
  """Parameters of an amd_jax run (any method) as a nested dict of host arrays.

  Used to take a teacher (or a pre-trained encoder) from another run's workdir.
  """
  path = checkpoint_dir(workdir)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoints under {path!r}: is {workdir!r} the workdir of an amd_jax run?")
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add("state", ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
  registry.add("data", ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
  manager = ocp.CheckpointManager(path, handler_registry=registry,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{path!r} holds no complete checkpoint")
  # Restore onto this process's first device whatever mesh and process count wrote the checkpoint:
  # without a target, orbax insists on the saved topology.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        manager.item_metadata(step)["state"])
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  manager.close()
  state = restored["state"]
  logging.info("loaded %s from %s at step %d", subtree, path, step)
  tree = state[subtree] if subtree else state
  return jax.tree.map(lambda x: jax.device_get(x), tree)


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


class TeacherMismatchError(ValueError):
  """The teacher checkpoint does not fit the configured teacher architecture."""


def check_fit(expected, given, source: str, what: str = "teacher", field: str = "config.teacher.model") -> None:
  missing, unexpected, misshaped = fit_report(expected, given)
  if missing or unexpected or misshaped:
    lines = [f"the {what} weights in {source!r} do not fit the configured architecture "
             f"(check {field}: variant, width, depth, patch size, qkv_bias, cls_token):"]
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
      if keys:
        shown = ", ".join(keys[:12]) + (f" ... (+{len(keys) - 12} more)" if len(keys) > 12 else "")
        lines.append(f"  {title} ({len(keys)}): {shown}")
    raise TeacherMismatchError("\n".join(lines))


RANDOM_TEACHER = "random"  # explicit opt-in, for benchmarks and tests only


def load_teacher(teacher_cfg, abstract_params, *, scan: bool, depth: int, rng_init=None, data_cfg=None,
                 parts: tuple[str, ...] = ("encoder",)):
  """Frozen teacher params from an amd_jax workdir, a PyTorch file, or (explicitly) random init.

  `parts` is the method's `teacher_parts`: ("encoder",) (the default) gives the bare encoder
  params; more parts (G2SD: ("encoder", "decoder")) give {part: params} for each, and a
  source without one of them stops the run.
  Never silently random: an empty or unreadable source, or weights that do not
  fit the configured architecture, stop the run with the keys and shapes.
  """
  parts = tuple(parts)
  encoder_only = parts == ("encoder",)
  source = teacher_cfg.checkpoint
  if not source:
    raise ValueError("config.teacher.checkpoint is empty: distillation needs a pre-trained teacher. Give the "
                     "workdir of an amd_jax run, or an official .pth/.safetensors file.")
  if source == RANDOM_TEACHER:
    logging.warning("config.teacher.checkpoint='random': the teacher is RANDOMLY INITIALISED (benchmarks/tests).")
    if rng_init is None:
      raise ValueError("a random teacher needs an init function")
    params = rng_init()
  elif os.path.isdir(source):
    params = load_params(source)
    if encoder_only:
      params = params.get("encoder", params) if isinstance(params, dict) else params
    else:
      missing = [p for p in parts if p not in params]
      if missing:
        raise TeacherMismatchError(
            f"config.teacher.checkpoint={source!r} holds no {' or '.join(map(repr, missing))} weights (its params "
            f"hold: {', '.join(sorted(params))}), but this method's teacher needs its {' and '.join(parts)}: give "
            "the workdir of a run that has them (for a G2SD teacher: an MAE run).")
      params = {p: params[p] for p in parts}
  elif os.path.isfile(source):
    kwargs = {}
    if data_cfg is not None:  # the fixed position tables are checked at the run's token grid
      kwargs = dict(image_size=data_cfg.image_size, num_frames=data_cfg.num_frames, in_chans=data_cfg.channels,
                    modality=data_cfg.modality)
    if encoder_only:
      from amd_jax.convert import load_torch_encoder  # pylint: disable=g-import-not-at-top
      params = load_torch_encoder(source, teacher_cfg.model, final_norm="norm" in abstract_params, **kwargs)
    else:
      params = _load_torch_parts(source, teacher_cfg, abstract_params, parts, data_cfg)
  else:
    raise FileNotFoundError(f"config.teacher.checkpoint={source!r} is neither a workdir nor a file")
  if encoder_only:
    params = _fit_encoder(params, abstract_params, scan, depth)
  else:
    params = dict(params)
    params["encoder"] = _fit_encoder(params["encoder"], abstract_params["encoder"], scan, depth)
  check_fit(abstract_params, params, source)
  return jax.tree.map(lambda x: np.asarray(x, np.float32), params)


def _fit_encoder(params, abstract, scan: bool, depth: int):
  from amd_jax.models import vit  # pylint: disable=g-import-not-at-top
  params = vit.match_layout(params, scan, depth)
  if "norm" in params and "norm" not in abstract:
    params = {k: v for k, v in params.items() if k != "norm"}  # a distillation teacher uses raw block outputs
  return params


def _load_torch_parts(source: str, teacher_cfg, abstract_params, parts, data_cfg):
  """Several parts (encoder + decoder) of an official checkpoint; a missing part stops with its keys."""
  from amd_jax import convert  # pylint: disable=g-import-not-at-top
  image_size, num_frames, channels, video = 224, 16, 3, None
  if data_cfg is not None:
    image_size, num_frames, channels = data_cfg.image_size, data_cfg.num_frames, data_cfg.channels
    video = data_cfg.modality == "video"
  arch = convert.arch_from_config(teacher_cfg.model, decoder_cfg=teacher_cfg.get("decoder"), image_size=image_size,
                                  num_frames=num_frames, in_chans=channels, video=video,
                                  final_norm="norm" in abstract_params["encoder"])
  # A classifier teacher's fc_norm and head are the converter's 'classifier' part.
  convert_parts = tuple(dict.fromkeys("classifier" if p in ("fc_norm", "head") else p for p in parts))
  try:
    params, _ = convert.load_torch_checkpoint(source, arch, parts=convert_parts,
                                              scan=bool(teacher_cfg.model.scan))
  except convert.ConversionError as e:
    raise TeacherMismatchError(
        f"config.teacher.checkpoint={source!r} does not hold all this method's teacher needs ({' and '.join(parts)};"
        " for a G2SD teacher: an MAE checkpoint WITH its decoder, e.g. facebookresearch/mae's *_full.pth): "
        f"{e}") from None
  return {p: params[p] for p in parts}
