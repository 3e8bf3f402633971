"""What a run shows and records: TensorBoard events, the progress line, log lines, throughput and MFU.

* EventWriter: TensorBoard event files written by tensorboardX (no TensorFlow), under the
  workdir (a gs:// workdir too: the events go through amd_jax.paths). Scalars are plain
  scalar summaries (readable by TensorBoard and its EventAccumulator), images, and the run's
  hyperparameters for TensorBoard's HParams tab. Only process 0 writes.
* The `amd_jax` logger: the loop's own lines (start, compile, each log window, the end) at
  INFO, shown on stderr wherever training runs (the command line, a script calling
  amd_jax.run, a notebook) without any logging set-up by the caller; AMD_JAX_VERBOSITY
  (debug|info|warning) changes the level.
* ProgressLine: one updating line (tqdm) with step, loss, examples/s and ETA where a terminal or
  notebook shows it (amd_jax.progress decides), refreshed at each log window.
* Window / Throughput: the log window's metric sums (kept on device, read one step late) and the
  whole run's throughput (examples/s over the training time, compile excluded); the window
  figures are logged as window/..., the run's are the final ones.
"""
from __future__ import annotations

import io
import logging as std_logging
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging as absl_logging
from tensorboardX import SummaryWriter, record_writer
from tensorboardX.summary import hparams as hparams_summary

from amd_jax import paths, progress
from amd_jax.train import guard, hardware

logger = std_logging.getLogger("amd_jax")


# ------------------------------------------------------------------ console and noise


def show_library_log() -> None:
  """Give the `amd_jax` logger a stderr handler of its own (once), so its INFO lines show everywhere."""
  if any(getattr(h, "_amd_jax", False) for h in logger.handlers):
    return
  handler = std_logging.StreamHandler(sys.stderr)
  handler.setFormatter(std_logging.Formatter("%(asctime)s amd_jax: %(message)s", datefmt="%H:%M:%S"))
  handler._amd_jax = True  # pylint: disable=protected-access
  logger.addHandler(handler)
  logger.setLevel(os.environ.get("AMD_JAX_VERBOSITY", "info").upper())
  logger.propagate = False   # not a second time through absl's (or the caller's) root handler


class _QuietLibraries(std_logging.Filter):
  """absl log filter: INFO lines of checkpointing/IO libraries drown the training log; orbax's tracebacks of a
  failed background save repeat an error the loop reports itself in one line (amd_jax.train.checkpoint)."""
  noisy = ("/orbax/", "/etils/", "/grain/", "/tensorflow/", "/gcsfs/", "/optax/", "/jax/_src/distributed")

  def filter(self, record):
    if "/orbax/" in record.pathname and record.exc_info:
      return False
    return record.levelno >= 30 or not any(part in record.pathname for part in self.noisy)


class _DropKnownNoise(std_logging.Filter):
  """Warnings that say nothing a user can act on."""
  phrases = (
      "read-only",                      # orbax, restoring a teacher from a read-only manager
      "Could not determine bucket type",  # gcsfs without Storage Control API credentials
      "Unable to initialize backend 'tpu'",  # libtpu installed (amd_jax.aot) on a host without a TPU
  )

  def filter(self, record):
    message = record.getMessage()
    return not any(p in message for p in self.phrases)


_quieted = False


def quiet_library_logs(verbose: bool | None = None) -> None:
  """Silence other libraries' chatter unless `verbose` (default: AMD_JAX_VERBOSE=1); always show the `amd_jax`
  logger. Called by amd_jax.run, so scripts and notebooks get the same quiet log as the command line."""
  global _quieted
  show_library_log()
  if verbose is None:
    verbose = os.environ.get("AMD_JAX_VERBOSE", "") not in ("", "0")
  if verbose or _quieted:
    return
  _quieted = True
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())
  noise = _DropKnownNoise()
  for name in ("", "absl", "orbax", "gcsfs", "jax._src.xla_bridge"):
    std_logging.getLogger(name).addFilter(noise)
  for handler in std_logging.getLogger().handlers:
    handler.addFilter(noise)
  std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.ERROR)   # backend probing
  warnings.filterwarnings("ignore", message=".*[Rr]ead-only.*", module="orbax")


