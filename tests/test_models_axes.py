"""Logical axis names on every parameter, the layout rules built on them, and the checkpoint layout.

Every method's parameters (and teacher's) are created boxed with the names of their axes; the
sharding rules (train/sharding.py PARAM_RULES) turn the names into the layouts the regexes on ViT
parameter names gave before, which an oracle below reimplements; the unboxed train state keeps the
key paths, shapes and dtypes that checkpoints written before the names existed hold.
"""
from __future__ import annotations

import hashlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from amd_jax.methods import get_method
from amd_jax.models import logical, vit
from amd_jax.train import loop, optim, sharding

# Shipped configs (their ':runlocal' tiny versions) covering every method, image and video, scanned and not.
RUNLOCAL = ["mae_vit_b_in1k", "videomae_vit_s_ssv2", "amd_vit_s_ssv2", "amd_vit_s_in1k", "dmae_vit_t_in1k",
            "tinymim_vit_t_in1k", "g2sd_vit_t_in1k", "finetune_vit_s_in1k", "finetune_vit_s_ssv2",
            "g2sd_sd_vit_s_in1k"]
MESHES = [dict(fsdp=8, tensor=1), dict(fsdp=1, tensor=4), dict(fsdp=2, tensor=2), dict(fsdp=4, tensor=2),
          dict(fsdp=3, tensor=3)]
KNOWN_NAMES = {name for name, _ in sharding.PARAM_RULES}


def example_batch(config) -> dict:
  d = config.data
  shape = (2, d.image_size, d.image_size, d.channels)
  if d.modality == "video":
    return {"video": jax.ShapeDtypeStruct((2, d.num_frames) + shape[1:], jnp.float32)}
  return {"image": jax.ShapeDtypeStruct(shape, jnp.float32)}


def runlocal_config(load_config, name: str):
  config = load_config(name, "runlocal")
  if config.data.num_classes < 1:   # counted from the data by the loop; any count gives the same names
    config.data.num_classes = 10
  return config


def boxed_trees(config) -> dict:
  """{'params': ..., 'teacher': ...} of jax.eval_shape of the method's init_with_axes (no compile)."""
  method = get_method(config)
  batch, key = example_batch(config), jax.random.PRNGKey(0)
  trees = {"params": jax.eval_shape(method.init_with_axes, key, batch)}
  if method.has_teacher:
    trees["teacher"] = jax.eval_shape(method.teacher_init_with_axes, key, batch)
  return trees


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def boxed_leaves(tree):
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, logical.ParamAxes))[0]


@pytest.fixture(scope="module")
def shipped_trees(shipped_config):
  return {name: boxed_trees(runlocal_config(shipped_config, name)) for name in RUNLOCAL}


# ------------------------------------------------------------------ every parameter is named


@pytest.mark.parametrize("name", RUNLOCAL)
def test_every_parameter_carries_axis_names(shipped_trees, name):
  for part, tree in shipped_trees[name].items():
    leaves = boxed_leaves(tree)
    assert leaves, (name, part)
    for path, leaf in leaves:
      where = f"{name} {part} {path_str(path)}"
      assert isinstance(leaf, logical.ParamAxes), f"{where}: no axis names ({type(leaf).__name__})"
      shape = leaf.value.shape
      assert len(leaf.names) == len(shape), (where, leaf.names, shape)
      for axis_name, size in zip(leaf.names, shape):
        # Unnamed axes are only the broadcast axes of learned tokens; every name has a rule.
        assert axis_name in KNOWN_NAMES or (axis_name is None and size == 1), (where, leaf.names, shape)
      if "/blocks/block/" in "/" + path_str(path) + "/":   # a scanned stack: the layer axis comes first
        assert leaf.names[0] == logical.Axis.LAYERS, (where, leaf.names)


@pytest.mark.parametrize("name", ["amd_vit_s_ssv2", "finetune_vit_s_in1k", "dmae_vit_t_in1k"])
def test_method_init_returns_plain_arrays(shipped_config, name):
  config = runlocal_config(shipped_config, name)
  method = get_method(config)
  batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in example_batch(config).items()}
  params = jax.jit(method.init)(jax.random.PRNGKey(0), batch)
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  assert leaves and all(isinstance(l, jax.Array) for l in leaves)
  boxed = jax.eval_shape(method.init_with_axes, jax.random.PRNGKey(0), batch)
  assert jax.tree.structure(params) == jax.tree.structure(logical.unbox(boxed))
  # The same values: init is init_with_axes unboxed.
  again = logical.unbox(jax.jit(method.init_with_axes)(jax.random.PRNGKey(0), batch))
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)))


