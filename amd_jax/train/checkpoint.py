"""The run's own checkpoints: orbax CheckpointManager over {state, data iterator, integrity}.

The data iterator's position is saved as JSON captured at the moment of the
save call (not later, in a background thread), so a restored run continues with
exactly the batches the interrupted run would have seen. Orbax writes each step
into a temporary directory and renames it when complete (on a bucket: marks it
complete last), so a save killed halfway never looks like a checkpoint.

Integrity: with every step a checksum per state leaf is saved (a position-weighted
sum of the leaf's 32-bit words, computed on the devices). Restoring recomputes and
compares them, so a step whose data bytes were garbled after it was written is
recognised even though its metadata is valid.

Resuming trusts a step only if it is complete, readable and restores with matching
checksums; otherwise the reason is reported and the previous step is tried, and so
on. The steps passed over are moved, as they are, to WORKDIR/unreadable_checkpoints/
(never deleted): orbax would otherwise refuse to save those step numbers again.

Faults are reported as what they are, naming the path: a checkpoints/ folder that
cannot be read or written stops the run before training starts (never a silent
restart from step 0); a save that fails (disk full, read-only) stops the run at that
save, leaving the earlier checkpoints as they were.
"""
from __future__ import annotations

import uuid

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from amd_jax import paths, weights

CHECKPOINT_DIR = weights.CHECKPOINT_DIR
UNREADABLE_DIR = "unreadable_checkpoints"
ITEMS = ("state", "data", "integrity")
COMMIT_MARKER = "commit_success.txt"   # written by orbax into a step directory when the step is complete


class CheckpointError(RuntimeError):
  """The run's checkpoints cannot be read, restored or written (the message names the path)."""


def checkpoint_dir(workdir: str) -> str:
  return weights.checkpoint_dir(workdir)


def saved_step_names(workdir: str) -> list[str]:
  """Names of the step folders in WORKDIR/checkpoints (complete or not); CheckpointError if it cannot be read."""
  directory = checkpoint_dir(workdir)
  try:
    return [n for n in paths.listdir(directory) if n.isdigit()] if paths.exists(directory) else []
  except OSError as e:
    raise CheckpointError(f"cannot use the checkpoints folder {directory}: {root_cause(e)}. Nothing was changed; "
                          "fix its permissions and rerun.") from None


def root_cause(error: BaseException, limit: int = 300) -> str:
  """A short description of `error`: its root cause's first line (orbax wraps tensorstore errors
  in a message that runs to pages)."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  text = str(error).strip().splitlines()
  text = f"{type(error).__name__}: {text[0] if text else ''}"
  return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------------ integrity


def _leaf_checksum(x: jax.Array) -> jax.Array:
  words = x.reshape(-1)
  if words.dtype.itemsize == 2:
    words = words.astype(jnp.float32) if jnp.issubdtype(words.dtype, jnp.floating) else words.astype(jnp.int32)
  if words.dtype.itemsize == 8:
    words = jax.lax.bitcast_convert_type(words, jnp.uint32).reshape(-1)
  elif words.dtype == jnp.bool_:
    words = words.astype(jnp.uint32)
  else:
    words = jax.lax.bitcast_convert_type(words, jnp.uint32)
  # Weights 2k+1 (odd, so no word is ignored) make the sum depend on where each word sits.
  weights_ = jnp.arange(words.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
  return jnp.sum(words * weights_, dtype=jnp.uint32)


@jax.jit
def _checksums(tree):
  return jax.tree.map(_leaf_checksum, tree)


def state_checksums(state) -> dict[str, int]:
  """{leaf path: checksum} of a train state (device arrays, any sharding)."""
  sums = jax.device_get(_checksums(state))
  return {jax.tree_util.keystr(path): int(v) for path, v in jax.tree_util.tree_flatten_with_path(sums)[0]}


class IntegrityError(RuntimeError):
  """A restored step's data does not match the checksums saved with it."""


# ------------------------------------------------------------------ the manager


