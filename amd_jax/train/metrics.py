"""Metric writers (TensorBoard + stdout through clu), progress, throughput and MFU."""
from __future__ import annotations

import time

import jax
from absl import logging
from clu import metric_writers


class _QuietLibraries:
  """absl log filter: INFO lines of checkpointing/IO libraries drown the training log."""
  noisy = ("/orbax/", "/etils/", "/grain/", "/tensorflow/")

  def filter(self, record):
    return record.levelno >= 30 or not any(part in record.pathname for part in self.noisy)


def quiet_library_logs():
  logging.get_absl_handler().addFilter(_QuietLibraries())


def make_writer(workdir: str):
  """TensorBoard event files under workdir plus log lines; only process 0 writes files."""
  return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0, asynchronous=True)


class Progress:
  """Steps/s, examples/s, ETA and model TFLOP/s between two reports."""

  def __init__(self, total_steps: int, batch_size: int, flops_per_step: float = 0.0, peak_flops: float = 0.0):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.flops_per_step = flops_per_step
    self.peak_flops = peak_flops
    self.start = time.perf_counter()
    self._last_time = self.start
    self._last_step = None
    self._data_wait = 0.0

  def reset(self, step: int):
    self._last_time = time.perf_counter()
    self._last_step = step
    self._data_wait = 0.0

  def add_data_wait(self, seconds: float):
    """Time the loop spent blocked on the input pipeline (reported as a fraction of the window)."""
    self._data_wait += seconds

  def report(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    if self._last_step is None or step <= self._last_step:
      self.reset(step)
      return {}
    dt = now - self._last_time
    steps = step - self._last_step
    # Steps are dispatched asynchronously, so the host mostly waits either for data
    # or for the device: a fraction near 1 means the input pipeline is the bottleneck;
    # well below 1 it is (about) the pipeline's time per batch over the step's.
    data_wait = self._data_wait
    self.reset(step)
    steps_per_sec = steps / dt
    out = {
        "steps_per_sec": steps_per_sec,
        "examples_per_sec": steps_per_sec * self.batch_size,
        "eta_minutes": (self.total_steps - step) / steps_per_sec / 60.0,
        "data_wait_fraction": data_wait / dt,
    }
    if self.flops_per_step:
      tflops = self.flops_per_step * steps_per_sec / 1e12 / jax.device_count()
      out["tflops_per_device"] = tflops
      if self.peak_flops:
        out["mfu"] = tflops * 1e12 / self.peak_flops
    return out
