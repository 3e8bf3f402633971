"""The one train loop, shared by every method.

mesh -> data -> abstract state (jax.eval_shape) -> shardings -> jit(init) ->
restore-or-init -> compile step (donating the state) -> loop with periodic
logging and checkpoints -> final checkpoint -> optional frozen-feature evaluation.

The loop knows a method only through amd_jax.methods.base.Method.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from amd_jax import config_validation, visualize
from amd_jax.data import pipeline, sources
from amd_jax.methods import get_method
from amd_jax.models import vit
from amd_jax.train import checkpoint, guard, metrics, optim, preemption, sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None   # exponential moving average of params when config.optim.ema_decay > 0


def schedule_steps(config, steps_per_epoch: int) -> tuple[int, int]:
  """(total_steps, warmup_steps) from *_steps or *_epochs fields."""
  total = config.total_steps if config.total_steps > 0 else int(math.ceil(config.num_epochs * steps_per_epoch))
  o = config.optim
  warmup = o.warmup_steps if o.warmup_steps >= 0 else int(round(max(o.warmup_epochs, 0.0) * steps_per_epoch))
  return total, warmup


def _local_batch_size(config) -> int:
  return config.batch_size // jax.process_count()


def _example_batch(dataset, config) -> dict:
  """One batch (its global shape) to trace init and the step with."""
  it = iter(dataset)
  local = next(it)
  _close(it)
  scale = jax.process_count()
  return {k: jnp.zeros((v.shape[0] * scale,) + v.shape[1:], v.dtype) for k, v in local.items()}


def make_train_step(method, tx, schedule, base_key, ema_decay: float = 0.0, nan_policy: str = "off"):
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
    out["grad_norm"] = optax.global_norm(grads)
    out["learning_rate"] = schedule(state.step)
    if nan_policy != "off":   # amd_jax.train.guard
      out["update_norm"] = optax.tree.norm(updates)
      finite = guard.all_finite(out["loss"], out["grad_norm"], out["update_norm"])
      if nan_policy == "skip":   # a non-finite step changes nothing but the step counter
        params, opt_state, ema = guard.keep_if_not(finite, (params, opt_state, ema),
                                                   (state.params, state.opt_state, state.ema_params))
      out = guard.flag_step(out, finite, state.step + 1, nan_policy)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), out
  return train_step


def write_run_config(workdir: str, config, allow_change: bool) -> None:
  """Record the run's config; refuse to continue a workdir that holds a different run."""
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    diffs = config_validation.identity_diff(previous, current)
    if diffs and not allow_change:
      raise config_validation.ConfigError(
          f"workdir {workdir!r} holds a run with a different config ({'; '.join(diffs[:5])}). Nothing was changed. "
          "Use a new --workdir, or pass --config.allow_config_change=True to continue this run with the new config.")
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(current, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def run(config, workdir: str) -> dict[str, float]:
  """Train `config` in `workdir` (resuming if it holds checkpoints). Returns the final metrics.

  SIGTERM/SIGINT: the step reached is checkpointed, then preemption.Preempted is raised.
  A non-finite step under config.nan_policy='stop' raises guard.NonFiniteError.
  """
  with preemption.StopRequest(agree_every=config.log_every_steps) as stop_request:
    return _run(config, workdir, stop_request)


def _run(config, workdir: str, stop_request: preemption.StopRequest) -> dict[str, float]:
  config_validation.validate(config)
  config_validation.check_workdir_writable(workdir)   # creates it
  write_run_config(workdir, config, config.allow_config_change)
  sources.reset_skipped_files()   # data/skipped_files counts this run's

  mesh = sharding.make_mesh(config.mesh)
  method = get_method(config)
  # An epoch is one pass over the distinct examples: with repeated augmentation a batch of
  # batch_size rows holds batch_size / repeated_aug of them (the official video recipes' count).
  examples_per_epoch = pipeline.num_examples(config.data, config.data.split) * config.data.repeated_aug
  steps_per_epoch = max(examples_per_epoch // config.batch_size, 1)
  total_steps, warmup_steps = schedule_steps(config, steps_per_epoch)
  logging.info("mesh %s; %d steps (%d per epoch), %d warmup", dict(mesh.shape), total_steps, steps_per_epoch,
               warmup_steps)

  # Each process loads the rows of every global batch its devices hold: the same global batches for any
  # number of processes.
  rows = sharding.process_batch_rows(sharding.batch_sharding(mesh), config.batch_size)
  dataset = pipeline.make_train_dataset(config.data, global_batch_size=config.batch_size, seed=config.seed,
                                        process_index=jax.process_index(), process_count=jax.process_count(),
                                        rows=rows)
  example = _example_batch(dataset, config)
  data_iter = iter(dataset)

  init_key, step_key = jax.random.split(jax.random.PRNGKey(config.seed))
  abstract_params = jax.eval_shape(method.init, init_key, example)
  tx, schedule = optim.make_optimizer(config.optim, batch_size=config.batch_size, total_steps=total_steps,
                                      warmup_steps=warmup_steps, layer_scales=method.layer_scales(abstract_params))
  ema_decay = float(config.optim.ema_decay)

  def init_state(rng):
    params = method.init(rng, example)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params if ema_decay > 0 else None)

  abstract = jax.eval_shape(init_state, init_key)
  use_fsdp = mesh.shape["fsdp"] > 1
  state_shardings = sharding.tree_shardings(abstract, mesh, fsdp=use_fsdp)
  batch_shard = sharding.batch_sharding(mesh)

  teacher, teacher_shardings = None, None
  if method.has_teacher:
    t_key = jax.random.PRNGKey(config.seed + 1)
    t_abstract = jax.eval_shape(method.teacher_init, t_key, example)
    t_model = config.teacher.model
    teacher = checkpoint.load_teacher(
        config.teacher, t_abstract, scan=t_model.scan, depth=vit.resolve_variant(
            t_model.variant, t_model.width, t_model.depth, t_model.num_heads)[1],
        rng_init=lambda: jax.jit(method.teacher_init)(t_key, example), data_cfg=config.data,
        parts=method.teacher_parts)
    shard = {"auto": use_fsdp, "sharded": True, "replicated": False}[config.shard_teacher]
    teacher_shardings = sharding.tree_shardings(teacher, mesh, fsdp=shard)
    teacher = jax.device_put(teacher, teacher_shardings)

  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint_every_steps, config.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is not None:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                          state_shardings)
    latest, state = ckpt.restore_latest(target, data_iter)   # falls back past unreadable steps
    logging.info("resumed from step %d in %s", latest, workdir)
  else:
    with sharding.activation_sharding(mesh, config.mesh):
      state = jax.jit(init_state, out_shardings=state_shardings)(init_key)
    pretrained = method.load_pretrained(sharding.to_host(state.params))
    if pretrained is not None:   # fine-tuning: start from a pre-trained encoder
      params = jax.device_put(pretrained, state_shardings.params)
      ema = jax.tree.map(jnp.copy, params) if ema_decay > 0 else None   # own buffers: the state is donated
      state = state.replace(params=params, ema_params=ema)
  start_step = int(jax.device_get(state.step))

  step_fn = jax.jit(make_train_step(method, tx, schedule, step_key, ema_decay, config.nan_policy),
                    in_shardings=(state_shardings, batch_shard, teacher_shardings),
                    out_shardings=(state_shardings, sharding.replicated(mesh)),
                    donate_argnums=(0,))
  t0 = time.perf_counter()
  abstract_batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=batch_shard), example)
  with sharding.activation_sharding(mesh, config.mesh):   # logical activation constraints -> mesh axes
    compiled = step_fn.lower(state, abstract_batch, teacher).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  logging.info("step compiled in %.1fs; memory analysis: %s", compile_s, memory)

  flops = method.flops_per_example(example)
  flops_per_step = 3 * flops["student"] * config.batch_size + flops["teacher"] * config.batch_size
  writer = metrics.make_writer(workdir)
  pictures = visualize.TrainingPictures(config, method, writer)   # TensorBoard images; off unless asked
  if start_step == 0:
    writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()})
  progress = metrics.Progress(total_steps, config.batch_size, flops_per_step)
  progress.reset(start_step)

  accumulate = jax.jit(guard.accumulate)
  nan_guard = guard.NanGuard(config.nan_policy, ckpt)
  acc, acc_count, pending = None, 0, None
  last_scalars: dict[str, float] = {}

  def flush(pending_item):
    """Host read of metrics accumulated up to a step that has already been dispatched."""
    step, acc_tree, count = pending_item
    values = jax.device_get(acc_tree)
    nan_guard.check_window(values, step)
    scalars = guard.window_means(values, count)
    scalars["data/skipped_files"] = float(len(sources.skipped_files()))
    scalars.update(progress.report(step))
    writer.write_scalars(step, scalars)
    return scalars

  def save(at_step: int, force: bool = False):
    """Checkpoint the state, unless it or a step not yet read is non-finite (then stop: checkpoints stay)."""
    nonlocal pending, last_scalars
    if pending is not None and config.nan_policy != "off":
      last_scalars, pending = flush(pending), None
    nan_guard.check_before_save(state, acc, at_step)
    ckpt.save(at_step, state, data_iter, force=force)

  step = start_step
  while step < total_steps:
    t_data = time.perf_counter()
    host_batch = next(data_iter)
    progress.add_data_wait(time.perf_counter() - t_data)   # perf_counter only: no device sync
    batch = sharding.global_batch(host_batch, batch_shard)
    state, step_metrics = compiled(state, batch, teacher)
    step += 1
    acc = step_metrics if acc is None else accumulate(acc, step_metrics)
    acc_count += 1
    if pending is not None:   # read the previous window one step late: no stall on the device
      last_scalars = flush(pending)
      pending = None
    if step % config.log_every_steps == 0 or step == total_steps:
      pending, acc, acc_count = (step, acc, acc_count), None, 0
    if step % config.checkpoint_every_steps == 0 and step < total_steps:
      save(step)
    pictures.maybe_write(step, state.params)   # every config.image_every_steps, before the next step donates
    if method.is_classifier and config.eval.every_steps and step % config.eval.every_steps == 0 \
        and step < total_steps:
      writer.write_scalars(step, classifier_eval(method, state, config, mesh))
    if stop_request.reached(step):   # SIGTERM/SIGINT: log, checkpoint this step below, then stop
      if acc is not None:
        pending, acc = (step, acc, acc_count), None
      break
  if pending is not None:
    last_scalars, pending = flush(pending), None
  if step > start_step or latest is None:
    save(step, force=True)
  ckpt.wait()
  _close(data_iter)
  if stop_request.stop_step is not None:
    writer.flush()
    ckpt.close()
    raise stop_request.preempted(ckpt.directory)
  final = {k: v for k, v in last_scalars.items()}
  final["compile_seconds"] = compile_s
  final["train_seconds"] = time.perf_counter() - progress.start

  if config.eval.probe:
    from amd_jax import probe  # pylint: disable=g-import-not-at-top
    results = probe.evaluate(method, state.params, config, mesh)
    writer.write_scalars(step, results)
    final.update(results)
  if method.is_classifier:
    results = classifier_eval(method, state, config, mesh)
    writer.write_scalars(step, results)
    final.update(results)
  writer.flush()
  ckpt.close()
  _log_summary(final)
  return final


def classifier_eval(method, state: TrainState, config, mesh) -> dict[str, float]:
  """Top-1/top-5 of the weights (eval/...) and of their EMA when kept (eval_ema/...)."""
  from amd_jax import evaluate  # pylint: disable=g-import-not-at-top
  results = evaluate.classification_accuracy(method.predict, state.params, config, mesh)
  if state.ema_params is not None:
    results.update(evaluate.classification_accuracy(method.predict, state.ema_params, config, mesh,
                                                    prefix="eval_ema/"))
  logging.info("step %d: %s", int(jax.device_get(state.step)),
               ", ".join(f"{k} {v:.4f}" for k, v in sorted(results.items())))
  return results


def _close(iterator):
  """Stop a grain iterator's prefetch threads/processes now rather than at interpreter exit."""
  close = getattr(iterator, "close", None)
  if close is not None:
    close()


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, key + "."))
    elif isinstance(v, (int, float, str, bool)):
      out[key] = v
  return out


def _log_summary(final: dict[str, float]):
  lines = [f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}" for k, v in sorted(final.items())]
  logging.info("final metrics:\n%s", "\n".join(lines))
  print("final metrics:\n" + "\n".join(lines), flush=True)
