"""Scale-out: logical activation rules, multi-slice mesh arithmetic, distributed start-up, launch scripts,
an AMD step equal on every mesh (8 simulated CPU devices), checkpoints moved between meshes, and a
2-process jax.distributed run equal to a 1-process run.

Multi-device work runs in subprocesses (XLA_FLAGS must be set before jax starts); each prints one JSON
record that the tests below inspect.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from amd_jax.models import logical, vit
from amd_jax import weights
from amd_jax.train import distributed, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")


def mesh_cfg(data=-1, fsdp=1, tensor=1, dcn_data=1, rules=""):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, dcn_data=dcn_data, rules=rules))


def _fail_text(proc) -> str:
  return f"exit {proc.returncode}\n--- stdout (tail) ---\n{proc.stdout[-3000:]}\n--- stderr (tail) ---\n" \
         f"{proc.stderr[-6000:]}"


def _record(proc) -> dict:
  assert proc.returncode == 0, _fail_text(proc)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT:")]
  assert lines, _fail_text(proc)
  return json.loads(lines[-1][len("RESULT:"):])


# These tests are compile-bound (tiny models, several meshes): XLA:CPU's cheaper code generation halves
# their time. Every run compared with another uses the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _env(devices: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"{FAST_COMPILE} --xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", AMD_JAX_DISTRIBUTED="0")
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(name, None)
  return env


# ------------------------------------------------------------- multi-slice mesh arithmetic


@pytest.mark.parametrize("cfg,devices,slices,ici,dcn", [
    (dict(data=-1, dcn_data=2), 16, 2, (8, 1, 1), (2, 1, 1)),
    (dict(data=4, fsdp=4, dcn_data=2), 16, 2, (2, 4, 1), (2, 1, 1)),
    (dict(data=-1, fsdp=2, tensor=2, dcn_data=4), 64, 4, (4, 2, 2), (4, 1, 1)),
    (dict(data=2, fsdp=-1, dcn_data=2), 512, 2, (1, 256, 1), (2, 1, 1)),
    (dict(data=-1, fsdp=8), 8, 1, (1, 8, 1), (1, 1, 1)),
])
def test_slice_shapes_split_data_between_slices(cfg, devices, slices, ici, dcn):
  got_ici, got_dcn = sharding.slice_shapes(mesh_cfg(**cfg), devices, slices)
  assert (got_ici, got_dcn) == (ici, dcn)
  assert int(np.prod(got_ici)) * slices == devices


@pytest.mark.parametrize("cfg,devices,slices,fragment", [
    (dict(data=-1, dcn_data=2), 16, 1, "number of TPU slices, 1"),
    (dict(data=-1, dcn_data=1), 16, 2, "number of TPU slices, 2"),
    (dict(data=3, fsdp=-1, dcn_data=2), 12, 2, "divide the data axis (3)"),
    (dict(data=-1, dcn_data=0), 8, 1, ">= 1"),
    (dict(data=0, fsdp=-1), 8, 1, "must be >= 1"),
])
def test_slice_shapes_reject_mismatch(cfg, devices, slices, fragment):
  with pytest.raises(ValueError, match="config.mesh") as info:
    sharding.slice_shapes(mesh_cfg(**cfg), devices, slices)
  assert fragment in str(info.value)


def test_hybrid_grid_puts_slices_along_data():
  fake = [types.SimpleNamespace(id=i, slice_index=i // 8, process_index=i // 4, platform="cpu",
                                device_kind="cpu") for i in range(16)]
  grid = sharding.device_grid(mesh_cfg(data=4, fsdp=2, tensor=2, dcn_data=2), fake)
  assert grid.shape == (4, 2, 2)
  slice_of = np.vectorize(lambda d: d.slice_index)(grid)
  # The two outer halves of the data axis are the two slices; fsdp and tensor never leave a slice.
  assert (slice_of[:2] == 0).all() and (slice_of[2:] == 1).all()
  assert sorted(d.id for d in grid.ravel()) == list(range(16))
  # One slice: the plain (ICI-aware) device mesh.
  assert sharding.device_grid(mesh_cfg(data=2, fsdp=2), fake[:4]).shape == (2, 2, 1)


# ------------------------------------------------------------- logical activation rules


def test_rules_defaults_and_overrides():
  default = dict(sharding.parse_rules(""))
  assert default["batch"] == ("data", "fsdp") and default["mlp"] == ("tensor",)
  assert default["embed"] is None and default["heads"] == ("tensor",)
  custom = dict(sharding.parse_rules("embed=tensor, mlp=, batch=data"))
  assert custom["embed"] == ("tensor",) and custom["mlp"] is None and custom["batch"] == ("data",)
  assert custom["heads"] == ("tensor",)   # names not given keep their default
  for bad in ("width=tensor", "mlp=model", "mlp", "batch=data+data"):
    with pytest.raises(ValueError, match="config.mesh.rules"):
      sharding.parse_rules(bad)
  with pytest.raises(ValueError, match="config.mesh.rules"):
    sharding.mesh_shape(mesh_cfg(rules="mlp=model"), 1)


def test_logical_spec_drops_axes_that_do_not_divide():
  rules = sharding.parse_rules("")
  mesh = {"data": 2, "fsdp": 2, "tensor": 4}
  P = jax.sharding.PartitionSpec
  assert logical.logical_spec(logical.TOKENS, (8, 10, 384), rules, mesh) == P(("data", "fsdp"), None, None)
  # ViT-S: 6 heads do not split 4 ways, stay whole; 1536 MLP units do.
  assert logical.logical_spec(logical.HEADS, (8, 10, 6, 64), rules, mesh) == P(("data", "fsdp"), None, None, None)
  assert logical.logical_spec(logical.MLP_HIDDEN, (8, 10, 1536), rules, mesh) == P(("data", "fsdp"), None, "tensor")
  # A batch of 2 takes 'data' only; a mesh axis is used once per array.
  assert logical.logical_spec(logical.TOKENS, (2, 10, 8), rules, mesh) == P("data", None, None)
  both = sharding.parse_rules("embed=tensor,mlp=tensor")
  assert logical.logical_spec(("batch", "embed", "mlp"), (8, 8, 8), both, mesh)[2] is None


def _has_constraint(fn, *args) -> bool:
  return "sharding_constraint" in str(jax.make_jaxpr(fn)(*args))


def test_constraints_are_noops_without_a_mesh():
  enc = vit.Encoder(width=32, depth=1, num_heads=2, patch_size=4)
  x = jnp.zeros((2, 8, 8, 1))
  params = enc.init(jax.random.PRNGKey(0), x)
  apply = lambda p, x: enc.apply(p, x)[0]
  plain = jax.jit(lambda p, x: apply(p, x))(params, x)
  assert not _has_constraint(apply, params, x)
  with nn.logical_axis_rules(sharding.parse_rules("")):   # rules but no mesh: still nothing
    assert not _has_constraint(apply, params, x)
  mesh = sharding.make_mesh(mesh_cfg(data=1), jax.devices()[:1])
  with sharding.activation_sharding(mesh, mesh_cfg(data=1)):
    assert _has_constraint(apply, params, x)   # inside the context the constraints are there ...
    constrained = jax.jit(apply)(params, x)
  np.testing.assert_array_equal(np.asarray(constrained), np.asarray(plain))   # ... and change no number


# ------------------------------------------------------------- per-process data order


def _take(dataset, n):
  it = iter(dataset)
  out = [next(it) for _ in range(n)]
  it.close()
  return out


def test_processes_load_their_rows_of_the_same_global_batches():
  from amd_jax import config_base  # pylint: disable=g-import-not-at-top
  from amd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  c = config_base.data_config()
  # num_classes == size: the label of an example is its index in the source.
  c.update(source="synthetic", synthetic_size=40, num_classes=40, image_size=8, channels=3, mean="0.5,0.5,0.5",
           std="0.25,0.25,0.25", prefetch=0)
  make = lambda **kw: pipeline.make_train_dataset(c, global_batch_size=8, seed=3, **kw)
  whole = _take(make(), 6)   # 48 examples: crosses an epoch boundary
  halves = [_take(make(process_index=p, process_count=2), 6) for p in range(2)]
  scattered = _take(make(process_index=1, process_count=2, rows=(1, 2, 5, 6)), 6)
  for i, batch in enumerate(whole):
    for key in ("image", "label"):   # same examples, same augmentation, same place in the global batch
      np.testing.assert_array_equal(np.concatenate([halves[0][i][key], halves[1][i][key]]), batch[key])
      np.testing.assert_array_equal(scattered[i][key], batch[key][[1, 2, 5, 6]])
  with pytest.raises(ValueError, match="rows"):
    make(process_index=0, process_count=2, rows=(0, 1, 2))
  # One process holds every row of the batch sharding.
  mesh = sharding.make_mesh(mesh_cfg(data=1), jax.devices()[:1])
  assert sharding.process_batch_rows(sharding.batch_sharding(mesh), 8) == tuple(range(8))


# ------------------------------------------------------------- distributed start-up


@pytest.mark.parametrize("env,tpu_vm,expected", [
    ({}, False, None),
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, False, None),
    ({"SLURM_NTASKS": "4"}, False, None),   # sbatch's shell, not an srun step: one process
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2"}, False, ("SLURM", {})),
    ({"SLURM_STEP_NUM_TASKS": "8(x2)", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, False, ("SLURM", {})),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, False, ("Open MPI", {})),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, False, None),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, False, ("TPU pod", {})),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, False, ("multi-slice", {})),
    ({}, True, ("Cloud TPU VM", {})),
    ({"AMD_JAX_DISTRIBUTED": "0", "SLURM_NTASKS": "4", "SLURM_PROCID": "1"}, True, None),
    ({"AMD_JAX_DISTRIBUTED": "1"}, False, ("asked", {})),
    ({"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, False,
     ("explicit", {"coordinator_address": "h0:1234", "num_processes": 2, "process_id": 1})),
    ({"JAX_COORDINATOR_ADDRESS": "h0:1234", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}, False,
     ("explicit", {"coordinator_address": "h0:1234"})),
])
def test_distributed_plan(env, tpu_vm, expected):
  got = distributed.plan(env, tpu_vm=tpu_vm)
  if expected is None:
    assert got is None
  else:
    assert got is not None and expected[0] in got[0] and got[1] == expected[1], got


@pytest.mark.parametrize("env,fragment", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "must lie in"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two"}, "must be an integer"),
    ({"AMD_JAX_DISTRIBUTED": "maybe"}, "allowed"),
])
def test_distributed_plan_rejects_bad_values(env, fragment):
  with pytest.raises(ValueError, match=fragment):
    distributed.plan(env, tpu_vm=False)


def test_this_machine_is_single_process():
  assert distributed.plan({}, tpu_vm=None) is None   # the CPU test machine is no TPU VM


# ------------------------------------------------------------- launch scripts (dry: fake gcloud / scontrol)


def _fake_bin(tmp_path, name: str, body: str) -> str:
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  path = bin_dir / name
  path.write_text("#!/bin/bash\n" + body)
  path.chmod(0o755)
  return str(bin_dir)


def test_tpu_vm_script_runs_main_on_every_worker(tmp_path):
  record = tmp_path / "gcloud_args"
  bin_dir = _fake_bin(tmp_path, "gcloud", f'printf "%s\\n" "$@" > {record}\n'
                      'printf "[worker 0] step 1\\n[worker 1] step 1\\n[worker 0] done\\n"\n')
  env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"])
  proc = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_vm.sh"), "--tpu", "my-pod", "--zone", "us-central2-b",
                         "--config", "configs/amd_vit_s_ssv2.py", "--workdir", "gs://bucket/run1",
                         "--logdir", str(tmp_path / "logs"), "--", "--config.batch_size=512"],
                        env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, _fail_text(proc)
  args = record.read_text().splitlines()
  assert args[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-pod"]
  assert "--worker=all" in args and "--zone=us-central2-b" in args
  command = next(a for a in args if a.startswith("--command="))
  assert "python -m amd_jax.main --config configs/amd_vit_s_ssv2.py --workdir gs://bucket/run1" in command
  assert "--config.batch_size=512" in command and "AMD_JAX_DISTRIBUTED=1" in command
  logs = tmp_path / "logs"
  assert "[worker 1] step 1" in (logs / "all_workers.log").read_text()
  assert (logs / "worker_0.log").read_text() == "step 1\ndone\n"   # split per worker, prefixes gone
  assert (logs / "worker_1.log").read_text() == "step 1\n"


@pytest.mark.parametrize("tasks,nodes,proc_id,local_id,extra,devices", [
    ("16", "2", "9", "1", {}, "1"),                                # one process per GPU
    ("2", "2", "1", "0", {"SLURM_GPUS_ON_NODE": "8"}, "0,1,2,3,4,5,6,7"),   # one process per node
    ("16", "2", "3", "3", {"CUDA_VISIBLE_DEVICES": "3"}, "0"),      # SLURM bound one GPU to the task
])
def test_gpu_slurm_script_derives_coordinator(tmp_path, tasks, nodes, proc_id, local_id, extra, devices):
  bin_dir = _fake_bin(tmp_path, "scontrol", 'echo gpu-node-07\necho gpu-node-08\n')
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_VISIBLE"))}
  env.update(PATH=bin_dir + os.pathsep + os.environ["PATH"], SLURM_JOB_NODELIST="gpu-node-[07-08]",
             SLURM_NTASKS=tasks, SLURM_PROCID=proc_id, SLURM_LOCALID=local_id, SLURM_JOB_ID="4242",
             SLURM_JOB_NUM_NODES=nodes, AMD_JAX_SRUN_TASK="1", AMD_JAX_DRY_RUN="1", AMD_JAX_PORT="23456", **extra)
  proc = subprocess.run(["bash", os.path.join(LAUNCH, "gpu_slurm.sh"), "--config", "configs/amd_vit_s_ssv2.py",
                         "--workdir", str(tmp_path / "w")], env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, _fail_text(proc)
  lines = proc.stdout.splitlines()
  assert "JAX_COORDINATOR_ADDRESS=gpu-node-07:23456" in lines
  assert f"JAX_NUM_PROCESSES={tasks}" in lines and f"JAX_PROCESS_ID={proc_id}" in lines
  assert f"JAX_LOCAL_DEVICE_IDS={devices}" in lines
  assert f"python -m amd_jax.main --config configs/amd_vit_s_ssv2.py --workdir {tmp_path / 'w'}" in lines


def test_gpu_slurm_script_needs_a_job():
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  proc = subprocess.run(["bash", os.path.join(LAUNCH, "gpu_slurm.sh")], env=env, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 2 and "sbatch" in proc.stderr


def test_local_script_fails_when_a_process_fails(tmp_path):
  proc = subprocess.run(["bash", os.path.join(LAUNCH, "local_multiprocess.sh"), "-n", "2", "-d", "1",
                         "-l", str(tmp_path / "logs"), "--", sys.executable, "-c",
                         "import os, sys, time; pid = int(os.environ['JAX_PROCESS_ID']); "
                         "print('process', pid, os.environ['JAX_NUM_PROCESSES'], os.environ['JAX_COORDINATOR_ADDRESS']);"
                         " sys.exit(3) if pid == 1 else time.sleep(60)"],
                        capture_output=True, text=True, timeout=50)
  assert proc.returncode != 0
  assert "process 1" in proc.stdout + proc.stderr   # the failing process's log is shown
  log0 = (tmp_path / "logs" / "process_0.log").read_text()
  assert log0.startswith("process 0 2 localhost:")


# ------------------------------------------------------------- 8 simulated devices: AMD step and checkpoints

_TINY_AMD = textwrap.dedent(r"""
    import importlib.util
    spec = importlib.util.spec_from_file_location("amd_cfg", "configs/amd_vit_s_ssv2.py")
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    cfg = m.get_config("runlocal")     # tiny student and teacher, random teacher, synthetic clips
    # One aligned layer pair and a one-block generator keep the compiles short; a modest lr keeps Adam's
    # second step (m / sqrt(v) of near-cancelling gradients) from magnifying float noise past 1e-5.
    cfg.amd.update(student_layers="2", teacher_layers="2", generator_depth=1)
    cfg.optim.lr = 1e-3
    cfg.batch_size = 8
