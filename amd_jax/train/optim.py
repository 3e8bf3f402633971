"""Optimizer: AdamW with a weight-decay mask, warmup + cosine, clipping, layer-wise lr decay."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
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


_BLOCK = re.compile(r"blocks_(\d+)")


def layer_id(path: str, depth: int) -> int:
  """BEiT/MAE layer ids: embeddings 0, block i -> i+1, everything after the blocks depth+1."""
  if re.search(r"(patch_embed|cls_token|dist_token|pos_embed)", path):
    return 0
  m = _BLOCK.search(path)
  if m and path.startswith("encoder"):
    return int(m.group(1)) + 1
  return depth + 1


def layer_decay_scales(params, depth: int, decay: float):
  """Multiplier decay**(depth + 1 - layer_id) for every parameter.

  A scanned encoder stores its blocks stacked on a leading layer axis
  (encoder/blocks/block/...): its scale is an array [depth, 1, ...] that
  broadcasts against the leaf, block i getting decay**(depth - i).
  """
  def one(path, leaf):
    p = "/".join(str(getattr(k, "key", k)) for k in path)
    if p.startswith("encoder/blocks/block/"):
      per_layer = decay ** (depth - np.arange(leaf.shape[0], dtype=np.float64))
      return jnp.asarray(per_layer.reshape((-1,) + (1,) * (len(leaf.shape) - 1)), jnp.float32)
    return decay ** (depth + 1 - layer_id(p, depth))
  return jax.tree_util.tree_map_with_path(one, params)


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
