"""Mesh construction, sharding rules, and train-step equivalence across meshes on 8 simulated CPU devices.

The multi-device checks run in ONE subprocess (XLA_FLAGS must be set before jax starts); it prints a JSON
record that the tests below inspect.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap

import jax
import ml_collections
import pytest

from amd_jax.train import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mesh_cfg(data=-1, fsdp=1, tensor=1):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


# ------------------------------------------------------------- in this process


@pytest.mark.parametrize("cfg,devices,expected", [
    (dict(data=-1, fsdp=1, tensor=1), 8, (8, 1, 1)),
    (dict(data=-1, fsdp=2, tensor=1), 8, (4, 2, 1)),
    (dict(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2)),
    (dict(data=2, fsdp=2, tensor=-1), 8, (2, 2, 2)),
    (dict(data=1, fsdp=1, tensor=1), 1, (1, 1, 1)),
    (dict(data=-1, fsdp=1, tensor=1), 1, (1, 1, 1)),
    (dict(data=4, fsdp=2, tensor=1), 8, (4, 2, 1)),
])
def test_mesh_shape_resolves(cfg, devices, expected):
  assert sharding.mesh_shape(mesh_cfg(**cfg), devices) == expected


@pytest.mark.parametrize("cfg,devices,fragment", [
    (dict(data=-1, fsdp=3, tensor=1), 8, "cannot be split"),
    (dict(data=2, fsdp=2, tensor=1), 8, "= 4"),
    (dict(data=4, fsdp=2, tensor=2), 8, "= 16"),
    (dict(data=-1, fsdp=-1, tensor=1), 8, "at most one axis"),
    (dict(data=2, fsdp=1, tensor=1), 1, "= 2"),
])
def test_mesh_shape_rejects_bad_products(cfg, devices, fragment):
  with pytest.raises(ValueError, match="config.mesh") as info:
    sharding.mesh_shape(mesh_cfg(**cfg), devices)
  assert fragment in str(info.value)


def test_one_device_mesh_and_specs():
  mesh = sharding.make_mesh(mesh_cfg())
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  assert sharding.batch_sharding(mesh).spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  assert sharding.replicated(mesh).spec == jax.sharding.PartitionSpec()
  # No fsdp/tensor axes: nothing is split.
  assert sharding.param_spec(("embed", "qkv"), (32, 96), dict(mesh.shape)) == jax.sharding.PartitionSpec(
      None, None)


# --------------------------------------------------------- 8 simulated devices

_SCRIPT = textwrap.dedent(r"""
    import importlib.util, json
    import jax, jax.numpy as jnp, ml_collections, numpy as np
    from amd_jax.data import pipeline
    from amd_jax.methods import get_method
    from amd_jax.train import loop, optim, sharding

    assert jax.device_count() == 8, jax.devices()
    spec = importlib.util.spec_from_file_location("tiny", "configs/test_tiny.py")
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    cfg = m.get_config("batch=8")
    # q/v bias (VideoMAE layout): a fused qkv bias has a k part whose gradient is exactly zero in exact
    # arithmetic; Adam turns its float noise into +-lr steps that differ between meshes.
    cfg.model.qkv_bias = "qv"
    method = get_method(cfg)
    it = iter(pipeline.make_train_dataset(cfg.data, global_batch_size=8, seed=0))
    batches = [next(it) for _ in range(2)]
    example = {k: jnp.zeros(v.shape, v.dtype) for k, v in batches[0].items()}
    tx, schedule = optim.make_optimizer(cfg.optim, batch_size=8, total_steps=10, warmup_steps=0)
    init_key, step_key = jax.random.split(jax.random.PRNGKey(0))

    def init_state(rng, with_axes=False):
      # with_axes: params and Adam moments boxed with their logical axis names (as the loop lays out the state)
      params = (method.init_with_axes if with_axes else method.init)(rng, example)
      return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    def path_str(path):
      return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)

    WATCH = ("params/encoder/blocks_0/attn/qkv/kernel", "params/encoder/blocks_0/attn/q_bias",
             "params/encoder/blocks_0/attn/proj/kernel", "params/encoder/blocks_1/mlp/fc1/kernel",
             "params/encoder/blocks_1/mlp/fc2/kernel", "params/encoder/cls_token",
             "params/decoder/blocks_0/mlp/fc1/kernel", "params/decoder/embed/kernel")

    def layout(tree, shardings=None):
      out = {}
      leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
      shards = jax.tree.leaves(shardings) if shardings is not None else [l.sharding for _, l in leaves]
      for (path, leaf), sh in zip(leaves, shards):
        p = path_str(path)
        if p in WATCH or p.endswith("mu/encoder/blocks_0/attn/qkv/kernel"):
          key = "mu/qkv" if "mu/" in p else p
          out[key] = dict(spec=[None if s is None else str(s) for s in sh.spec],
                          shard=list(sh.shard_shape(leaf.shape)), shape=list(leaf.shape))
          if shardings is None:  # a real array: its stored pieces have that shape
            assert list(leaf.addressable_shards[0].data.shape) == out[key]["shard"], (p, out[key])
      return out

    def make_mesh(data=-1, fsdp=1, tensor=1, devices=None):
      return sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)), devices)

    abstract = jax.eval_shape(lambda k: init_state(k, with_axes=True), init_key)
    host_state = jax.device_get(jax.jit(init_state)(init_key))
    assert jax.tree.structure(sharding.unbox(abstract)) == jax.tree.structure(host_state)
    results, params = {}, {}

    # Layout only (no compile): rules applied to the abstract state.
    for name, kw in [("fsdp8", dict(data=1, fsdp=8)), ("tensor4", dict(data=2, tensor=4))]:
      mesh = make_mesh(**kw)
      shard = sharding.tree_shardings(abstract, mesh, fsdp=mesh.shape["fsdp"] > 1)
      results[name] = dict(mesh=dict(mesh.shape), n_devices=int(mesh.devices.size),
                           layout=layout(sharding.unbox(abstract), shard))

    # Train steps: one device vs pure data parallel vs data x fsdp x tensor.
    for name, kw in [("one", dict(data=1, devices=jax.devices()[:1])), ("data8", dict(data=8)),
                     ("mixed", dict(data=2, fsdp=2, tensor=2))]:
      mesh = make_mesh(**kw)
      shard = sharding.tree_shardings(abstract, mesh, fsdp=mesh.shape["fsdp"] > 1)
      bs = sharding.batch_sharding(mesh)
      state = jax.device_put(host_state, shard)
      before = layout(state)
      step = jax.jit(loop.make_train_step(method, tx, schedule, step_key), in_shardings=(shard, bs, None),
                     out_shardings=(shard, sharding.replicated(mesh)), donate_argnums=(0,))
      losses = []
      for b in batches:
        state, metrics = step(state, sharding.global_batch(b, bs), None)
        losses.append(float(metrics["loss"]))
      results[name] = dict(mesh=dict(mesh.shape), n_devices=int(mesh.devices.size), losses=losses,
                           layout=before, layout_after=layout(state), step=int(state.step))
      params[name] = jax.device_get(state.params)

    absdiff = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    for name in params:
      results[name]["max_param_diff"] = max(jax.tree.leaves(jax.tree.map(absdiff, params[name], params["one"])))
    results["one"]["max_param_change"] = max(jax.tree.leaves(jax.tree.map(absdiff, params["one"],
                                                                          host_state.params)))
    print("RESULT:" + json.dumps(results))
    """)


def _run_script():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT:"))
  return json.loads(line[len("RESULT:"):])


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
  """The script's record, computed once per session (pytest-xdist workers wait on a file lock)."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  with open(root / "sharding_8dev.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      done = root / "sharding_8dev.json"
      if not done.exists():
        done.write_text(json.dumps(_run_script()))
      return json.loads(done.read_text())
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def test_meshes_built_as_asked(multi):
  assert multi["one"]["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1} and multi["one"]["n_devices"] == 1
  assert multi["data8"]["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert multi["mixed"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert multi["fsdp8"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert all(multi[k]["n_devices"] == 8 for k in ("data8", "fsdp8", "mixed", "tensor4"))


def test_pure_data_parallel_replicates_params(multi):
  lay = multi["data8"]["layout"]
  for info in lay.values():
    assert all(s is None for s in info["spec"]), info
    assert info["shard"] == info["shape"]


def test_fsdp_shards_kernel_and_adam_moments(multi):
  lay = multi["fsdp8"]["layout"]
  qkv = lay["params/encoder/blocks_0/attn/qkv/kernel"]
  assert qkv["shape"] == [32, 96]
  assert qkv["spec"] == [None, "fsdp"] and qkv["shard"] == [32, 12]   # largest axis split 8 ways
  fc2 = lay["params/encoder/blocks_1/mlp/fc2/kernel"]
  assert fc2["spec"] == ["fsdp", None] and fc2["shard"] == [16, 32]
  assert lay["mu/qkv"] == qkv  # optimizer state laid out like its parameter
  assert lay["params/encoder/blocks_0/attn/q_bias"]["spec"] == []  # 1-D leaves replicated
  assert lay["params/encoder/cls_token"]["shard"] == [1, 1, 4]


def test_tensor_rules_split_columns_and_rows(multi):
  lay = multi["tensor4"]["layout"]
  col = {"params/encoder/blocks_0/attn/qkv/kernel": [32, 24], "params/encoder/blocks_1/mlp/fc1/kernel": [32, 32],
         "params/decoder/blocks_0/mlp/fc1/kernel": [32, 32]}
  for path, shard in col.items():
    assert lay[path]["spec"] == [None, "tensor"], path
    assert lay[path]["shard"] == shard, path
  row = {"params/encoder/blocks_0/attn/proj/kernel": [8, 32], "params/encoder/blocks_1/mlp/fc2/kernel": [32, 32]}
  for path, shard in row.items():
    assert lay[path]["spec"] == ["tensor", None], path
    assert lay[path]["shard"] == shard, path
  # A kernel no tensor rule names stays whole (no fsdp on this mesh).
  assert lay["params/decoder/embed/kernel"]["shard"] == lay["params/decoder/embed/kernel"]["shape"]


def test_mixed_mesh_combines_fsdp_and_tensor(multi):
  lay = multi["mixed"]["layout"]
  assert lay["params/encoder/blocks_0/attn/qkv/kernel"]["spec"] == ["fsdp", "tensor"]
  assert lay["params/encoder/blocks_0/attn/qkv/kernel"]["shard"] == [16, 48]
  assert lay["params/encoder/blocks_0/attn/proj/kernel"]["spec"] == ["tensor", "fsdp"]


def test_layouts_survive_the_step(multi):
  for name in ("data8", "mixed"):
    assert multi[name]["layout_after"] == multi[name]["layout"], name
  # mixed: the real arrays follow the same rules as the abstract layouts above.
  assert multi["mixed"]["layout"]["params/encoder/blocks_1/mlp/fc1/kernel"]["spec"] == ["fsdp", "tensor"]


@pytest.mark.parametrize("name", ["data8", "mixed"])
def test_train_step_matches_one_device(multi, name):
  one, other = multi["one"], multi[name]
  assert other["step"] == one["step"] == 2
  for a, b in zip(other["losses"], one["losses"]):
    assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (name, other["losses"], one["losses"])
  assert other["max_param_diff"] <= 1e-5, (name, other["max_param_diff"])
  # The comparison is not vacuous: the step changed the params by far more than the tolerance.
  assert one["max_param_change"] > 1e-3
  assert len(set(one["losses"])) == 2
