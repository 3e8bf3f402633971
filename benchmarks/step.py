"""Train-step benchmark of any config: compile time, step time, throughput, model TFLOP/s, MFU, memory.

  python benchmarks/step.py --config configs/quickstart.py:stage=mae
  python benchmarks/step.py --config configs/amd_vit_s_ssv2.py --config.batch_size=2 \
      --config.model.dtype=float32 --config.teacher.model.dtype=float32

The step is the loop's own: amd_jax.train.loop.make_train_step over the optimizer
of amd_jax.train.optim.make_optimizer, jitted with the loop's shardings and state
donation, lowered and compiled ahead of time as the loop does. Parameters are
random (a distillation teacher is random-initialised: its speed does not depend
on its values) and the batch is synthetic with the config's shapes, so no data
set or checkpoint is needed.

Timing: after `--warmup` steps, `--repeats` rounds each time `--steps` steps
(each one waited for with block_until_ready) and then one large matmul per
dtype (f32, and bf16 where the device runs it); the MFU of a round is the step's
model FLOP/s over that round's matmul FLOP/s, so both sides see the same machine
load. Medians over the rounds are reported. Model FLOPs are counted as the loop
counts them: 3 x student forward (forward + backward) + 1 x teacher forward,
from the method's analytic flops_per_example.

The table is printed and, unless --out is empty, appended to docs/benchmarks.md
with the date, the machine, the load and the command.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from amd_jax.data import pipeline
from amd_jax.train import loop, sharding  # pylint: disable=g-import-not-at-top,wrong-import-position

DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "benchmarks.md")


# ------------------------------------------------------------------------------------------------ machine
def machine_description() -> str:
  """CPU model and core count from /proc/cpuinfo, plus the JAX device kind."""
  model, cores = platform.processor() or "unknown CPU", len(os.sched_getaffinity(0))
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  dev = jax.devices()[0]
  return f"{model}, {cores} usable cores; JAX {jax.__version__} on {dev.platform} ({dev.device_kind})"


def load_average() -> str:
  try:
    with open("/proc/loadavg") as f:
      return " ".join(f.read().split()[:3])
  except OSError:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def runnable_tasks() -> int:
  """Tasks running or ready to run right now, machine-wide (the 4th field of /proc/loadavg)."""
  try:
    with open("/proc/loadavg") as f:
      return int(f.read().split()[3].split("/")[0])
  except (OSError, ValueError, IndexError):
    return 0


def wait_quiet(max_runnable: int = 2, timeout_s: float = 0.0, samples: int = 5) -> float:
  """Wait (up to timeout_s) until other users leave the cores alone; returns the seconds waited.

  The machine is shared: a round measured while others compute is slower on both sides
  but not by the same factor, so rounds start when at most `max_runnable` tasks (this
  one included) were runnable in `samples` checks 0.2 s apart. timeout_s=0: never wait.
  """
  t0 = time.perf_counter()
  quiet = 0
  while time.perf_counter() - t0 < timeout_s:
    quiet = quiet + 1 if runnable_tasks() <= max_runnable else 0
    if quiet >= samples:
      break
    time.sleep(0.2)
  return time.perf_counter() - t0


def command_line() -> str:
  return "python " + " ".join(sys.argv)


def append_markdown(title: str, body: str, command: str, path: str = DOCS, notes: str = "") -> None:
  """Append one measured section (title, date, machine, command, body) to docs/benchmarks.md."""
  if not path:
    return
  stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
  lines = [f"\n### {title} ({stamp})", "", f"Machine: {machine_description()}.", "",
           f"Command: `{command}`", "", body.rstrip(), ""]
  if notes:
    lines += [notes.rstrip(), ""]
  new = not os.path.exists(path)
  with open(path, "a") as f:
    if new:
      f.write("# Benchmarks\n")
    f.write("\n".join(lines))


# ------------------------------------------------------------------------------------------------ config
def apply_overrides(config, overrides: list[str]):
  """'a.b=v' strings onto a ConfigDict, each value parsed as the type of the field it replaces."""
  for item in overrides:
    key, _, value = item.partition("=")
    parts = key.split(".")
    parent = config
    for p in parts[:-1]:
      parent = parent[p]
    old = parent[parts[-1]]
    if isinstance(old, bool):
      parsed = value.lower() in ("1", "true", "yes")
    elif isinstance(old, (int, float, str)):
      parsed = type(old)(value)
    else:
      parsed = value
    parent[parts[-1]] = parsed
  return config


def load_config(spec: str, overrides: list[str] = ()):
  """'name[:arg]' or 'configs/x.py[:arg]' -> the config, with 'a.b=v' overrides (as amd_jax.main takes them)."""
  from amd_jax import config_files  # pylint: disable=g-import-not-at-top
  return apply_overrides(config_files.load(spec), list(overrides))


# ------------------------------------------------------------------------------------------------ the step
def synthetic_batch(config, batch_size: int | None = None, seed: int = 0) -> dict:
  """A batch of the config's shapes: normalised pixels ~ N(0, 1) and labels."""
  d = config.data
  b = batch_size or config.batch_size
  shape = (b, d.image_size, d.image_size, d.channels)
  key = "image"
  if d.modality == "video":
    shape = (b, d.num_frames) + shape[1:]
    key = "video"
  rng = np.random.default_rng(seed)
  return {key: jnp.asarray(rng.standard_normal(shape, np.float32)),
          "label": jnp.asarray(rng.integers(0, max(d.num_classes, 1), (b,), np.int32))}


