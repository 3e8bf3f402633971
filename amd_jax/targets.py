"""Patchify / unpatchify and the pixel regression targets of ImageMAE and VideoMAE.

Layouts (channel-last inputs):
- images [B, H, W, C]  -> [B, (h w), (p q C)]            (ImageMAE's patchify)
- videos [B, T, H, W, C] -> [B, (t h w), (p0 p1 p2 C)]    (VideoMAE's, channel innermost)
Token order matches the patch embedding's row-major flattening.
"""
from __future__ import annotations

import einops
import jax
import jax.numpy as jnp

NORM_EPS = 1e-6


def patchify(x: jax.Array, patch_size: int, tubelet_size: int = 0) -> jax.Array:
  # Each patch row's pixels and channels are contiguous: moved as one axis of patch_size * C
  # values, the transpose's minor dimension is 48 rather than 3 for RGB, which TPU's (8, 128)
  # tiles pad 2.7x instead of 43x. Same values and order as rearranging (p0 p1 p2 c).
  q = patch_size * x.shape[-1]
  runs = x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))
  if x.ndim == 5:
    return einops.rearrange(runs, "b (t p0) (h p1) (w q) -> b (t h w) (p0 p1 q)", p0=tubelet_size, p1=patch_size,
                            q=q)
  return einops.rearrange(runs, "b (h p) (w q) -> b (h w) (p q)", p=patch_size, q=q)


def unpatchify(tokens: jax.Array, grid: tuple[int, ...], patch_size: int, channels: int,
               tubelet_size: int = 0) -> jax.Array:
  """Inverse of patchify for a token grid (h, w) or (t, h, w)."""
  if len(grid) == 3:
    t, h, w = grid
    return einops.rearrange(tokens, "b (t h w) (p0 p1 p2 c) -> b (t p0) (h p1) (w p2) c",
                            t=t, h=h, w=w, p0=tubelet_size, p1=patch_size, p2=patch_size, c=channels)
  h, w = grid
  return einops.rearrange(tokens, "b (h w) (p q c) -> b (h p) (w q) c", h=h, w=w, p=patch_size, q=patch_size,
                          c=channels)


def image_target(images: jax.Array, patch_size: int, norm_pix: bool = True) -> jax.Array:
  """ImageMAE: per-patch normalisation over all p*p*C values, (v - mean) / sqrt(var + 1e-6).

  var is the unbiased estimate, as torch.Tensor.var computes it in the official code.
  """
  target = patchify(images.astype(jnp.float32), patch_size)
  if not norm_pix:
    return target
  mean = target.mean(axis=-1, keepdims=True)
  var = target.var(axis=-1, keepdims=True, ddof=1)
  return (target - mean) / jnp.sqrt(var + NORM_EPS)


def video_target(videos: jax.Array, patch_size: int, tubelet_size: int, norm_pix: bool = True) -> jax.Array:
  """VideoMAE: per-patch AND per-channel normalisation, (v - mean) / (unbiased std + 1e-6).

  `videos` are pixel values in [0, 1] (the official code un-normalises first).
  """
  tokens = patchify(videos.astype(jnp.float32), patch_size, tubelet_size)   # [B, N, (p0 p1 p2 C)]
  if not norm_pix:
    return tokens
  # Statistics per channel over the patch's pixels, computed on [B, N, p0 p1, (p2 C)] so that the
  # channel is never the minor dimension alone (see patchify): sums over the rows, then over the
  # p2 pixels of each channel; mean and std are tiled back over p2. Two passes, as torch's std.
  c = videos.shape[-1]
  rows = tokens.reshape(tokens.shape[:2] + (-1, patch_size * c))
  n = rows.shape[2] * patch_size

  def per_channel_sum(v):   # [B, N, rows, (p2 C)] -> [B, N, 1, (p2 C)]: each channel's sum, tiled over p2
    s = v.sum(axis=2).reshape(v.shape[:2] + (patch_size, c)).sum(axis=2)
    return jnp.tile(s, (1, 1, patch_size))[:, :, None]

  centred = rows - per_channel_sum(rows) / n
  std = jnp.sqrt(per_channel_sum(centred * centred) / (n - 1))
  return (centred / (std + NORM_EPS)).reshape(tokens.shape)
