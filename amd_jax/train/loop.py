"""The one train loop, shared by every method and by fine-tuning.

A run goes through named steps (each a method of _Run below):
  check the workdir   refuse a workdir holding another run, before anything is read or written
  build data          the input pipeline and the schedule (steps, warmup) it implies
  build trainer       mesh, method, optimizer, abstract state and shardings (Trainer: no arrays yet)
  build teacher       load the frozen teacher (before anything is written: a bad teacher locks nothing)
  build state         restore the latest checkpoint, or initialise (a pre-trained start included)
  record config       config.json (and, when a change is allowed, the config history)
  compile             the step, ahead of time, donating the state
  train               the steps, with logging one step late, checkpoints and SIGTERM handling
  finish              the final checkpoint, evaluation, final metrics
and every exit (finished, stopped, failed) closes the data iterator, the checkpoint manager
and the event writer.

The loop knows a method only through amd_jax.methods.base.Method. `Trainer` is also what
amd_jax.aot compiles for a TPU topology: the same step, shardings and donation.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import time
import uuid
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from amd_jax import config_validation, evaluate, paths, probe, visualize, weights
from amd_jax.data import pipeline, sources, stats
from amd_jax.errors import ConfigError
from amd_jax.methods import get_method
from amd_jax.methods.base import Method
from amd_jax.train import checkpoint, guard, metrics, optim, preemption, sharding

logger = metrics.logger

CONFIG_FILE = weights.CONFIG_FILE
HISTORY_FILE = "config_history.jsonl"   # one JSON line per allowed change of a resumed run's config
FINAL_FILE = "final_metrics.json"      # the final metrics of a finished run, returned again on a rerun
SCHEDULE_FILE = "schedule.json"        # the steps the run's schedule came to (logged when they change)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None   # exponential moving average of params when config.optim.ema_decay > 0


# ------------------------------------------------------------------ schedule


@dataclasses.dataclass(frozen=True)
class Schedule:
  examples_per_epoch: int
  steps_per_epoch: int
  total_steps: int
  warmup_steps: int

  def describe(self) -> str:
    return f"{self.total_steps} steps ({self.steps_per_epoch} per epoch), {self.warmup_steps} warmup"


def schedule_for(config, num_train_examples: int) -> Schedule:
  """Steps from the config's *_steps, *_epochs or warmup_fraction fields and the data set's size.

  An epoch is one pass over the distinct examples: with repeated augmentation a batch of
  batch_size rows holds batch_size / repeated_aug of them (the official video recipes' count).
  A warmup as long as the run or longer is cut to the run (warned): it would never reach the peak.
  """
  examples = num_train_examples * config.data.repeated_aug
  per_epoch = max(examples // config.batch_size, 1)
  total = config.total_steps if config.total_steps > 0 else int(math.ceil(config.num_epochs * per_epoch))
  o = config.optim
  if o.warmup_steps >= 0:
    warmup = int(o.warmup_steps)
  elif o.warmup_epochs >= 0:
    warmup = int(round(o.warmup_epochs * per_epoch))
  elif o.warmup_fraction >= 0:
    warmup = int(round(o.warmup_fraction * total))
  else:
    warmup = 0
  if warmup >= total:
    capped = max(total // 10, 0)
    logger.warning("the warmup (%d steps) is as long as the run (%d steps) or longer: using %d warmup steps "
                   "(10%% of the run); set optim.warmup_steps / warmup_epochs / warmup_fraction to choose.",
                   warmup, total, capped)
    warmup = capped
  return Schedule(examples_per_epoch=examples, steps_per_epoch=per_epoch, total_steps=total, warmup_steps=warmup)


# ------------------------------------------------------------------ the step


def make_train_step(method: Method, tx, lr_schedule, base_key, ema_decay: float = 0.0, nan_policy: str = "off"):
  def train_step(state: TrainState, batch, teacher_params):
    rng = jax.random.fold_in(base_key, state.step)

    def loss_fn(params):
      return method.loss(params, teacher_params, batch, rng)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema_decay > 0:
      ema = optax.incremental_update(params, ema, step_size=1.0 - ema_decay)
    out = dict(aux)
    out["loss"] = loss
    out["grad_norm"] = optax.tree.norm(grads)
    out["learning_rate"] = lr_schedule(state.step)
    if nan_policy != "off":   # amd_jax.train.guard
      out["update_norm"] = optax.tree.norm(updates)
      finite = guard.all_finite(out["loss"], out["grad_norm"], out["update_norm"])
      if nan_policy == "skip":   # a non-finite step changes nothing but the step counter
        params, opt_state, ema = guard.keep_if_not(finite, (params, opt_state, ema),
                                                   (state.params, state.opt_state, state.ema_params))
      out = guard.flag_step(out, finite, state.step + 1, nan_policy)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), out
  return train_step


def batch_spec(data_cfg, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of a global training batch (what amd_jax.data.pipeline.make_train_dataset yields)."""
  shape = (data_cfg.image_size, data_cfg.image_size, data_cfg.channels)
  if data_cfg.modality == "video":
    shape = (data_cfg.num_frames,) + shape
  return {pipeline.data_key(data_cfg): jax.ShapeDtypeStruct((batch_size,) + shape, jnp.float32),
          "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}


def _one_example(spec: dict) -> dict:
  """A one-row batch of zeros: what init needs (parameter shapes do not depend on the batch size)."""
  return {k: jnp.zeros((1,) + s.shape[1:], s.dtype) for k, s in spec.items()}


@dataclasses.dataclass
class Trainer:
  """The train step and everything its shapes and shardings come from; no data read, no arrays made.

  build_trainer(config, mesh, schedule) makes one for any mesh, including the devices of a TPU
  topology on a host without TPUs (amd_jax.aot).
  """
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  method: Method
  schedule: Schedule
  tx: optax.GradientTransformation
  lr_schedule: Any
  init_key: jax.Array
  step_key: jax.Array
  batch: dict                       # ShapeDtypeStructs of the global batch, with the batch sharding
  abstract_state: TrainState        # ShapeDtypeStructs, with the state shardings
  state_shardings: TrainState
  teacher: Any = None               # ShapeDtypeStructs of the teacher's params (with shardings), or None
  teacher_shardings: Any = None

  def init_state(self, rng) -> TrainState:
    example = _one_example(self.batch)
    params = sharding.unbox(self.method.init(rng, example))
    ema = params if self.config.optim.ema_decay > 0 else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params), ema_params=ema)

  def initialise(self) -> TrainState:
    """A fresh state on the mesh."""
    with sharding.activation_sharding(self.mesh, self.config.mesh):
      return jax.jit(self.init_state, out_shardings=self.state_shardings)(self.init_key)

  def step_fn(self):
    """The jitted step: (state, batch, teacher) -> (state, metrics), the state donated."""
    c = self.config
    step = make_train_step(self.method, self.tx, self.lr_schedule, self.step_key, float(c.optim.ema_decay),
                           c.nan_policy)
    return jax.jit(step, in_shardings=(self.state_shardings, self.batch_sharding, self.teacher_shardings),
                   out_shardings=(self.state_shardings, sharding.replicated(self.mesh)), donate_argnums=(0,))

  @property
  def batch_sharding(self):
    return sharding.batch_sharding(self.mesh)

  def lower(self):
    """The step lowered for the abstract state, batch and teacher, under the logical activation rules."""
    with sharding.activation_sharding(self.mesh, self.config.mesh):
      return self.step_fn().lower(self.abstract_state, self.batch, self.teacher)

  def flops_per_step(self) -> float:
    """Analytic model FLOPs of one step: 3 x student forward (fwd + bwd) + 1 x teacher forward."""
    example = {k: np.zeros((1,) + s.shape[1:], s.dtype) for k, s in self.batch.items()}
    flops = self.method.flops_per_example(example)
    return (3 * flops["student"] + flops["teacher"]) * self.config.batch_size


