"""The moving-garments generator (amd_jax.data.make_moving): real H.264 files, two labels, deterministic,
read back through the library's ordinary video_list source and pipeline."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest

from amd_jax import errors
from amd_jax.config_base import data_config
from amd_jax.data import make_moving as mm
from amd_jax.data import pipeline, sources

SPEC = mm.MovingSpec(frames=6, size=24, garment_size=12, min_speed=1.0, max_speed=2.0, seed=3)


def _decode(path: str) -> np.ndarray:
  with av.open(path) as container:
    stream = container.streams.video[0]
    assert stream.codec_context.name == "h264" and stream.format.name == "yuv420p"
    return np.stack([f.to_ndarray(format="gray") for f in container.decode(stream)])


def _listing(folder) -> dict[str, bytes]:
  out = {}
  for root, _, files in os.walk(folder):
    for f in files:
      path = os.path.join(root, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, folder)] = fh.read()
  return out


@pytest.fixture(scope="module")
def moving_set(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("moving") / "set")
  mm.generate(out, 16, 8, SPEC, workers=2, log=lambda _: None)
  return out


def test_layout_labels_and_h264_files(moving_set):
  meta = mm.read_meta(moving_set)
  assert meta["complete"] and meta["num_examples"] == {"train": 16, "test": 8}
  for split, count in (("train", 16), ("test", 8)):
    lists = {label: sources.parse_video_list(mm.list_file(moving_set, split, label)) for label in mm.LABELS}
    names = [p for p, _ in lists["direction"]]
    assert names == [mm.clip_name(split, i) for i in range(count)]
    assert all([p for p, _ in lists[label]] == names for label in mm.LABELS)
    directions = [l for _, l in lists["direction"]]
    garments = [l for _, l in lists["garment"]]
    assert directions == [i % 8 for i in range(count)]   # balanced: the directions cycle
    assert all(0 <= g < 10 for g in garments)
    assert [l for _, l in lists["joint"]] == [10 * d + g for d, g in zip(directions, garments)]
    frames = _decode(os.path.join(moving_set, names[0]))
    assert frames.shape == (SPEC.frames, SPEC.size, SPEC.size)


def test_garment_labels_come_from_the_split_images(moving_set):
  images, labels = mm._fashion_mnist("", "test")  # pylint: disable=protected-access
  order = mm.image_order(SPEC, "test", len(images))
  listed = sources.parse_video_list(mm.list_file(moving_set, "test", "garment"))
  for index, (name, label) in enumerate(listed):
    frames, direction, garment = mm.make_clip(SPEC, "test", index, images, order, labels)
    assert garment == label and direction == index % 8
    # The file holds the rendered frames, up to H.264's small loss on grey garments.
    decoded = _decode(os.path.join(moving_set, name)).astype(int)
    assert np.abs(decoded - frames).mean() < 2.0 and np.abs(decoded - frames).max() <= 40


def _centre_of_mass(frame: np.ndarray) -> np.ndarray:
  ys, xs = np.indices(frame.shape)
  w = frame.astype(float)
  return np.array([(xs * w).sum(), (ys * w).sum()]) / w.sum()


def test_the_middle_moves_in_the_labelled_direction(moving_set):
  """The decoded garment's centre of mass travels along the label's direction across the middle frame."""
  k = SPEC.clear_steps
  for name, direction in sources.parse_video_list(mm.list_file(moving_set, "train", "direction")):
    frames = _decode(os.path.join(moving_set, name))
    shift = _centre_of_mass(frames[SPEC.middle + k]) - _centre_of_mass(frames[SPEC.middle - k])
    expected = mm.velocity(direction, 1.0)
    cosine = shift @ expected / (np.linalg.norm(shift) * np.linalg.norm(expected))
    assert cosine > 0.9, (name, mm.DIRECTIONS[direction], shift)


def test_trajectory_bounces_inside_the_canvas():
  spec = mm.MovingSpec(frames=16, size=32, garment_size=16, min_speed=2.0, max_speed=2.0)
  order = np.arange(10)
  bounced = 0
  for index in range(24):
    plan = mm.plan_clip(spec, "train", index, order)
    pos = mm.trajectory(spec, plan)
    assert pos.min() >= 0 and pos.max() <= spec.size - spec.garment_size
    steps = np.diff(pos, axis=0)
    sign = np.sign(np.round(mm.velocity(plan.direction, plan.speed), 6))
    clear = steps[spec.middle - spec.clear_steps:spec.middle + spec.clear_steps]
    assert np.all(clear * sign >= 0)   # no bounce around the middle: every step goes the labelled way
    bounced += int(np.any(steps * sign < 0))
  assert bounced > 12   # 15 steps of 2 px on a 16 px range: most clips bounce somewhere


def test_the_middle_frame_alone_cannot_tell_the_direction():
  """Where the garment is at the middle frame has the same distribution for every direction: a single-frame
  control that sees the middle frame is at chance on the direction label."""
  spec = mm.MovingSpec()
  order = np.arange(10)
  by_direction = {d: [] for d in range(8)}
  for index in range(8 * 600):
    plan = mm.plan_clip(spec, "train", index, order)
    by_direction[plan.direction].append(plan.middle)
  pooled = np.concatenate([np.asarray(v) for v in by_direction.values()])
  grid = np.linspace(0, spec.size - spec.garment_size, 33)
  for positions in by_direction.values():
    positions = np.asarray(positions)
    for axis in (0, 1):   # Kolmogorov-Smirnov distance to the pooled distribution, per axis
      cdf = lambda x, a=axis: (x[:, a][:, None] <= grid).mean(0)
      assert np.abs(cdf(positions) - cdf(pooled)).max() < 0.08
    assert abs(positions.mean() - pooled.mean()) < 0.4


def test_same_seed_same_bytes_any_worker_count(tmp_path, moving_set):
  again = str(tmp_path / "again")
  mm.generate(again, 16, 8, SPEC, workers=1, log=lambda _: None)
  assert _listing(again) == _listing(moving_set)
  other = str(tmp_path / "other_seed")
  mm.generate(other, 16, 8, mm.MovingSpec(**{**SPEC.__dict__, "seed": 4}), workers=2, log=lambda _: None)
  first = _decode(os.path.join(other, mm.clip_name("train", 0)))
  assert not np.array_equal(first, _decode(os.path.join(moving_set, mm.clip_name("train", 0))))


def test_rerun_keeps_a_finished_set_and_refuses_others(tmp_path, moving_set):
  before = _listing(moving_set)
  messages = []
  mm.generate(moving_set, 16, 8, SPEC, log=messages.append)
  assert "nothing to do" in messages[0] and _listing(moving_set) == before
  with pytest.raises(errors.ConfigError, match="other parameters"):
    mm.generate(moving_set, 17, 8, SPEC, log=lambda _: None)
  assert _listing(moving_set) == before
  folder = tmp_path / "mine"
  folder.mkdir()
  (folder / "notes.txt").write_text("my data")
  with pytest.raises(errors.ConfigError, match="not empty"):
    mm.generate(str(folder), 4, 4, SPEC, log=lambda _: None)
  assert os.listdir(folder) == ["notes.txt"]


def test_interrupted_set_is_written_again(tmp_path):
  out = str(tmp_path / "set")
  mm.generate(out, 4, 2, SPEC, log=lambda _: None)
  finished = _listing(out)
  os.remove(os.path.join(out, mm.clip_name("train", 3)))
  os.remove(os.path.join(out, "train_garment.csv"))
  meta = mm.describe(SPEC, 4, 2, complete=False)
  with open(os.path.join(out, mm.META_FILE), "w") as f:
    json.dump(meta, f, indent=2)
  mm.generate(out, 4, 2, SPEC, log=lambda _: None)
  assert _listing(out) == finished


@pytest.mark.parametrize("flags, field", [
    (["--size", "25"], "--size=25"),
    (["--size", "12", "--garment_size", "12"], "--size=12"),
    (["--max_speed", "9"], "--max_speed=9.0"),
    (["--clear_steps", "9"], "--clear_steps=9"),
    (["--min_speed", "0"], "--min_speed=0.0"),
    (["--frames", "1"], "--frames=1"),
    (["--num_test", "0"], "--num_test=0"),
])
def test_bad_flags_are_one_line_exit_2(tmp_path, flags, field):
  proc = subprocess.run([sys.executable, "-m", "amd_jax.data.make_moving", "--out", str(tmp_path / "x"), *flags],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and field in lines[0], proc.stderr
  assert not (tmp_path / "x").exists()


def _video_cfg(folder: str, label: str, **overrides):
  c = data_config()
  c.update(source="video_list", modality="video", path=os.path.join(folder, "{split}_" + label + ".csv"),
           video_root=folder, channels=1, image_size=16, num_frames=4, sampling_rate=1, mean="0.1",
           std="0.2", hflip=False, num_classes=10, num_workers=0, prefetch=0)
  c.update(overrides)
  return c


def test_read_through_the_video_list_pipeline(moving_set):
  """Training batches (random temporal position, multi-scale crop) and multi-view eval batches, both labels."""
  for label, classes in (("direction", 8), ("garment", 10)):
    c = _video_cfg(moving_set, label, num_classes=classes)
    pipeline.validate_data_config(c)
    it = iter(pipeline.make_train_dataset(c, global_batch_size=8, seed=0))
    batch = next(it)
    assert batch["video"].shape == (8, 4, 16, 16, 1) and batch["video"].dtype == np.float32
    listed = dict(sources.parse_video_list(mm.list_file(moving_set, "train", label)))
    assert set(batch["label"].tolist()) <= set(listed.values())
  c = _video_cfg(moving_set, "joint", num_classes=80, test_num_clips=2, test_num_crops=2)
  batches = list(pipeline.make_eval_dataset(c, split="test", batch_size=4))
  assert batches[0]["video"].shape == (4, 4, 4, 16, 16, 1)
  joint = np.concatenate([b["label"][b["mask"]] for b in batches])
  listed = [l for _, l in sources.parse_video_list(mm.list_file(moving_set, "test", "joint"))]
  np.testing.assert_array_equal(joint, listed)
