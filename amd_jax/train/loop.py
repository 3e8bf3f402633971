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

from amd_jax import config_validation
from amd_jax.data import pipeline
from amd_jax.methods import get_method
from amd_jax.models import vit
from amd_jax.train import checkpoint, metrics, optim, sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


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


def make_train_step(method, tx, schedule, base_key):
  def train_step(state: TrainState, batch, teacher_params):
    rng = jax.random.fold_in(base_key, state.step)

    def loss_fn(params):
      return method.loss(params, teacher_params, batch, rng)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    out = dict(aux)
    out["loss"] = loss
    out["grad_norm"] = optax.global_norm(grads)
    out["learning_rate"] = schedule(state.step)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), out
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
  """Train `config` in `workdir` (resuming if it holds checkpoints). Returns the final metrics."""
  config_validation.validate(config)
  os.makedirs(workdir, exist_ok=True)
  config_validation.check_workdir_writable(workdir)
  write_run_config(workdir, config, config.allow_config_change)

  mesh = sharding.make_mesh(config.mesh)
  method = get_method(config)
  steps_per_epoch = max(pipeline.num_examples(config.data, config.data.split) // config.batch_size, 1)
  total_steps, warmup_steps = schedule_steps(config, steps_per_epoch)
  logging.info("mesh %s; %d steps (%d per epoch), %d warmup", dict(mesh.shape), total_steps, steps_per_epoch,
               warmup_steps)

  dataset = pipeline.make_train_dataset(config.data, global_batch_size=config.batch_size, seed=config.seed,
                                        process_index=jax.process_index(), process_count=jax.process_count())
  example = _example_batch(dataset, config)
  data_iter = iter(dataset)

  tx, schedule = optim.make_optimizer(config.optim, batch_size=config.batch_size, total_steps=total_steps,
                                      warmup_steps=warmup_steps)
  init_key, step_key = jax.random.split(jax.random.PRNGKey(config.seed))

  def init_state(rng):
    params = method.init(rng, example)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

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
    state = ckpt.restore(latest, target, data_iter)
    logging.info("resumed from step %d in %s", latest, workdir)
  else:
    state = jax.jit(init_state, out_shardings=state_shardings)(init_key)
  start_step = int(jax.device_get(state.step))

  step_fn = jax.jit(make_train_step(method, tx, schedule, step_key),
                    in_shardings=(state_shardings, batch_shard, teacher_shardings),
                    out_shardings=(state_shardings, sharding.replicated(mesh)),
                    donate_argnums=(0,))
  t0 = time.perf_counter()
  abstract_batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=batch_shard), example)
  compiled = step_fn.lower(state, abstract_batch, teacher).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  logging.info("step compiled in %.1fs; memory analysis: %s", compile_s, memory)

  flops = method.flops_per_example(example)
  flops_per_step = 3 * flops["student"] * config.batch_size + flops["teacher"] * config.batch_size
  writer = metrics.make_writer(workdir)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()})
  progress = metrics.Progress(total_steps, config.batch_size, flops_per_step)
  progress.reset(start_step)

  accumulate = jax.jit(lambda acc, m: jax.tree.map(jnp.add, acc, m))
  acc, acc_count, pending = None, 0, None
  last_scalars: dict[str, float] = {}

  def flush(pending_item):
    """Host read of metrics accumulated up to a step that has already been dispatched."""
    step, acc_tree, count = pending_item
    values = jax.device_get(acc_tree)
    scalars = {k: float(v) / count for k, v in values.items()}
    scalars.update(progress.report(step))
    writer.write_scalars(step, scalars)
    return scalars

  step = start_step
  while step < total_steps:
    batch = sharding.global_batch(next(data_iter), batch_shard)
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
      ckpt.save(step, state, data_iter)
  if pending is not None:
    last_scalars = flush(pending)
  if step > start_step or latest is None:
    ckpt.save(step, state, data_iter, force=True)
  ckpt.wait()
  _close(data_iter)
  final = {k: v for k, v in last_scalars.items()}
  final["compile_seconds"] = compile_s
  final["train_seconds"] = time.perf_counter() - progress.start

  if config.eval.probe:
    from amd_jax import probe  # pylint: disable=g-import-not-at-top
    results = probe.evaluate(method, state.params, config, mesh)
    writer.write_scalars(step, results)
    final.update(results)
  writer.flush()
  ckpt.close()
  _log_summary(final)
  return final


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
