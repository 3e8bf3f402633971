"""Data statistics (amd_jax/data/stats.py): measured mean/std, 'auto' with its cache, stale-value warnings."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from amd_jax import config_base
from amd_jax.data import stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_two_colour_folder(root, sizes=((4, 4), (6, 2), (8, 10))):
  """train/red holds red images, train/blue blue ones, of the given (height, width) sizes each.

  Equal pixel counts of (255, 0, 0) and (0, 0, 255): mean (0.5, 0, 0.5), std (0.5, 0, 0.5).
  """
  for name, colour in (("blue", (0, 0, 255)), ("red", (255, 0, 0))):
    folder = root / "train" / name
    folder.mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
      Image.new("RGB", (w, h), colour).save(folder / f"{i}.png")


def folder_cfg(path, **overrides):
  c = config_base.data_config()
  c.update(source="image_folder", path=str(path), channels=3, image_size=8, mean="auto", std="auto",
           eval_split="")
  c.update(overrides)
  return c


def test_mean_std_and_sizes_of_a_folder(tmp_path):
  write_two_colour_folder(tmp_path)
  result = stats.compute_stats(folder_cfg(tmp_path))
  np.testing.assert_allclose(result.mean, (0.5, 0.0, 0.5), atol=1e-9)
  np.testing.assert_allclose(result.std, (0.5, 0.0, 0.5), atol=1e-9)
  assert (result.measured, result.total) == (6, 6)
  assert result.heights == (4, 6, 8) and result.widths == (2, 4, 10)
  assert result.overrides() == "--config.data.mean=0.5000,0.0000,0.5000 --config.data.std=0.5000,0.0000,0.5000"
  grey = stats.compute_stats(folder_cfg(tmp_path, channels=1))  # PIL luma: red 76, blue 29
  np.testing.assert_allclose(grey.mean, ((76 + 29) / 2 / 255,), atol=1e-9)
  sample = stats.compute_stats(folder_cfg(tmp_path), num_examples=4)
  assert (sample.measured, sample.total) == (4, 6)


def test_fashion_mnist_statistics_match_the_published_ones():
  c = config_base.data_config()  # Fashion-MNIST: every training image is measured by default
  result = stats.compute_stats(c)
  assert result.measured == 60000
  np.testing.assert_allclose(result.mean, (0.2860,), atol=5e-4)
  np.testing.assert_allclose(result.std, (0.3530,), atol=5e-4)


def test_auto_is_measured_once_cached_and_recorded(tmp_path):
  write_two_colour_folder(tmp_path / "data")
  workdir = tmp_path / "run"
  c = folder_cfg(tmp_path / "data")
  resolved = stats.resolve_normalisation(c, str(workdir))
  assert (resolved.mean, resolved.std) == ("0.5000,0.0000,0.5000", "0.5000,0.0000,0.5000")
  assert c.mean == "auto"  # the caller's config is left as it was
  cache_file = workdir / stats.STATS_FILE
  record = json.loads(cache_file.read_text())
  assert record["mean"] == resolved.mean and record["key"]["data"]["path"] == str(tmp_path / "data")

  # Reused while the data fields hold (the cache's value, not a new measurement, comes back) ...
  record["mean"] = "0.1000,0.2000,0.3000"
  cache_file.write_text(json.dumps(record))
  assert stats.resolve_normalisation(c, str(workdir)).mean == "0.1000,0.2000,0.3000"
  # ... measured again when they change, and a damaged cache is not trusted.
  grey = stats.resolve_normalisation(folder_cfg(tmp_path / "data", channels=1), str(workdir))
  assert grey.mean == f"{(76 + 29) / 2 / 255:.4f}"
  cache_file.write_text("{not json")
  assert stats.resolve_normalisation(c, str(workdir)).mean == "0.5000,0.0000,0.5000"
  # Only the 'auto' fields change; explicit numbers stay; no 'auto': the config comes back as is.
  half = stats.resolve_normalisation(folder_cfg(tmp_path / "data", std="0.2,0.2,0.2"), str(workdir))
  assert (half.mean, half.std) == ("0.5000,0.0000,0.5000", "0.2,0.2,0.2")
  fixed = folder_cfg(tmp_path / "data", mean="0.5,0.5,0.5", std="0.2,0.2,0.2")
  assert stats.resolve_normalisation(fixed, str(tmp_path / "other")) is fixed
  assert not (tmp_path / "other").exists()


def test_stale_fields_name_another_data_sets_values(tmp_path):
  quickstart_like = config_base.data_config()  # Fashion-MNIST's mean, std, flip
  assert stats.stale_fields(quickstart_like) == []
  own = config_base.data_config()
  own.update(source="image_folder", path=str(tmp_path))
  assert stats.stale_fields(own) == ["mean", "std", "hflip"]
  message = stats.describe_stale(own)
  assert "config.data.mean='0.2860', config.data.std='0.3530' are Fashion-MNIST's statistics" in message
  assert "config.data.hflip=True" in message
  own.update(mean="auto", std="auto")
  assert stats.stale_fields(own) == [] and stats.describe_stale(own) == ""
  own.update(hflip=False, mean="0.2860", std="0.3")  # a kept mean alone is named too
  assert stats.stale_fields(own) == ["mean"]

  imagenet = dict(channels=3, mean="0.485,0.456,0.406", std="0.229,0.224,0.225")
  fmnist_rgb = config_base.data_config()
  fmnist_rgb.update(**imagenet)
  assert stats.stale_fields(fmnist_rgb) == ["mean", "std"]
  rgb_folder = config_base.data_config()
  rgb_folder.update(source="image_folder", path=str(tmp_path), **imagenet)
  assert stats.stale_fields(rgb_folder) == []  # ImageNet's statistics are the customary default for RGB
  synthetic = config_base.data_config()
  synthetic.update(source="synthetic")
  assert stats.stale_fields(synthetic) == []


def test_command_line_prints_the_overrides_and_the_classes(tmp_path):
  write_two_colour_folder(tmp_path)
  command = [sys.executable, "-m", "amd_jax.data.stats", "--config", os.path.join(REPO, "configs", "test_tiny.py"),
             "--config.data.source=image_folder", f"--config.data.path={tmp_path}", "--config.data.channels=3",
             "--config.data.mean=0.2860,0.2860,0.2860", "--config.data.std=0.3530,0.3530,0.3530"]
  done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  out = done.stdout
  assert "6 of 6 images measured" in out
  assert "height min/median/max 4 / 6 / 8" in out
  assert "--config.data.mean=0.5000,0.0000,0.5000 --config.data.std=0.5000,0.0000,0.5000" in out
  # test_tiny.py says 4 classes; the folder has 2: reported, the measurement still printed.
  assert "classes: 2 (2 class folders in" in out and "config.data.num_classes=4 is not valid" in out
  assert "note:" not in out  # three channels of 0.2860 are not Fashion-MNIST's one value
  bad = subprocess.run(command[:6] + ["--config.data.path=/no/such/folder"], capture_output=True, text=True,
                       cwd=REPO, timeout=300, check=False)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith("amd_jax: configuration error: config.data.path=")


@pytest.mark.parametrize("field,value", [("mean", "auto,0.2"), ("std", "")])
def test_auto_is_all_or_nothing_per_field(field, value, tmp_path):
  from amd_jax import errors  # pylint: disable=g-import-not-at-top
  from amd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  write_two_colour_folder(tmp_path)
  c = folder_cfg(tmp_path, **{field: value})
  with pytest.raises(errors.ConfigError, match=f"config.data.{field}="):
    pipeline.validate_data_config(c)