def build_trainer(config, mesh, schedule: Schedule) -> Trainer:
  method = get_method(config)
  init_key, step_key = jax.random.split(jax.random.PRNGKey(config.seed))
  batch_shard = sharding.batch_sharding(mesh)
  spec = batch_spec(config.data, config.batch_size)
  batch = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=batch_shard) for k, s in spec.items()}
  example = _one_example(spec)
  params = jax.eval_shape(method.init, init_key, example)
  tx, lr_schedule = optim.make_optimizer(config.optim, batch_size=config.batch_size,
                                         total_steps=schedule.total_steps, warmup_steps=schedule.warmup_steps,
                                         layer_scales=method.layer_scales(params))
  trainer = Trainer(config=config, mesh=mesh, method=method, schedule=schedule, tx=tx, lr_schedule=lr_schedule,
                    init_key=init_key, step_key=step_key, batch=batch, abstract_state=None, state_shardings=None)
  use_fsdp = mesh.shape["fsdp"] > 1

  def state_with_axes():   # the train state with every parameter-shaped leaf carrying its logical axis names
    p = method.init_with_axes(init_key, example)
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                      ema_params=p if config.optim.ema_decay > 0 else None)

  boxed_state = jax.eval_shape(state_with_axes)
  trainer.state_shardings = sharding.tree_shardings(boxed_state, mesh, fsdp=use_fsdp)
  trainer.abstract_state = _with_shardings(sharding.unbox(boxed_state), trainer.state_shardings)
  if method.has_teacher:
    t_key = jax.random.PRNGKey(config.seed + 1)
    boxed_teacher = jax.eval_shape(method.teacher_init_with_axes, t_key, example)
    shard = {"auto": use_fsdp, "sharded": True, "replicated": False}[config.shard_teacher]
    trainer.teacher_shardings = sharding.tree_shardings(boxed_teacher, mesh, fsdp=shard)
    trainer.teacher = teacher_storage(_with_shardings(sharding.unbox(boxed_teacher), trainer.teacher_shardings),
                                      config.teacher.model.get("dtype", "float32"))
  return trainer