# ------------------------------------------------------------------ TensorBoard events


class _PathRecordWriter:
  """tensorboardX record writer for URLs: the event file is buffered and rewritten whole at each
  flush through amd_jax.paths (an object store has no append)."""

  def __init__(self, path: str):
    self.path = path
    self.buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    paths.write_bytes(self.path, self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _PathRecordWriterFactory:
  def open(self, path: str) -> _PathRecordWriter:
    return _PathRecordWriter(path)

  def directory_check(self, path: str) -> None:   # buckets need no folders
    del path


def _register_url_writers() -> None:
  for scheme in ("gs", "s3"):
    record_writer.register_writer_factory(scheme, _PathRecordWriterFactory())


class EventWriter:
  """TensorBoard events of one run (process 0 writes; the others hold no file)."""

  def __init__(self, workdir: str, flush_secs: int = 30):
    self._tb = None
    if jax.process_index() == 0:
      _register_url_writers()
      self._tb = SummaryWriter(logdir=str(workdir), flush_secs=flush_secs)

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    if self._tb is None:
      return
    for name, value in scalars.items():
      self._tb.add_scalar(name, float(value), global_step=int(step))

  def write_images(self, step: int, images: dict[str, np.ndarray]) -> None:
    """images: name -> [N, H, W, C] uint8 (or a single [H, W, C])."""
    if self._tb is None:
      return
    for name, value in images.items():
      value = np.asarray(value)
      if value.ndim == 3:
        value = value[None]
      self._tb.add_images(name, value, global_step=int(step), dataformats="NHWC")

  def write_hparams(self, hparams: dict) -> None:
    """The run's flattened config on TensorBoard's HParams tab (not printed)."""
    if self._tb is None:
      return
    clean = {k: v for k, v in hparams.items() if isinstance(v, (bool, int, float, str))}
    for summary in hparams_summary(clean, {}):
      self._tb.file_writer.add_summary(summary)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


# ------------------------------------------------------------------ log windows


def accumulate(acc: dict, step_metrics: dict) -> dict:
  """Running reduction of a window's per-step metrics (sums; guard's counters reduce their own way)."""
  return {k: guard.REDUCTIONS.get(k, jnp.add)(acc[k], v) for k, v in step_metrics.items()}


_accumulate = jax.jit(accumulate)


class Window:
  """The metrics of the steps since the last log line, kept on the device until read."""

  def __init__(self):
    self.sums = None
    self.count = 0

  def add(self, step_metrics: dict) -> None:
    self.sums = step_metrics if self.sums is None else _accumulate(self.sums, step_metrics)
    self.count += 1

  def take(self, end_step: int) -> "PendingWindow | None":
    """Close the window at `end_step`; the values stay on the device until PendingWindow.read()."""
    if self.sums is None:
      return None
    pending = PendingWindow(end_step, self.sums, self.count)
    self.sums, self.count = None, 0
    return pending


class PendingWindow:
  def __init__(self, end_step: int, sums: dict, count: int):
    self.end_step, self.sums, self.count = end_step, sums, count

  def read(self) -> dict:
    """Host values of the sums (blocks until the window's last step is done)."""
    return jax.device_get(self.sums)


def window_means(values: dict, count: int) -> dict[str, float]:
  """Host scalars of one window: means over its finite steps, plus guard's counters as they are."""
  bad = int(values.get(guard.COUNT, 0))
  good = count - bad
  out = {k: float(v) / good for k, v in values.items() if k not in guard.COUNTERS and good > 0}
  if guard.COUNT in values:
    out[guard.COUNT] = float(bad)
  return out


# ------------------------------------------------------------------ throughput and progress


class Throughput:
  """Steps/s, examples/s, ETA, data wait and model TFLOP/s per window, and for the whole run."""

  def __init__(self, total_steps: int, batch_size: int, flops_per_step: float = 0.0, device=None):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.flops_per_step = flops_per_step
    device = device if device is not None else jax.devices()[0]
    chip = hardware.chip_of(device)
    self.peak_flops = chip.peak_bf16_flops if chip else 0.0   # no MFU where the peak is unknown (CPUs)
    self.num_devices = jax.device_count()
    self._run_start_time = None
    self._run_start_step = None
    self._run_wait = 0.0
    self._last_time = None
    self._last_step = None
    self._window_wait = 0.0

  def start(self, step: int) -> None:
    """The first step of this process's training (after compiling)."""
    now = time.perf_counter()
    self._run_start_time = self._last_time = now
    self._run_start_step = self._last_step = step
    self._run_wait = self._window_wait = 0.0

  def add_data_wait(self, seconds: float) -> None:
    """Time the loop spent blocked on the input pipeline."""
    self._window_wait += seconds
    self._run_wait += seconds

  def _rates(self, steps: int, seconds: float, wait: float, step: int) -> dict[str, float]:
    steps_per_sec = steps / seconds
    # Steps are dispatched asynchronously, so the host mostly waits either for data or for the
    # device: a data_wait_fraction near 1 means the input pipeline is the bottleneck.
    out = {"steps_per_sec": steps_per_sec, "examples_per_sec": steps_per_sec * self.batch_size,
           "data_wait_fraction": wait / seconds}
    if step < self.total_steps:
      out["eta_minutes"] = (self.total_steps - step) / steps_per_sec / 60.0
    if self.flops_per_step:
      tflops = self.flops_per_step * steps_per_sec / 1e12 / self.num_devices
      out["tflops_per_device"] = tflops
      if self.peak_flops:
        out["mfu"] = tflops * 1e12 / self.peak_flops
    return out

  def window(self, step: int) -> dict[str, float]:
    """window/... rates since the previous call (empty before any step)."""
    now = time.perf_counter()
    if self._last_step is None or step <= self._last_step:
      return {}
    rates = self._rates(step - self._last_step, now - self._last_time, self._window_wait, step)
    self._last_time, self._last_step, self._window_wait = now, step, 0.0
    return {f"window/{k}": v for k, v in rates.items()}

  def run(self, step: int) -> dict[str, float]:
    """The whole run's rates (this process's steps, compile excluded) and its training seconds."""
    if self._run_start_step is None or step <= self._run_start_step:
      return {}
    seconds = time.perf_counter() - self._run_start_time
    out = self._rates(step - self._run_start_step, seconds, self._run_wait, self.total_steps)
    out["train_seconds"] = seconds
    return out


class ProgressLine:
  """A tqdm line over the run's steps where amd_jax.progress shows bars; a no-op elsewhere."""

  def __init__(self, total_steps: int, start_step: int):
    self._bar = None
    if progress.enabled(jax.process_index()):
      self._bar = progress.bar(total=total_steps, desc="train", unit="step")
      self._bar.update(start_step)
    self._step = start_step

  def update(self, step: int, scalars: dict[str, float]) -> None:
    if self._bar is None:
      return
    self._bar.update(step - self._step)
    self._step = step
    shown = {"loss": scalars.get("loss"), "ex/s": scalars.get("window/examples_per_sec"),
             "eta": scalars.get("window/eta_minutes")}
    parts = []
    if shown["loss"] is not None:
      parts.append(f"loss {shown['loss']:.4f}")
    if shown["ex/s"] is not None:
      parts.append(f"{shown['ex/s']:,.0f} ex/s")
    if shown["eta"] is not None:
      parts.append(f"ETA {shown['eta']:.1f} min")
    self._bar.set_postfix_str(", ".join(parts))

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


def window_line(step: int, total_steps: int, scalars: dict[str, float]) -> str:
  """The log line of one window: step, loss terms, throughput, ETA."""
  terms = [f"{k} {v:.4f}" for k, v in sorted(scalars.items())
           if k.startswith("loss") and isinstance(v, float)]
  rate = scalars.get("window/examples_per_sec")
  eta = scalars.get("window/eta_minutes")
  tail = []
  if rate is not None:
    tail.append(f"{rate:,.1f} examples/s")
  if eta is not None:
    tail.append(f"ETA {eta:.1f} min")
  if guard.COUNT in scalars and scalars[guard.COUNT]:
    tail.append(f"{int(scalars[guard.COUNT])} non-finite step(s) skipped")
  return f"step {step}/{total_steps}: " + ", ".join(terms + tail)
