"""Non-finite guard: what the train loop does when a step's loss, gradients or update is NaN/Inf.

config.nan_policy:
  stop  (default) the loop stops with NonFiniteError naming the first bad step and
        the metrics that were non-finite. It notices at its usual one-step-late
        read of the metrics, so no step waits on the device for it, and a save
        reads the metrics not yet read (and checks the state) first: a
        non-finite state is never written over the checkpoints.
  skip  a non-finite step changes nothing (weights, EMA, optimizer state,
        including the optimizer's own step count, stay as they were) but the
        step counter, hence the data and the masks, moves on. The metric
        `nonfinite_steps` counts the skipped steps of each log window; the
        window's means are over its finite steps. A run that skips
        config.nan_max_skips steps in a row stops as under 'stop': it is not
        learning any more.
  off   no check at all: the step is applied whatever its values.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

POLICIES = ("stop", "skip", "off")
COUNT = "nonfinite_steps"          # logged: non-finite steps in the window
FIRST = "first_nonfinite_step"     # internal: the window's first non-finite step
LAST_FINITE = "last_finite_step"   # internal: the window's last finite step (0: none)
_NO_STEP = np.iinfo(np.int32).max
COUNTERS = (COUNT, FIRST, LAST_FINITE)
# How a window reduces the counters over its steps (the metrics themselves are summed).
REDUCTIONS = {FIRST: jnp.minimum, LAST_FINITE: jnp.maximum}


class NonFiniteError(FloatingPointError):
  """Training met a NaN/Inf under nan_policy='stop' (or a non-finite state was about to be saved)."""


def all_finite(*scalars) -> jax.Array:
  """True where every scalar is finite (a traced bool)."""
  return jnp.all(jnp.stack([jnp.isfinite(jnp.asarray(s, jnp.float32)) for s in scalars]))


def keep_if_not(finite, new, old):
  """`new` where `finite`, else `old`, leaf by leaf (the skip of a non-finite step)."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def flag_step(out: dict, finite, step, policy: str) -> dict:
  """Add the step's counters to its metrics; under 'skip', zero a skipped step's values so
  that the window sums stay finite (window_means divides by the finite steps only)."""
  if policy == "skip":
    out = {k: jnp.where(finite, v, jnp.zeros_like(v)) for k, v in out.items()}
  out = dict(out)
  out[COUNT] = jnp.where(finite, 0, 1).astype(jnp.int32)
  out[FIRST] = jnp.where(finite, _NO_STEP, step).astype(jnp.int32)
  out[LAST_FINITE] = jnp.where(finite, step, 0).astype(jnp.int32)
  return out


def nonfinite_terms(values: dict) -> list[str]:
  return sorted(k for k, v in values.items() if k not in COUNTERS and not np.all(np.isfinite(v)))


@jax.jit
def _finite_leaves(tree):
  return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree)


def nonfinite_leaves(tree) -> list[str]:
  """Paths of the floating-point leaves of `tree` that hold a NaN or Inf."""
  floats = jax.tree.map(lambda x: x if jnp.issubdtype(x.dtype, jnp.floating) else None, tree)
  flags = jax.device_get(_finite_leaves(floats))
  return [jax.tree_util.keystr(path) for path, ok in jax.tree_util.tree_flatten_with_path(flags)[0] if not ok]


class NanGuard:
  """The loop's host side of the policy. `checkpoints` (a train.checkpoint.Checkpointer) is
  waited for before stopping, so a save already under way (of a checked state) completes."""

  def __init__(self, policy: str, checkpoints=None, max_skips: int = 20, start_step: int = 0):
    if policy not in POLICIES:
      raise ValueError(f"nan_policy={policy!r}; allowed: {', '.join(POLICIES)}")
    self.policy = policy
    self.max_skips = max_skips
    self._checkpoints = checkpoints
    self._last_finite = start_step   # the last step known to be finite (the run's start counts)

  def check_window(self, values: dict, end_step: int) -> None:
    """Raise NonFiniteError under 'stop' if the window ending at `end_step` held a non-finite step,
    and under 'skip' once max_skips steps in a row were skipped."""
    bad = int(values.get(COUNT, 0))
    if LAST_FINITE in values:
      self._last_finite = max(self._last_finite, int(values[LAST_FINITE]))
    if bad and self.policy == "skip":
      logging.warning("skipped %d non-finite step(s) up to step %d (the first: step %d).", bad, end_step,
                      int(values[FIRST]))
      in_a_row = end_step - self._last_finite
      if in_a_row >= self.max_skips:
        self._stop(f"{in_a_row} steps in a row were non-finite and skipped (steps {self._last_finite + 1}-"
                   f"{end_step}; config.nan_max_skips={self.max_skips}): the run is not learning any more.",
                   advice="Lower the learning rate, set optim.grad_clip, or check the data (normalisation).")
    if self.policy != "stop" or not bad:
      return
    first = int(values[FIRST])
    terms = nonfinite_terms(values)
    self._stop(f"non-finite values at step {first} (nan_policy='stop'); non-finite in steps {first}-{end_step}: "
               f"{', '.join(terms) or 'none of the logged metrics'}.")

  def check_before_save(self, state, unread: dict | None, step: int) -> None:
    """Before a checkpoint of `state` at `step`: the metrics not yet read (`unread`, device values)
    and the state itself must be finite; otherwise raise, and nothing is saved."""
    if self.policy == "off":
      return
    if unread is not None and self.policy == "stop":
      self.check_window(jax.device_get(unread), step)
    bad = nonfinite_leaves(state)
    if bad:
      shown = ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
      self._stop(f"the train state at step {step} holds non-finite values ({shown}); it was not saved.")

  def _stop(self, message: str, advice: str = ""):
    last = None
    if self._checkpoints is not None:
      self._checkpoints.wait()
      last = self._checkpoints.latest_step()
    kept = f"The checkpoints are left as they were (latest: step {last})." if last is not None else \
        "No checkpoint was written."
    advice = advice or ("Lower the learning rate, set optim.grad_clip, check the data (normalisation), or pass "
                        "--config.nan_policy=skip to skip such steps.")
    raise NonFiniteError(f"{message} {kept} {advice}")
