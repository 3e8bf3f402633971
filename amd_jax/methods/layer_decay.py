"""Layer-wise learning-rate decay (BEiT / MAE fine-tuning): a factor per parameter, by the block it sits in."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

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
