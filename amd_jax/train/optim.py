"""Optimizer: AdamW with a weight-decay mask, warmup + cosine, clipping, layer-wise lr decay."""
from __future__ import annotations

import jax
import optax


def decay_mask(params):
  """Decay only matmul/conv kernels: never biases, norms, position embeddings, cls or mask tokens."""
  def one(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    return name == "kernel"
  return jax.tree_util.tree_map_with_path(one, params)


def learning_rate(optim_cfg, batch_size: int) -> float:
  return optim_cfg.lr if optim_cfg.lr > 0 else optim_cfg.base_lr * batch_size / 256


def make_schedule(optim_cfg, *, batch_size: int, total_steps: int, warmup_steps: int):
  peak = learning_rate(optim_cfg, batch_size)
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=optim_cfg.min_lr)


def make_optimizer(optim_cfg, *, batch_size: int, total_steps: int, warmup_steps: int,
                   frozen_mask=None, layer_scales=None):
  """Returns (optax transformation, schedule). `frozen_mask`: True for params that must not move."""
  schedule = make_schedule(optim_cfg, batch_size=batch_size, total_steps=total_steps, warmup_steps=warmup_steps)
  parts = []
  if optim_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
  parts += [optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps),
            optax.add_decayed_weights(optim_cfg.weight_decay, mask=decay_mask)]
  if layer_scales is not None:
    parts.append(_scale_tree(layer_scales))
  parts.append(optax.scale_by_learning_rate(schedule))
  tx = optax.chain(*parts)
  if frozen_mask is not None:
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               jax.tree.map(lambda f: "frozen" if f else "train", frozen_mask))
  return tx, schedule


def _scale_tree(scales):
  """Multiply each update by its own fixed factor (layer-wise lr decay)."""
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s, updates, scales), state

  return optax.GradientTransformation(init_fn, update_fn)
