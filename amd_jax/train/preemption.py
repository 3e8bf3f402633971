"""Clean stop on SIGTERM (preemption) or SIGINT (Ctrl-C): checkpoint the step reached, then exit.

The signal handler only records the signal. The train loop asks `reached(step)`
after each step (a host-side check, no device sync); when it answers True the
loop checkpoints that step (data-iterator position included), waits for the
write, and raises `Preempted`. amd_jax.main turns that into exit status
128 + signal number (143 for SIGTERM, 130 for SIGINT) after printing
"received SIGTERM at step N; checkpoint written to ...; rerun the same command
to resume". A second Ctrl-C interrupts at once.

Several processes (jax.distributed): every process must save the same step.
With JAX's preemption service (on by default) JAX itself listens for SIGTERM
and `multihost_utils.reached_preemption_sync_point` names the step at which all
processes stop; no Python handler is installed then. Without it, the processes
agree every `agree_every` steps through a small all-gather of their flags.

The previous handlers are restored when the run ends; a signal that arrived
after the last step (during the final save or evaluation) is delivered again
then, so the process still ends as the sender asked.

Long blocking phases before the first step (restoring a checkpoint, compiling the
step) run through `interruptible`: a signal during them stops the run within a
fraction of a second (there is nothing new to save), instead of after the phase;
a TPU's preemption notice leaves about 30 s.
"""
from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signal_name: str) -> int:
  """128 + the signal's number, as a shell reports a process ended by that signal."""
  return 128 + int(signal.Signals[signal_name])


class Preempted(Exception):
  """The run stopped on a signal after checkpointing the step it had reached (or, during set-up,
  with nothing new to save: `during` names the phase, and a worker thread may still be busy in it)."""

  def __init__(self, signal_name: str, step: int | None, checkpoint_dir: str, during: str = ""):
    self.signal_name, self.step, self.checkpoint_dir = signal_name, step, checkpoint_dir
    self.during = during
    self.exit_code = exit_code(signal_name)
    if during:
      message = (f"received {signal_name} while {during}; nothing new to save (checkpoints in {checkpoint_dir} "
                 "are as they were); rerun the same command to resume")
    else:
      message = (f"received {signal_name} at step {step}; checkpoint written to {checkpoint_dir}; "
                 "rerun the same command to resume")
    super().__init__(message)


def _preemption_service_running() -> bool:
  """True when jax.distributed started JAX's preemption sync manager (several processes only)."""
  if jax.process_count() < 2:
    return False
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  # The same attribute multihost_utils.reached_preemption_sync_point consults.
  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class StopRequest:
  """Context manager for one run: installs the handlers, answers `reached(step)`, restores them."""

  def __init__(self, agree_every: int = 1):
    self.agree_every = max(int(agree_every), 1)
    self.signal_name: str | None = None   # the first signal received
    self.stop_step: int | None = None     # the step at which the loop was told to stop
    self._previous: dict[int, object] = {}
    self._use_jax_sync = False

  def __enter__(self) -> "StopRequest":
    if _preemption_service_running():
      self._use_jax_sync = True
      logging.info("SIGTERM handled by JAX's preemption service: all processes stop at the same step.")
      return self
    if threading.current_thread() is not threading.main_thread():
      logging.warning("training outside the main thread: SIGTERM/SIGINT will not checkpoint before exiting.")
      return self
    for sig in SIGNALS:
      if signal.getsignal(sig) is signal.SIG_IGN:   # e.g. SIGINT of a background job: keep ignoring it
        continue
      self._previous[sig] = signal.signal(sig, self._record)
    return self

  def _record(self, signum, frame):  # pylint: disable=unused-argument
    # Only a flag: the loop acts between steps, where the state is whole.
    if self.signal_name is None:
      self.signal_name = signal.Signals(signum).name
      logging.warning("received %s: stopping after this step to write a checkpoint.", self.signal_name)
    if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
      signal.signal(signum, self._previous.get(signum) or signal.default_int_handler)

  def reached(self, step: int) -> bool:
    """Whether the loop should checkpoint `step` and stop. Call after every step, on every process."""
    if self._use_jax_sync:
      stop = bool(multihost_utils.reached_preemption_sync_point(step))
      if stop and self.signal_name is None:
        self.signal_name = "SIGTERM"
    elif jax.process_count() > 1:
      stop = step % self.agree_every == 0 and self._anyone_signalled()
    else:
      stop = self.signal_name is not None
    if stop:
      self.stop_step = step
    return stop

  def _anyone_signalled(self) -> bool:
    flags = multihost_utils.process_allgather(np.int32(self.signal_name is not None))
    if np.any(flags) and self.signal_name is None:
      self.signal_name = "SIGTERM"   # another process received it
    return bool(np.any(flags))

  def interruptible(self, fn, during: str, checkpoint_dir: str):
    """fn() in a worker thread, the main thread watching for a signal: one stops the run at once.

    Multi-process runs (and runs outside the main thread) call fn() directly: their processes must
    stop together, at a step.
    """
    if self._use_jax_sync or jax.process_count() > 1 or not self._previous:
      return fn()
    outcome = {}

    def work():
      try:
        outcome["value"] = fn()
      except BaseException as e:  # pylint: disable=broad-except
        outcome["error"] = e

    worker = threading.Thread(target=work, name=f"amd_jax: {during}", daemon=True)
    worker.start()
    while worker.is_alive():
      worker.join(0.1)
      if self.signal_name is not None and worker.is_alive():
        error = Preempted(self.signal_name, None, checkpoint_dir, during=during)
        logging.warning("%s", error)
        self.stop_step = -1   # handled: nothing to deliver again at exit
        raise error
    if "error" in outcome:
      raise outcome["error"]
    return outcome["value"]

  def preempted(self, checkpoint_dir: str) -> Preempted:
    """The exception to raise once the stop step is saved (and logged as it is)."""
    error = Preempted(self.signal_name or "SIGTERM", self.stop_step, checkpoint_dir)
    logging.warning("%s", error)
    return error

  def __exit__(self, exc_type, exc, tb):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    self._previous.clear()
    if exc_type is None and self.signal_name is not None and self.stop_step is None and not self._use_jax_sync:
      # Arrived after the last step: the run's work is saved; end as the sender asked.
      os.kill(os.getpid(), signal.Signals[self.signal_name])
    return False
