"""Compile the loop's train step for a TPU topology on any host: per-chip memory, fit, modeled speed.

  python -m amd_jax.aot --config configs/amd_vit_b_ssv2.py --topology v5e:16x16 [--num_slices 2] \\
      [--config.mesh.fsdp=16 ...] [--json out.json] [--search] [--hlo step.hlo.txt]

The step is the loop's own (amd_jax.train.loop.build_trainer and Trainer.lower: the same method,
optimizer, state and teacher shardings, donation and logical activation rules), lowered from
abstract values for the devices of a TPU topology (jax.experimental.topologies) and compiled by
libtpu's compiler on this host's CPU. Nothing is allocated or run, no data or teacher is read.

What it reports, per chip (docs/scaling.md, "Compiled for TPU"):
  memory   XLA's buffer assignment of the compiled step: arguments (state, batch shard, teacher),
           outputs, the part of the outputs that reuses donated arguments, temporaries and
           generated code; their peak against the chip's HBM: FITS / DOES NOT FIT, headroom.
           A step larger than the HBM the compiler may use is refused by the compiler itself
           (RESOURCE_EXHAUSTED): that is reported as DOES NOT FIT with the compiler's figure.
  FLOPs    the compiled program's count (XLA cost analysis counts ONE chip's SPMD program; times
           the chips, the whole step) against the analytic model FLOPs the loop logs.
  speed    XLA's TPU cost model's step time ('optimal_seconds') and, from it, examples/s and MFU
           (analytic model FLOPs over the chips' dense bf16 peak). These are MODELED figures
           (XLA TPU cost model), not measured: see docs/scaling.md for how far they can be trusted.

--search compiles a bounded list of layouts (mesh splits, remat policies, teacher sharded or
replicated, scanned or unrolled blocks), ranks them by modeled step time and recommends the
fastest that fits, as --config overrides.

Needs libtpu (`pip install 'amd_jax[tpu]'`); without it the command says so and exits 2.
Exit status: 0 compiled (fits or not: the verdict is in the output); 2 configuration error or
no libtpu; 1 anything else.
"""
from __future__ import annotations

import os
import sys

# Before JAX loads. This process compiles for a TPU that is not here: it never uses this host's
# accelerators (JAX_PLATFORMS=cpu), may load libtpu beside another process that holds it (a CPU
# run with libtpu installed takes libtpu's lock file), and answers libtpu's host probing itself so
# that it neither queries a metadata server nor prints warnings about one.
if __name__ == "__main__":
  os.environ["JAX_PLATFORMS"] = "cpu"
  for _name, _value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                        ("TPU_ACCELERATOR_TYPE", "v5litepod-4"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                        ("TF_CPP_MIN_LOG_LEVEL", "2")):
    os.environ.setdefault(_name, _value)

import dataclasses  # pylint: disable=g-import-not-at-top,wrong-import-position
import importlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import re  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=g-import-not-at-top,wrong-import-position
from typing import Any, Callable, Sequence  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.experimental import topologies  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from amd_jax import config_files, config_validation, errors, methods, paths  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax.models import check as model_check  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax.models import platform  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax.train import hardware, loop, metrics, sharding  # pylint: disable=g-import-not-at-top,wrong-import-position

GIB = hardware.GIB
MODELED = "modeled (XLA TPU cost model), not measured"
SCHEMA_VERSION = 1
INSTALL_HINT = "pip install 'amd_jax[tpu]'"

# How libtpu names each generation's topologies, and how its chips appear: v4 and v5p chips are
# 'megacore' (one device drives both TensorCores of a chip), v5e and v6e chips have one core.
# Pod hosts hold 2x2 chips in every generation.
_LIBTPU_NAMES = {"v4": ("v4", "megacore"), "v5p": ("v5p", "megacore"), "v5e": ("v5e", "default"),
                 "v6e": ("v6e", "default")}
_TOPOLOGY_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}
CHIPS_PER_HOST_BOUNDS = (2, 2, 1)

# Training-set sizes of the official recipes' data sets: the schedule (warmup and decay steps)
# needs one, the compiled step does not depend on it.
OFFICIAL_TRAIN_SIZES = {"imagenet2012": 1_281_167, "ssv2": 168_913, "k400": 240_436, "fashion_mnist": 60_000}