class StepBench:
  """The loop's own compiled train step (loop.build_trainer: method, optimizer, shardings, donation, activation
  rules) on freshly initialised params (a random teacher) and a synthetic batch."""

  def __init__(self, config, total_steps: int = 1000):
    if not config.data.num_classes:   # 0: counted from the data, as a run does
      config = config.copy_and_resolve_references()
      config.data.num_classes = pipeline.num_classes(config.data)
    self.config = config
    mesh = sharding.make_mesh(config.mesh)
    schedule = loop.Schedule(examples_per_epoch=config.batch_size, steps_per_epoch=1, total_steps=total_steps,
                             warmup_steps=min(10, total_steps - 1))
    trainer = loop.build_trainer(config, mesh, schedule)
    self.method = method = trainer.method
    self.batch_size = config.batch_size
    example = synthetic_batch(config)
    self.teacher = None
    if method.has_teacher:
      teacher = jax.jit(method.teacher_init)(jax.random.PRNGKey(config.seed + 1), example)
      self.teacher = jax.device_put(teacher, trainer.teacher_shardings)
    self.state = trainer.initialise()
    self.batch = jax.device_put(example, trainer.batch_sharding)
    t0 = time.perf_counter()
    lowered = trainer.lower()
    t1 = time.perf_counter()
    self.compiled = lowered.compile()
    t2 = time.perf_counter()
    self.lower_s, self.compile_s = t1 - t0, t2 - t1
    self.memory = self.compiled.memory_analysis()
    self.flops_per_step = trainer.flops_per_step()
    self.last_metrics = None

  def peak_bytes(self) -> float:
    """Arguments + outputs - donated (aliased) + temporaries of the compiled step."""
    m = self.memory
    if m is None:
      return float("nan")
    return float(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)

  def step(self) -> float:
    """One step, waited for; returns its wall time in seconds."""
    t0 = time.perf_counter()
    self.state, metrics = self.compiled(self.state, self.batch, self.teacher)
    jax.block_until_ready((self.state, metrics))
    dt = time.perf_counter() - t0
    self.last_metrics = metrics
    return dt


