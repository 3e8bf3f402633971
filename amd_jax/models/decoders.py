"""Decoders that fill in masked tokens: MAE's pixel decoder and AMD's feature generator.

Both take the encoder's tokens at the `keep` positions and predict something at
the `target` positions. Tokens are laid out as cat([visible, targets]) with the
position embedding of each token's own grid index (VideoMAE's layout). MAE's
decoder un-shuffles to grid order instead; attention does not care about token
order, so the outputs agree to float rounding, and the concatenated layout needs
no scatter and keeps shapes static.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from amd_jax.models import posemb
from amd_jax.models.vit import LN_EPS, Block, dense_init, gather_tokens


class MaskedTokenDecoder(nn.Module):
  """cat([embed(x_vis) + P[keep], mask_token + P[target]]) -> blocks -> [norm] -> [head] on targets.

  Attributes:
    grid: token grid shape, (h, w) or (t, h, w); positions index into it.
    has_cls: the input's first token is a cls token (kept through the blocks, dropped at the end).
    embed: 'bias' (MAE decoder_embed), 'nobias' (VideoMAE encoder_to_decoder) or 'none' (input
      already at `width`, as in AMD's generators).
    out_dim: width of the final Linear head; 0 = no head (return block outputs).
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

  @nn.compact
  def __call__(self, x, keep, target):
    if self.embed != "none":
      x = nn.Dense(self.width, use_bias=self.embed == "bias", kernel_init=dense_init, dtype=self.dtype,
                   name="embed")(x)
    x = x.astype(jnp.float32)
    b = x.shape[0]
    table = jnp.asarray(posemb.make_table(self.pos_emb, self.width, self.grid, cls_token=False))
    mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.width))
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
    for i in range(self.depth):
      h, _ = Block(self.width, self.num_heads, self.mlp_ratio, self.qkv_bias, self.dtype, name=f"blocks_{i}")(h)
    h = h[:, -num_targets:]
    if self.final_norm:
      h = nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, name="norm")(h)
    if self.out_dim:
      h = nn.Dense(self.out_dim, kernel_init=dense_init, dtype=self.dtype, name="head")(h)
    return h.astype(jnp.float32)