# ----------------------------------------------------------------------------------- topology


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice shape ('v5e:16x16') and how many such slices are joined over the data-centre network."""
  generation: str
  shape: tuple[int, ...]
  num_slices: int = 1

  @property
  def name(self) -> str:
    return f"{self.generation}:{'x'.join(map(str, self.shape))}"

  @property
  def chips_per_slice(self) -> int:
    n = 1
    for s in self.shape:
      n *= s
    return n

  @property
  def num_chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def chip(self) -> hardware.Chip:
    return hardware.TPU_CHIPS[self.generation]

  def describe(self) -> str:
    slices = f"{self.num_slices} slices of " if self.num_slices > 1 else ""
    return f"{slices}{self.name} ({self.num_chips} {self.chip.name} chips)"


def parse_topology(text: str, num_slices: int = 1) -> Topology:
  """'v5e:16x16' / 'v4:4x4x4' / 'v5p:4x4x4' / 'v6e:8x8' -> Topology; a clear ConfigError otherwise."""
  example = "e.g. v5e:16x16 (256 chips), v4:4x4x4 or v5p:4x4x4 (64 chips), v6e:8x8"
  generation, sep, dims = str(text).strip().lower().partition(":")
  if not sep or generation not in _LIBTPU_NAMES:
    raise ConfigError(f"--topology={text!r} is not valid: expected GENERATION:SHAPE with a generation from "
                      f"{', '.join(_LIBTPU_NAMES)}, {example}")
  try:
    shape = tuple(int(d) for d in dims.split("x"))
  except ValueError:
    shape = ()
  want = _TOPOLOGY_DIMS[generation]
  if len(shape) != want or any(d < 1 for d in shape):
    raise ConfigError(f"--topology={text!r} is not valid: a {generation} slice has {want} dimensions of chips "
                      f"('x'-separated positive integers), {example}")
  if num_slices < 1:
    raise ConfigError(f"--num_slices={num_slices} is not valid: the number of slices must be >= 1")
  return Topology(generation, shape, num_slices)


def has_libtpu() -> bool:
  """libtpu (the TPU compiler) is importable, or TPU_LIBRARY_PATH names it, as JAX itself looks for it."""
  path = os.environ.get("TPU_LIBRARY_PATH")
  if path and os.path.isfile(path):
    return True
  try:   # imported, not only looked up: a broken or blocked install counts as absent
    importlib.import_module("libtpu")
  except ImportError:
    return False
  return True


def topology_devices(topology: Topology) -> list:
  """The devices of `topology` (not attached to this host: compile targets only)."""
  if not has_libtpu():
    raise ConfigError(f"compiling for TPU needs libtpu, which is not installed here: {INSTALL_HINT}")
  libtpu_name, chip_config = _LIBTPU_NAMES[topology.generation]
  name = f"{libtpu_name}:{'x'.join(map(str, topology.shape))}"
  bounds = CHIPS_PER_HOST_BOUNDS if len(topology.shape) == 3 else CHIPS_PER_HOST_BOUNDS
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name=chip_config,
                                        chips_per_host_bounds=bounds, num_slices=topology.num_slices)
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f"--topology={topology.name!r} (x{topology.num_slices} slices) is not a topology libtpu "
                      f"can build: {first}") from None
  return list(desc.devices)


# ------------------------------------------------------------------------------------ config


def load_config(spec: str) -> ml_collections.ConfigDict:
  """'configs/x.py[:arg]' or a shipped config's name -> its ConfigDict, as --config loads it."""
  try:
    return config_files.load(spec)
  except ConfigError:
    raise
  except (OSError, ValueError, ImportError, SyntaxError, AttributeError, KeyError) as e:
    raise ConfigError(f"cannot load the config {spec!r}: {_one_line(e)}") from None


def with_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted fields set ({'mesh.fsdp': 16}); a field the config lacks is an error."""
  out = config.copy_and_resolve_references()
  for dotted, value in overrides.items():
    node, parts = out, dotted.split(".")
    for part in parts[:-1]:
      if part not in node:
        raise ConfigError(f"config.{dotted} is not a field of this config")
      node = node[part]
    if parts[-1] not in node:
      raise ConfigError(f"config.{dotted} is not a field of this config")
    node[parts[-1]] = value
  return out


def override_flags(overrides: dict[str, Any]) -> str:
  """{'mesh.fsdp': 16, 'model.remat': 'dots'} -> '--config.mesh.fsdp=16 --config.model.remat=dots'."""
  return " ".join(f"--config.{k}={v}" for k, v in overrides.items())


def num_train_examples(config) -> tuple[int, str]:
  """A training-set size for the schedule, and where it came from (data not needed: see OFFICIAL_TRAIN_SIZES)."""
  d = config.data
  if d.source == "synthetic":
    return int(d.synthetic_size), "config.data.synthetic_size"
  if d.source == "fashion_mnist":
    return OFFICIAL_TRAIN_SIZES["fashion_mnist"], "Fashion-MNIST's train split"
  if d.source == "tfds" and d.tfds_name == "imagenet2012":
    return OFFICIAL_TRAIN_SIZES["imagenet2012"], "ImageNet-1k's train split (1,281,167)"
  if d.modality == "video" and d.num_classes in (174, 400):
    name = "ssv2" if d.num_classes == 174 else "k400"
    label = {"ssv2": "Something-Something v2", "k400": "Kinetics-400"}[name]
    return OFFICIAL_TRAIN_SIZES[name], f"{label}'s train split ({OFFICIAL_TRAIN_SIZES[name]:,})"
  try:
    return pipeline.num_examples(d), "the data set (config.data)"
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"the schedule needs the training-set size, which config.data cannot give here "
                      f"({_one_line(e)}): pass --num_train_examples=N (it does not change the compiled step)") \
        from None


# Class counts the data would give where no data is at hand (config.data.num_classes=0 asks the data).
_KNOWN_CLASSES = {"fashion_mnist": 10, "synthetic": 10}


def data_fields_for_compile(config) -> tuple[ml_collections.ConfigDict, list[str]]:
  """`config` with the data fields a run measures from its data (num_classes=0, mean/std 'auto') filled in, and
  what was filled. The step's shapes need the class count; the normalisation only changes constants, so
  'auto' compiles as 0.5 / 0.25 per channel. Counting classes reads the data's listings when they are here."""
  notes, updates = [], {}
  d = config.data
  if int(d.num_classes) == 0:
    try:
      classes = int(pipeline.num_classes(d))
      notes.append(f"data.num_classes={classes} (counted in the data)")
    except Exception as e:  # pylint: disable=broad-except
      if d.source not in _KNOWN_CLASSES:
        raise ConfigError(f"config.data.num_classes=0 asks the data for the class count, which cannot be read "
                          f"here ({_one_line(e)}): pass --config.data.num_classes=N") from None
      classes = _KNOWN_CLASSES[d.source]
      notes.append(f"data.num_classes={classes} ({d.source}'s)")
    updates["data.num_classes"] = classes
  for field, value in (("mean", "0.5"), ("std", "0.25")):
    if str(d[field]).strip().lower() == "auto":
      updates[f"data.{field}"] = ",".join([value] * int(d.channels))
      notes.append(f"data.{field}='auto' compiled as {updates[f'data.{field}']} (constants only)")
  return (with_overrides(config, updates) if updates else config), notes


