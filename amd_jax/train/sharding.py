"""Device mesh, parameter/state shardings from name rules, and batch sharding.

Axes: 'data' (pure data parallel), 'fsdp' (data parallel with parameters and
optimizer state sharded), 'tensor' (Megatron-style split of attention and MLP
matmuls). GSPMD inserts the communication; any choice of rules is correct, the
rules only decide what is stored where.
"""
from __future__ import annotations

import re

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Resolve the one -1 entry so the product equals the device count."""
  sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got data={sizes[0]} fsdp={sizes[1]} "
                     f"tensor={sizes[2]}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh: {num_devices} devices cannot be split with fixed axes of product {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"config.mesh: data*fsdp*tensor = {int(np.prod(sizes))} but there are {num_devices} devices")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = devices if devices is not None else jax.devices()
  shape = mesh_shape(mesh_cfg, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (AssertionError, NotImplementedError, ValueError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# Tensor-parallel rules on 2-D kernels [in, out] (matched on the leaf's path):
# column-split the layers that fan out, row-split those that fan back in.
_COLUMN = re.compile(r"(qkv|fc1)/kernel$")
_ROW = re.compile(r"(attn/proj|fc2)/kernel$")


def _path_str(path) -> str:
  parts = []
  for p in path:
    for attr in ("key", "name", "idx"):
      if hasattr(p, attr):
        parts.append(str(getattr(p, attr)))
        break
  return "/".join(parts)


def leaf_spec(path: str, shape: tuple[int, ...], mesh: Mesh, fsdp: bool = True) -> P:
  """PartitionSpec of one parameter-shaped leaf (params, Adam moments alike)."""
  if len(shape) < 2:
    return P()
  spec = [None] * len(shape)
  tensor = mesh.shape["tensor"]
  # Scanned stacks carry a leading layer axis: rules apply to the trailing [in, out].
  if tensor > 1 and len(shape) >= 2:
    if _COLUMN.search(path) and shape[-1] % tensor == 0:
      spec[-1] = "tensor"
    elif _ROW.search(path) and shape[-2] % tensor == 0:
      spec[-2] = "tensor"
  n = mesh.shape["fsdp"]
  if fsdp and n > 1:
    # Shard the largest remaining axis that divides evenly.
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
      if spec[i] is None and shape[i] % n == 0 and shape[i] >= n:
        spec[i] = "fsdp"
        break
  return P(*spec)


def tree_shardings(abstract_tree, mesh: Mesh, fsdp: bool = True):
  """NamedShardings for every leaf of a tree of ShapeDtypeStructs (or arrays)."""
  def one(path, leaf):
    return NamedSharding(mesh, leaf_spec(_path_str(path), tuple(leaf.shape), mesh, fsdp))
  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """Per-process numpy batch -> global jax.Arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
