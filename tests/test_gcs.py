"""Runs whose every file lives in a bucket: a real GCS JSON API served locally (tests/conftest.py `gcs`).

The command line is run as a user runs it on a TPU VM, `--workdir gs://...`, with the emulator
found through the standard environment variables only. Each test checks what landed in the
bucket through an independent client (google-cloud-storage), and that nothing was written to
local disk in its place.
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from amd_jax import convert, paths, weights

pytestmark = [pytest.mark.gcs, pytest.mark.slow, pytest.mark.usefixtures("compilation_cache")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "test_tiny.py")


def run_cli(gcs, cwd, workdir, *overrides, config=TINY, wait=True):
  cmd = [sys.executable, "-m", "amd_jax.main", f"--config={config}", f"--workdir={workdir}", *overrides]
  env = gcs.subprocess_env(PYTHONPATH=REPO, AMD_JAX_PROGRESS="0")
  proc = subprocess.Popen(cmd, cwd=str(cwd), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if not wait:
    return proc
  out, err = proc.communicate(timeout=900)
  proc.stdout_text, proc.stderr_text = out, err
  return proc


def assert_ok(proc):
  assert proc.returncode == 0, proc.stderr_text[-4000:]


def tree_equal(a, b) -> bool:
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  return [p for p, _ in la] == [p for p, _ in lb] and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(la, lb))


@pytest.fixture
def empty_cwd(tmp_path):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  return cwd


def test_run_in_a_bucket_writes_nothing_locally_and_resumes_exactly_after_kill_9(gcs, empty_cwd):
  common = ("--config.total_steps=24", "--config.checkpoint_every_steps=4", "--config.keep_checkpoints=10")
  straight = run_cli(gcs, empty_cwd, gcs / "straight", *common)
  assert_ok(straight)
  objects = gcs.objects("straight")
  assert "straight/config.json" in objects and "straight/final_metrics.json" in objects
  assert any(o.startswith("straight/events.out.tfevents.") for o in objects)
  for step in (4, 24):
    assert f"straight/checkpoints/{step}/commit_success.txt" in objects
  assert list(empty_cwd.iterdir()) == []   # no ./gs:/... folder, nothing beside it

  # kill -9 once a checkpoint is in the bucket, then run the same command again.
  proc = run_cli(gcs, empty_cwd, gcs / "crashed", *common, wait=False)
  deadline = time.monotonic() + 600
  while "crashed/checkpoints/8/commit_success.txt" not in gcs.objects("crashed/checkpoints"):
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.2)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  resumed = run_cli(gcs, empty_cwd, gcs / "crashed", *common)
  assert_ok(resumed)
  assert "resumed from step" in resumed.stderr_text
  for subtree in ("params", "opt_state"):
    assert tree_equal(weights.load_params(gcs / "straight", subtree=subtree),
                      weights.load_params(gcs / "crashed", subtree=subtree)), subtree
  assert list(empty_cwd.iterdir()) == []

  # Another config in that workdir is refused, and the bucket is left exactly as it was.
  before = {o: paths.read_bytes(gcs / o) for o in gcs.objects("straight") if not o.endswith("/")}
  refused = run_cli(gcs, empty_cwd, gcs / "straight", *common, "--config.model.width=64")
  assert refused.returncode == 2, refused.stderr_text[-3000:]
  assert "holds a different run" in refused.stderr_text and "model.width" in refused.stderr_text
  after = {o: paths.read_bytes(gcs / o) for o in gcs.objects("straight") if not o.endswith("/")}
  assert after == before


def test_amd_teacher_from_a_bucket_workdir_and_a_bucket_pth(gcs, empty_cwd, tiny_config):
  teacher = gcs / "teacher"
  assert_ok(run_cli(gcs, empty_cwd, teacher, "--config.total_steps=2"))
  # The same teacher as an official-naming .pth file, uploaded next to it.
  cfg = tiny_config("amd")
  arch = convert.arch_from_config(cfg.teacher.model, image_size=cfg.data.image_size, in_chans=cfg.data.channels,
                                  video=False)
  local_pth = empty_cwd.parent / "teacher.pth"
  convert.export_torch({"encoder": weights.load_params(teacher)["encoder"]}, str(local_pth), arch, "mae",
                       parts=("encoder",))
  paths.write_bytes(gcs / "weights/teacher.pth", local_pth.read_bytes())
  local_pth.unlink()
  for name, source in (("from_run", teacher), ("from_pth", gcs / "weights/teacher.pth")):
    proc = run_cli(gcs, empty_cwd, gcs / f"amd_{name}", "--config.total_steps=2",
                   f"--config.teacher.checkpoint={source}", config=f"{TINY}:amd")
    assert_ok(proc)
    assert f"amd_{name}/checkpoints/2/commit_success.txt" in gcs.objects(f"amd_{name}")
    assert set(weights.load_params(gcs / f"amd_{name}")) == {"encoder", "decoder", "projections", "generators"}
  assert list(empty_cwd.iterdir()) == []


def _png(value: int) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full((16, 16), value, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def test_image_folder_and_video_list_in_a_bucket_train(gcs, empty_cwd):
  # An image folder: <split>/<class>/*.png, uploaded object by object.
  for split, count in (("train", 6), ("test", 2)):
    for label, cls in enumerate(("coat", "shirt", "bag")):
      for i in range(count):
        paths.write_bytes(gcs / f"images/{split}/{cls}/{i}.png", _png(40 * label + 10 * i))
  proc = run_cli(gcs, empty_cwd, gcs / "image_run", "--config.total_steps=2", "--config.batch_size=6",
                 "--config.data.source=image_folder", f"--config.data.path={gcs / 'images'}",
                 "--config.data.num_classes=3")
  assert_ok(proc)
  assert "image_run/checkpoints/2/commit_success.txt" in gcs.objects("image_run")

  # Videos: clips of the moving-garments generator, written straight into the bucket with their lists.
  made = subprocess.run([sys.executable, "-m", "amd_jax.data.make_moving", "--out", gcs / "moving",
                         "--num_train", "4", "--num_test", "2", "--frames", "8", "--size", "32"],
                        cwd=str(empty_cwd), env=gcs.subprocess_env(PYTHONPATH=REPO), capture_output=True, text=True,
                        timeout=600)
  assert made.returncode == 0, made.stderr[-3000:]
  assert "moving/train/000000.mp4" in gcs.objects("moving")
  proc = run_cli(gcs, empty_cwd, gcs / "video_run", "--config.total_steps=2", "--config.batch_size=2",
                 "--config.data.source=video_list", f"--config.data.path={gcs / 'moving'}/{{split}}_direction.csv",
                 f"--config.data.video_root={gcs / 'moving'}", "--config.data.image_size=32",
                 "--config.data.num_frames=4", "--config.data.sampling_rate=1", "--config.data.num_classes=8",
                 config=f"{TINY}:video")
  assert_ok(proc)
  assert "video_run/checkpoints/2/commit_success.txt" in gcs.objects("video_run")
  assert list(empty_cwd.iterdir()) == []