_MATMUL_ONLY = ("kernel", "q_bias", "v_bias")   # leaves the model reads only through a cast to its compute dtype


def teacher_storage(tree, dtype):
  """The frozen teacher as the step takes it: matmul weights (the kernels and biases of Dense layers and patch
  projections, VideoMAE's q/v biases) stored in the teacher's compute dtype, the rest (LayerNorms, tokens) as
  they are. The model casts exactly those leaves to that dtype wherever it uses them, so storing them cast
  gives the same numbers, once instead of at every step: a bfloat16 ViT-L teacher takes half its 1.2 GB per
  chip and the step no longer reads and converts it in float32. Leaves: arrays or ShapeDtypeStructs."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return tree

  def cast(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=leaf.sharding)
    return np.asarray(leaf).astype(dtype)

  def visit(node):
    if not isinstance(node, dict):
      return node
    dense = "kernel" in node
    return {k: cast(v) if not isinstance(v, dict) and (k in _MATMUL_ONLY or (dense and k == "bias")) else visit(v)
            for k, v in node.items()}

  return visit(tree)


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def load_teacher(trainer: Trainer):
  """The frozen teacher's weights on the mesh (amd_jax.weights: a run, a PyTorch file, or 'random')."""
  config, method = trainer.config, trainer.method
  t_key = jax.random.PRNGKey(config.seed + 1)
  example = _one_example(trainer.batch)
  host = weights.load_teacher(
      config.teacher, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), trainer.teacher),
      parts=method.teacher_parts, data_cfg=config.data, student_model_cfg=config.model,
      rng_init=lambda: sharding.unbox(jax.jit(method.teacher_init)(t_key, example)))
  host = teacher_storage(host, config.teacher.model.get("dtype", "float32"))
  return jax.device_put(host, trainer.teacher_shardings)


# ------------------------------------------------------------------ a run