# ------------------------------------------------------------------------------------------------ matmul peak
class MatmulPeak:
  """FLOP/s of one large square matmul in `dtype` (f32 accumulation for bf16), jitted once."""

  def __init__(self, n: int, dtype):
    self.n, self.dtype = n, jnp.dtype(dtype)
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    self.a = jax.random.normal(key_a, (n, n), jnp.float32).astype(self.dtype)
    self.b = jax.random.normal(key_b, (n, n), jnp.float32).astype(self.dtype)
    self.fn = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    self.fn(self.a, self.b).block_until_ready()

  def measure(self) -> float:
    t0 = time.perf_counter()
    self.fn(self.a, self.b).block_until_ready()
    return 2.0 * self.n**3 / (time.perf_counter() - t0)


def bf16_supported() -> bool:
  try:
    MatmulPeak(64, jnp.bfloat16)
    return True
  except Exception:  # pylint: disable=broad-except
    return False


# ------------------------------------------------------------------------------------------------ measurement
def measure(bench: StepBench, *, warmup: int, steps: int, repeats: int, matmul_n: int, bf16: bool = True,
            quiet_timeout: float = 0.0) -> dict:
  """Interleaved rounds of (steps, f32 matmul, bf16 matmul); medians and per-round MFU.

  Each round's matmul rate is the median of 5 runs (not the best one): on a shared
  machine the step and the matmul then see the same kind of load. repeats=0 only compiles.
  """
  if repeats == 0:
    return {"step_s": float("nan"), "step_s_all": [], "examples_per_s": float("nan"), "tflops": float("nan"),
            "compile_s": bench.compile_s, "lower_s": bench.lower_s, "peak_gib": bench.peak_bytes() / 2**30,
            "load": load_average(), "runnable": [], "loss": float("nan"), "peak_f32_tflops": float("nan"),
            "mfu_f32": float("nan")}
  peaks = {"f32": MatmulPeak(matmul_n, jnp.float32)}
  if bf16 and bf16_supported():
    peaks["bf16"] = MatmulPeak(matmul_n, jnp.bfloat16)
  for _ in range(warmup):
    bench.step()
  step_times, peak_values, mfu = [], {k: [] for k in peaks}, {k: [] for k in peaks}
  loads = [load_average()]
  busy = []
  for _ in range(repeats):
    wait_quiet(timeout_s=quiet_timeout)
    busy.append(runnable_tasks())
    t = statistics.median([bench.step() for _ in range(steps)])
    step_times.append(t)
    achieved = bench.flops_per_step / t
    for k, p in peaks.items():
      v = statistics.median(p.measure() for _ in range(5))
      peak_values[k].append(v)
      mfu[k].append(achieved / v)
  loads.append(load_average())
  t = statistics.median(step_times)
  out = {
      "step_s": t, "step_s_all": step_times, "examples_per_s": bench.batch_size / t,
      "tflops": bench.flops_per_step / t / 1e12, "compile_s": bench.compile_s, "lower_s": bench.lower_s,
      "peak_gib": bench.peak_bytes() / 2**30, "load": " -> ".join(loads), "runnable": busy,
      "loss": float(jax.device_get(bench.last_metrics["loss"])),
  }
  for k in peaks:
    out[f"peak_{k}_tflops"] = statistics.median(peak_values[k]) / 1e12
    out[f"mfu_{k}"] = statistics.median(mfu[k])
  return out