def test_scanned_and_remat_stack_names_its_layer_axis():
  enc = vit.Encoder(width=32, depth=3, num_heads=2, patch_size=4, scan=True, remat="full")
  tree = jax.eval_shape(enc.init, jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 3)))["params"]
  qkv = tree["blocks"]["block"]["attn"]["qkv"]["kernel"]
  assert qkv.names == ("layers", "embed", "qkv") and qkv.value.shape == (3, 32, 96)


def test_unboxing_adds_no_sharding_constraint_under_a_mesh():
  """flax's LogicallyPartitioned would constrain each parameter through the activation rules when a module
  reads it under a mesh; ParamAxes leaves the layout to the state's shardings: init (which also runs the
  forward pass) holds only the forward pass's activation constraints."""
  enc = vit.Encoder(width=32, depth=1, num_heads=2, patch_size=4)
  x = jnp.zeros((2, 8, 8, 1))
  params = logical.unbox(enc.init(jax.random.PRNGKey(0), x))
  mesh_cfg = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, dcn_data=1, rules=""))
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
  with sharding.activation_sharding(mesh, mesh_cfg):
    init = str(jax.make_jaxpr(lambda k: logical.unbox(enc.init(k, x)))(jax.random.PRNGKey(0)))
    apply = str(jax.make_jaxpr(lambda p: enc.apply(p, x))(params))
  assert apply.count("sharding_constraint[") > 0
  assert init.count("sharding_constraint[") == apply.count("sharding_constraint[")


def test_a_wrong_number_of_names_is_refused():
  init = logical.with_axes(nn.initializers.zeros, ("embed",))
  with pytest.raises(ValueError, match="1 axis names"):
    init(jax.random.PRNGKey(0), (2, 3))


# ------------------------------------------------------------------ the rules


def test_param_spec_rules():
  mesh = {"data": 1, "fsdp": 4, "tensor": 2}
  A = logical.Axis
  spec = lambda names, shape, **kw: sharding.param_spec(names, shape, mesh, **kw)
  # tensor: fan-out layers split their outputs, fan-in layers their inputs; fsdp takes the largest axis left.
  assert spec((A.EMBED, A.QKV), (32, 96)) == P("fsdp", "tensor")
  assert spec((A.HEADS, A.EMBED), (32, 32)) == P("tensor", "fsdp")
  assert spec((A.EMBED, A.MLP), (32, 128)) == P("fsdp", "tensor")
  assert spec((A.MLP, A.EMBED), (128, 32)) == P("tensor", "fsdp")
  # fsdp alone: the largest axis that it divides, the first of equals.
  assert spec((A.EMBED, A.TEACHER_EMBED), (64, 64)) == P("fsdp", None)
  assert spec((A.PATCH_HEIGHT, A.PATCH_WIDTH, A.CHANNELS, A.EMBED), (16, 16, 3, 384)) == P(None, None, None, "fsdp")
  assert spec((A.EMBED, A.CLASSES), (32, 10)) == P("fsdp", None)          # 10 is larger but 4 does not divide it
  assert spec((A.EMBED, A.QKV), (30, 96)) == P(None, "tensor")             # nothing left that fsdp divides
  assert spec((A.EMBED, A.QKV), (32, 96), fsdp=False) == P(None, "tensor")
  # One-axis parameters stay whole; a scanned stack's [layers, n] vectors take fsdp but never tensor.
  assert spec((A.MLP,), (128,)) == P()
  assert spec((A.LAYERS, A.MLP), (4, 128)) == P(None, "fsdp")
  # The layer axis is never split, even when it is the only axis that divides.
  assert sharding.param_spec((A.LAYERS, A.EMBED, A.QKV), (24, 1024, 3072), {"fsdp": 3, "tensor": 3}) == \
      P(None, None, "tensor")
  assert spec((A.LAYERS, A.EMBED, A.QKV), (8, 32, 96)) == P(None, "fsdp", "tensor")
  # Names the table does not list, and unnamed axes, take fsdp only.
  assert spec(("my_axis", "other"), (64, 32)) == P("fsdp", None)
  assert spec((None, None), (8, 96)) == P(None, "fsdp")
  assert spec(logical.TOKEN_AXES, (1, 1, 32)) == P(None, None, "fsdp")
  with pytest.raises(ValueError, match="axis names"):
    spec((A.EMBED,), (4, 4))


