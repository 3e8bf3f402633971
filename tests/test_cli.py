"""`python -m amd_jax.main` in a subprocess: a smoke run with overrides, and the errors a user sees."""
from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing import event_accumulator

# Runs of the same configs compile the same programs: the session's compilation cache (conftest.py) compiles
# each once, here and in the subprocesses started from os.environ.
pytestmark = pytest.mark.usefixtures("compilation_cache")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(workdir, *overrides, config="configs/test_tiny.py"):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "amd_jax.main", f"--config={config}", f"--workdir={workdir}", *overrides]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """One CLI training run per session (pytest-xdist workers share it through a file lock)."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  workdir = str(root / "cli_smoke_run")
  with open(root / "cli_smoke.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      done = root / "cli_smoke.json"
      if not done.exists():
        # test_tiny's defaults: total_steps=4, checkpoint_every_steps=2, optim.lr=1e-3.
        proc = run_main(workdir, "--config.total_steps=3", "--config.optim.lr=0.002", "--config.log_every_steps=1")
        done.write_text(json.dumps(dict(returncode=proc.returncode, stdout=proc.stdout[-20000:],
                                        stderr=proc.stderr[-20000:])))
      result = json.loads(done.read_text())
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return workdir, subprocess.CompletedProcess([], result["returncode"], result["stdout"], result["stderr"])


@pytest.mark.slow
def test_smoke_run_succeeds(smoke):
  workdir, proc = smoke
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert "final metrics" in proc.stdout
  assert "loss:" in proc.stdout.split("final metrics", 1)[1]
  assert os.path.isfile(os.path.join(workdir, "config.json"))
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  assert os.path.isdir(os.path.join(workdir, "checkpoints"))


@pytest.mark.slow
def test_overrides_take_effect(smoke):
  workdir, proc = smoke
  assert proc.returncode == 0, proc.stderr[-5000:]
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["total_steps"] == 3 and saved["optim"]["lr"] == 0.002
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps == [2, 3]  # the final checkpoint is at the overridden total, not the config's 4
  # The nested optimizer override reached the schedule: peak lr after the 1-step warmup.
  # Scalars are scalars to TensorBoard's standard reader.
  accumulator = event_accumulator.EventAccumulator(workdir)
  accumulator.Reload()
  assert "learning_rate" in accumulator.Tags()["scalars"] and "loss" in accumulator.Tags()["scalars"]
  lrs = {e.step: e.value for e in accumulator.Scalars("learning_rate")}
  assert sorted(lrs) == [1, 2, 3]
  assert lrs[2] == pytest.approx(0.002)


def test_invalid_override_exits_2_naming_the_field(tmp_path):
  workdir = str(tmp_path / "bad")
  proc = run_main(workdir, "--config.model.patch_size=5")
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "configuration error" in proc.stderr
  assert "config.data.image_size=16" in proc.stderr and "patch_size=5" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # nothing ran


def test_unknown_override_field_is_refused(tmp_path):
  workdir = str(tmp_path / "unknown")
  proc = run_main(workdir, "--config.optim.lrr=1")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "unknown config field in --config.optim.lrr" in proc.stderr
  assert "Did you mean \"lr\"" in proc.stderr   # ml_collections' suggestion is kept
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


@pytest.mark.slow
def test_workdir_of_another_run_is_refused_cleanly(smoke, tmp_path):
  """A workdir holding another config's run: a sentence and exit code 2 (like any configuration error),
  not a traceback; the run in it is untouched."""
  source, first = smoke
  assert first.returncode == 0
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  ckpt = os.path.join(workdir, "checkpoints")
  before = sorted((os.path.relpath(root, workdir), tuple(sorted(files))) for root, _, files in os.walk(ckpt))
  with open(os.path.join(workdir, "config.json")) as f:
    config_before = f.read()
  proc = run_main(workdir, "--config.model.width=64")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "model.width" in proc.stderr and "allow_config_change" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert sorted((os.path.relpath(root, workdir), tuple(sorted(files))) for root, _, files in os.walk(ckpt)) == before
  with open(os.path.join(workdir, "config.json")) as f:
    assert f.read() == config_before


@pytest.mark.parametrize("config,expected", [
    ("configs/test_tiny.py:stesp=3", "unknown config argument 'stesp'"),
    ("configs/no_such_config.py", "no_such_config"),
])
def test_config_file_errors_are_one_line(tmp_path, config, expected):
  proc = run_main(str(tmp_path / "run"), config=config)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("amd_jax:")]
  assert len(lines) == 1 and "configuration error:" in lines[0], proc.stderr[-3000:]
  assert expected in lines[0]
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "run")


def test_each_configuration_message_is_printed_once(tmp_path):
  proc = run_main(str(tmp_path / "run"), "--config.optim.lrr=1")
  assert proc.returncode == 2
  assert proc.stderr.count("unknown config field in --config.optim.lrr") == 1, proc.stderr[-3000:]


@pytest.mark.slow
def test_the_command_line_shows_progress_and_final_metrics_once(smoke):
  _, proc = smoke
  assert proc.stdout.count("final metrics:") == 1
  assert "amd_jax: step 3/3: loss" in proc.stderr   # the log line of each window
  assert "_hparams_" not in proc.stdout + proc.stderr and "allow_config_change" not in proc.stdout
  # The whole run's throughput is the final one; windows are labelled as windows in TensorBoard.
  final = dict(line.strip().split(": ") for line in proc.stdout.split("final metrics:", 1)[1].splitlines()
               if ": " in line)
  assert "examples_per_sec" in final and not any(k.startswith("window/") for k in final)


@pytest.mark.slow
def test_profile_steps_write_a_trace_tensorboard_reads(tmp_path):
  proc = run_main(str(tmp_path / "run"), "--config.total_steps=4", "--config.profile_steps=2,3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  traces = glob.glob(os.path.join(tmp_path, "run", "plugins", "profile", "*", "*.xplane.pb"))
  assert traces, os.listdir(tmp_path / "run")
  assert "profile of steps 2-3 written" in proc.stderr
