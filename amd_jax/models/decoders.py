"""Decoders that fill in masked tokens: MAE's pixel decoder, AMD's feature generator, G2SD's feature decoder.

Both take the encoder's tokens at the `keep` positions and predict something at
the `target` positions. Tokens are laid out as cat([visible, targets]) with the
position embedding of each token's own grid index (VideoMAE's layout). MAE's
decoder un-shuffles to grid order instead; attention does not care about token
order, so the outputs agree to float rounding, and the concatenated layout needs
no scatter and keeps shapes static.

Initialisation follows the encoder's `init_scheme` (amd_jax.models.vit): 'mae' gives the
mask token N(0, 0.02) and a xavier-uniform input projection, as MAE; 'videomae' gives what
the official VideoMAE/AMD code gives: the mask token truncated normal with std 0.02 cut at
+-0.02 (one std: the official wrapper of timm's trunc_normal_ passes a=-std, b=std), and
the input projection (encoder_to_decoder, built outside the modules that re-initialise
their Linears) at PyTorch's default Linear init. Every parameter carries logical axis names.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from amd_jax.models import logical, posemb
from amd_jax.models.logical import Axis
from amd_jax.models.vit import (Block, check_init_scheme, dense_init, gather_tokens, layer_norm, named_dense,
                                torch_default_init)


def truncated_normal_one_std(stddev: float):
  """N(0, stddev^2) truncated to [-stddev, stddev] (not rescaled): timm's trunc_normal_(std, a=-std, b=std).

  The values' standard deviation is about 0.54 stddev. flax's truncated_normal instead cuts at two
  standard deviations and rescales to the requested std.
  """
  def init(key, shape, dtype=jnp.float32):
    return stddev * jax.random.truncated_normal(key, -1.0, 1.0, shape, dtype)

  return init


class MaskedTokenDecoder(nn.Module):
  """cat([embed(x_vis) + P[keep], mask_token + P[target]]) -> blocks -> [norm] -> [head] on targets.

  Attributes:
    grid: token grid shape, (h, w) or (t, h, w); positions index into it.
    has_cls: the input's first token is a cls token (kept through the blocks, dropped at the end).
    embed: 'bias' (MAE decoder_embed), 'nobias' (VideoMAE encoder_to_decoder) or 'none' (input
      already at `width`, as in AMD's generators).
    out_dim: width of the final Linear head; 0 = no head (return block outputs).
    max_depth: > 0 runs only the first max_depth blocks (G2SD's teacher stops after block 4
      of 8); the blocks after it, and the norm and head if configured, still exist in the
      params of a full decoder, so pass `final_norm=False, out_dim=0` to read raw block outputs.
    return_all: return every token (the cls token first when has_cls, then the grid in
      row-major order) instead of the target tokens only. `keep` and `target` must then
      cover the grid exactly once (G2SD supervises all tokens).
  """
  width: int
  depth: int
  num_heads: int
  grid: tuple[int, ...]
  out_dim: int = 0
  mlp_ratio: float = 4.0
  qkv_bias: str = "fused"
  pos_emb: str = "sincos2d"
  has_cls: bool = False
  embed: str = "bias"
  final_norm: bool = True
  train_mask_token: bool = True
  dtype: Any = jnp.float32
  max_depth: int = 0
  return_all: bool = False
  init_scheme: str = "mae"   # mae | videomae (module docstring)

  @nn.compact
  def __call__(self, x, keep, target):
    check_init_scheme(self.init_scheme)
    official_video = self.init_scheme == "videomae"
    if self.embed != "none":
      embed_init = torch_default_init() if official_video else dense_init
      x = nn.Dense(self.width, use_bias=self.embed == "bias", dtype=self.dtype, name="embed",
                   **named_dense((Axis.ENCODER_EMBED, Axis.EMBED), embed_init))(x)
    x = x.astype(jnp.float32)
    b = x.shape[0]
    table = jnp.asarray(posemb.make_table(self.pos_emb, self.width, self.grid, cls_token=False))
    token_init = truncated_normal_one_std(0.02) if official_video else nn.initializers.normal(0.02)
    mask_token = self.param("mask_token", logical.with_axes(token_init, logical.TOKEN_AXES), (1, 1, self.width))
    if not self.train_mask_token:
      # Parity with the official AMD generators, whose mask tokens are never registered.
      mask_token = jax.lax.stop_gradient(mask_token)
    pos = lambda idx: gather_tokens(jnp.broadcast_to(table[None], (b,) + table.shape), idx)
    parts = []
    if self.has_cls:
      parts.append(x[:, :1])  # cls row of the table is zeros
      x = x[:, 1:]
    parts.append(x + pos(keep))
    num_targets = target.shape[1]
    parts.append(jnp.broadcast_to(mask_token, (b, num_targets, self.width)) + pos(target))
    h = jnp.concatenate(parts, axis=1)
    depth = min(self.max_depth, self.depth) if self.max_depth > 0 else self.depth
    for i in range(depth):
      h, _ = Block(self.width, self.num_heads, self.mlp_ratio, self.qkv_bias, self.dtype, name=f"blocks_{i}")(h)
    if self.return_all:
      h = self._grid_order(h, keep, target)
    else:
      h = h[:, -num_targets:]
    if self.final_norm:
      h = layer_norm("norm")(h)
    if self.out_dim:
      h = nn.Dense(self.out_dim, dtype=self.dtype, name="head", **named_dense((Axis.EMBED, Axis.PATCH_PIXELS)))(h)
    return h.astype(jnp.float32)

  def _grid_order(self, h, keep, target):
    """cat([cls?, keep tokens, target tokens]) -> cat([cls?, tokens in grid order]) by the inverse permutation."""
    num_cls = int(self.has_cls)
    order = jnp.concatenate([keep, target], axis=1)
    if order.shape[1] != int(np.prod(self.grid)):
      raise ValueError(f"return_all needs keep ({keep.shape[1]}) + target ({target.shape[1]}) tokens to cover the "
                       f"grid of {int(np.prod(self.grid))} tokens")
    body = gather_tokens(h[:, num_cls:], jnp.argsort(order, axis=1))
    return jnp.concatenate([h[:, :num_cls], body], axis=1)


class FeaturePredictor(nn.Module):
  """G2SD's prediction head on the student decoder: Linear -> exact GELU -> Linear (`hidden`, then `out_dim`)."""
  hidden: int
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    # Named like an MLP: the hidden layer splits over 'tensor' as the blocks' fc1/fc2 do.
    x = nn.Dense(self.hidden, dtype=self.dtype, name="fc1", **named_dense((Axis.EMBED, Axis.MLP)))(x)
    x = nn.gelu(x, approximate=False)
    x = nn.Dense(self.out_dim, dtype=self.dtype, name="fc2", **named_dense((Axis.MLP, Axis.TEACHER_EMBED)))(x)
    return x.astype(jnp.float32)