""")

_STEP_SCRIPT = _TINY_AMD + textwrap.dedent(r"""
    import json, sys
    import jax, jax.numpy as jnp, ml_collections, numpy as np
    from amd_jax.data import pipeline
    from amd_jax.methods import get_method
    from amd_jax.train import checkpoint, loop, optim, sharding

    assert jax.device_count() == 8, jax.devices()
    ckpt_dir = sys.argv[1]
    method = get_method(cfg)
    it = iter(pipeline.make_train_dataset(cfg.data, global_batch_size=8, seed=0))
    batches = [next(it) for _ in range(2)]
    it.close()
    example = {k: jnp.zeros(v.shape, v.dtype) for k, v in batches[0].items()}
    tx, schedule = optim.make_optimizer(cfg.optim, batch_size=8, total_steps=10, warmup_steps=0)
    init_key, step_key = jax.random.split(jax.random.PRNGKey(0))

    def init_state(rng, with_axes=False):
      # with_axes: params and Adam moments boxed with their logical axis names (as the loop lays out the state)
      params = (method.init_with_axes if with_axes else method.init)(rng, example)
      return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    def path_str(path):
      return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)

    # Path suffixes of the leaves whose layout is reported (the optimizer state's nesting is optax's).
    WATCH = {"params/encoder/blocks_0/mlp/fc1/kernel": "kernel", "mu/encoder/blocks_0/mlp/fc1/kernel": "mu",
             "nu/encoder/blocks_0/mlp/fc1/kernel": "nu", "teacher/blocks_1/attn/qkv/kernel": "teacher"}

    def layout(tree, prefix=""):
      out = {}
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        p = prefix + path_str(path)
        name = next((v for k, v in WATCH.items() if p == k or p.endswith("/" + k)), None)
        if name:
          out[name] = dict(spec=[None if s is None else str(s) for s in leaf.sharding.spec],
                           shard=list(leaf.addressable_shards[0].data.shape), shape=list(leaf.shape))
      return out

    def make_mesh(devices=None, **kw):
      return sharding.make_mesh(ml_collections.ConfigDict(dict(dict(data=1, fsdp=1, tensor=1), **kw)), devices)

    abstract = jax.eval_shape(lambda k: init_state(k, with_axes=True), init_key)
    host_state = jax.device_get(jax.jit(init_state)(init_key))
    teacher_host = jax.device_get(jax.jit(method.teacher_init)(jax.random.PRNGKey(1), example))
    # A loaded teacher is a plain tree: it takes the layout of its boxed abstract counterpart.
    teacher_abstract = jax.eval_shape(method.teacher_init_with_axes, jax.random.PRNGKey(1), example)

    results, params, states = {}, {}, {}
    MESHES = [("one", dict(devices=jax.devices()[:1])), ("data8", dict(data=8)), ("fsdp8", dict(fsdp=8)),
              ("mixed", dict(data=2, fsdp=2, tensor=2))]
    for name, kw in MESHES:
      mesh = make_mesh(**kw)
      fsdp = mesh.shape["fsdp"] > 1
      shard = sharding.tree_shardings(abstract, mesh, fsdp=fsdp)
      t_shard = sharding.tree_shardings(teacher_abstract, mesh, fsdp=fsdp)   # shard_teacher='auto'
      bs = sharding.batch_sharding(mesh)
      state = jax.device_put(host_state, shard)
      teacher = jax.device_put(teacher_host, t_shard)
      step = jax.jit(loop.make_train_step(method, tx, schedule, step_key), in_shardings=(shard, bs, t_shard),
                     out_shardings=(shard, sharding.replicated(mesh)), donate_argnums=(0,))
      abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bs) for k, v in example.items()}
      with sharding.activation_sharding(mesh, cfg.mesh):
        lowered = step.lower(state, abstract_batch, teacher)
      compiled = lowered.compile()
      losses = []
      for b in batches:
        state, metrics = compiled(state, sharding.global_batch(b, bs), teacher)
        losses.append(float(metrics["loss"]))
      lay = layout(state)
      lay.update(layout(teacher, "teacher/"))
      results[name] = dict(mesh=dict(mesh.shape), losses=losses, layout=lay, step=int(state.step),
                           constraints=lowered.as_text().count("sharding_constraint")
                           + lowered.as_text().count('custom_call_target="Sharding"'))
      params[name] = jax.device_get(state.params)
      states[name] = state

    absdiff = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    for name in params:
      results[name]["max_param_diff"] = max(jax.tree.leaves(jax.tree.map(absdiff, params[name], params["one"])))
    results["one"]["max_param_change"] = max(jax.tree.leaves(jax.tree.map(absdiff, params["one"],
                                                                          host_state.params)))

    # A checkpoint written under fsdp=8 restores under other meshes with identical values.
    saved = states["fsdp8"]
    saved_host = jax.device_get(saved)
    ck = checkpoint.Checkpointer(ckpt_dir, every_steps=1, keep=1, async_save=False)
    ck.save(2, saved, force=True)
    ck.wait()
    restores = {}
    for name, kw in [("data8", dict(data=8)), ("mixed", dict(data=2, fsdp=2, tensor=2)), ("fsdp8", dict(fsdp=8))]:
      mesh = make_mesh(**kw)
      shard = sharding.tree_shardings(abstract, mesh, fsdp=mesh.shape["fsdp"] > 1)
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            sharding.unbox(abstract), shard)
      got = ck.restore(2, target)
      same = all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                                              jax.device_get(got), saved_host)))
      kept = all(a.sharding == s for a, s in zip(jax.tree.leaves(got), jax.tree.leaves(shard)))
      restores[name] = dict(identical=same, target_shardings=kept, layout=layout(got))
    ck.close()
    results["restore"] = restores
    print("RESULT:" + json.dumps(results))
    """)


# The 2-process and 1-process runs: the tiny AMD config through the CLI, parameters sharded over all 8 devices.
_MAIN_ARGS = ["--config", "configs/amd_vit_s_ssv2.py:runlocal", "--config.batch_size=8",
              "--config.amd.student_layers=2", "--config.amd.teacher_layers=2", "--config.amd.generator_depth=1",
              "--config.optim.lr=1e-3",
              "--config.total_steps=3", "--config.mesh.data=1", "--config.mesh.fsdp=8",
              "--config.checkpoint_every_steps=100"]


class _Background:
  """A subprocess started now and read later; output goes to files (pipes could fill and stall it)."""

  def __init__(self, cmd, env, root, name: str):
    self.out, self.err = root / f"{name}.stdout", root / f"{name}.stderr"
    with open(self.out, "w") as out, open(self.err, "w") as err:
      self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True)

  def result(self, timeout: float) -> subprocess.CompletedProcess:
    try:
      self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.stop()
    return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self.out.read_text(),
                                       self.err.read_text())

  def stop(self):
    """SIGTERM first: the local launcher then stops the processes it started."""
    if self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=15)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module", autouse=True)
def heavy_runs(request, tmp_path_factory):
  """Start the multi-device subprocesses the selected tests need, all at once.

  XLA compiles on one core at a time, so on a 2-core machine the runs overlap well; the fast tests
  of this file run meanwhile.
  """
  wanted = {name for item in request.session.items if item.module is request.module
            for name in item.fixturenames}
  root = tmp_path_factory.mktemp("scaleout")
  runs = {}
  if "eight" in wanted:
    runs["eight"] = _Background([sys.executable, "-c", _STEP_SCRIPT, str(root / "mesh_ckpt")], _env(8), root, "eight")
  if "two_process" in wanted:
    env = _env(4)
    env["XLA_FLAGS"] = FAST_COMPILE   # the launcher adds the device count per process
    env.pop("AMD_JAX_DISTRIBUTED")    # the processes initialise from the launcher's coordinator variables
    runs["multi"] = _Background(
        ["bash", os.path.join(LAUNCH, "local_multiprocess.sh"), "-n", "2", "-d", "4", "-t", "500", "-l",
         str(root / "logs"), "--", sys.executable, "-m", "amd_jax.main", *_MAIN_ARGS, "--workdir",
         str(root / "multi")], env, root, "multi")
    runs["single"] = _Background([sys.executable, "-m", "amd_jax.main", *_MAIN_ARGS, "--workdir",
                                  str(root / "single")], _env(8), root, "single")
  yield dict(runs=runs, root=root)
  for run in runs.values():
    run.stop()


@pytest.fixture(scope="module")
def eight(heavy_runs):
  return _record(heavy_runs["runs"]["eight"].result(timeout=600))


@pytest.mark.parametrize("name", ["data8", "fsdp8", "mixed"])
def test_amd_step_matches_one_device(eight, name):
  one, other = eight["one"], eight[name]
  assert other["step"] == one["step"] == 2
  for a, b in zip(other["losses"], one["losses"]):
    assert abs(a - b) <= 1e-5, (name, other["losses"], one["losses"])
  assert other["max_param_diff"] <= 1e-5, (name, other["max_param_diff"])
  assert one["max_param_change"] > 1e-3   # the comparison is not vacuous
  assert len(set(one["losses"])) == 2


def test_amd_params_and_adam_moments_are_sharded(eight):
  fsdp, mixed, data = eight["fsdp8"]["layout"], eight["mixed"]["layout"], eight["data8"]["layout"]
  kernel = fsdp["kernel"]
  assert kernel["shape"] == [32, 128]
  assert kernel["spec"] == [None, "fsdp"] and kernel["shard"] == [32, 16]
  assert fsdp["mu"] == kernel and fsdp["nu"] == kernel   # Adam moments laid out like their parameter
  assert mixed["kernel"]["spec"] == ["fsdp", "tensor"] and mixed["kernel"]["shard"] == [16, 64]
  assert mixed["mu"] == mixed["kernel"] and mixed["nu"] == mixed["kernel"]
  assert data["kernel"]["shard"] == data["kernel"]["shape"] and data["mu"]["shard"] == data["mu"]["shape"]
  # The frozen teacher is sharded too when fsdp > 1 (shard_teacher='auto'), replicated otherwise.
  assert fsdp["teacher"]["spec"] == [None, "fsdp"] and fsdp["teacher"]["shard"] == [32, 12]
  assert data["teacher"]["shard"] == data["teacher"]["shape"]


def test_activation_constraints_reach_the_compiled_step(eight):
  for name in ("one", "data8", "fsdp8", "mixed"):
    assert eight[name]["constraints"] > 10, (name, eight[name]["constraints"])


@pytest.mark.parametrize("name", ["data8", "mixed", "fsdp8"])
def test_checkpoint_moves_between_meshes(eight, name):
  got = eight["restore"][name]
  assert got["identical"] and got["target_shardings"], got
  assert got["layout"]["kernel"]["spec"] == eight[name]["layout"]["kernel"]["spec"]


# ------------------------------------------------------------- 2 processes x 4 devices vs 1 process x 8


@pytest.fixture(scope="module")
def two_process(heavy_runs):
  runs, root = heavy_runs["runs"], heavy_runs["root"]
  for name in ("multi", "single"):
    proc = runs[name].result(timeout=600)
    assert proc.returncode == 0, f"{name} run: " + _fail_text(proc)
  logs = {p.name: p.read_text() for p in (root / "logs").iterdir()}
  return dict(multi=str(root / "multi"), single=str(root / "single"), logs=logs)


def test_two_processes_train_like_one(two_process):
  from amd_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  logs = two_process["logs"]
  assert sorted(logs) == ["process_0.log", "process_1.log"]
  for text in logs.values():   # both processes joined one 8-device runtime
    assert "process 0 of 2" in text or "process 1 of 2" in text, text[-3000:]
    assert "4 local / 8 global devices" in text, text[-3000:]
  multi = weights.load_params(two_process["multi"])
  single = weights.load_params(two_process["single"])
  init = jax.tree.leaves(multi)
  assert len(init) == len(jax.tree.leaves(single))
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), multi, single)
  assert max(jax.tree.leaves(diffs)) <= 1e-5, diffs
  assert checkpoint.Checkpointer(two_process["multi"], 100, 3).latest_step() == 3
