"""The train loop end to end on synthetic data: learning, events, checkpoints, resume, refusal, metrics, video."""
from __future__ import annotations

import fcntl
import glob
import importlib.util
import json
import math
import os
import shutil

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.util import tensor_util

from amd_jax import weights
from amd_jax.train import loop

# Whole runs of the loop (every test reads one); runs of one config compile the same programs, which the
# session's persistent compilation cache (conftest.py) compiles once.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("compilation_cache")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _session_root(tmp_path_factory):
  """A temp dir shared by the whole test session, pytest-xdist workers included."""
  root = tmp_path_factory.getbasetemp()
  return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def tiny(arg=None, **overrides):
  spec = importlib.util.spec_from_file_location("_test_tiny_cfg", os.path.join(REPO, "configs", "test_tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  for field, value in overrides.items():
    node = c
    *parents, leaf = field.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def constant_lr(arg=None, **overrides):
  """A schedule that does not depend on total_steps: a run stopped early and resumed with a larger
  total_steps must then take exactly the steps of a straight run."""
  settings = dict(optim__lr=1e-3, optim__min_lr=1e-3, optim__warmup_steps=0)
  settings.update(overrides)
  return tiny(arg, **settings)


def ckpt_steps(workdir):
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


def event_files(workdir):
  return sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")))


def read_scalars(files, tag):
  """{step: value} of a scalar tag in TensorBoard event files, read with TensorBoard's own loader."""
  out = {}
  for f in files:
    for event in event_file_loader.EventFileLoader(f).Load():
      for v in event.summary.value:
        if v.tag == tag:
          out[event.step] = float(tensor_util.make_ndarray(v.tensor))
  return out


def tree_equal(a, b) -> bool:
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in la] == [p for p, _ in lb]
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(la, lb))


def tree_max_diff(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
                                          a, b)))


def snapshot(workdir):
  """(relative path, size, mtime_ns) of every file under workdir, and config.json's text."""
  files = []
  for root, _, names in os.walk(workdir):
    for n in names:
      p = os.path.join(root, n)
      st = os.stat(p)
      files.append((os.path.relpath(p, workdir), st.st_size, st.st_mtime_ns))
  with open(os.path.join(workdir, "config.json")) as f:
    return sorted(files), f.read()


def shared(tmp_path_factory, name, produce):
  """produce(workdir) -> JSON-able result, computed once per test session, also across pytest-xdist
  workers (they share the parent of their base temp dirs; a file lock makes the others wait)."""
  root = _session_root(tmp_path_factory)
  workdir = root / f"shared_{name}"
  with open(root / f"shared_{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      done = workdir / "result.json"
      if not done.exists():
        workdir.mkdir(exist_ok=True)
        result = produce(str(workdir))
        done.write_text(json.dumps(result))
      return str(workdir), json.loads(done.read_text())
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


# ------------------------------------------------- a short run: learning, events, checkpoints

RUN_A = dict(total_steps=12, log_every_steps=1, checkpoint_every_steps=4)


def _produce_run_a(root):
  """tiny, 12 steps (warmup 1, cosine), logged every step, checkpoint every 4; and the same run logged
  every 5 steps (it reuses the first run's compiled programs through the cache)."""
  every_step, every_5 = os.path.join(root, "every_step"), os.path.join(root, "every_5")
  final = loop.run(tiny(**RUN_A), every_step)
  final_5 = loop.run(tiny(**dict(RUN_A, log_every_steps=5)), every_5)
  return dict(workdir=every_step, final=final, workdir_5=every_5, final_5=final_5)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
  return shared(tmp_path_factory, "run_a", _produce_run_a)[1]


def test_loss_falls(run_a):
  losses = read_scalars(event_files(run_a["workdir"]), "loss")
  first = np.mean([losses[s] for s in (1, 2, 3)])
  last = np.mean([losses[s] for s in (10, 11, 12)])
  assert last < 0.8 * first, losses
  lr = read_scalars(event_files(run_a["workdir"]), "learning_rate")
  assert lr[1] == 0.0 and lr[2] == pytest.approx(1e-3) and lr[12] < lr[6] < lr[2]  # warmup, then cosine
  assert all(v > 0 for v in read_scalars(event_files(run_a["workdir"]), "grad_norm").values())


def test_run_writes_events_checkpoints_and_config(run_a):
  workdir, final = run_a["workdir"], run_a["final"]
  assert ckpt_steps(workdir) == [4, 8, 12]
  for step in (4, 8, 12):
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step), "state"))
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step), "data"))
  files = event_files(workdir)
  assert files, os.listdir(workdir)
  losses = read_scalars(files, "loss")
  assert sorted(losses) == list(range(1, 13))
  assert all(math.isfinite(v) for v in losses.values())
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["total_steps"] == 12 and saved["model"]["variant"] == "tiny"
  assert math.isfinite(final["loss"]) and final["compile_seconds"] > 0


