"""Sharding constraints on activations, by logical axis name.

Models name the axes of their key activations ('batch', 'seq', 'embed', 'mlp',
'heads', 'kv'); which mesh axes those names map to is the training code's
business: it sets flax's logical axis rules (nn.logical_axis_rules) and a JAX
mesh context (jax.set_mesh) around tracing. Without either (one device, a model
applied outside a mesh), `constrain` returns its input untouched.

A constraint only tells GSPMD where a value should live; it never changes a
number. A mesh axis is dropped from a dimension it does not divide (a 6-head
ViT-S on tensor=4 keeps its heads whole) and used at most once per array.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

# Logical names of the activations the encoder constrains.
TOKENS = ("batch", "seq", "embed")          # residual stream [B, N, D]
MLP_HIDDEN = ("batch", "seq", "mlp")        # fc1 output [B, N, mlp_ratio * D]
HEADS = ("batch", "seq", "heads", "kv")     # q / k / v / attention output [B, N, H, Dh]


def _mesh_axes(rule) -> tuple[str, ...]:
  if rule is None:
    return ()
  return (rule,) if isinstance(rule, str) else tuple(rule)


def logical_spec(names: Sequence[str | None], shape: Sequence[int], rules, mesh_shape: dict[str, int]) -> P:
  """PartitionSpec for an array of `shape` whose axes carry logical `names`, under `rules`."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    axes = []
    for axis in _mesh_axes(table.get(name)) if name is not None else ():
      n = mesh_shape.get(axis, 1)
      if axis in used or n == 1:
        continue
      if size % (n * math.prod(mesh_shape[a] for a in axes)):
        continue
      axes.append(axis)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return P(*spec)


def constrain(x, names: Sequence[str | None]):
  """with_sharding_constraint by logical names; a no-op without rules or outside a mesh context."""
  rules = nn.get_logical_axis_rules()
  if not rules:
    return x
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = logical_spec(names, x.shape, rules, dict(mesh.shape))
  return jax.lax.with_sharding_constraint(x, spec)
