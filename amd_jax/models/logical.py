"""Logical axis names: of the key activations (sharding constraints) and of every parameter (metadata).

Activations. Models name the axes of their key activations ('batch', 'seq', 'embed',
'mlp', 'heads', 'kv'); which mesh axes those names map to is the training code's
business: it sets flax's logical axis rules (nn.logical_axis_rules) and a JAX mesh
context (jax.set_mesh) around tracing. Without either (one device, a model applied
outside a mesh), `constrain` returns its input untouched. A constraint only tells
GSPMD where a value should live; it never changes a number. A mesh axis is dropped
from a dimension it does not divide (a 6-head ViT-S on tensor=4 keeps its heads
whole) and used at most once per array.

Parameters. Every parameter is created with the names of its axes (`with_axes` around
its initialiser), as flax's logical partitioning does: `Module.init` returns leaves
boxed in `ParamAxes`, `jax.eval_shape` of it gives the names without computing
anything, and amd_jax.train.sharding turns them into the state's layout by one table
of rules (PARAM_RULES). `unbox` gives the plain arrays. The names say what an axis
IS (docs/scaling.md lists them), never where it goes.
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
HEADS_MAJOR = ("batch", "heads", "seq", "kv")   # the same, head-major [B, H, N, Dh] (the TPU path)


class Axis:
  """Logical names of parameter axes (the activations' names are the tuples above)."""
  LAYERS = "layers"                  # a scanned stack's layer axis (added by nn.scan)
  EMBED = "embed"                    # the residual width of an encoder, decoder or generator
  QKV = "qkv"                        # fused q/k/v projection outputs: 3 x heads x head_dim
  HEADS = "heads"                    # attention features, heads x head_dim (attn proj input, q/v biases)
  MLP = "mlp"                        # MLP hidden units (and G2SD's predictor hidden layer)
  ENCODER_EMBED = "encoder_embed"    # a decoder's input: the encoder's width
  TEACHER_EMBED = "teacher_embed"    # a distillation target's width (projections onto a teacher)
  STUDENT_HEADS = "student_heads"    # D-MAE's attention-head mixing: student heads -> teacher heads
  TEACHER_HEADS = "teacher_heads"
  TUBELET = "tubelet"                # patch embedding kernel: frames, rows, columns, channels of a patch
  PATCH_HEIGHT = "patch_height"
  PATCH_WIDTH = "patch_width"
  CHANNELS = "channels"
  PATCH_PIXELS = "patch_pixels"      # a pixel decoder's output: the values of one patch
  CLASSES = "classes"                # classifier outputs


TOKEN_AXES = (None, None, Axis.EMBED)   # learned tokens [1, 1, width] (cls, dist, mask): broadcast axes unnamed


class ParamAxes(nn.LogicallyPartitioned):
  """A parameter with the logical names of its axes (flax metadata; `nn.get_partition_spec` reads it).

  Unboxing gives the bare value. flax's LogicallyPartitioned would add a sharding constraint,
  through the ACTIVATION rules, whenever a module reads the parameter under a mesh; amd_jax
  lays parameters out once, for the whole train state, from PARAM_RULES (train/sharding.py).
  """

  def unbox(self, apply_constraint: bool = True):
    del apply_constraint
    return self.value


def with_axes(init, names: Sequence[str | None]):
  """An initialiser whose value comes boxed with the logical names of its axes (one per axis)."""
  names = tuple(names)

  def boxed(key, shape, *args, **kwargs):
    if len(shape) != len(names):
      raise ValueError(f"parameter of shape {tuple(shape)} declared with {len(names)} axis names {names}")
    return ParamAxes(init(key, shape, *args, **kwargs), names)

  return boxed


def unbox(tree):
  """The plain arrays (or ShapeDtypeStructs) of a tree whose leaves may carry axis names."""
  return nn.meta.unbox(tree)


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
