"""Device mesh, parameter/state shardings from logical axis names, activation rules, and batch sharding.

Axes: 'data' (pure data parallel), 'fsdp' (data parallel with parameters and
optimizer state sharded), 'tensor' (Megatron-style split of attention and MLP
matmuls). GSPMD inserts the communication; any choice of rules is correct, the
rules only decide what is stored where.

Multi-slice TPU runs (config.mesh.dcn_data > 1) split the data axis between
slices: data-parallel gradient reductions are the only traffic that crosses the
slow data-centre network, while fsdp and tensor stay inside a slice's ICI.

Activations carry logical axis names (amd_jax.models.logical); `DEFAULT_RULES`
maps them onto the mesh, config.mesh.rules overrides single names, and
`activation_sharding` makes the mapping visible to the model while it is traced.

Parameters carry logical axis names too, declared where the models create them;
`PARAM_RULES` says which mesh axes each name may be split over and `tree_shardings`
lays out a whole train state (params, Adam moments, EMA) or a teacher from them.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from amd_jax.models import logical

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical activation axis -> mesh axes (flax's rule format). The batch is split like
# the input batch; tokens and the residual width stay whole; the MLP hidden units
# and attention heads follow the column-split qkv / fc1 kernels onto 'tensor'.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("seq", None),
    ("embed", None),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv", None),
)
LOGICAL_AXES = tuple(name for name, _ in DEFAULT_RULES)


def _fail(field: str, value, allowed: str):
  raise ValueError(f"config.mesh.{field}={value!r} is invalid: {allowed}")


def parse_rules(text: str) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
  """'mlp=tensor,embed=,batch=data+fsdp' over DEFAULT_RULES: each entry replaces one name's mesh axes.

  An empty right-hand side keeps that logical axis whole (replicated).
  """
  table = dict(DEFAULT_RULES)
  for item in str(text).replace(" ", "").split(","):
    if not item:
      continue
    name, eq, value = item.partition("=")
    if not eq or name not in table:
      _fail("rules", text, f"expected comma-separated name=axis[+axis] entries with names from "
            f"{', '.join(LOGICAL_AXES)}, e.g. 'mlp=tensor,embed='")
    axes = tuple(a for a in value.split("+") if a)
    bad = [a for a in axes if a not in AXES]
    if bad or len(set(axes)) != len(axes):
      _fail("rules", text, f"{name}={value!r}: mesh axes must be distinct names from {', '.join(AXES)}")
    table[name] = axes or None
  return tuple(table.items())


def num_slices(devices) -> int:
  """TPU slices among `devices` (devices without a slice_index count as one slice)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def mesh_shape(mesh_cfg, num_devices: int, slices: int | None = None) -> tuple[int, int, int]:
  """Resolve the one -1 entry so the product equals the device count; check slices and rules.

  `slices` defaults to the slices of jax.devices(): config.mesh.dcn_data must equal it.
  """
  sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got data={sizes[0]} fsdp={sizes[1]} "
                     f"tensor={sizes[2]}")
  if any(s < 1 and s != -1 for s in sizes):
    raise ValueError(f"config.mesh: axis sizes must be >= 1 (or one -1), got data={sizes[0]} fsdp={sizes[1]} "
                     f"tensor={sizes[2]}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh: {num_devices} devices cannot be split with fixed axes of product {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"config.mesh: data*fsdp*tensor = {int(np.prod(sizes))} but there are {num_devices} devices")
  dcn = int(mesh_cfg.get("dcn_data", 1))
  slices = num_slices(jax.devices()) if slices is None else slices
  if dcn < 1:
    _fail("dcn_data", dcn, "the number of TPU slices the data axis spans must be >= 1")
  if dcn != slices:
    _fail("dcn_data", dcn, f"it must equal the number of TPU slices, {slices} here")
  if sizes[0] % dcn:
    _fail("dcn_data", dcn, f"it must divide the data axis ({sizes[0]}): each slice holds data/dcn_data of it")
  parse_rules(mesh_cfg.get("rules", ""))
  return tuple(sizes)


def slice_shapes(mesh_cfg, num_devices: int, slices: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
  """(per-slice ICI mesh shape, DCN mesh shape): the data axis is split between slices, outermost."""
  data, fsdp, tensor = mesh_shape(mesh_cfg, num_devices, slices)
  return (data // slices, fsdp, tensor), (slices, 1, 1)


def device_grid(mesh_cfg, devices) -> np.ndarray:
  """The [data, fsdp, tensor] array of devices: one slice (ICI-aware order) or a hybrid multi-slice grid."""
  slices = num_slices(devices)
  ici, dcn = slice_shapes(mesh_cfg, len(devices), slices)
  if slices > 1:
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
  try:
    return mesh_utils.create_device_mesh(ici, devices=devices)
  except (AssertionError, NotImplementedError, ValueError):
    return np.asarray(devices).reshape(ici)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = devices if devices is not None else jax.devices()
  return Mesh(device_grid(mesh_cfg, devices), AXES)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, mesh_cfg=None):
  """Trace models under this: their logical activation constraints then map onto `mesh`."""
  rules = parse_rules(mesh_cfg.get("rules", "") if mesh_cfg is not None else "")
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# Parameter axis name -> the mesh axes it may be split over. Resolution, per parameter (param_spec):
#  - 'tensor' first, Megatron style, on matrices only: the layers that fan out are split along their
#    outputs (qkv, fc1: 'qkv' and 'mlp' axes), those that fan back in along their inputs (attn proj, fc2:
#    'heads' and 'mlp' axes), so each device keeps whole attention heads and MLP units between the two;
#  - then 'fsdp' (ZeRO-3: storage only, the step gathers a parameter before using it) on the LARGEST axis
#    left that it divides, the first on ties: the most even split and the fewest parameters that stay whole;
#  - a parameter with a single axis (bias, norm scale, q/v bias) stays whole: splitting a few hundred
#    numbers saves nothing and adds a gather; a scanned stack's vectors [layers, n] are split like matrices;
#  - the 'layers' axis of a scanned stack is never split (each scan step reads one layer whole);
#  - a mesh axis is used once per parameter, and only where it divides the axis evenly.
# Names the table does not list (a user's own module) and unnamed axes may take 'fsdp' only, so a plain
# tree without names (a teacher read from a file) gets the fsdp layout and no tensor split.
_FSDP_ONLY = ("fsdp",)
PARAM_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (logical.Axis.LAYERS, ()),
    (logical.Axis.QKV, ("tensor", "fsdp")),
    (logical.Axis.HEADS, ("tensor", "fsdp")),
    (logical.Axis.MLP, ("tensor", "fsdp")),
    (logical.Axis.EMBED, _FSDP_ONLY),
    (logical.Axis.ENCODER_EMBED, _FSDP_ONLY),
    (logical.Axis.TEACHER_EMBED, _FSDP_ONLY),
    (logical.Axis.STUDENT_HEADS, _FSDP_ONLY),
    (logical.Axis.TEACHER_HEADS, _FSDP_ONLY),
    (logical.Axis.TUBELET, _FSDP_ONLY),
    (logical.Axis.PATCH_HEIGHT, _FSDP_ONLY),
    (logical.Axis.PATCH_WIDTH, _FSDP_ONLY),
    (logical.Axis.CHANNELS, _FSDP_ONLY),
    (logical.Axis.PATCH_PIXELS, _FSDP_ONLY),
    (logical.Axis.CLASSES, _FSDP_ONLY),
)
# The order in which mesh axes are placed: tensor's place is fixed by the layer's role, fsdp takes what is left.
_PARAM_MESH_AXES = ("tensor", "fsdp")


def param_spec(names: Sequence[str | None], shape: Sequence[int], mesh_shape: dict[str, int],
               fsdp: bool = True, rules=PARAM_RULES) -> P:
  """PartitionSpec of one parameter-shaped leaf (a parameter, its Adam moments, its EMA) from its axis names."""
  shape, names = tuple(shape), tuple(names)
  if len(names) != len(shape):
    raise ValueError(f"{len(names)} axis names {names} for a parameter of shape {shape}")
  if len(shape) < 2:
    return P()
  table = dict(rules)
  allowed = [table.get(name, _FSDP_ONLY) if name is not None else _FSDP_ONLY for name in names]
  is_matrix = sum(name != logical.Axis.LAYERS for name in names) >= 2
  spec: list[str | None] = [None] * len(shape)
  for axis in _PARAM_MESH_AXES:
    size = mesh_shape.get(axis, 1)
    if size == 1 or (axis == "fsdp" and not fsdp) or (axis == "tensor" and not is_matrix):
      continue
    fits = [i for i in range(len(shape)) if spec[i] is None and axis in allowed[i] and shape[i] % size == 0]
    if fits:
      spec[max(fits, key=lambda i: shape[i])] = axis   # max keeps the first of equals
  return P(*spec)


def _is_boxed(leaf) -> bool:
  return isinstance(leaf, nn.meta.AxisMetadata)


def tree_specs(tree, mesh_shape: dict[str, int], fsdp: bool = True):
  """PartitionSpecs for the UNBOXED form of `tree`: leaves boxed with axis names (jax.eval_shape of an
  init that keeps them) are laid out by their names, plain leaves (arrays, ShapeDtypeStructs) by fsdp alone."""
  def one(leaf):
    names = getattr(leaf, "names", None) if _is_boxed(leaf) else None
    shape = tuple(getattr(leaf, "value", leaf).shape)   # the box's value: no unbox hook (constraints) runs
    return param_spec(names if names is not None else (None,) * len(shape), shape, mesh_shape, fsdp)
  return jax.tree.map(one, tree, is_leaf=_is_boxed)


def tree_shardings(abstract_tree, mesh: Mesh, fsdp: bool = True):
  """NamedShardings for the unboxed form of `abstract_tree` (see tree_specs), e.g. jax.eval_shape of the
  train state built from the methods' boxed init: the result matches `unbox(abstract_tree)` leaf for leaf."""
  specs = tree_specs(abstract_tree, dict(mesh.shape), fsdp)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """Per-process numpy batch -> global jax.Arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def process_batch_rows(sharding: NamedSharding, global_batch_size: int) -> tuple[int, ...]:
  """Rows of the global batch this process's devices hold, ascending.

  make_array_from_process_local_data puts the process's local rows there in this
  order, so a pipeline that loads exactly these rows of each global batch gives the
  same global batch whatever the number of processes.
  """
  rows = set()
  for index in sharding.addressable_devices_indices_map((global_batch_size,)).values():
    rows.update(range(*index[0].indices(global_batch_size)))
  return tuple(sorted(rows))


def to_host(tree):
  """Host numpy copy of a tree of global arrays, gathering those no single process holds whole."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(one, tree)


def unbox(tree):
  """The plain arrays (or ShapeDtypeStructs) of a tree whose leaves may carry flax partitioning metadata."""
  return logical.unbox(tree)
