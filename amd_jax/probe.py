"""Frozen-feature evaluation: kNN and linear probe on features extracted from an encoder.

Features are extracted once (jit, batch sharded over the mesh), then:
- kNN (DINO / MAE-lite protocol): cosine similarity to every training feature,
  the k nearest vote with weight exp(sim / T). Defaults k=20, T=0.07.
- Linear probe (MAE protocol): BatchNorm without affine parameters in front of a
  linear head, trained on the frozen features. On precomputed features the
  BatchNorm statistics are the training set's mean and variance, which is what
  the BN layer converges to; the head is trained with SGD+momentum and a cosine
  schedule. No augmentation: features are computed once (documented difference).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from amd_jax import progress
from amd_jax.data import pipeline
from amd_jax.train import sharding


def extract_features(feature_fn, data_cfg, *, split: str, batch_size: int, mesh, max_examples: int = 0):
  """Run `feature_fn(batch) -> [B, D]` over a split; returns (features [N, D] float32, labels [N])."""
  dataset = pipeline.make_eval_dataset(data_cfg, split=split, batch_size=batch_size // jax.process_count(),
                                       process_index=jax.process_index(), process_count=jax.process_count(),
                                       max_examples=max_examples)
  batch_shard = sharding.batch_sharding(mesh)
  repl = sharding.replicated(mesh)

  @jax.jit
  def step(batch):
    feats = feature_fn(batch).astype(jnp.float32)
    return jax.lax.with_sharding_constraint((feats, batch["label"], batch["mask"]), repl)

  feats, labels = [], []
  t0 = time.perf_counter()
  num = pipeline.num_examples(data_cfg, split)
  num = min(num, max_examples) if max_examples > 0 else num
  total = pipeline.eval_batches_per_process(num, batch_size // jax.process_count(), jax.process_count())
  for local in progress.bar(dataset, total=total, desc=f"{split} features", unit="batch",
                            process_index=jax.process_index()):
    f, y, m = jax.device_get(step(sharding.global_batch(local, batch_shard)))
    m = np.asarray(m, bool)
    feats.append(np.asarray(f)[m])
    labels.append(np.asarray(y)[m])
  feats, labels = np.concatenate(feats), np.concatenate(labels)
  logging.info("extracted %d %s features of width %d in %.1fs", len(labels), split, feats.shape[1],
               time.perf_counter() - t0)
  return feats, labels


def knn_accuracy(train_x, train_y, test_x, test_y, *, num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk: int = 1024) -> float:
  """Weighted kNN top-1 accuracy with cosine similarity (k capped at the number of train features)."""
  k = min(k, len(train_x))
  normalize = lambda x: x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
  train_x = jnp.asarray(normalize(train_x))
  train_y = jnp.asarray(train_y)

  @jax.jit
  def predict(q):
    sims = q @ train_x.T
    top_sims, top_idx = jax.lax.top_k(sims, k)
    votes = jax.nn.one_hot(train_y[top_idx], num_classes) * jnp.exp(top_sims / temperature)[..., None]
    return jnp.argmax(votes.sum(axis=1), axis=-1)

  test_x = normalize(test_x)
  correct = 0
  for start in range(0, len(test_x), chunk):
    q = test_x[start:start + chunk]
    pad = chunk - len(q)  # keep one compiled shape
    pred = np.asarray(predict(jnp.asarray(np.pad(q, ((0, pad), (0, 0))))))[:len(q)]
    correct += int((pred == test_y[start:start + chunk]).sum())
  return correct / len(test_y)


def linear_probe_accuracy(train_x, train_y, test_x, test_y, *, num_classes: int, epochs: int = 20,
                          batch_size: int = 256, lr: float = 0.1, seed: int = 0) -> float:
  """BatchNorm(no affine) + linear head on frozen features; top-1 on the test features."""
  mean, std = train_x.mean(0), np.sqrt(train_x.var(0) + 1e-6)
  tx_, te_ = (train_x - mean) / std, (test_x - mean) / std
  n, d = tx_.shape
  batch_size = min(batch_size, n)   # fewer train features than one batch (smoke runs)
  steps_per_epoch = max(n // batch_size, 1)
  schedule = optax.cosine_decay_schedule(lr, epochs * steps_per_epoch)
  opt = optax.sgd(schedule, momentum=0.9)
  # MAE initialises the probe head with trunc-normal std 0.01 and zero bias.
  params = {"w": jax.random.normal(jax.random.PRNGKey(seed), (d, num_classes)) * 0.01,
            "b": jnp.zeros((num_classes,))}
  x_all, y_all = jnp.asarray(tx_, jnp.float32), jnp.asarray(train_y, jnp.int32)

  def loss_fn(p, x, y):
    logits = x @ p["w"] + p["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def epoch(carry, key):
    perm = jax.random.permutation(key, n)[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)

    def one(c, idx):
      p, s = c
      g = jax.grad(loss_fn)(p, x_all[idx], y_all[idx])
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    carry, _ = jax.lax.scan(one, carry, perm)
    return carry

  carry = (params, opt.init(params))
  for key in jax.random.split(jax.random.PRNGKey(seed + 1), epochs):
    carry = epoch(carry, key)
  params = carry[0]
  pred = np.asarray(jnp.argmax(jnp.asarray(te_, jnp.float32) @ params["w"] + params["b"], axis=-1))
  return float((pred == test_y).mean())


def evaluate_features(train, test, eval_cfg, num_classes: int) -> dict[str, float]:
  (train_x, train_y), (test_x, test_y) = train, test
  return {
      "knn_top1": knn_accuracy(train_x, train_y, test_x, test_y, num_classes=num_classes, k=eval_cfg.knn_k,
                               temperature=eval_cfg.knn_temperature),
      "linear_probe_top1": linear_probe_accuracy(train_x, train_y, test_x, test_y, num_classes=num_classes,
                                                 epochs=eval_cfg.probe_epochs, batch_size=eval_cfg.probe_batch_size,
                                                 lr=eval_cfg.probe_lr),
  }


def evaluate(method, params, config, mesh) -> dict[str, float]:
  """kNN and linear-probe accuracy of `method.features` on config.data (train split -> eval split)."""
  feature_fn = lambda batch: method.features(params, batch)
  e = config.eval
  kwargs = dict(batch_size=e.probe_batch_size, mesh=mesh)
  train = extract_features(feature_fn, config.data, split=config.data.split,
                           max_examples=e.max_train_examples, **kwargs)
  test = extract_features(feature_fn, config.data, split=config.data.eval_split, **kwargs)
  results = evaluate_features(train, test, e, pipeline.num_classes(config.data))
  if pipeline.eval_is_train(config.data):
    # Not a held-out figure: the probes are fitted and scored on the same (training) examples.
    logging.warning("probes: train == eval (config.data.eval_split=%r is the training split): these accuracies "
                    "are on the examples the probes were fitted to.", config.data.eval_split)
    results["eval_is_train"] = 1.0
  return results