def test_checkpoint_holds_the_trained_params(run_a):
  workdir = run_a["workdir"]
  params = weights.load_params(workdir)
  assert set(params) == {"encoder", "decoder"}
  assert params["encoder"]["blocks_0"]["attn"]["qkv"]["kernel"].shape == (32, 96)
  early = weights.load_params(workdir, step=4)
  assert tree_max_diff(params, early) > 0  # step 12 is not step 4
  state = weights.load_params(workdir, subtree="")
  assert int(state["step"]) == 12


def test_metrics_read_one_step_late_still_give_final_loss(run_a):
  per_step = read_scalars(event_files(run_a["workdir"]), "loss")
  # Logged every step: the final metrics are the last step's, read after the loop.
  assert run_a["final"]["loss"] == pytest.approx(per_step[12], rel=1e-6)
  # Logged every 5 steps: windows 1-5, 6-10 (each read one step late), then 11-12 flushed after the loop.
  windows = read_scalars(event_files(run_a["workdir_5"]), "loss")
  assert sorted(windows) == [5, 10, 12]
  for end, steps in ((5, range(1, 6)), (10, range(6, 11)), (12, (11, 12))):
    assert windows[end] == pytest.approx(np.mean([per_step[s] for s in steps]), rel=1e-5), end
  assert run_a["final_5"]["loss"] == pytest.approx(windows[12], rel=1e-6)


