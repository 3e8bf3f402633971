"""The data sources on gs:// (the local GCS emulator of conftest.py's `gcs` fixture).

The same files are written to local disk and to the bucket; the pipelines must
give the same batches from both.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image
import pytest

from amd_jax import config_base
from amd_jax import paths
from amd_jax.data import pipeline
from amd_jax.data import sources
from testlib import assert_batches_equal, carphone_path, take

pytestmark = pytest.mark.gcs


def write_tree(files: dict[str, bytes], local_root, remote_root: str) -> None:
  """The same relative files under a local folder and under a gs:// prefix."""
  for relative, data in files.items():
    local = os.path.join(local_root, relative)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    with open(local, "wb") as f:
      f.write(data)
    paths.write_bytes(f"{remote_root}/{relative}", data)


def png_bytes(seed: int, size=(12, 10)) -> bytes:
  import io  # pylint: disable=g-import-not-at-top
  pixels = np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="PNG")
  return out.getvalue()


def image_folder_files() -> dict[str, bytes]:
  """train/ and test/ with class folders of PNGs (a nested sub-folder too, and a broken file)."""
  files = {}
  for split, per_class in (("train", 4), ("test", 2)):
    for c, name in enumerate(("ant", "bee", "cow")):
      for i in range(per_class):
        files[f"{split}/{name}/{i}.png"] = png_bytes(100 * c + 10 * i + (split == "test"))
  files["train/bee/deeper/9.png"] = png_bytes(999)
  files["train/bee/2_broken.png"] = b"\x89PNG\r\n\x1a\n not an image"
  files["train/cow/readme.txt"] = b"not an image"
  return files


def image_cfg(path, **overrides):
  c = config_base.data_config()
  c.update(source="image_folder", path=path, channels=3, image_size=8, mean="0.5,0.5,0.5",
           std="0.25,0.25,0.25", eval_split="test", cache_max_bytes=0)
  c.update(overrides)
  return c


def test_image_folder_in_a_bucket_gives_the_local_batches(gcs, tmp_path):
  write_tree(image_folder_files(), tmp_path, gcs.url)
  local, remote = image_cfg(str(tmp_path)), image_cfg(gcs.url)
  for c in (local, remote):
    pipeline.validate_data_config(c)
  assert pipeline.num_classes(remote) == 3
  assert pipeline.num_examples(remote) == pipeline.num_examples(local) == 14
  remote_files = sources.make_source(remote, "train")._files  # pylint: disable=protected-access
  local_files = sources.make_source(local, "train")._files  # pylint: disable=protected-access
  # Same walk order: a folder's files, then its sub-folders.
  assert [f[len(gcs.url):] for f in remote_files] == [f[len(str(tmp_path)):] for f in local_files]
  assert remote_files[0].startswith("gs://")

  sources.reset_skipped_files()
  train = lambda c: take(pipeline.make_train_dataset(c, global_batch_size=6, seed=2), 4)
  assert_batches_equal(train(remote), train(local))
  assert f"{gcs.url}/train/bee/2_broken.png" in sources.skipped_files()
  evaluate = lambda c: list(pipeline.make_eval_dataset(c, split="test", batch_size=4))
  assert_batches_equal(evaluate(remote), evaluate(local))
  # The in-memory copy of a bucket folder serves the same batches.
  assert_batches_equal(train(image_cfg(gcs.url, cache_max_bytes=2**20)), train(local))


def video_cfg(path, video_root, **overrides):
  c = config_base.data_config()
  c.update(source="video_list", modality="video", path=path, video_root=video_root, channels=3,
           mean="0.45,0.45,0.45", std="0.225,0.225,0.225", image_size=16, num_frames=4,
           sampling_rate=8, eval_split="test")
  c.update(overrides)
  return c


def test_video_list_in_a_bucket_gives_the_local_batches(gcs, tmp_path):
  with open(carphone_path(), "rb") as f:
    clip = f.read()
  files = {"clips/a.mp4": clip, "clips/sub/b.mp4": clip,
           "lists/train.csv": b"a.mp4 0\nsub/b.mp4 2\n# a comment\n\na.mp4 1\n",
           "lists/test.csv": b"sub/b.mp4 1\n"}
  write_tree(files, tmp_path, gcs.url)
  local = video_cfg(str(tmp_path / "lists"), str(tmp_path / "clips"))
  remote = video_cfg(gcs / "lists", gcs / "clips")
  for c in (local, remote):
    pipeline.validate_data_config(c)
  assert pipeline.num_classes(remote) == 3
  assert pipeline.num_examples(remote) == 3

  sources.reset_skipped_files()
  train = lambda c: take(pipeline.make_train_dataset(c, global_batch_size=3, seed=0), 2)
  assert_batches_equal(train(remote), train(local))
  assert not sources.skipped_files()  # every clip in the bucket was read
  evaluate = lambda c: list(pipeline.make_eval_dataset(c, split="test", batch_size=2))
  assert_batches_equal(evaluate(remote), evaluate(local))


def test_fashion_mnist_idx_files_in_a_bucket(gcs):
  for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
    with open(os.path.join(sources.FASHION_MNIST_DIR, name), "rb") as f:
      paths.write_bytes(gcs / name, f.read())
  c = config_base.data_config()
  c.update(path=gcs.url, split="test", eval_split="")
  pipeline.validate_data_config(c)
  assert pipeline.num_examples(c) == 10000
  local = config_base.data_config()
  local.update(split="test", eval_split="")
  first = lambda c: take(pipeline.make_eval_dataset(c, split="test", batch_size=16), 1)
  assert_batches_equal(first(c), first(local))