def test_tree_shardings_takes_boxed_and_plain_leaves():
  boxed = logical.with_axes(nn.initializers.zeros, (logical.Axis.EMBED, logical.Axis.QKV))
  tree = {"named": jax.eval_shape(lambda: boxed(jax.random.PRNGKey(0), (32, 96))),
          "plain": jax.ShapeDtypeStruct((32, 96), jnp.float32), "step": jax.ShapeDtypeStruct((), jnp.int32),
          "none": None}
  specs = sharding.tree_specs(tree, {"data": 1, "fsdp": 2, "tensor": 2})
  assert specs["named"] == P("fsdp", "tensor")
  assert specs["plain"] == P(None, "fsdp")       # no names: fsdp by size alone, no tensor split
  assert specs["step"] == P() and specs["none"] is None
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
  shard = sharding.tree_shardings(tree, mesh)
  assert jax.tree.structure(shard) == jax.tree.structure(logical.unbox(tree))


# The layouts before the names existed: tensor rules by regexes on ViT parameter paths, fsdp on the largest
# axis that divides. An oracle the names must reproduce.
_OLD_COLUMN = re.compile(r"(qkv|fc1)/kernel$")
_OLD_ROW = re.compile(r"(attn/proj|fc2)/kernel$")


def old_path_rule(path: str, shape, mesh_shape) -> P:
  if len(shape) < 2:
    return P()
  spec, tensor, n = [None] * len(shape), mesh_shape["tensor"], mesh_shape["fsdp"]
  if tensor > 1:
    if _OLD_COLUMN.search(path) and shape[-1] % tensor == 0:
      spec[-1] = "tensor"
    elif _OLD_ROW.search(path) and shape[-2] % tensor == 0:
      spec[-2] = "tensor"
  if n > 1:
    for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
      if spec[i] is None and shape[i] % n == 0:
        spec[i] = "fsdp"
        break
  return P(*spec)


@pytest.mark.parametrize("name", RUNLOCAL)
def test_names_reproduce_the_path_rules(shipped_trees, name):
  compared = 0
  for mesh in MESHES:
    mesh_shape = {"data": 1, **mesh}
    for part, tree in shipped_trees[name].items():
      specs = sharding.tree_specs(tree, mesh_shape)
      flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
      for (path, leaf), got in zip(boxed_leaves(tree), flat_specs):
        want = old_path_rule(path_str(path), leaf.value.shape, mesh_shape)
        assert got == want, (name, part, mesh, path_str(path), leaf.names, leaf.value.shape)
        compared += 1
  assert compared > 100


# ------------------------------------------------------------------ the checkpointed state


# Key paths, shapes and dtypes of the train state (step, params, Adam state, EMA) as checkpoints written
# before parameters carried axis names hold them: sha256 of the lines 'path (shape) dtype', from that code.
STATE_BEFORE = {
    "image": (147, "6c93d14f356610c428038964bb450fe691a78f91608bc51d727c97b675b73e33"),
    "video_scan_ema": (147, "2fa722538d0a699f8f3925731716f662b1e19c96319b3f157a7ddc82f33544cb"),
}


@pytest.mark.parametrize("case", sorted(STATE_BEFORE))
def test_train_state_keeps_the_checkpoint_layout(tiny_config, case):
  video = case != "image"
  config = tiny_config("video" if video else None)
  config.model.scan = video
  ema = video
  method = get_method(config)
  d = config.data
  shape = (8, d.image_size, d.image_size, d.channels)
  batch = {"video": jnp.zeros((8, d.num_frames) + shape[1:])} if video else {"image": jnp.zeros(shape)}
  tx, _ = optim.make_optimizer(config.optim, batch_size=8, total_steps=4, warmup_steps=1)

  def state(rng, with_axes):
    params = (method.init_with_axes if with_axes else method.init)(rng, batch)
    return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                           ema_params=params if ema else None)

  for with_axes in (False, True):
    abstract = logical.unbox(jax.eval_shape(lambda k, w=with_axes: state(k, w), jax.random.PRNGKey(0)))
    lines = [f"{path_str(p)} {tuple(l.shape)} {l.dtype}" for p, l in jax.tree_util.tree_flatten_with_path(abstract)[0]]
    count, digest = STATE_BEFORE[case]
    assert not any("/value" in line for line in lines), lines[:5]   # no box fields in saved paths
    assert (len(lines), hashlib.sha256("\n".join(lines).encode()).hexdigest()) == (count, digest), "\n".join(lines)