def table(rows: list[tuple[str, dict]]) -> str:
  has_bf16 = any("mfu_bf16" in r for _, r in rows)
  head = ["run", "batch", "compile s", "step s (median)", "examples/s", "model TFLOP/s", "f32 matmul TFLOP/s",
          "MFU vs f32"]
  if has_bf16:
    head += ["bf16 matmul TFLOP/s", "MFU vs bf16"]
  head += ["peak memory GiB", "load (1/5/15 min, before -> after)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, r in rows:
    cells = [name, str(r["batch"]), f"{r['lower_s'] + r['compile_s']:.1f}", f"{r['step_s']:.4f}",
             f"{r['examples_per_s']:.1f}", f"{r['tflops']:.4f}", f"{r['peak_f32_tflops']:.4f}",
             f"{100 * r['mfu_f32']:.1f}%"]
    if has_bf16:
      cells += [f"{r['peak_bf16_tflops']:.4f}" if "mfu_bf16" in r else "-",
                f"{100 * r['mfu_bf16']:.1f}%" if "mfu_bf16" in r else "-"]
    cells += [f"{r['peak_gib']:.2f}", r["load"]]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def run_config(config, *, name: str, warmup: int, steps: int, repeats: int, matmul_n: int,
               quiet_timeout: float = 0.0) -> dict:
  bench = StepBench(config)
  r = measure(bench, warmup=warmup, steps=steps, repeats=repeats, matmul_n=matmul_n, quiet_timeout=quiet_timeout)
  r["batch"] = config.batch_size
  r["name"] = name
  return r


# ------------------------------------------------------------------------------------------------ before / after
LEGACY_PARTS = ("gelu", "attention", "patch_embed", "dense")


@contextlib.contextmanager
def legacy_formulations(parts=LEGACY_PARTS):
  """Trace models as amd_jax wrote them before its CPU speed work, to measure that work's effect.

  Inside the context, for each of `parts`: 'gelu' through jax.nn.gelu (erfc form), 'attention'
  through jax.nn.dot_product_attention, 'dense' layers on [B, N, in] inputs, and 'patch_embed'
  as a strided convolution over every token followed by a gather of the kept ones. The
  parameters (names, shapes, init) and the maths are the same; only the formulation differs.
  """
  unknown = set(parts) - set(LEGACY_PARTS)
  if unknown:
    raise ValueError(f"unknown legacy parts {sorted(unknown)}; allowed: {', '.join(LEGACY_PARTS)}")
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from amd_jax.models import posemb, vit  # pylint: disable=g-import-not-at-top

  class ConvPatchEmbed(nn.Module):
    width: int
    patch_size: int
    tubelet_size: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
      kernel = ((self.tubelet_size,) if self.tubelet_size else ()) + (self.patch_size, self.patch_size)
      init = nn.initializers.xavier_uniform(in_axis=tuple(range(len(kernel) + 1)), out_axis=-1)
      y = nn.Conv(self.width, kernel, strides=kernel, padding="VALID", kernel_init=init, dtype=self.dtype,
                  name="proj")(x.astype(self.dtype))
      return y.reshape(y.shape[0], -1, self.width)

  def embed(self, inputs, keep=None):
    tubelet = self.tubelet_size if inputs.ndim == 5 else 0
    grid = vit.token_grid(inputs.shape[1:], self.patch_size, tubelet)
    x = ConvPatchEmbed(self.width, self.patch_size, tubelet, self.dtype, name="patch_embed")(inputs)
    x = x.astype(jnp.float32) + jnp.asarray(posemb.make_table(self.pos_emb, self.width, grid.shape, False))[None]
    if keep is not None:
      x = vit.gather_tokens(x, keep)
    if self.cls_token:
      cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, self.width))
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1)
    return x

  saved = (vit.gelu_exact, vit.attention_per_head, vit.Dense, vit.Encoder.embed)
  if "gelu" in parts:
    vit.gelu_exact = lambda x: nn.gelu(x, approximate=False)
  if "attention" in parts:
    vit.attention_per_head = lambda q, k, v: jax.nn.dot_product_attention(q, k, v)
  if "dense" in parts:
    vit.Dense = nn.Dense
  if "patch_embed" in parts:
    vit.Encoder.embed = embed
  try:
    yield
  finally:
    vit.gelu_exact, vit.attention_per_head, vit.Dense, vit.Encoder.embed = saved


