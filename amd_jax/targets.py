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
  if x.ndim == 5:
    return einops.rearrange(x, "b (t p0) (h p1) (w p2) c -> b (t h w) (p0 p1 p2 c)",
                            p0=tubelet_size, p1=patch_size, p2=patch_size)
  return einops.rearrange(x, "b (h p) (w q) c -> b (h w) (p q c)", p=patch_size, q=patch_size)


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
  tokens = einops.rearrange(videos.astype(jnp.float32), "b (t p0) (h p1) (w p2) c -> b (t h w) (p0 p1 p2) c",
                            p0=tubelet_size, p1=patch_size, p2=patch_size)
  if norm_pix:
    mean = tokens.mean(axis=-2, keepdims=True)
    std = tokens.std(axis=-2, keepdims=True, ddof=1)
    tokens = (tokens - mean) / (std + NORM_EPS)
  return einops.rearrange(tokens, "b n p c -> b n (p c)")
