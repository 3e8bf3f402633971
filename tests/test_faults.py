"""Faults found by a red-team pass, each reproduced: nothing locks a workdir, every exit is clean, checkpoint
permission and integrity faults are named, a run that only skips stops, a signal during compilation stops it.

Permission faults need a process the file modes apply to. As root (CI containers), the command runs
without the capabilities that let root ignore them (util-linux `setpriv` drops CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH); otherwise as the current user. Either way the operating system's own permission
checks are met; nothing is simulated.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from amd_jax import errors, weights
from amd_jax.train import checkpoint, guard, loop

# Whole runs of the loop and the command line with injected faults; the session's compilation cache
# (conftest.py) compiles the tiny config's programs once for all of them.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("compilation_cache")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "test_tiny.py")
NAN_STD = "1e-45"   # data.std that overflows float32: every normalised pixel is Inf/NaN


def tiny(arg=None):
  spec = importlib.util.spec_from_file_location("_faults_tiny_cfg", TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def set_fields(c, **overrides):
  for field, value in overrides.items():
    node = c
    *parents, leaf = field.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


# ------------------------------------------------------------------ a bad teacher locks nothing


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("faults") / "teacher")
  loop.run(tiny("steps=2"), workdir)
  return workdir


@pytest.mark.parametrize("problem", ["missing", "wrong_architecture", "no_checkpoints"])
def test_a_bad_teacher_stops_before_anything_is_written_and_the_corrected_rerun_runs(
    problem, teacher_run, tmp_path, tiny_config):
  empty_run = tmp_path / "not_a_run"
  empty_run.mkdir()
  (empty_run / "config.json").write_text(json.dumps({"method": "mae"}))
  bad = tiny_config("amd,steps=2")
  bad.teacher.checkpoint = {"missing": str(tmp_path / "nowhere"), "wrong_architecture": teacher_run,
                            "no_checkpoints": str(empty_run)}[problem]
  if problem == "wrong_architecture":
    bad.teacher.model.width = 64
  workdir = tmp_path / "student"
  with pytest.raises(errors.ConfigError) as info:
    loop.run(bad, str(workdir))
  assert "config.teacher" in str(info.value)
  assert not (workdir / "config.json").exists() and not (workdir / "checkpoints").exists()
  good = tiny_config("amd,steps=2")
  good.teacher.checkpoint = teacher_run
  assert np.isfinite(loop.run(good, str(workdir))["loss_dir"])   # the same workdir, nothing to refuse


def test_a_config_that_never_saved_a_step_may_be_replaced(tmp_path, tiny_config):
  workdir = tmp_path / "run"
  workdir.mkdir()
  first = tiny_config("steps=2")
  first.optim.lr = 0.5
  (workdir / "config.json").write_text(first.to_json_best_effort())   # a run that stopped before any save
  second = tiny_config("steps=2,width=64")
  loop.run(second, str(workdir))
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["width"] == 64 and saved["optim"]["lr"] == second.optim.lr


# ------------------------------------------------------------------ clean exits


def run_cli(workdir, *overrides, config=TINY, timeout=900, **popen):
  cmd = [sys.executable, "-m", "amd_jax.main", f"--config={config}", f"--workdir={workdir}", *overrides]
  env = dict(os.environ, AMD_JAX_PROGRESS="0", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **popen)


def test_nan_stop_exits_3_cleanly(tmp_path):
  """The message, then exit 3: no abort of threads left running (the soak script repeats this 20 times)."""
  proc = run_cli(tmp_path / "run", f"--config.data.std={NAN_STD}", "--config.total_steps=6")
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert "amd_jax: stopped: non-finite values at step 1" in proc.stderr
  for sign in ("terminate called", "Traceback", "Aborted", "core dumped"):
    assert sign not in proc.stderr, proc.stderr[-3000:]


def test_skipping_every_step_stops_after_nan_max_skips(tmp_path, tiny_config):
  c = set_fields(tiny_config("steps=40"), data__std=NAN_STD, nan_policy="skip", nan_max_skips=5,
                 log_every_steps=2)
  with pytest.raises(guard.NonFiniteError) as info:
    loop.run(c, str(tmp_path / "run"))
  message = str(info.value)
  assert "in a row were non-finite and skipped" in message and "nan_max_skips=5" in message, message
  assert "steps 1-6" in message and "are left as they were" in message   # skipped steps left the state as it was


# ------------------------------------------------------------------ checkpoint permissions and integrity


# Root ignores file modes through these capabilities; without them it is an ordinary owner.
_DROP_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]


def unprivileged(cmd: list[str]) -> list[str]:
  return (_DROP_DAC if os.geteuid() == 0 else []) + cmd


def cli_env() -> dict:
  return dict({k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, AMD_JAX_PROGRESS="0", PYTHONPATH=REPO)


def run_unprivileged(workdir, *overrides, timeout=900):
  return subprocess.run(unprivileged([sys.executable, "-m", "amd_jax.main", f"--config={TINY}",
                                      f"--workdir={workdir}", *overrides]),
                        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def test_checkpoint_permission_faults_are_named_never_a_silent_restart(tmp_path):
  workdir = str(tmp_path / "run")
  first = run_unprivileged(workdir, "--config.total_steps=4")
  assert first.returncode == 0, first.stderr[-3000:]
  ckpts = os.path.join(workdir, "checkpoints")
  # checkpoints/ that cannot be listed: one line naming it, exit 4, nothing changed.
  os.chmod(ckpts, 0)
  try:
    blocked = run_unprivileged(workdir, "--config.total_steps=6", "--config.allow_config_change=True")
  finally:
    os.chmod(ckpts, 0o755)
  assert blocked.returncode == 4, blocked.stderr[-3000:]
  assert f"cannot use the checkpoints folder {ckpts}" in blocked.stderr and "Permission denied" in blocked.stderr
  assert "Traceback" not in blocked.stderr
  assert sorted(os.listdir(ckpts)) == ["2", "4"]
  # An unreadable newest step: passed over with the right reason, set aside, the run goes on from step 2.
  os.chmod(os.path.join(ckpts, "4"), 0)
  try:
    resumed = run_unprivileged(workdir, "--config.total_steps=6", "--config.allow_config_change=True")
  finally:
    for root, dirs, _ in os.walk(workdir):
      for d in dirs:
        os.chmod(os.path.join(root, d), 0o755)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "cannot be read (PermissionError" in resumed.stderr and "not completely written" not in resumed.stderr
  assert "resumed from step 2" in resumed.stderr
  # A folder without permissions cannot move to another folder (that needs write permission on itself):
  # it is renamed beside the steps instead, out of orbax's sight, as it was.
  moved = re.search(r"moved unreadable checkpoint step 4 to (\S+) \(kept as it was\)", resumed.stderr)
  assert moved and os.path.isdir(moved.group(1)), resumed.stderr[-3000:]
  assert sorted(d for d in os.listdir(ckpts) if d.isdigit()) == ["2", "4", "6"]   # 4 saved again


def test_a_save_that_fails_stops_at_that_save_and_keeps_the_earlier_checkpoints(tmp_path):
  """Checkpoints turned read-only during the run (as a full or read-only disk): the next save stops the
  run with one line naming the path and the OS error; the earlier steps stay as they were."""
  workdir = str(tmp_path / "run")
  ckpts = os.path.join(workdir, "checkpoints")
  cmd = [sys.executable, "-m", "amd_jax.main", f"--config={TINY}", f"--workdir={workdir}", "--config.total_steps=400",
         "--config.checkpoint_every_steps=20", "--config.log_every_steps=20"]
  proc = subprocess.Popen(unprivileged(cmd), cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 600
  while not os.path.isfile(os.path.join(ckpts, "20", checkpoint.COMMIT_MARKER)):
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.05)
  os.chmod(ckpts, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
  try:
    _, err = proc.communicate(timeout=600)
  finally:
    os.chmod(ckpts, 0o755)
  assert proc.returncode == 4, err[-3000:]
  lines = [l for l in err.splitlines() if l.startswith("amd_jax: checkpoint fault")]
  assert len(lines) == 1 and ckpts in lines[0] and "Permission denied" in lines[0], err[-3000:]
  assert "Traceback" not in err
  kept = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
  assert 20 in kept and max(kept) < 400
  assert weights.load_params(workdir, step=20)["encoder"]   # intact and readable


def _corrupt_integrity_record(step_dir):
  """Change one saved checksum, as if the data bytes no longer matched what was written."""
  for root, _, files in os.walk(os.path.join(step_dir, "integrity")):
    for name in files:
      path = os.path.join(root, name)
      try:
        record = json.loads(open(path).read())
      except (ValueError, UnicodeDecodeError):
        continue
      key = next(iter(record["checksums"]))
      record["checksums"][key] = (record["checksums"][key] + 1) % 2 ** 32
      open(path, "w").write(json.dumps(record))
      return key
  raise AssertionError("no integrity record found")


def _flip_a_data_byte(step_dir):
  """Flip one byte in the middle of the step's largest array data file (its metadata stays valid)."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
           if os.sep + "d" + os.sep in os.path.join(r, f)]
  target = max(files, key=os.path.getsize)
  data = bytearray(open(target, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(target, "wb").write(bytes(data))


@pytest.mark.parametrize("damage", ["checksum", "data_byte"])
def test_a_garbled_step_is_passed_over_like_an_unreadable_one(tmp_path, tiny_config, damage):
  reference, workdir = str(tmp_path / "reference"), str(tmp_path / "run")
  loop.run(tiny_config("steps=6"), reference)
  shutil.copytree(reference, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  step_dir = os.path.join(workdir, "checkpoints", "4")
  if damage == "checksum":
    _corrupt_integrity_record(step_dir)
  else:
    _flip_a_data_byte(step_dir)
  loop.run(tiny_config("steps=6"), workdir)
  assert os.path.isdir(os.path.join(workdir, checkpoint.UNREADABLE_DIR, "4"))
  for subtree in ("params", "opt_state"):
    a, b = weights.load_params(reference, subtree=subtree), weights.load_params(workdir, subtree=subtree)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), subtree


# ------------------------------------------------------------------ signals during set-up


def test_sigterm_during_compilation_stops_within_seconds(tmp_path):
  """A deep unscanned model compiles for long on a CPU: SIGTERM then stops the run at once."""
  cmd = [sys.executable, "-m", "amd_jax.main", f"--config={TINY}", f"--workdir={tmp_path / 'run'}",
         "--config.model.depth=24", "--config.model.scan=False", "--config.decoder.depth=8"]
  # Without the compilation cache: this test needs the compile to take its time.
  env = dict({k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")},
             AMD_JAX_PROGRESS="0", PYTHONPATH=REPO)
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  seen = ""
  while "on mesh" not in seen:   # the line logged just before the state is built and the step compiled
    line = proc.stderr.readline()
    assert line or proc.poll() is None, seen[-3000:]
    seen += line
  time.sleep(2.0)
  assert proc.poll() is None, "the run ended before the signal"
  sent = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  _, rest = proc.communicate(timeout=120)
  elapsed = time.monotonic() - sent
  err = seen + rest
  assert proc.returncode == 143, err[-3000:]
  assert "received SIGTERM while" in err and "nothing new to save" in err, err[-3000:]
  assert "compiled in" not in err   # it did not wait for the compile
  assert elapsed < 10, elapsed
