"""Classification evaluation: top-1 / top-5 over an eval split, single- or multi-view.

One ordered, padded pass over config.data.eval_split (amd_jax.data.pipeline.make_eval_dataset),
the batch sharded over the mesh. A video eval batch with several views per clip
(config.data.test_num_clips x test_num_crops > 1) has pixels [B, V, T, H, W, C]; every view
is classified and the softmax probabilities are averaged over the V views of an example
before top-k, as the official video test does.
"""
from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from amd_jax import methods, progress, weights
from amd_jax import probe as probe_lib
from amd_jax.data import pipeline
from amd_jax.train import sharding


def average_view_probabilities(logits: jax.Array, num_views: int) -> jax.Array:
  """[B * V, C] logits of V consecutive views per example -> [B, C] mean softmax."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return probs.reshape((-1, num_views) + probs.shape[1:]).mean(axis=1)


def topk_correct(probs: jax.Array, labels: jax.Array, mask: jax.Array, ks=(1, 5)) -> dict[str, jax.Array]:
  """Number of real (mask True) examples whose label is among the k most probable classes."""
  order = jnp.argsort(-probs, axis=-1)
  out = {}
  for k in ks:
    k_eff = min(k, probs.shape[-1])
    hit = jnp.any(order[:, :k_eff] == labels[:, None], axis=-1)
    out[f"top{k}"] = jnp.sum(hit & mask)
  return out


@functools.lru_cache(maxsize=8)
def make_eval_step(predict: Callable, key: str, mesh):
  """jit(params, batch) -> summed {'top1', 'top5', 'nll', 'count'} of one batch (replicated)."""
  repl = sharding.replicated(mesh)

  def step(params, batch):
    x = batch[key]
    multi_view = x.ndim == (6 if key == "video" else 5)
    num_views = x.shape[1] if multi_view else 1
    if multi_view:
      x = x.reshape((-1,) + x.shape[2:])
    probs = average_view_probabilities(predict(params, {**batch, key: x}), num_views)
    labels, mask = batch["label"], batch["mask"]
    out = topk_correct(probs, labels, mask)
    picked = jnp.take_along_axis(probs, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
    out["nll"] = -jnp.sum(jnp.where(mask, jnp.log(picked + 1e-12), 0.0))
    out["count"] = jnp.sum(mask)
    return jax.lax.with_sharding_constraint(out, repl)
  return jax.jit(step)


def classification_accuracy(predict: Callable, params, config, mesh, *, max_examples: int = 0,
                            prefix: str = "eval/") -> dict[str, float]:
  """{'eval/top1', 'eval/top5', 'eval/loss', 'eval/examples'} of `predict(params, batch) -> logits`."""
  key = pipeline.data_key(config.data)
  batch_size = config.eval.batch_size if config.eval.get("batch_size", 0) > 0 else config.batch_size
  dataset = pipeline.make_eval_dataset(config.data, split=config.data.eval_split,
                                       batch_size=batch_size // jax.process_count(),
                                       process_index=jax.process_index(), process_count=jax.process_count(),
                                       max_examples=max_examples)
  step = make_eval_step(predict, key, mesh)
  batch_shard = sharding.batch_sharding(mesh)
  totals = None
  t0 = time.perf_counter()
  num = pipeline.num_examples(config.data, config.data.eval_split)
  num = min(num, max_examples) if max_examples > 0 else num
  total = pipeline.eval_batches_per_process(num, batch_size // jax.process_count(), jax.process_count())
  for local in progress.bar(dataset, total=total, desc=f"{config.data.eval_split} top-k", unit="batch",
                            process_index=jax.process_index()):
    out = step(params, sharding.global_batch(local, batch_shard))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = {k: float(v) for k, v in jax.device_get(totals).items()}
  count = max(totals["count"], 1.0)
  logging.info("evaluated %d %s examples in %.1fs", int(totals["count"]), config.data.eval_split,
               time.perf_counter() - t0)
  return {f"{prefix}top1": totals["top1"] / count, f"{prefix}top5": totals["top5"] / count,
          f"{prefix}loss": totals["nll"] / count, f"{prefix}examples": float(np.int64(totals["count"]))}


# ------------------------------------------------------------------ evaluating a finished run


def load_run(workdir: str, step: int | None = None):
  """(config, method, params) of the amd_jax run in `workdir` (its config.json over today's defaults,
  and a checkpoint: the latest unless `step` is given)."""
  config, params = weights.load_run(workdir, methods.known_fields, step)
  return config, methods.get_method(config), jax.tree.map(jnp.asarray, params)


def evaluate_workdir(workdir: str, *, step: int | None = None, probe: bool = True,
                     max_train_examples: int = -1) -> dict[str, float]:
  """kNN + linear probe of a run's encoder, and top-1/top-5 when the run is a classifier."""
  config, method, params = load_run(workdir, step)
  if max_train_examples >= 0:
    config.eval.max_train_examples = max_train_examples
  mesh = sharding.make_mesh(config.mesh)
  results = {}
  if probe:
    results.update(probe_lib.evaluate(method, params, config, mesh))
  if method.is_classifier:
    results.update(classification_accuracy(method.predict, params, config, mesh))
  return results


def main(argv):
  del argv
  f = flags.FLAGS
  results = evaluate_workdir(f.workdir, step=f.step if f.step >= 0 else None, probe=f.probe,
                             max_train_examples=f.max_train_examples)
  print("\n".join(f"{k}: {v:.4f}" for k, v in sorted(results.items())), flush=True)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "workdir of an amd_jax run (pre-training or fine-tuning)", required=True)
  flags.DEFINE_integer("step", -1, "checkpoint step (-1: the latest)")
  flags.DEFINE_bool("probe", True, "kNN and linear probe on frozen features")
  flags.DEFINE_integer("max_train_examples", -1, "train features for the probes (-1: the run's setting, 0: all)")
  app.run(main)