def run(config, workdir: str) -> dict[str, float]:
  """Train `config` in `workdir` (resuming if it holds checkpoints). Returns the final metrics.

  SIGTERM/SIGINT: the step reached is checkpointed, then preemption.Preempted is raised.
  A non-finite step under config.nan_policy='stop' raises guard.NonFiniteError; a bad config
  or source raises errors.ConfigError before anything is written; checkpoint faults raise
  checkpoint.CheckpointError.
  """
  metrics.quiet_library_logs()
  config_validation.validate(config)
  workdir = paths.resolve(workdir)
  config = resolve_data_fields(config, workdir)
  with preemption.StopRequest(agree_every=config.log_every_steps) as stop_request:
    return _Run(config, workdir, stop_request).execute()


def resolve_data_fields(config, workdir: str):
  """A copy of `config` whose data fields hold what the run uses: measured mean/std for 'auto' (cached in the
  workdir) and the class count for num_classes=0. config.json records these numbers. Fields that look left
  over from another data set are warned about."""
  stale = stats.describe_stale(config.data)
  if stale:
    logger.warning("%s", stale)
  config = copy.deepcopy(config)
  with config.unlocked():
    config.data = stats.resolve_normalisation(config.data, workdir, write_cache=jax.process_index() == 0)
    config.data.num_classes = pipeline.num_classes(config.data)
  return config