class Checkpointer:
  """Saves and restores TrainState + data-iterator state under WORKDIR/checkpoints/<step>/."""

  def __init__(self, workdir: str, every_steps: int, keep: int, async_save: bool = True):
    self.directory = checkpoint_dir(workdir)
    self._check_access()
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(every_steps, 1), max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    except OSError as e:
      raise CheckpointError(f"cannot open the checkpoints in {self.directory} ({root_cause(e)})") from None
    self._last_saved: int | None = None

  def _check_access(self) -> None:
    """A checkpoints/ folder that cannot be listed or written is a fault to report now: unnoticed, the run
    would start again from step 0 and fail (or hang) at its first save."""
    directory = self.directory
    try:
      if paths.exists(directory):
        paths.listdir(directory)
      if jax.process_index() == 0:
        paths.makedirs(directory)
        probe = paths.join(directory, f".amd_jax_write_test_{uuid.uuid4().hex[:8]}")
        paths.write_bytes(probe, b"")
        paths.as_path(probe).unlink()
    except OSError as e:
      raise CheckpointError(f"cannot use the checkpoints folder {directory}: {root_cause(e)}. Nothing was changed; "
                            "fix its permissions (or free space) and rerun.") from None

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
    items = {"state": ocp.args.StandardSave(state),
             "integrity": ocp.args.JsonSave({"checksums": state_checksums(state)})}
    if data_iterator is not None:
      items["data"] = ocp.args.JsonSave(data_iterator.get_state())
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(step, e) from None
    if saved:
      self._last_saved = step
    return saved

  def _save_failed(self, step: int, error: BaseException) -> CheckpointError:
    kept = [s for s in self.all_steps() if s != step]
    return CheckpointError(
        f"writing checkpoint step {step} to {self.directory} failed: {root_cause(error)}. The earlier "
        f"checkpoints are as they were (latest: {max(kept) if kept else 'none'}); free space or fix permissions, "
        "then rerun the same command to resume.")

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restore into `abstract_state` (ShapeDtypeStructs with shardings); set the iterator's position."""
    step_dir = paths.join(self.directory, str(step))
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = ocp.args.JsonRestore()
    verify = paths.isdir(paths.join(step_dir, "integrity"))
    if verify:
      items["integrity"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if verify:
      saved = restored["integrity"]["checksums"]
      now = state_checksums(restored["state"])
      bad = sorted(k for k in now if saved.get(k) != now[k])
      if bad:
        raise IntegrityError(f"the data of {len(bad)} array(s) differ from the checksums saved with the step "
                             f"(first: {bad[0]}): the files were changed after they were written")
    if data_iterator is not None and restored.get("data") is not None:
      data_iterator.set_state(restored["data"])
    return restored["state"]

  def _unusable_reason(self, step: int) -> str | None:
    """Why a step cannot be restored, found without restoring it (None: try it)."""
    step_dir = paths.join(self.directory, str(step))
    try:
      names = paths.listdir(step_dir)
    except OSError as e:
      return f"{step_dir} cannot be read ({root_cause(e)})"
    if COMMIT_MARKER not in names or "state" not in names:
      return f"no {COMMIT_MARKER}: the step was not completely written (or copied)"
    try:
      paths.listdir(paths.join(step_dir, "state"))
    except OSError as e:
      return f"{step_dir}/state cannot be read ({root_cause(e)})"
    return None

  def restore_latest(self, abstract_state, data_iterator=None):
    """(step, state) of the newest step that restores, trying older ones when a newer one fails.

    Raises CheckpointError naming every step and its reason when none restores
    (then nothing is moved: the cause may be the config rather than the files).
    """
    failures = []
    for step in sorted(self.all_steps(), reverse=True):
      reason = self._unusable_reason(step)
      if reason is None:
        try:
          state = self.restore(step, abstract_state, data_iterator)
        except Exception as e:  # pylint: disable=broad-except
          reason = str(e) if isinstance(e, IntegrityError) else root_cause(e)
      if reason is not None:
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
    """Move unreadable steps out of orbax's sight, unchanged, so their step numbers can be saved again:
    to WORKDIR/unreadable_checkpoints/, or, when the step's own permissions forbid moving it to another
    folder (a directory needs write permission on itself for that), to checkpoints/unreadable_<step>."""
    target_root = paths.join(paths.as_path(self.directory).parent, UNREADABLE_DIR)
    if jax.process_index() == 0:
      for step in steps:
        source = paths.as_path(paths.join(self.directory, str(step)))
        try:
          target = self._free_name(target_root, str(step))
          paths.makedirs(target_root)
          source.rename(target)
        except OSError as first:
          try:
            target = self._free_name(self.directory, f"unreadable_{step}")
            source.rename(target)
          except OSError:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} cannot be restored, and it cannot be "
                                  f"moved aside ({root_cause(first)}). Move it away by hand and rerun.") from None
        logging.warning("moved unreadable checkpoint step %d to %s (kept as it was).", step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("amd_jax:set_aside_unreadable_checkpoints")
    self.manager.reload()

  @staticmethod
  def _free_name(folder: str, name: str):
    target, n = paths.as_path(paths.join(folder, name)), 1
    while target.exists():
      n += 1
      target = paths.as_path(paths.join(folder, f"{name}-{n}"))
    return target

  def wait(self) -> None:
    """Wait for the background save; a failure surfaces here as a CheckpointError."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(self._last_saved if self._last_saved is not None else -1, e) from None

  def close(self) -> None:
    """Wait for a save under way, then release the manager."""
    try:
      self.wait()
    finally:
      self.manager.close()

  def abandon(self) -> None:
    """Release the manager on an error path; a failing background save is logged, not raised."""
    try:
      self.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("closing the checkpoint manager: %s", root_cause(e))
