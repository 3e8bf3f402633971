"""Fixed sine-cosine position embeddings (NumPy, computed once at trace time).

Two layouts exist in the MAE family and they are NOT interchangeable:
- ImageMAE's 2-D table: the first half of the channels encodes the column (w)
  coordinate, the second half the row (h) coordinate; each half is
  [sin(pos*omega), cos(pos*omega)] concatenated, omega_i = 1/10000^(i/(D/4)).
- VideoMAE's 1-D table over the flattened (t, h, w) index, INTERLEAVED:
  channel j holds sin (j even) or cos (j odd) of pos / 10000^(2*floor(j/2)/D).
"""
from __future__ import annotations

import numpy as np


def sincos_1d_concat(dim: int, positions: np.ndarray) -> np.ndarray:
  """[sin | cos] halves for a 1-D array of positions -> [len(positions), dim]."""
  if dim % 2:
    raise ValueError(f"sincos embedding width must be even, got {dim}")
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000**omega
  angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = False) -> np.ndarray:
  """ImageMAE's 2-D table [(1 if cls) + grid_h*grid_w, dim], row-major tokens."""
  if dim % 4:
    raise ValueError(f"2-D sincos embedding width must be divisible by 4, got {dim}")
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  # MAE feeds the column coordinate to the first half (its meshgrid is (w, h)).
  table = np.concatenate([sincos_1d_concat(dim // 2, cols), sincos_1d_concat(dim // 2, rows)], axis=1)
  if cls_token:
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
  return table.astype(np.float32)


def sincos_1d_interleaved(num_positions: int, dim: int) -> np.ndarray:
  """VideoMAE's 1-D table [num_positions, dim], sin on even and cos on odd channels."""
  pos = np.arange(num_positions, dtype=np.float64)[:, None]
  j = np.arange(dim)
  angles = pos / np.power(10000.0, 2 * (j // 2) / dim)[None, :]
  table = np.where(j % 2 == 0, np.sin(angles), np.cos(angles))
  return table.astype(np.float32)


def make_table(kind: str, dim: int, grid: tuple[int, ...], cls_token: bool) -> np.ndarray:
  """A table for `grid` = (h, w) or (t, h, w) tokens; the cls row (zeros) comes first if asked."""
  if kind == "sincos2d":
    if len(grid) == 3:  # video with a 2-D table: spatial table repeated over time.
      t, h, w = grid
      spatial = sincos_2d(dim, h, w, cls_token=False)
      table = np.tile(spatial, (t, 1))
    else:
      table = sincos_2d(dim, *grid, cls_token=False)
  elif kind == "sincos1d":
    table = sincos_1d_interleaved(int(np.prod(grid)), dim)
  else:
    raise ValueError(f"unknown position embedding {kind!r}; allowed: sincos2d, sincos1d")
  if cls_token:
    table = np.concatenate([np.zeros((1, dim), np.float32), table], axis=0)
  return table