class _Run:
  """One call of run(): its steps share what they build as attributes."""

  def __init__(self, config, workdir: str, stop_request: preemption.StopRequest):
    self.config = config
    self.workdir = workdir
    self.stop_request = stop_request
    self.mesh = sharding.make_mesh(config.mesh)
    self.saved_config: dict | None = None
    self.config_changes: list[str] = []
    self.data_iter = None
    self.ckpt: checkpoint.Checkpointer | None = None
    self.writer: metrics.EventWriter | None = None
    self.progress_line: metrics.ProgressLine | None = None
    self.state = None
    self.teacher = None
    self.last_scalars: dict[str, float] = {}

  def execute(self) -> dict[str, float]:
    failed = True
    try:
      self.check_workdir()
      self.build_data()
      self.build_trainer()
      self.build_teacher()
      self.build_checkpointer()
      if self.is_complete():
        failed = False
        return self.already_complete()
      self.build_state()
      self.record_config()
      self.compile()
      self.train()
      final = self.finish()
      failed = False
      return final
    finally:
      self.close(failed)

  # --- before anything is written -----------------------------------------------------------------
  def check_workdir(self) -> None:
    """The workdir must be writable, and may hold only this run (or a run that never saved a step)."""
    c, workdir = self.config, self.workdir
    try:
      paths.makedirs(workdir)
      probe_file = paths.join(workdir, f".amd_jax_write_test_{jax.process_index()}_{uuid.uuid4().hex[:8]}")
      paths.write_bytes(probe_file, b"")
      paths.as_path(probe_file).unlink()
    except OSError as e:
      raise ConfigError(f"workdir {workdir!r} is not writable ({e.strerror or e}); choose another --workdir") \
          from None
    self.saved_config = weights.read_run_config(workdir)
    if self.saved_config is None:
      return
    has_steps = bool(checkpoint.saved_step_names(workdir))
    current = json.loads(c.to_json_best_effort())
    identity, settings = config_validation.resume_changes(self.saved_config, current)
    if not has_steps:
      if identity or settings:
        logger.info("%s holds the config of a run that saved no checkpoint; it is replaced by this run's.", workdir)
      return
    changes = identity + settings
    if changes and not c.allow_config_change:
      kind = "a different run" if identity else "the same run with other training settings"
      shown = "; ".join(changes[:6]) + (f"; ... (+{len(changes) - 6} more)" if len(changes) > 6 else "")
      raise ConfigError(
          f"workdir {workdir!r} holds {kind} ({shown}). Nothing was changed. Use a new --workdir, or pass "
          "--config.allow_config_change=True to continue this run with the new config (the change is recorded "
          f"in {HISTORY_FILE}).")
    self.config_changes = changes

  def build_data(self) -> None:
    c = self.config
    self.num_train_examples = pipeline.num_examples(c.data, c.data.split)
    self.schedule = schedule_for(c, self.num_train_examples)
    rows = sharding.process_batch_rows(sharding.batch_sharding(self.mesh), c.batch_size)
    # Each process loads the rows of every global batch its devices hold: the same global batches for any
    # number of processes.
    self.dataset = pipeline.make_train_dataset(c.data, global_batch_size=c.batch_size, seed=c.seed,
                                               process_index=jax.process_index(),
                                               process_count=jax.process_count(), rows=rows)

  def build_trainer(self) -> None:
    self.trainer = build_trainer(self.config, self.mesh, self.schedule)
    self.method = self.trainer.method
    logger.info("%s on mesh %s: %s", self.config.method, dict(self.mesh.shape), self.schedule.describe())

  def build_teacher(self) -> None:
    if self.method.has_teacher:
      self.teacher = load_teacher(self.trainer)

  def build_checkpointer(self) -> None:
    c = self.config
    self.ckpt = checkpoint.Checkpointer(self.workdir, c.checkpoint_every_steps, c.keep_checkpoints)

  def is_complete(self) -> bool:
    latest = self.ckpt.latest_step()
    return latest is not None and latest >= self.schedule.total_steps and not self.config_changes

  def already_complete(self) -> dict[str, float]:
    """A finished run, rerun: nothing to compile or train; the stored final metrics are returned."""
    latest = self.ckpt.latest_step()
    logger.info("%s: the run is already complete at step %d of %d; nothing to do (raise config.total_steps with "
                "allow_config_change=True to continue it).", self.workdir, latest, self.schedule.total_steps)
    path = paths.join(self.workdir, FINAL_FILE)
    final = json.loads(paths.read_text(path)) if paths.isfile(path) else {}
    final["already_complete"] = 1.0
    return final

  def build_state(self) -> None:
    """Restore the newest readable checkpoint, or initialise (with the method's pre-trained start)."""
    trainer = self.trainer
    self.data_iter = iter(self.dataset)
    self.latest = self.ckpt.latest_step()
    if self.latest is not None:
      self.latest, self.state = self.stop_request.interruptible(
          lambda: self.ckpt.restore_latest(trainer.abstract_state, self.data_iter),
          "restoring the checkpoint", self.ckpt.directory)
      logger.info("resumed from step %d in %s", self.latest, self.workdir)
      self._log_schedule_change()
    else:
      self.state = self.stop_request.interruptible(trainer.initialise, "initialising the train state",
                                                   self.ckpt.directory)
      self._load_initial_weights()
    self.start_step = int(jax.device_get(self.state.step))

  def _load_initial_weights(self) -> None:
    c, method, state = self.config, self.method, self.state
    host = None
    if c.init:
      expected = sharding.to_host(state.params)
      host = weights.load_initial_params(c.init, expected, c, parts=tuple(expected))
      logger.info("initial weights from %s", c.init)
    pretrained = method.load_pretrained(host if host is not None else sharding.to_host(state.params))
    host = pretrained if pretrained is not None else host
    if host is None:
      return
    params = jax.device_put(host, self.trainer.state_shardings.params)
    ema = jax.tree.map(jnp.copy, params) if c.optim.ema_decay > 0 else None   # own buffers: the state is donated
    self.state = state.replace(params=params, ema_params=ema)

  def _log_schedule_change(self) -> None:
    path = paths.join(self.workdir, SCHEDULE_FILE)
    if not paths.isfile(path):
      return
    before = json.loads(paths.read_text(path))
    now = dataclasses.asdict(self.schedule)
    changed = [f"{k} {before.get(k)} -> {v}" for k, v in now.items() if before.get(k) != v]
    if changed:
      logger.warning("the schedule of this resumed run changed: %s (the learning rate continues from step %d "
                     "on the new schedule).", ", ".join(changed), self.latest)

  # --- writing ----------------------------------------------------------------------------------------
  def record_config(self) -> None:
    """config.json (process 0), and the history line of an allowed change (never a silent overwrite)."""
    if jax.process_index() != 0:
      return
    current = json.loads(self.config.to_json_best_effort())
    if self.config_changes:
      entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "resumed_at_step": self.latest, "changes": self.config_changes, "previous": self.saved_config}
      history = paths.join(self.workdir, HISTORY_FILE)
      text = paths.read_text(history) if paths.isfile(history) else ""
      paths.write_text(history, text + json.dumps(entry, sort_keys=True) + "\n")
      logger.warning("continuing with a changed config (allow_config_change): %s; recorded in %s",
                     "; ".join(self.config_changes), history)
    paths.write_text(paths.join(self.workdir, CONFIG_FILE), json.dumps(current, indent=2, sort_keys=True))
    paths.write_text(paths.join(self.workdir, SCHEDULE_FILE), json.dumps(dataclasses.asdict(self.schedule)))

  def compile(self) -> None:
    t0 = time.perf_counter()
    self.compiled = self.stop_request.interruptible(lambda: self.trainer.lower().compile(),
                                                    "compiling the train step", self.ckpt.directory)
    self.compile_seconds = time.perf_counter() - t0
    memory = self.compiled.memory_analysis()
    if memory is not None:
      gib = lambda b: b / 2 ** 30
      logger.info("step compiled in %.1f s; per device: arguments %.2f GiB, temporaries %.2f GiB, outputs %.2f "
                  "GiB", self.compile_seconds, gib(memory.argument_size_in_bytes), gib(memory.temp_size_in_bytes),
                  gib(memory.output_size_in_bytes))
    else:
      logger.info("step compiled in %.1f s", self.compile_seconds)

  # --- the steps ---------------------------------------------------------------------------------------
  def train(self) -> None:
    c, trainer = self.config, self.trainer
    total = self.schedule.total_steps
    self.writer = metrics.EventWriter(self.workdir)
    if self.start_step == 0:
      self.writer.write_hparams(_flat(c.to_dict()))
    self.pictures = visualize.TrainingPictures(c, self.method, self.writer)
    self.throughput = metrics.Throughput(total, c.batch_size, trainer.flops_per_step())
    self.progress_line = metrics.ProgressLine(total, self.start_step)
    self.nan_guard = guard.NanGuard(c.nan_policy, self.ckpt, c.nan_max_skips, self.start_step)
    self.profile = _ProfileWindow(c.profile_steps, self.workdir)
    self.window = metrics.Window()
    self.pending: metrics.PendingWindow | None = None
    sources.reset_skipped_files()   # data/skipped_files counts this run's
    batch_shard = trainer.batch_sharding
    self.throughput.start(self.start_step)
    step = self.start_step
    while step < total:
      self.profile.before(step + 1)
      t_data = time.perf_counter()
      host_batch = next(self.data_iter)
      self.throughput.add_data_wait(time.perf_counter() - t_data)   # perf_counter only: no device sync
      batch = sharding.global_batch(host_batch, batch_shard)
      self.state, step_metrics = self.compiled(self.state, batch, self.teacher)
      step += 1
      self.profile.after(step, step_metrics)
      self.window.add(step_metrics)
      if self.pending is not None:   # read the previous window one step late: no stall on the device
        self._flush()
      if step % c.log_every_steps == 0 or step == total:
        self.pending = self.window.take(step)
      if step % c.checkpoint_every_steps == 0 and step < total:
        self._save(step)
      self.pictures.maybe_write(step, self.state.params)   # before the next step donates the params
      if self.method.is_classifier and c.eval.every_steps and step % c.eval.every_steps == 0 and step < total:
        self.writer.write_scalars(step, classifier_eval(self.method, self.state, c, self.mesh))
      if self.stop_request.reached(step):   # SIGTERM/SIGINT: checkpoint this step below, then stop
        break
    self.step = step
    if self.pending is not None:
      self._flush()
    if self.window.count:   # steps after the last log line (a stop between log steps)
      self.pending = self.window.take(step)
      self._flush()

  def _flush(self) -> None:
    """Read a closed window's metrics (already dispatched), check them, log and record them."""
    pending, self.pending = self.pending, None
    values = pending.read()
    self.nan_guard.check_window(values, pending.end_step)
    scalars = metrics.window_means(values, pending.count)
    scalars["data/skipped_files"] = float(len(sources.skipped_files()))
    scalars.update(self.throughput.window(pending.end_step))
    self.writer.write_scalars(pending.end_step, scalars)
    self.progress_line.update(pending.end_step, scalars)
    logger.info("%s", metrics.window_line(pending.end_step, self.schedule.total_steps, scalars))
    self.last_scalars = scalars

  def _save(self, at_step: int, force: bool = False) -> None:
    """Checkpoint the state, unless it or a step not yet read is non-finite (then stop: checkpoints stay)."""
    if self.pending is not None and self.config.nan_policy != "off":
      self._flush()
    self.nan_guard.check_before_save(self.state, self.window.sums, at_step)
    self.ckpt.save(at_step, self.state, self.data_iter, force=force)

  # --- the end -----------------------------------------------------------------------------------------
  def finish(self) -> dict[str, float]:
    c, step = self.config, self.step
    if step > self.start_step or self.latest is None:
      self._save(step, force=True)
    self.ckpt.wait()
    if self.stop_request.stop_step is not None:
      raise self.stop_request.preempted(self.ckpt.directory)
    final = {k: v for k, v in self.last_scalars.items() if not k.startswith("window/")}
    final.update(self.throughput.run(step))
    final["compile_seconds"] = self.compile_seconds
    final["step"] = float(step)
    self.progress_line.close()
    if c.eval.probe:
      results = probe.evaluate(self.method, self.state.params, c, self.mesh)
      self.writer.write_scalars(step, results)
      final.update(results)
    if self.method.is_classifier:
      results = classifier_eval(self.method, self.state, c, self.mesh)
      self.writer.write_scalars(step, results)
      final.update(results)
    if jax.process_index() == 0:
      paths.write_text(paths.join(self.workdir, FINAL_FILE), json.dumps(final, indent=2, sort_keys=True))
    rate = final.get("examples_per_sec")
    logger.info("finished at step %d: %.1f min of training%s", step, final.get("train_seconds", 0.0) / 60,
                f", {rate:,.1f} examples/s over the run" if rate else "")
    return final

  def close(self, failed: bool) -> None:
    """Release what the run holds, on every exit: threads left running abort the interpreter at exit."""
    for closer in (lambda: self.progress_line and self.progress_line.close(),
                   lambda: _close_iterator(self.data_iter),
                   lambda: self.writer and self.writer.close()):
      try:
        closer()
      except Exception as e:  # pylint: disable=broad-except
        logger.warning("closing after the run: %s", checkpoint.root_cause(e))
    if self.ckpt is not None:
      if failed:
        self.ckpt.abandon()
      else:
        self.ckpt.close()


