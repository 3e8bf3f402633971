"""Faults a long run meets: SIGTERM and kill -9 of a real process, damaged checkpoints, NaN/Inf, bad data.

Covered elsewhere (not repeated here): a workdir of another config is refused and left untouched
(tests/test_train.py::test_workdir_of_another_config_is_refused_and_untouched, and through the command
line in tests/test_cli.py); a teacher checkpoint that does not fit stops with its keys and shapes
(tests/test_amd.py).
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.util import tensor_util

from amd_jax import config_validation, weights
from amd_jax.train import checkpoint, guard, loop, preemption

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The run every test here starts from or compares with: 80 steps, a checkpoint every 10 (all kept).
REF = dict(total_steps=80, checkpoint_every_steps=10, log_every_steps=10, keep_checkpoints=20)
LAST = REF["total_steps"]
NAN_STD = "1e-45"   # data.std that overflows float32: every normalised pixel is Inf/NaN


@pytest.fixture(scope="module")
def cache_dir(compilation_cache):
  """The session's persistent compilation cache (conftest.py), for this module's runs in-process and in the
  subprocesses it starts: they compile the same step, and compiling is most of a tiny run's time on a CPU."""
  return compilation_cache


def tiny(**overrides):
  spec = importlib.util.spec_from_file_location("_test_tiny_cfg", os.path.join(REPO, "configs", "test_tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  for field, value in {**REF, **overrides}.items():
    node = c
    *parents, leaf = field.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def ckpt_steps(workdir):
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


def tree_equal(a, b) -> bool:
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in la] == [p for p, _ in lb]
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(la, lb))


def file_digests(root):
  """{relative path: (sha1, mtime_ns)} of every file under root."""
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      p = os.path.join(d, n)
      with open(p, "rb") as f:
        out[os.path.relpath(p, root)] = (hashlib.sha1(f.read()).hexdigest(), os.stat(p).st_mtime_ns)
  return out


def event_files(workdir):
  return set(glob.glob(os.path.join(workdir, "events.out.tfevents.*")))


def read_scalars(workdir, tag, old_files=()):
  """{step: value} of a scalar in the workdir's TensorBoard events, leaving out `old_files`."""
  out = {}
  for f in event_files(workdir) - set(old_files):
    for event in event_file_loader.EventFileLoader(f).Load():
      for v in event.summary.value:
        if v.tag == tag:
          out[event.step] = float(tensor_util.make_ndarray(v.tensor))
  return out


def copy_truncated(source, workdir, last_step):
  """A copy of a finished run as if it had stopped after its `last_step` checkpoint."""
  shutil.copytree(source, workdir)
  for step in ckpt_steps(workdir):
    if step > last_step:
      shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))


@pytest.fixture(scope="module")
def reference(cache_dir, tmp_path_factory):
  """The uninterrupted run: its workdir and final params."""
  workdir = str(tmp_path_factory.mktemp("reliability") / "reference")
  loop.run(tiny(), workdir)
  return workdir


# ------------------------------------------------- a real process: SIGTERM, then kill -9, then resume


def start_main(workdir, cache_dir, log_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "amd_jax.main", "--config=configs/test_tiny.py", f"--workdir={workdir}",
         *[f"--config.{k}={v}" for k, v in REF.items()]]
  log = open(log_path, "w")
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log


def signal_when(proc, workdir, min_step, sig, timeout=240):
  """Send `sig` once a checkpoint of step >= min_step is complete; (returncode, steps at the signal)."""
  deadline = time.time() + timeout
  while not [s for s in ckpt_steps(workdir) if s >= min_step]:
    assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before step {min_step}"
    assert time.time() < deadline, "no checkpoint appeared in time"
    time.sleep(0.01)
  proc.send_signal(sig)
  steps = ckpt_steps(workdir)
  return proc.wait(timeout=timeout), steps


