"""Analytic matmul FLOP counts (2 per multiply-add), as maxtext counts them for MFU."""
from __future__ import annotations


def block_flops(tokens: int, width: int, mlp_ratio: float = 4.0) -> float:
  """One pre-LN transformer block's forward: qkv, scores, weighted sum, proj, MLP."""
  n, d = tokens, width
  hidden = int(d * mlp_ratio)
  dense = 2 * n * (3 * d * d + d * d + 2 * d * hidden)
  attention = 2 * 2 * n * n * d
  return float(dense + attention)


def stack_flops(tokens: int, width: int, depth: int, mlp_ratio: float = 4.0) -> float:
  return depth * block_flops(tokens, width, mlp_ratio)


def linear_flops(tokens: int, d_in: int, d_out: int) -> float:
  return float(2 * tokens * d_in * d_out)