def compare_legacy(config, *, warmup: int, steps: int, repeats: int, quiet_timeout: float = 0.0,
                   parts=LEGACY_PARTS) -> dict:
  """Interleaved rounds of the legacy-formulation step and the current one; ratio current / legacy."""
  with legacy_formulations(parts):
    old = StepBench(config)
  new = StepBench(config)
  for _ in range(warmup):
    old.step()
    new.step()
  rounds = []
  for _ in range(repeats):
    wait_quiet(timeout_s=quiet_timeout)
    busy = runnable_tasks()
    t_old = statistics.median(old.step() for _ in range(steps))
    t_new = statistics.median(new.step() for _ in range(steps))
    rounds.append((t_old, t_new, busy))
  return {"legacy_s": statistics.median(r[0] for r in rounds), "current_s": statistics.median(r[1] for r in rounds),
          "ratio": statistics.median(r[1] / r[0] for r in rounds), "rounds": rounds,
          "compile_legacy_s": old.lower_s + old.compile_s, "compile_current_s": new.lower_s + new.compile_s}


# ------------------------------------------------------------------------------------------------ CLI
if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", None, "amd_jax config file (as amd_jax.main takes it).",
                                            lock_config=True)
  _WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps after compiling")
  _STEPS = flags.DEFINE_integer("steps", 5, "timed steps per round (their median is the round's step time)")
  _REPEATS = flags.DEFINE_integer("repeats", 3, "interleaved rounds of (steps, matmuls)")
  _MATMUL = flags.DEFINE_integer("matmul_n", 2048, "size of the square matmul that measures the peak")
  _OUT = flags.DEFINE_string("out", DOCS, "markdown file to append the table to ('' : print only)")
  _NAME = flags.DEFINE_string("name", "", "row label (default: the config argument)")
  _LEGACY = flags.DEFINE_string("compare_legacy", "", "instead: time the step against the same step traced with "
                                "the formulations amd_jax used before its CPU speed work (legacy_formulations): "
                                f"'all' or comma-separated parts of {','.join(LEGACY_PARTS)}")
  _QUIET = flags.DEFINE_float("quiet_timeout", 0.0, "seconds to wait, before each round, for the other users of "
                              "the machine to go quiet (0: start at once)")
  flags.mark_flags_as_required(["config"])

  def main(argv):
    del argv
    config = _CONFIG.value
    name = _NAME.value or flags.FLAGS["config"].serialize().split("=", 1)[-1]
    print(f"load before: {load_average()}", flush=True)
    if _LEGACY.value:
      load0 = load_average()
      parts = LEGACY_PARTS if _LEGACY.value == "all" else tuple(_LEGACY.value.split(","))
      r = compare_legacy(config, warmup=_WARMUP.value, steps=_STEPS.value, repeats=_REPEATS.value,
                         quiet_timeout=_QUIET.value, parts=parts)
      text = "\n".join([
          "| run | legacy parts | batch | legacy step s | current step s | ratio current / legacy | compile s (legacy, "
          "current) | load before -> after |", "|---|---|---|---|---|---|---|---|",
          f"| {name} | {'+'.join(parts)} | {config.batch_size} | {r['legacy_s']:.4f} | {r['current_s']:.4f} | **{r['ratio']:.3f}** | "
          f"{r['compile_legacy_s']:.1f}, {r['compile_current_s']:.1f} | {load0} -> {load_average()} |"])
      print(text)
      rounds = "; ".join(f"{a:.4f} / {b:.4f} (runnable {c})" for a, b, c in r["rounds"])
      print("rounds (legacy / current):", rounds)
      append_markdown(f"Before / after the CPU formulations: {name}", text, command_line(), _OUT.value,
                      notes=f"Rounds (legacy / current step s): {rounds}.")
      return
    r = run_config(config, name=name, warmup=_WARMUP.value, steps=_STEPS.value, repeats=_REPEATS.value,
                   matmul_n=_MATMUL.value, quiet_timeout=_QUIET.value)
    text = table([(name, r)])
    print(text)
    rounds = ", ".join(f"{t:.4f}" for t in r["step_s_all"])
    print(f"round step times: {rounds}; runnable tasks at round starts {r['runnable']}; loss {r['loss']:.4f}")
    append_markdown(f"Train step: {name}", text, command_line(), _OUT.value,
                    notes=f"Round step times (s): {rounds}; runnable tasks at the round starts: {r['runnable']}.")

  app.run(main)