@pytest.fixture(scope="module")
def interrupted(reference, cache_dir, tmp_path_factory):
  """`python -m amd_jax.main` sent SIGTERM after its step-10 checkpoint; rerun, killed with SIGKILL
  once it had saved 20 steps more; rerun (in this process) to the end."""
  root = tmp_path_factory.mktemp("interrupted")
  workdir = str(root / "run")
  proc, log = start_main(workdir, cache_dir, root / "term.log")
  term_rc, _ = signal_when(proc, workdir, 10, signal.SIGTERM)
  log.close()
  term_log = (root / "term.log").read_text()
  term_steps = ckpt_steps(workdir)
  match = re.search(r"received SIGTERM at step (\d+); checkpoint written to (\S+); rerun the same command", term_log)
  stopped_at = int(match.group(1)) if match else None
  stopped_state = weights.load_params(workdir, step=stopped_at, subtree="") if stopped_at in term_steps else None

  proc, log = start_main(workdir, cache_dir, root / "kill.log")
  kill_rc, steps_at_kill = signal_when(proc, workdir, (stopped_at or 0) + 20, signal.SIGKILL)
  log.close()
  final = loop.run(tiny(), workdir)
  return dict(workdir=workdir, term_rc=term_rc, term_log=term_log, term_steps=term_steps, match=match,
              stopped_at=stopped_at, stopped_state=stopped_state, kill_rc=kill_rc, steps_at_kill=steps_at_kill,
              kill_log=(root / "kill.log").read_text(), final=final)


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_reached_and_exits_143(interrupted):
  r = interrupted
  assert r["term_rc"] == 143 == preemption.exit_code("SIGTERM"), r["term_log"][-3000:]
  assert r["match"], r["term_log"][-3000:]
  assert r["match"].group(2) == os.path.join(r["workdir"], "checkpoints")
  assert "Traceback" not in r["term_log"]
  stopped_at = r["stopped_at"]
  assert 10 <= stopped_at < LAST   # mid-run
  assert max(r["term_steps"]) == stopped_at   # the step reached is the newest checkpoint
  assert int(r["stopped_state"]["step"]) == stopped_at
  assert f"resumed from step {stopped_at}" in r["kill_log"]


@pytest.mark.slow
def test_kill_9_and_sigterm_then_rerun_is_bitwise_equal_to_an_uninterrupted_run(interrupted, reference):
  r = interrupted
  context = f"checkpoints at the kill: {r['steps_at_kill']}; log of the killed run:\n{r['kill_log'][-3000:]}"
  assert r["kill_rc"] == -signal.SIGKILL, context
  assert max(r["steps_at_kill"]) < LAST, context   # killed mid-run
  assert ckpt_steps(r["workdir"])[-1] == LAST
  assert np.isfinite(r["final"]["loss"])
  for subtree in ("params", "opt_state"):
    a = weights.load_params(reference, subtree=subtree)
    b = weights.load_params(r["workdir"], subtree=subtree)
    assert tree_equal(a, b), f"{subtree} differ; {context}"


# ------------------------------------------------------------------- damaged checkpoints