def test_workdir_of_another_config_is_refused_and_untouched(run_a, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(run_a["workdir"], workdir)
  before = snapshot(workdir)
  with pytest.raises(ValueError) as info:
    loop.run(tiny("width=64", **RUN_A), workdir)
  message = str(info.value)
  assert "model.width" in message and "64" in message and workdir in message
  assert "allow_config_change" in message
  assert snapshot(workdir) == before
  assert weights.load_params(workdir)["encoder"]["cls_token"].shape == (1, 1, 32)


def test_finished_run_is_not_retrained(run_a, tmp_path, library_log):
  workdir = str(tmp_path / "run")
  shutil.copytree(run_a["workdir"], workdir)
  before = snapshot(workdir)
  final = loop.run(tiny(**RUN_A), workdir)
  assert snapshot(workdir) == before   # nothing written: no step, no checkpoint, no event file
  assert "already complete at step 12" in library_log.text
  assert "compiled" not in library_log.text
  # The stored final metrics of the run are returned again, marked as such.
  assert final["already_complete"] == 1.0
  assert final["loss"] == pytest.approx(run_a["final"]["loss"])


# ------------------------------------------------------------------- resume


def _produce_resume(root):
  """A run stopped after 6 steps and restarted to 10; the same 10 steps taken straight; and a copy of
  the straight run that 'crashed' after its step-6 checkpoint (9 and 10 deleted), restarted."""
  resumed, straight, crashed = (os.path.join(root, n) for n in ("resumed", "straight", "crashed"))
  first = loop.run(constant_lr(total_steps=6, checkpoint_every_steps=3), resumed)
  after_first = dict(ckpts=ckpt_steps(resumed), events=event_files(resumed))
  # Continuing to more steps changes the schedule: an explicit, recorded change.
  final = loop.run(constant_lr(total_steps=10, checkpoint_every_steps=3, allow_config_change=True), resumed)
  loop.run(constant_lr(total_steps=10, checkpoint_every_steps=3), straight)
  shutil.copytree(straight, crashed)
  for step in (9, 10):
    shutil.rmtree(os.path.join(crashed, "checkpoints", str(step)))
  loop.run(constant_lr(total_steps=10, checkpoint_every_steps=3), crashed)
  return dict(resumed=resumed, straight=straight, crashed=crashed, first=first, final=final, **after_first)


@pytest.fixture(scope="module")
def resume(tmp_path_factory):
  return shared(tmp_path_factory, "resume", _produce_resume)[1]


def test_stop_and_resume_continues_from_saved_step(resume):
  resumed = resume["resumed"]
  assert resume["ckpts"] == [3, 6]
  assert math.isfinite(resume["first"]["loss"])
  assert ckpt_steps(resumed) == [3, 6, 9, 10]
  assert int(weights.load_params(resumed, subtree="")["step"]) == 10
  new_files = [f for f in event_files(resumed) if f not in resume["events"]]
  assert sorted(read_scalars(new_files, "loss")) == [7, 8, 9, 10]  # the resumed run counts on from 6
  assert math.isfinite(resume["final"]["loss"])
  with open(os.path.join(resumed, "config.json")) as f:
    assert json.load(f)["total_steps"] == 10
  # The change is on record: what the first six steps were trained with is kept.
  with open(os.path.join(resumed, "config_history.jsonl")) as f:
    entries = [json.loads(line) for line in f]
  assert len(entries) == 1 and entries[0]["resumed_at_step"] == 6
  assert entries[0]["changes"] == ["total_steps: 6 -> 10"] and entries[0]["previous"]["total_steps"] == 6


def test_resume_is_exact(resume):
  """6 steps + 4 resumed steps == 10 straight steps, bit for bit (params and Adam moments)."""
  for step in (3, 6, 9, 10):
    a, b = weights.load_params(resume["straight"], step), weights.load_params(resume["resumed"], step)
    assert tree_equal(a, b), f"step {step}: max |diff| = {tree_max_diff(a, b)}"
  a = weights.load_params(resume["straight"], subtree="opt_state")
  b = weights.load_params(resume["resumed"], subtree="opt_state")
  assert tree_equal(a, b), f"opt_state: max |diff| = {tree_max_diff(a, b)}"
  # Per-step losses agree too (the masks of a step depend on the step only).
  straight = read_scalars(event_files(resume["straight"]), "loss")
  resumed = read_scalars(event_files(resume["resumed"]), "loss")
  assert sorted(straight) == sorted(resumed) == list(range(1, 11))
  assert all(straight[s] == resumed[s] for s in straight), (straight, resumed)


def test_resume_from_mid_run_checkpoint_is_exact(resume):
  """The straight run's step-6 checkpoint was saved asynchronously while training went on; the copy
  restarted from it ends where the straight run ended: the async save captured the right state and
  the right data-iterator position."""
  assert ckpt_steps(resume["crashed"]) == [3, 6, 9, 10]
  a, b = weights.load_params(resume["straight"]), weights.load_params(resume["crashed"])
  assert tree_equal(a, b), f"max |diff| = {tree_max_diff(a, b)}"


# -------------------------------------------------------------------- video


def test_videomae_tiny_end_to_end(tmp_path):
  workdir = str(tmp_path)
  final = loop.run(tiny("video", total_steps=3, checkpoint_every_steps=3), workdir)
  assert math.isfinite(final["loss"]) and final["loss"] > 0
  assert ckpt_steps(workdir) == [3]
  params = weights.load_params(workdir)
  enc = params["encoder"]
  assert enc["patch_embed"]["proj"]["kernel"].shape == (2, 4, 4, 3, 32)  # tubelet x patch x patch x C
  assert "cls_token" not in enc
  assert "q_bias" in enc["blocks_0"]["attn"] and "bias" not in enc["blocks_0"]["attn"]["qkv"]
  assert sorted(read_scalars(event_files(workdir), "loss")) == [1, 2, 3]