class _ProfileWindow:
  """config.profile_steps='A,B': a jax.profiler trace of steps A..B in the workdir (TensorBoard's profile tab)."""

  def __init__(self, text: str, workdir: str):
    steps = [int(s) for s in str(text).replace(" ", "").split(",") if s]
    self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
    self.workdir = workdir
    self.active = False

  def before(self, step: int) -> None:
    if step == self.first and not self.active:
      jax.profiler.start_trace(self.workdir)
      self.active = True

  def after(self, step: int, step_metrics) -> None:
    if self.active and step >= self.last:
      jax.block_until_ready(step_metrics)
      jax.profiler.stop_trace()
      self.active = False
      logger.info("profile of steps %d-%d written under %s/plugins/profile", self.first, self.last, self.workdir)


def classifier_eval(method, state: TrainState, config, mesh) -> dict[str, float]:
  """Top-1/top-5 of the weights (eval/...) and of their EMA when kept (eval_ema/...)."""
  results = evaluate.classification_accuracy(method.predict, state.params, config, mesh)
  if state.ema_params is not None:
    results.update(evaluate.classification_accuracy(method.predict, state.ema_params, config, mesh,
                                                    prefix="eval_ema/"))
  logger.info("step %d: %s", int(jax.device_get(state.step)),
              ", ".join(f"{k} {v:.4f}" for k, v in sorted(results.items())))
  return results


def _close_iterator(iterator):
  """Stop a grain iterator's prefetch threads/processes now rather than at interpreter exit."""
  if iterator is not None and hasattr(iterator, "close"):
    iterator.close()


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, key + "."))
    elif isinstance(v, (int, float, str, bool)):
      out[key] = v
  return out