@pytest.mark.slow
def test_damaged_latest_checkpoints_fall_back_to_an_older_one(reference, tmp_path, caplog):
  """80: save interrupted (left in orbax's temporary name); 70: data files truncated; 60: commit
  marker missing (a partial copy). The run resumes from 50, sets 70 and 60 aside unchanged, and ends
  bitwise where the uninterrupted run ended."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  ckpts = os.path.join(workdir, "checkpoints")
  os.rename(os.path.join(ckpts, "80"), os.path.join(ckpts, "80.orbax-checkpoint-tmp"))   # as a killed save
  for f in glob.glob(os.path.join(ckpts, "70", "state", "ocdbt.process_0", "d", "*")):
    os.truncate(f, os.path.getsize(f) // 2)
  os.remove(os.path.join(ckpts, "60", checkpoint.COMMIT_MARKER))
  damaged = {step: file_digests(os.path.join(ckpts, str(step))) for step in (70, 60)}
  step_50 = file_digests(os.path.join(ckpts, "50"))

  with caplog.at_level("WARNING"):
    loop.run(tiny(), workdir)
  warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
  assert re.search(r"checkpoint step 70 in \S+ cannot be restored \(ValueError: OUT_OF_RANGE", warnings), warnings
  assert re.search(r"checkpoint step 60 in \S+ cannot be restored \(no commit_success\.txt", warnings)
  assert "step 50" not in warnings and "step 80" not in warnings
  assert file_digests(os.path.join(ckpts, "50")) == step_50   # restored from, not rewritten
  for step in (70, 60):   # set aside, byte for byte
    assert file_digests(os.path.join(workdir, checkpoint.UNREADABLE_DIR, str(step))) == damaged[step]
  assert ckpt_steps(workdir)[-3:] == [60, 70, 80]   # saved again by the resumed run
  assert tree_equal(weights.load_params(reference), weights.load_params(workdir))
  assert tree_equal(weights.load_params(reference, 70), weights.load_params(workdir, 70))


@pytest.mark.slow
def test_no_restorable_checkpoint_is_a_clear_error_and_moves_nothing(reference, tmp_path):
  workdir = str(tmp_path / "run")
  copy_truncated(reference, workdir, 20)
  for step in (10, 20):
    for f in glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_0", "d", "*")):
      os.truncate(f, 10)
  before = file_digests(workdir)
  with pytest.raises(checkpoint.CheckpointError) as info:
    loop.run(tiny(), workdir)
  message = str(info.value)
  assert "step 20:" in message and "step 10:" in message and "nothing was changed" in message
  after = file_digests(workdir)
  assert {k: v for k, v in after.items() if k.startswith("checkpoints")} == \
      {k: v for k, v in before.items() if k.startswith("checkpoints")}
  assert not os.path.exists(os.path.join(workdir, checkpoint.UNREADABLE_DIR))


# --------------------------------------------------------------------------- NaN / Inf


@pytest.mark.slow
def test_nan_stop_names_step_and_terms_and_leaves_checkpoints_untouched(reference, tmp_path):
  """Resumed at 40 with data that turns every input into Inf/NaN: the run stops at step 41 and the
  checkpoint it would have written at 50 is not written."""
  workdir = str(tmp_path / "run")
  copy_truncated(reference, workdir, 40)
  before = file_digests(os.path.join(workdir, "checkpoints"))
  with pytest.raises(guard.NonFiniteError) as info:   # other normalisation: an allowed, recorded change
    loop.run(tiny(data__std=NAN_STD, allow_config_change=True), workdir)
  message = str(info.value)
  assert "non-finite values at step 41" in message, message
  terms = re.search(r"non-finite in steps 41-\d+: ([\w, ]+)\.", message).group(1).split(", ")
  assert {"loss", "loss_rec", "grad_norm"} <= set(terms) and "learning_rate" not in terms
  assert "latest: step 40" in message and "nan_policy=skip" in message
  assert file_digests(os.path.join(workdir, "checkpoints")) == before


@pytest.mark.slow
def test_nan_skip_counts_skipped_steps_and_keeps_the_weights(reference, tmp_path):
  """Every step after the resume is non-finite: all are skipped, counted, and the weights and
  optimizer state stay those of the step-60 checkpoint."""
  workdir = str(tmp_path / "run")
  copy_truncated(reference, workdir, 60)
  copied_events = event_files(workdir)
  final = loop.run(tiny(data__std=NAN_STD, nan_policy="skip", nan_max_skips=100, allow_config_change=True),
                   workdir)
  assert ckpt_steps(workdir)[-2:] == [70, 80]
  assert int(weights.load_params(workdir, subtree="")["step"]) == 80
  for subtree in ("params", "opt_state"):
    assert tree_equal(weights.load_params(reference, 60, subtree=subtree),
                      weights.load_params(workdir, subtree=subtree)), subtree
  params = weights.load_params(workdir)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  counts = read_scalars(workdir, guard.COUNT, copied_events)
  assert counts == {70: 10, 80: 10}
  assert final[guard.COUNT] == 10 and "loss" not in final   # no finite step to average


def test_a_nonfinite_state_is_never_saved():
  """The last line of defence: a state with a NaN is refused before a save, naming the leaf."""
  class Checkpoints:
    waited = False

    def wait(self):
      self.waited = True

    def latest_step(self):
      return 40

  state = {"encoder": {"w": np.ones((2, 2), np.float32), "b": np.array([0.0, np.nan], np.float32)},
           "step": np.int32(45)}
  checkpoints = Checkpoints()
  with pytest.raises(guard.NonFiniteError) as info:
    guard.NanGuard("stop", checkpoints).check_before_save(state, None, 45)
  assert "step 45" in str(info.value) and "['encoder']['b']" in str(info.value)
  assert "['encoder']['w']" not in str(info.value) and "latest: step 40" in str(info.value)
  assert checkpoints.waited
  guard.NanGuard("off", checkpoints).check_before_save(state, None, 45)   # 'off' checks nothing


def test_nan_policy_is_validated():
  with pytest.raises(config_validation.ConfigError, match="nan_policy"):
    config_validation.validate(tiny(nan_policy="ignore"))


# ------------------------------------------------------------------------------ bad data, workdirs


def _png(path, value):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(np.full((16, 16), value, np.uint8)).save(path)


@pytest.mark.slow
def test_undecodable_files_are_counted_in_the_logged_metrics(reference, tmp_path):
  root = tmp_path / "images"
  (root / "train" / "a").mkdir(parents=True)
  for i in range(8):
    _png(root / "train" / "a" / f"{i}.png", 30 * i)
  (root / "train" / "a" / "broken.png").write_bytes(b"not an image")
  workdir = str(tmp_path / "run")
  final = loop.run(tiny(data__source="image_folder", data__path=str(root), data__eval_split="",
                        data__num_classes=0, checkpoint_every_steps=LAST), workdir)
  skipped = read_scalars(workdir, "data/skipped_files")
  assert sorted(skipped) == list(range(10, LAST + 1, 10))
  assert set(skipped.values()) == {1.0} and final["data/skipped_files"] == 1.0


@pytest.mark.parametrize("layout", ["missing", "no_class_folders", "empty_class_folder"])
def test_empty_or_missing_data_stops_before_anything_runs(tmp_path, layout):
  data = tmp_path / "data"
  if layout != "missing":
    data.mkdir()
  if layout == "empty_class_folder":
    (data / "train" / "a").mkdir(parents=True)
  workdir = str(tmp_path / "run")
  with pytest.raises(config_validation.ConfigError) as info:
    loop.run(tiny(data__source="image_folder", data__path=str(data), data__eval_split=""), workdir)
  message = str(info.value)
  assert f"config.data.path={str(data)!r}" in message, message
  expected = {"missing": "is not a directory", "no_class_folders": "has no sub-folders",
              "empty_class_folder": "has 0 examples"}[layout]
  assert expected in message, message
  assert not os.path.exists(workdir)   # stopped at validation: nothing compiled, nothing written


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  workdir = str(blocker / "run")
  with pytest.raises(config_validation.ConfigError) as info:
    loop.run(tiny(), workdir)
  assert f"workdir {workdir!r} is not writable" in str(info.value) and "--workdir" in str(info.value)


# ------------------------------------------------------------------------------ the signal handler


def test_stop_request_records_signals_and_restores_the_handlers():
  calls = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
  try:
    ours = signal.getsignal(signal.SIGTERM)
    with preemption.StopRequest() as stop:
      assert signal.getsignal(signal.SIGTERM) is not ours
      assert not stop.reached(3)
      os.kill(os.getpid(), signal.SIGTERM)   # only recorded: this process goes on
      assert stop.signal_name == "SIGTERM" and stop.reached(4) and stop.stop_step == 4
      assert str(stop.preempted("/w/checkpoints")) == (
          "received SIGTERM at step 4; checkpoint written to /w/checkpoints; rerun the same command to resume")
    assert signal.getsignal(signal.SIGTERM) is ours and calls == []   # acted on: not delivered again
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_a_signal_after_the_last_step_is_delivered_when_the_run_ends():
  calls = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
  try:
    with preemption.StopRequest():
      os.kill(os.getpid(), signal.SIGTERM)   # e.g. during the final evaluation
      assert calls == []
    assert calls == [signal.SIGTERM]
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_second_ctrl_c_interrupts_at_once():
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)   # Python's own, whoever runs the tests
  try:
    with preemption.StopRequest() as stop:
      os.kill(os.getpid(), signal.SIGINT)
      assert stop.signal_name == "SIGINT" and stop.reached(1)
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)   # the handler runs between bytecodes; it never gets this far
    assert preemption.exit_code("SIGINT") == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, previous)


def test_an_ignored_signal_stays_ignored():
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)   # as in a background job
  try:
    with preemption.StopRequest() as stop:
      assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
      os.kill(os.getpid(), signal.SIGINT)
      assert stop.signal_name is None and not stop.reached(1)
  finally:
    signal.signal(signal.SIGINT, previous)


def test_several_processes_follow_jax_preemption_sync(monkeypatch):
  """With JAX's preemption service no Python handler is installed; JAX names the step all stop at."""
  monkeypatch.setattr(preemption, "_preemption_service_running", lambda: True)
  monkeypatch.setattr(preemption.multihost_utils, "reached_preemption_sync_point", lambda step: step == 7)
  before = signal.getsignal(signal.SIGTERM)
  with preemption.StopRequest() as stop:
    assert signal.getsignal(signal.SIGTERM) is before
    assert [stop.reached(s) for s in (5, 6, 7)] == [False, False, True]
    assert stop.stop_step == 7 and stop.signal_name == "SIGTERM"


def test_several_processes_without_the_service_agree_at_log_steps(monkeypatch):
  """Only this process's peer got SIGTERM: the flags are gathered every `agree_every` steps."""
  gathered = []
  monkeypatch.setattr(preemption, "_preemption_service_running", lambda: False)
  monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)

  def allgather(flag):
    gathered.append(int(flag))
    return np.array([int(flag), 1])
  monkeypatch.setattr(preemption.multihost_utils, "process_allgather", allgather)
  with preemption.StopRequest(agree_every=5) as stop:
    assert not any(stop.reached(s) for s in (1, 2, 3, 4))
    assert stop.reached(5) and stop.signal_name == "SIGTERM"
  assert gathered == [0]   # one exchange, at step 5


def test_exit_codes_of_the_command_line():
  from amd_jax import main  # pylint: disable=g-import-not-at-top
  assert main.EXIT_CODES["SIGTERM"] == preemption.exit_code("SIGTERM") == 143
  assert main.EXIT_CODES["SIGINT"] == preemption.exit_code("SIGINT") == 130
  assert len(set(main.EXIT_CODES.values())) == len(main.EXIT_CODES)
