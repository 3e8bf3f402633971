"""A video student end to end: a tiny moving-garments set, VideoMAE and AMD trained through the CLI
(`python -m amd_jax.main`), both labels probed with the quickstart's one-pass evaluation."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from amd_jax import quickstart
from amd_jax.data import make_moving

# Runs of the same configs compile the same programs: the session's compilation cache (conftest.py) compiles
# each once, here and in the subprocesses started from os.environ.
pytestmark = pytest.mark.usefixtures("compilation_cache")


CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart_video.py")
SPEC = make_moving.MovingSpec(frames=16, size=32, garment_size=16, seed=1)


def _main(config_arg: str, workdir, *overrides):
  return subprocess.run([sys.executable, "-m", "amd_jax.main", "--config", f"{CONFIG}:{config_arg}",
                         "--workdir", str(workdir), *overrides], capture_output=True, text=True, timeout=1200,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_config_stages_share_the_token_grid():
  module = quickstart.load_config_module(CONFIG)
  stages = {s: module.get_config(f"stage={s},data=/d,teacher=/t,init=/i") for s in
            ("teacher", "videomae", "amd", "finetune")}
  for c in stages.values():
    assert c.data.modality == "video" and c.data.path == "/d/{split}_direction.csv" and c.data.video_root == "/d"
    assert (c.model.patch_size, c.model.tubelet_size, c.data.hflip) == (8, 2, False)
  assert stages["amd"].mask.ratio > stages["amd"].teacher.mask_ratio and stages["amd"].mask.kind == "tube"
  assert stages["amd"].teacher.model.width == stages["teacher"].model.width
  assert stages["finetune"].data.test_num_clips * stages["finetune"].data.test_num_crops == 6
  assert module.get_config("data=/d,label=garment").data.num_classes == 10


@pytest.mark.slow
def test_videomae_and_amd_through_the_cli_probe_both_labels(tmp_path):
  data = str(tmp_path / "moving")
  make_moving.generate(data, 24, 16, SPEC, log=lambda _: None)
  student = tmp_path / "videomae"
  run = _main(f"stage=videomae,data={data},runlocal", student)
  assert run.returncode == 0, run.stderr[-3000:]
  # AMD distils from that run (a 64-wide teacher here, to keep the test to two runs).
  amd = tmp_path / "amd"
  run = _main(f"stage=amd,data={data},teacher={student},runlocal", amd,
              "--config.teacher.model.width=64", "--config.teacher.model.num_heads=2")
  assert run.returncode == 0, run.stderr[-3000:]
  saved = json.loads((amd / "config.json").read_text())
  assert saved["method"] == "amd" and saved["mask"]["kind"] == "tube" and saved["data"]["source"] == "video_list"

  module = quickstart.load_config_module(CONFIG)
  result = quickstart.evaluate_video({"videomae": str(student), "amd": str(amd)}, "videomae",
                                     joint_data=module.data_fields(data, "joint"), single_frame=("videomae", "amd"))
  assert result["labels"] == ["direction", "garment"]
  assert (result["num_train"], result["num_test"]) == (24, 16)
  assert set(result["rows"]) == {"videomae", "amd", "untrained student", "raw pixels", "single frame, videomae",
                                 "single frame, amd"}
  for scores in result["rows"].values():
    for label in ("direction", "garment"):
      assert set(scores[label]) == {"knn_top1", "linear_probe_top1"}
      assert all(0.0 <= v <= 1.0 for v in scores[label].values())
  # Scores are counts of 16 test clips: any other value would mean padding or a label mix-up.
  counts = [v * 16 for s in result["rows"].values() for l in s.values() for v in l.values()]
  np.testing.assert_allclose(counts, np.round(counts), atol=1e-6)