def check_config(config, topology: Topology) -> None:
  """The checks of config_validation.validate that do not read data or count this host's devices, plus the
  batch and mesh against the topology's chips. Raises ConfigError."""
  if config.method not in methods.REGISTRY:
    errors.fail("method", config.method, f"allowed: {', '.join(sorted(methods.REGISTRY))}")
  config_validation.check_no_unknown_fields(config, config_validation.known_fields(config.method))
  model_check.validate_model(config.model, config.data)
  checked = config
  if "teacher" in config and not config.teacher.get("checkpoint"):
    # The teacher's weights are never read here; a run still needs them (its own validation says so).
    checked = with_overrides(config, {"teacher.checkpoint": "(not read when compiling ahead of time)"})
  methods.get_method_class(config.method).validate_config(checked)
  if (config.total_steps > 0) == (config.num_epochs > 0):
    raise ConfigError(f"give exactly one of config.total_steps (now {config.total_steps}) and config.num_epochs "
                      f"(now {config.num_epochs}) as a positive number; set the other to -1")
  n = topology.num_chips
  if config.batch_size < 1 or config.batch_size % n:
    lower, upper = (config.batch_size // n) * n, (config.batch_size // n + 1) * n
    options = " or ".join(str(b) for b in (lower, upper) if b > 0)
    errors.fail("batch_size", config.batch_size,
                f"the loop splits the global batch evenly over all {n} chips of {topology.describe()}: use a "
                f"multiple of {n}, e.g. --config.batch_size={options}")
  dcn = int(config.mesh.get("dcn_data", 1))
  if dcn != topology.num_slices:
    errors.fail("mesh.dcn_data", dcn, f"it must equal the number of slices ({topology.num_slices}): add "
                f"--config.mesh.dcn_data={topology.num_slices}")
  try:
    sharding.mesh_shape(config.mesh, n, topology.num_slices)
  except ValueError as e:
    raise ConfigError(f"{e} (the topology has {n} chips)") from None


# ----------------------------------------------------------------------------------- compile


@dataclasses.dataclass
class Memory:
  """Per-chip bytes of the compiled step (XLA's memory analysis), and its fit on the chip."""
  argument_bytes: int
  output_bytes: int
  alias_bytes: int          # outputs written into donated arguments (counted once in the peak)
  temp_bytes: int
  generated_code_bytes: int
  hbm_bytes: int            # the chip's HBM
  compiler_limit_bytes: int | None = None   # the HBM the compiler said it may use (when it refused the step)

  @property
  def total_bytes(self) -> int:
    """Peak resident bytes: arguments + outputs not aliased to them + temporaries + code."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.generated_code_bytes

  @property
  def headroom_bytes(self) -> int:
    return (self.compiler_limit_bytes or self.hbm_bytes) - self.total_bytes

  @property
  def fits(self) -> bool:
    return self.headroom_bytes >= 0

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    out.update(total_bytes=self.total_bytes, headroom_bytes=self.headroom_bytes, fits=self.fits)
    return out


@dataclasses.dataclass
class Speed:
  """XLA's TPU cost model on one compiled program (per chip; see `cost_figures`)."""
  flops_per_chip: float
  bytes_accessed_per_chip: float
  step_seconds: float | None      # None: the model gave no usable estimate
  raw_optimal_seconds: float      # 'optimal_seconds' as the cost analysis returned it
  unknown_cost_ops: int           # ops the model prices at -1 s each (added back into step_seconds)
  while_loops: int                # loops in the program: the model counts each body once
  source: str                     # which compile the figures come from
  custom_calls: list[str] = dataclasses.field(default_factory=list)   # the program's custom-call targets


@dataclasses.dataclass
class Result:
  """One compile of one config on one topology (and, for the speed figures, its unrolled twin)."""
  config: str
  overrides: dict[str, Any]
  topology: Topology
  mesh: dict[str, int]
  batch_size: int
  shard_teacher: str
  remat: str
  scan: bool
  memory: Memory | None = None
  speed: Speed | None = None
  analytic_flops_per_step: float | None = None
  lower_seconds: float = 0.0
  compile_seconds: float = 0.0
  speed_compile_seconds: float = 0.0   # the unrolled compile for the speed figures, when one was needed
  error: str = ""                      # the compiler's refusal (out of HBM), when it refused
  speed_note: str = ""
  schedule_examples: str = ""
  data_notes: list[str] = dataclasses.field(default_factory=list)   # data fields filled in without the data
  hlo: str = dataclasses.field(default="", repr=False)   # keep_hlo: the program the speed figures describe

  @property
  def fits(self) -> bool:
    return self.memory is not None and self.memory.fits

  @property
  def modeled_step_seconds(self) -> float | None:
    return self.speed.step_seconds if self.speed else None

  @property
  def compiled_flops_per_chip(self) -> float | None:
    return self.speed.flops_per_chip if self.speed else None

  @property
  def compiled_flops_per_step(self) -> float | None:
    return self.speed.flops_per_chip * self.topology.num_chips if self.speed else None

  @property
  def modeled_examples_per_second(self) -> float | None:
    return self.batch_size / self.modeled_step_seconds if self.modeled_step_seconds else None

  @property
  def modeled_mfu(self) -> float | None:
    if not self.modeled_step_seconds or not self.analytic_flops_per_step:
      return None
    return self.analytic_flops_per_step / (self.modeled_step_seconds * self.topology.num_chips
                                           * self.topology.chip.peak_bf16_flops)

  def to_json(self) -> dict:
    t = self.topology
    flops_ratio = None
    if self.compiled_flops_per_step and self.analytic_flops_per_step:
      flops_ratio = self.compiled_flops_per_step / self.analytic_flops_per_step
    s = self.speed
    return {
        "schema_version": SCHEMA_VERSION,
        "config": self.config,
        "overrides": self.overrides,
        "overrides_flags": override_flags(self.overrides),
        "topology": {"name": t.name, "num_slices": t.num_slices, "chips": t.num_chips, "chip": t.chip.name,
                     "hbm_bytes_per_chip": t.chip.hbm_bytes, "peak_bf16_flops_per_chip": t.chip.peak_bf16_flops},
        "layout": {"mesh": self.mesh, "batch_size": self.batch_size, "per_chip_batch": self.batch_size / t.num_chips,
                   "shard_teacher": self.shard_teacher, "remat": self.remat, "scan": self.scan},
        "fits": self.fits,
        "memory_per_chip": self.memory.to_json() if self.memory else None,
        "flops": {"compiled_per_chip": self.compiled_flops_per_chip,
                  "compiled_per_step": self.compiled_flops_per_step,
                  "analytic_per_step": self.analytic_flops_per_step,
                  "compiled_over_analytic": flops_ratio,
                  "note": "XLA's cost analysis counts one chip's program; per step = per chip x chips"},
        "modeled": {"step_seconds": self.modeled_step_seconds,
                    "examples_per_second": self.modeled_examples_per_second,
                    "mfu": self.modeled_mfu,
                    "bytes_accessed_per_chip": s.bytes_accessed_per_chip if s else None,
                    "raw_optimal_seconds": s.raw_optimal_seconds if s else None,
                    "unknown_cost_ops": s.unknown_cost_ops if s else None,
                    "while_loops": s.while_loops if s else None,
                    "custom_calls": s.custom_calls if s else None,
                    "from": s.source if s else None,
                    "note": self.speed_note,
                    "source": MODELED},
        "compile_seconds": self.compile_seconds,
        "speed_compile_seconds": self.speed_compile_seconds,
        "lower_seconds": self.lower_seconds,
        "error": self.error,
        "schedule_examples": self.schedule_examples,
        "data_fields_filled": self.data_notes,
        "versions": {"jax": jax.__version__, "libtpu": _libtpu_version()},
    }


_OOM = re.compile(r"RESOURCE_EXHAUSTED.*?(?:required|Used)[^(]*\(([\d.]+)([KMGT]?)\).*?(?:available HBM|of)\s*\(?"
                  r"([\d.]+)([KMGT]?)", re.S)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# Custom calls libtpu's cost model prices at -1 s each in 'optimal_seconds' (found: a program's figure is minus
# their count plus a positive remainder that grows with the work). ConcatBitcast appears in most steps, ZeroCrop
# and SliceId in multi-slice ones. See docs/scaling.md, "How far the modeled figures can be trusted".
_UNKNOWN_COST_CALLS = ("ConcatBitcast", "ZeroCrop", "SliceId")
_CUSTOM_CALL = re.compile(r'custom_call_target="(\w+)"')
_WHILE = re.compile(r"\swhile\(")


def _out_of_memory(message: str) -> tuple[int, int] | None:
  """(bytes required, bytes available) from the TPU compiler's out-of-HBM refusal, or None."""
  if "RESOURCE_EXHAUSTED" not in message:
    return None
  m = _OOM.search(message)
  if not m:
    return (0, 0)
  return int(float(m.group(1)) * _UNITS[m.group(2)]), int(float(m.group(3)) * _UNITS[m.group(4)])


def cost_figures(compiled, source: str) -> Speed:
  """The cost model's figures for one compiled TPU program, with its -1 s placeholders added back.

  While loops (scanned blocks) are reported, not corrected: the model counts a loop's body once,
  so a program with loops is under-priced by about (trip count - 1) bodies.
  """
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  text = compiled.as_text()
  calls = _CUSTOM_CALL.findall(text)
  unknown = sum(calls.count(target) for target in _UNKNOWN_COST_CALLS)
  raw = float(cost.get("optimal_seconds", 0.0))
  seconds = raw + unknown
  return Speed(flops_per_chip=float(cost.get("flops", 0.0)), bytes_accessed_per_chip=float(cost.get("bytes accessed", 0.0)),
               step_seconds=seconds if seconds > 0 else None, raw_optimal_seconds=raw, unknown_cost_ops=unknown,
               while_loops=len(_WHILE.findall(text)), source=source, custom_calls=sorted(set(calls)))


def unrolled(config) -> dict[str, Any]:
  """The overrides that unroll every scanned stack of `config` (empty when nothing is scanned)."""
  out = {}
  if config.model.get("scan"):
    out["model.scan"] = False
  if "teacher" in config and config.teacher.model.get("scan"):
    out["teacher.model.scan"] = False
  return out


def _compile(trainer):
  """(lowered, compiled or the compiler's refusal text, lower seconds, compile seconds)."""
  t0 = time.perf_counter()
  lowered = trainer.lower()
  t1 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except   # the compiler's out-of-HBM refusal is a verdict
    if _out_of_memory(str(e)) is None:
      raise
    compiled = _one_line(e)
  return compiled, t1 - t0, time.perf_counter() - t1


def compile_step(config, topology: Topology, *, config_name: str = "", overrides: dict[str, Any] | None = None,
                 train_examples: int | None = None, keep_hlo: bool = False, speed: str = "auto") -> Result:
  """Build the loop's Trainer for `config` on `topology` and compile its step for TPU (see the module doc).

  speed: 'auto' — when the step has loops (scanned stacks), the speed figures come from a second
  compile of the same step unrolled (scan off: the cost model counts a loop body once); 'as_compiled'
  — from this compile whatever it holds (flagged when it has loops); 'none' — no speed figures.
  """
  errors.check_choice("speed", speed, ["auto", "as_compiled", "none"])
  # Layers that choose a formulation per backend must trace the TPU one on this CPU host.
  with platform.compiling_for("tpu"):
    return _compile_step(config, topology, config_name=config_name, overrides=overrides,
                         train_examples=train_examples, keep_hlo=keep_hlo, speed=speed)


def _compile_step(config, topology: Topology, *, config_name: str, overrides: dict[str, Any] | None,
                  train_examples: int | None, keep_hlo: bool, speed: str) -> Result:
  overrides = dict(overrides or {})
  config = with_overrides(config, overrides) if overrides else config
  config, data_notes = data_fields_for_compile(config)
  check_config(config, topology)
  if train_examples is None:
    train_examples, examples_from = num_train_examples(config)
  else:
    examples_from = "--num_train_examples"
  devices = topology_devices(topology)
  mesh = sharding.make_mesh(config.mesh, devices)
  schedule = loop.schedule_for(config, train_examples)
  trainer = loop.build_trainer(config, mesh, schedule)
  result = Result(config=config_name, overrides=overrides, topology=topology,
                  mesh={k: int(v) for k, v in mesh.shape.items()}, batch_size=int(config.batch_size),
                  shard_teacher=str(config.get("shard_teacher", "auto")), remat=str(config.model.remat),
                  scan=bool(config.model.scan), schedule_examples=f"{train_examples} ({examples_from})",
                  data_notes=data_notes)
  result.analytic_flops_per_step = float(trainer.flops_per_step())
  compiled, result.lower_seconds, result.compile_seconds = _compile(trainer)
  if isinstance(compiled, str):   # refused: out of HBM
    required, available = _out_of_memory(compiled)
    result.error = compiled
    result.memory = Memory(argument_bytes=0, output_bytes=0, alias_bytes=0,
                           temp_bytes=required or topology.chip.hbm_bytes + 1, generated_code_bytes=0,
                           hbm_bytes=topology.chip.hbm_bytes, compiler_limit_bytes=available or None)
    return result
  m = compiled.memory_analysis()
  result.memory = Memory(argument_bytes=int(m.argument_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
                         alias_bytes=int(m.alias_size_in_bytes), temp_bytes=int(m.temp_size_in_bytes),
                         generated_code_bytes=int(m.generated_code_size_in_bytes),
                         hbm_bytes=topology.chip.hbm_bytes)
  if keep_hlo:
    result.hlo = compiled.as_text()
  if speed == "none":
    return result
  result.speed = cost_figures(compiled, "this compile")
  unroll = unrolled(config)
  if result.speed.while_loops and speed == "auto" and unroll:
    twin = loop.build_trainer(with_overrides(config, unroll), mesh, schedule)
    twin_compiled, _, result.speed_compile_seconds = _compile(twin)
    if isinstance(twin_compiled, str):
      result.speed_note = ("the unrolled step (for the speed figures) does not fit; speed figures from the scanned "
                           "step, whose loop bodies the cost model counts once: " + twin_compiled)
    else:
      result.speed = cost_figures(twin_compiled, f"the same step unrolled ({override_flags(unroll)})")
      if keep_hlo:   # the program the speed figures describe
        result.hlo = twin_compiled.as_text()
      result.speed_note = ("scanned stacks: the speed figures come from the same step compiled unrolled (the cost "
                           "model counts a loop body once)")
  if result.speed.while_loops:
    result.speed_note = result.speed_note or (f"the program has {result.speed.while_loops} loops whose bodies the "
                                              "cost model counts once: speed figures are too optimistic")
  if result.speed.step_seconds is None:
    result.speed_note = (f"the cost model gave no usable step time ('optimal_seconds' {result.speed.raw_optimal_seconds:.4g}"
                         f" after adding back {result.speed.unknown_cost_ops} unpriced ops; custom calls in the "
                         f"program: {', '.join(result.speed.custom_calls) or 'none'})")
  return result


# ------------------------------------------------------------------------------ reading the HLO

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*?)\s([a-z][a-z0-9-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s.*\{\s*$")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _array_bytes(shape_text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(shape_text):
    n = 1
    for d in dims.split(","):
      n *= int(d) if d else 1
    total += n * _BYTES[dtype]
  return total


def _where(op_name: str) -> str:
  """'jit(train_step)/transpose(jvp(Encoder))/Encoder.run_blocks/...' -> 'Encoder backward'."""
  m = re.search(r"(transpose\()?jvp\(([A-Za-z_]\w*)\)", op_name)
  if not m:
    return "optimizer and the rest"
  return f"{m.group(2)} {'backward' if m.group(1) else 'forward'}"


def _computations_with_convolution(text: str) -> set[str]:
  """Names of the computations whose body holds a convolution (how TPU HLO spells a matmul)."""
  found, current = set(), None
  for line in text.splitlines():
    header = _COMPUTATION.match(line) if not line.startswith((" ", "\t")) else None
    if header:
      current = header.group(1)
      continue
    inst = _INSTRUCTION.match(line)
    if current is not None and inst and inst.group(3) == "convolution":
      found.add(current)
  return found


_LAYER_KINDS = ("attn", "mlp", "norm", "patch_embed")
TPU_CLOCK_HZ = {"v5e": 1.5e9}   # the compiler's cycle estimates -> seconds (v5e: 197 TFLOP/s = 4 MXUs x 128^2 x 2 x 1.5 GHz)


def _layer_kind(op_name: str) -> str:
  """'.../blocks_3/attn/qkv/dot_general' -> 'attn'; the first of attn / mlp / norm / patch_embed named, else 'other'."""
  for part in op_name.split("/"):
    for kind in _LAYER_KINDS:
      if part == kind or part.startswith(kind) and part[len(kind):].isdigit():
        return kind
  return "other"


def hlo_summary(text: str) -> dict[str, Any]:
  """Where a compiled TPU step's work sits, read from its optimised HLO (each instruction once: loop bodies
  are not multiplied by their trip counts).

  cycles_by_part: the TPU compiler's cycle estimate of every top-level instruction that has one, by the
  model class the metadata names (forward / backward) and the layer kind (attention, MLP, norm, patch
  embedding, other); their sum at the chip's clock is close to the cost model's step time.
  matmul_cycles_by_module: the same estimates for the matmul (convolution) fusions alone, by model
  class (forward / backward); collectives, copies and
  transposes, dtype converts and float32 matmuls: instruction counts and output bytes per chip.
  """
  fused = set(_CALLS.findall(text))
  with_matmul = _computations_with_convolution(text)
  current, summary = None, {"cycles_by_part": {}, "matmul_cycles_by_module": {}, "collectives": {},
                            "copies_and_transposes": {},
                            "converts": {"count": 0, "bytes": 0}, "float32_matmuls": {"count": 0, "bytes": 0},
                            "while_loops": 0}
  for line in text.splitlines():
    header = _COMPUTATION.match(line) if not line.startswith((" ", "\t")) else None
    if header:
      current = header.group(1)
      continue
    if current in fused:
      continue
    inst = _INSTRUCTION.match(line)
    if not inst:
      continue
    _, shape, op = inst.groups()
    nbytes = _array_bytes(shape)
    cycles = _CYCLES.search(line)
    called = _CALLS.search(line)
    is_matmul = op == "convolution" or (op == "fusion" and called is not None and called.group(1) in with_matmul)
    name = _OP_NAME.search(line)
    op_name = name.group(1) if name else ""
    if cycles:
      part = f"{_where(op_name)} / {_layer_kind(op_name)}"
      summary["cycles_by_part"][part] = summary["cycles_by_part"].get(part, 0) + int(cycles.group(1))
    if cycles and is_matmul:
      key = _where(op_name)
      summary["matmul_cycles_by_module"][key] = summary["matmul_cycles_by_module"].get(key, 0) + int(cycles.group(1))
      if shape.startswith("f32["):
        summary["float32_matmuls"]["count"] += 1
        summary["float32_matmuls"]["bytes"] += nbytes
    base = op[:-len("-start")] if op.endswith("-start") else op
    if base in _COLLECTIVES:
      entry = summary["collectives"].setdefault(base, {"count": 0, "bytes": 0})
      entry["count"] += 1
      entry["bytes"] += nbytes
    elif op in ("copy", "transpose"):
      entry = summary["copies_and_transposes"].setdefault(op, {"count": 0, "bytes": 0})
      entry["count"] += 1
      entry["bytes"] += nbytes
    elif op == "convert":
      summary["converts"]["count"] += 1
      summary["converts"]["bytes"] += nbytes
    elif op == "while":
      summary["while_loops"] += 1
  return summary


def summary_text(summary: dict[str, Any]) -> str:
  parts = summary.get("cycles_by_part", {})
  every = sum(parts.values())
  lines = [f"All cycles (the TPU compiler's estimates, loop bodies once): {every:,} "
           f"({every / TPU_CLOCK_HZ['v5e'] * 1e3:,.1f} ms at v5e's 1.5 GHz), by model part / layer kind:"]
  for key, value in sorted(parts.items(), key=lambda kv: -kv[1]):
    if value / (every or 1) >= 0.002:
      lines.append(f"  {key:<48} {value / (every or 1):6.1%}")
  cycles = summary["matmul_cycles_by_module"]
  total = sum(cycles.values()) or 1
  lines.append("Matmul cycles (the TPU compiler's estimates, loop bodies once) by model part:")
  for key, value in sorted(cycles.items(), key=lambda kv: -kv[1]):
    lines.append(f"  {key:<40} {value / total:6.1%}")
  for title, key in (("Collectives", "collectives"), ("Copies and transposes", "copies_and_transposes")):
    items = summary[key]
    lines.append(f"{title}: " + (", ".join(f"{op} x{v['count']} ({v['bytes'] / 2**20:,.0f} MiB)"
                                         for op, v in sorted(items.items())) or "none"))
  for title, key in (("Dtype converts", "converts"), ("float32 matmul outputs", "float32_matmuls")):
    v = summary[key]
    lines.append(f"{title}: x{v['count']} ({v['bytes'] / 2**20:,.0f} MiB)")
  lines.append(f"While loops: {summary['while_loops']}")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------ search


def candidate_layouts(config, topology: Topology) -> list[dict[str, Any]]:
  """Layouts worth compiling for `config` on `topology`, most promising first (a short list, not a grid).

  Meshes: pure data parallel; fully sharded data parallel inside each slice; data x fsdp with fsdp
  16 or 8 (parameter gathers stay among neighbouring chips). Each first with the student's
  activations kept for the backward pass (remat 'none'), then recomputed ('dots': matmul outputs
  kept; 'full': nothing kept), which only pays when nothing fits. The teacher is sharded when the
  mesh has an fsdp axis ('auto').
  """
  n, slices = topology.num_chips, topology.num_slices
  per_slice = topology.chips_per_slice
  meshes = [dict(data=-1, fsdp=1, tensor=1)]
  if per_slice > 1:
    meshes.append(dict(data=slices, fsdp=per_slice, tensor=1))
  for f in (16, 8):
    if 1 < f < per_slice and per_slice % f == 0:
      meshes.append(dict(data=n // f, fsdp=f, tensor=1))
  out = []
  for remat in ("none", "dots", "full"):
    for mesh in meshes:
      layout = {f"mesh.{k}": v for k, v in mesh.items()}
      layout["model.remat"] = remat
      if "teacher" in config:
        layout["shard_teacher"] = "auto"
      out.append(layout)
  return out


def _tensor_layouts(config, topology: Topology) -> list[dict[str, Any]]:
  """Tensor parallelism, tried only when nothing else fits: these encoders are narrow, and a tensor split
  divides the batch over fewer chips."""
  out = []
  for t in (2, 4):
    if topology.chips_per_slice % t == 0:
      out.append({"mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": t, "model.remat": "dots",
                  **({"shard_teacher": "sharded"} if "teacher" in config else {})})
  return out


def search(config, topology: Topology, *, config_name: str = "", base_overrides: dict[str, Any] | None = None,
           max_compiles: int = 8, train_examples: int | None = None,
           log: Callable[[str], None] = print) -> list[Result]:
  """Compile candidate layouts (at most max_compiles), ranked: those that fit by modeled step time first.

  Every candidate is compiled with its stacks unrolled (model.scan / teacher.model.scan False, in the
  recommended overrides too): the cost model counts a loop body once, so only an unrolled step gets a
  step time, and one compile per candidate gives both its memory and its speed.
  Round 1: remat 'none' on each mesh, recomputation only while nothing fits, tensor splits last.
  Round 2, around the fastest that fits: the teacher replicated (with an fsdp axis) and, when it had
  to recompute, the next cheaper remat policy.
  """
  base = {**dict(base_overrides or {}), **unrolled(with_overrides(config, dict(base_overrides or {})))}
  config = with_overrides(config, base) if base else config
  results: list[Result] = []
  tried: set[str] = set()

  def attempt(layout: dict[str, Any]) -> None:
    key = json.dumps(layout, sort_keys=True)
    if key in tried or len(results) >= max_compiles:
      return
    tried.add(key)
    try:
      r = compile_step(config, topology, config_name=config_name, overrides=layout, train_examples=train_examples,
                       speed="as_compiled")
    except ConfigError as e:   # a layout this config cannot take (a mesh axis that does not divide)
      log(f"  skipped {override_flags(layout)}: {e}")
      return
    r.overrides = {**base, **layout}
    results.append(r)
    log("  " + _search_line(r))

  for layout in candidate_layouts(config, topology):
    if layout["model.remat"] != "none" and any(r.fits for r in results):
      break
    attempt(layout)
  if not any(r.fits for r in results):
    for layout in _tensor_layouts(config, topology):
      attempt(layout)
  fitting = ranked([r for r in results if r.fits])
  if fitting:
    best = {k: v for k, v in fitting[0].overrides.items() if k not in base}
    if "teacher" in config and best.get("mesh.fsdp", 1) > 1:
      attempt(dict(best, shard_teacher="replicated"))
    cheaper = {"full": "dots", "dots": "none"}.get(best.get("model.remat", "none"))
    if cheaper:
      attempt(dict(best, **{"model.remat": cheaper}))
  return ranked(results)


def ranked(results: Sequence[Result]) -> list[Result]:
  """Fitting layouts by modeled step time, then the others by how much memory they need."""
  def key(r: Result):
    if r.fits:
      return (0, r.modeled_step_seconds or float("inf"))
    return (1, r.memory.total_bytes if r.memory else float("inf"))
  return sorted(results, key=key)


# ------------------------------------------------------------------------------------ output


def _gib(b: float | None) -> str:
  return "-" if b is None else f"{b / GIB:.2f}"


def _search_line(r: Result) -> str:
  verdict = "FITS" if r.fits else "DOES NOT FIT"
  speed = (f", modeled step {r.modeled_step_seconds:.3f} s, MFU {r.modeled_mfu:.1%}" if r.modeled_step_seconds
           else "")
  return (f"{override_flags({k: v for k, v in r.overrides.items()}) or '(config as given)'}: {verdict}, "
          f"{_gib(r.memory.total_bytes if r.memory else None)} GiB/chip{speed} (compiled in {r.compile_seconds:.0f} s)")


def report(r: Result) -> str:
  """The human-readable table of one compile."""
  t, m = r.topology, r.memory
  lines = [f"{r.config or 'config'} on {t.describe()}" + (f" with {override_flags(r.overrides)}" if r.overrides else ""),
           f"  layout            mesh {r.mesh}, global batch {r.batch_size} ({r.batch_size / t.num_chips:g} per "
           f"chip), teacher {r.shard_teacher}, remat {r.remat}, scan {r.scan}"]
  if m is not None:
    limit = m.compiler_limit_bytes or m.hbm_bytes
    verdict = "FITS" if m.fits else "DOES NOT FIT"
    lines.append(f"  memory per chip   {verdict}: {_gib(m.total_bytes)} GiB of {_gib(limit)} GiB "
                 f"({'headroom' if m.fits else 'over by'} {_gib(abs(m.headroom_bytes))} GiB)")
    if r.error:
      lines.append(f"                    the TPU compiler refused the step: {r.error}")
    else:
      lines.append(f"                    arguments {_gib(m.argument_bytes)}, outputs {_gib(m.output_bytes)} "
                   f"(of which donated {_gib(m.alias_bytes)}), temporaries {_gib(m.temp_bytes)}, generated code "
                   f"{_gib(m.generated_code_bytes)} GiB")
  if r.compiled_flops_per_chip:
    ratio = r.compiled_flops_per_step / r.analytic_flops_per_step if r.analytic_flops_per_step else float("nan")
    lines.append(f"  FLOPs per step    compiled {r.compiled_flops_per_step:.4g} ({r.compiled_flops_per_chip:.4g} per "
                 f"chip x {t.num_chips}), analytic {r.analytic_flops_per_step:.4g}: ratio {ratio:.2f}")
  if r.speed is not None:
    lines.append(f"  speed figures     from {r.speed.source}" + (f"; {r.speed_note}" if r.speed_note else ""))
  if r.modeled_step_seconds:
    lines.append(f"  step time         {r.modeled_step_seconds * 1e3:.1f} ms  [{MODELED}]")
    lines.append(f"  examples/s        {r.modeled_examples_per_second:,.0f}  [{MODELED}]")
    lines.append(f"  MFU               {r.modeled_mfu:.1%} of {t.chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 per "
                 f"chip  [{MODELED}]")
  if r.data_notes:
    lines.append(f"  without the data  {'; '.join(r.data_notes)}")
  extra = f", unrolled twin {r.speed_compile_seconds:.1f} s" if r.speed_compile_seconds else ""
  lines.append(f"  compile           {r.compile_seconds:.1f} s (lowering {r.lower_seconds:.1f} s{extra}) on this host")
  return "\n".join(lines)


def search_report(results: Sequence[Result]) -> str:
  lines = [f"Layouts by modeled step time [{MODELED}]:", "",
           "| # | overrides | fits | GiB/chip | step s | examples/s | MFU | compile s |", "|---|---|---|---|---|---|---|---|"]
  for i, r in enumerate(results, 1):
    lines.append(f"| {i} | {override_flags(r.overrides) or '(as given)'} | {'yes' if r.fits else 'NO'} | "
                 f"{_gib(r.memory.total_bytes if r.memory else None)} | "
                 f"{r.modeled_step_seconds or float('nan'):.3f} | {r.modeled_examples_per_second or 0:,.0f} | "
                 f"{(r.modeled_mfu or 0):.1%} | {r.compile_seconds:.0f} |")
  best = next((r for r in results if r.fits), None)
  lines.append("")
  if best is None:
    lines.append("No layout tried fits: lower config.batch_size or use chips with more HBM.")
  else:
    lines.append(f"Recommended (fastest that fits; add to the overrides given): "
                 f"{override_flags(best.overrides) or '(the config as given)'}")
  return "\n".join(lines)


def _libtpu_version() -> str:
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    return metadata.version("libtpu")
  except Exception:  # pylint: disable=broad-except
    return ""


def _one_line(error: BaseException) -> str:
  text = str(error).strip() or type(error).__name__
  return " ".join(text.split())


# ------------------------------------------------------------------------------- command line

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags (defined by `python -m amd_jax.aot` only: importing this module defines none)."""
  config_flags.DEFINE_config_file("config", None, "Path to an amd_jax config file, or the name of a shipped one "
                                  "([:arg]), as for amd_jax.main; --config.a.b=v overrides apply.", lock_config=True)
  flags.DEFINE_string("topology", None, "TPU slice to compile for: v5e:16x16, v4:4x4x4, v5p:4x4x4, v6e:8x8, ...")
  flags.DEFINE_integer("num_slices", 1, "Slices of --topology joined over the data-centre network "
                       "(config.mesh.dcn_data must equal it).")
  flags.DEFINE_string("json", "", "Write the result(s) as JSON here (a local path or gs:// URL).")
  flags.DEFINE_bool("search", False, "Compile a bounded list of layouts and recommend the fastest that fits.")
  flags.DEFINE_integer("max_compiles", 8, "--search: at most this many compiles.")
  flags.DEFINE_integer("num_train_examples", 0, "Training-set size for the schedule (0: the official data set's, "
                       "or config.data's); the compiled step does not depend on it.")
  flags.DEFINE_string("hlo", "", "Write the compiled step's optimised HLO text here (without --search; the unrolled "
                      "twin's when the speed figures come from it).")
  flags.DEFINE_bool("hlo_summary", False, "Print where the step's work sits in its HLO (matmul cycles by model part, "
                    "collectives, copies, converts; without --search).")
  flags.DEFINE_bool("verbose", False, "Keep other libraries' log lines.")
  flags.mark_flags_as_required(["config", "topology"])


def _config_name() -> str:
  """The --config value as given ('--config=x' or '--config x')."""
  argv = sys.argv[1:]
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return ""


def _given_overrides() -> list[str]:
  return [a for a in sys.argv[1:] if a.startswith("--config.")]


def main(argv):
  if len(argv) > 1:
    stop(f"unexpected arguments: {' '.join(argv[1:])}")
  metrics.quiet_library_logs(verbose=FLAGS.verbose)
  config = FLAGS.config
  name = _config_name()
  given = _given_overrides()
  label = " ".join([name] + given)
  try:
    topology = parse_topology(FLAGS.topology, FLAGS.num_slices)
    examples = FLAGS.num_train_examples or None
    if not has_libtpu():
      raise ConfigError(f"compiling for TPU needs libtpu, which is not installed here: {INSTALL_HINT}")
    if FLAGS.search:
      print(f"searching layouts of {label} on {topology.describe()} (at most {FLAGS.max_compiles} compiles)",
            flush=True)
      results = search(config, topology, config_name=label, max_compiles=FLAGS.max_compiles,
                       train_examples=examples, log=lambda s: print(s, flush=True))
      if not results:
        raise ConfigError("no layout could be compiled for this config and topology (see the lines above)")
      print()
      print(report(results[0]))
      print()
      print(search_report(results))
      payload = {"search": [r.to_json() for r in results],
                 "recommended": next((r.to_json() for r in results if r.fits), None)}
    else:
      r = compile_step(config, topology, config_name=label, train_examples=examples,
                       keep_hlo=bool(FLAGS.hlo) or FLAGS.hlo_summary)
      print(report(r))
      if FLAGS.hlo_summary and r.hlo:
        print()
        print(summary_text(hlo_summary(r.hlo)))
      payload = r.to_json()
      if FLAGS.hlo and r.hlo:
        paths.write_text(FLAGS.hlo, r.hlo)
    if FLAGS.json:
      paths.write_text(FLAGS.json, json.dumps(payload, indent=2, sort_keys=True))
      print(f"wrote {FLAGS.json}")
  except ConfigError as e:
    stop(f"configuration error: {e}")


def parse_flags(argv):
  """absl's parsing (--config as for amd_jax.main: a path or a shipped config's name); an unloadable config or
  an unknown --config.x override ends in one line (exit 2)."""
  try:
    argv = config_files.resolve_flag(argv)
  except ConfigError as e:
    stop(f"configuration error: {e}")
  try:
    rest = FLAGS(argv)
    if FLAGS.config is not None:
      FLAGS.config.keys()   # a file that could not be loaded raises only when its config is first used
    return rest
  except (AttributeError, KeyError) as e:
    stop(f"configuration error: unknown config field in {', '.join(_given_overrides()) or 'the overrides'}: "
         f"{_one_line(e)}")
  except (flags.Error, OSError, ValueError, ImportError, SyntaxError) as e:
    stop(f"configuration error: {_one_line(e)}")


def stop(message: str, code: int = 2):
  print(f"amd_jax: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
