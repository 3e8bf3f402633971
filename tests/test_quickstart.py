"""amd_jax.quickstart: --config.* overrides reach every stage and control; a rerun never replaces a result."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from amd_jax import errors, quickstart

# Runs of the same configs compile the same programs: the session's compilation cache (conftest.py) compiles
# each once, here and in the subprocesses started from os.environ.
pytestmark = pytest.mark.usefixtures("compilation_cache")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_split_overrides_takes_both_spellings():
  rest, overrides = quickstart.split_overrides(
      ["--workdir", "W", "--config.data.path=/x", "--video", "--config.mask.ratio", "0.9", "--config.data.hflip"])
  assert rest == ["--workdir", "W", "--video"]
  assert overrides == ["--config.data.path=/x", "--config.mask.ratio=0.9", "--config.data.hflip"]


def test_overrides_reach_every_stage_that_has_the_field(tmp_path):
  plan = quickstart.Plan(str(tmp_path / "w"), False, quickstart.default_config_path(),
                         ["--config.data.source=image_folder", f"--config.data.path={tmp_path}",
                          "--config.teacher.mask_ratio=0.4", "--config.optim.base_lr=0.002",
                          "--config.data.hflip=false"], runlocal=False)
  for config in plan.configs.values():
    assert (config.data.source, config.data.path, config.data.hflip) == ("image_folder", str(tmp_path), False)
    assert config.optim.base_lr == 0.002
  assert plan.configs["amd"].teacher.mask_ratio == 0.4   # only the AMD stage has a teacher view
  assert "teacher" not in plan.configs["mae"]


def test_video_plan_reads_its_data_folder_and_keeps_overrides(tmp_path):
  plan = quickstart.Plan(str(tmp_path / "w"), True, quickstart.default_config_path(video=True),
                         ["--config.data.num_workers=2"], runlocal=True)
  assert plan.stages == quickstart.VIDEO_STAGES and plan.moving_data
  for config in plan.configs.values():
    assert config.data.video_root == str(tmp_path / "w" / "data") and config.data.num_workers == 2
    assert config.data.hflip is False and config.mask.kind == "tube"
  other = quickstart.Plan(str(tmp_path / "v"), True, quickstart.default_config_path(video=True),
                          [f"--config.data.path={tmp_path}/list.csv", "--config.data.video_root="], runlocal=True)
  assert not other.moving_data   # another video list: its own label is scored, nothing is generated


@pytest.mark.parametrize("override, message", [
    ("--config.data.nope=1", "names no field"),
    ("--config.mask.ratio=abc", "config.mask.ratio"),
])
def test_bad_overrides_stop_before_anything_runs(tmp_path, override, message):
  with pytest.raises(errors.ConfigError, match=message):
    quickstart.Plan(str(tmp_path / "w"), False, quickstart.default_config_path(), [override], runlocal=True)
  assert not (tmp_path / "w").exists()


def test_middle_frame_clip_repeats_the_middle_frame():
  video = np.arange(2 * 4 * 2 * 2 * 1, dtype=np.float32).reshape(2, 4, 2, 2, 1)
  out = np.asarray(quickstart.middle_frame_clip(video))
  assert out.shape == video.shape
  for t in range(4):
    np.testing.assert_array_equal(out[:, t], video[:, 2])


def _image_folder(root, per_class: dict[str, int]) -> None:
  """Three classes a glance tells apart (the left, right or top half bright), noisy 28x28 grey PNGs."""
  rng = np.random.default_rng(0)
  halves = (np.s_[:, :14], np.s_[:, 14:], np.s_[:14, :])
  for split, count in per_class.items():
    for label, half in enumerate(halves):
      folder = root / split / f"class{label}"
      folder.mkdir(parents=True)
      for i in range(count):
        pixels = np.full((28, 28), 40.0)
        pixels[half] = 215.0
        pixels = np.clip(pixels + rng.normal(0, 12, (28, 28)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")


def _quickstart(*args, cwd):
  return subprocess.run([sys.executable, "-m", "amd_jax.quickstart", *args], capture_output=True, text=True,
                        cwd=cwd, timeout=1800, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow
def test_own_image_folder_then_rerun_keeps_results_md(tmp_path):
  """The quickstart on an image folder from the command line (controls included), then reruns: a finished
  workdir prints its stored table and stays byte-identical; other settings are refused."""
  data = tmp_path / "folder"
  _image_folder(data, {"train": 12, "test": 6})
  workdir = tmp_path / "qs"
  args = ["--runlocal", "--workdir", str(workdir), "--config.data.source=image_folder", f"--config.data.path={data}",
          "--config.data.num_classes=0", "--config.data.mean=0.5", "--config.data.std=0.3", "--config.data.hflip=false"]
  first = _quickstart(*args, cwd=tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert results["complete"] and results["settings"]["overrides"] == args[3:]
  for stage in quickstart.IMAGE_STAGES:
    run_config = json.loads((workdir / stage / "config.json").read_text())
    assert run_config["data"]["source"] == "image_folder" and run_config["data"]["path"] == str(data)
  # The controls read the folder too: its classes differ in which half is bright, which raw pixels tell apart.
  assert results["controls"]["rows"]["raw pixels"]["knn_top1"] == 1.0
  text = (workdir / "results.md").read_text()
  assert "Command: `python -m amd_jax.quickstart " + " ".join(args) + "`" in text and "Finished: " in text
  before = (workdir / "results.md").read_bytes()
  stamps = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}

  again = _quickstart(*args, cwd=tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "holds a finished quickstart" in again.stdout and "nothing was run again" in again.stdout
  assert text in again.stdout
  assert (workdir / "results.md").read_bytes() == before
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()} == stamps   # nothing written

  other = _quickstart(*args, "--config.mask.ratio=0.6", cwd=tmp_path)
  assert other.returncode == 2 and "other settings" in other.stderr
  assert len([l for l in other.stderr.splitlines() if "other settings" in l]) == 1   # said once
  assert (workdir / "results.md").read_bytes() == before

  # Interrupted after the stages (results.md lost): the stages' and controls' records rebuild the same table,
  # nothing is trained or measured again.
  records = {p: p.read_bytes() for p in workdir.glob("*/quickstart.json")} | {
      workdir / "controls.json": (workdir / "controls.json").read_bytes()}
  os.remove(workdir / "results.md")
  os.remove(workdir / "results.json")
  rebuilt = _quickstart(*args, cwd=tmp_path)
  assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
  assert {p: p.read_bytes() for p in records} == records
  assert "step compiled" not in rebuilt.stderr + rebuilt.stdout
  table = text[text.index("| encoder |"):]
  assert table in (workdir / "results.md").read_text()
