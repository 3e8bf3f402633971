"""Random-access data sources (grain's RandomAccessDataSource protocol).

Each source has `__len__` and `__getitem__(index)`, returning a dict of numpy
values: {'image': uint8 [H, W, C], 'label': int32} for images, or
{'video': uint8 [T, H, W, C], 'label': int32} for videos (the centred clip;
video sources also have `read(index, rng)` for a randomly placed clip, since
the temporal position is part of the augmentation, and `read_views(index,
num_clips)` for the [num_clips, T, H, W, C] clips of a multi-clip test, evenly
spaced in time). Sources are chosen by
config.data.source:

  fashion_mnist  path: folder of the original idx .gz files ('' = the Debian
                 package's /usr/share/datasets/fashion-mnist). Splits: train, test.
  image_folder   path/<split>/<class>/**/*.{jpg,jpeg,png}. Classes are the
                 sorted sub-folder names. If path/<split> does not exist but
                 path's sub-folders hold images themselves (path/<class>/x.jpg),
                 path is taken as ONE unsplit set and used for every split (a
                 warning says so: train and eval then see the same images).
  tfds           tfds.data_source(tfds_name, split, data_dir=path): a data set
                 prepared by the user in array_record format (tfds build
                 --file_format=array_record). Features 'image' and 'label'
                 (label -1 when the data set has none).
  video_list     VideoMAE-style list file, one video per line:
                 "<path> <label>" (label: last whitespace-separated token, so
                 paths may contain spaces; blank lines and '#' lines skipped).
                 Relative paths are joined to video_root. `path` is the list
                 file; a path containing '{split}' is formatted with the split;
                 a folder means <folder>/<split>.csv (or .txt) as VideoMAE lays
                 out train.csv/val.csv/test.csv.
  synthetic      synthetic_size random uint8 images or clips with labels
                 index % num_classes, a pure function of (split, index).

Files that fail to decode are skipped: the next index (wrapping round) is read
instead, so the replacement is deterministic. Each skipped path is logged once
and recorded in `skipped_files()` (per process: with grain worker processes
the skips happen, and are logged, in the workers).
"""
from __future__ import annotations

import functools
import gzip
import os
import threading
import zlib
from typing import Any, Callable

from absl import logging
import numpy as np

from amd_jax.data import transforms
from amd_jax.data import video as video_lib

SOURCES = ("fashion_mnist", "image_folder", "tfds", "video_list", "synthetic")
IMAGE_SOURCES = ("fashion_mnist", "image_folder", "tfds", "synthetic")
VIDEO_SOURCES = ("video_list", "synthetic")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_MNIST_PREFIX = {"train": "train", "test": "t10k"}
# A run of this many unreadable files in a row is not bad luck but a broken
# data set (or a bug): stop instead of spinning through the whole source.
MAX_CONSECUTIVE_SKIPS = 100


class SourceError(ValueError):
  """A configuration problem with the data: the message names the config field."""


# ------------------------------------------------------------- skipped files

_skipped: dict[str, str] = {}
_skipped_lock = threading.Lock()


def skipped_files() -> dict[str, str]:
  """Paths skipped in this process because they could not be decoded -> reason."""
  with _skipped_lock:
    return dict(_skipped)


def reset_skipped_files() -> None:
  with _skipped_lock:
    _skipped.clear()


def _record_skip(what: str, error: BaseException) -> None:
  reason = f"{type(error).__name__}: {error}"
  with _skipped_lock:
    first_time = what not in _skipped
    _skipped[what] = reason
  if first_time:
    logging.warning("Skipping undecodable file %s (%s); using the next example instead.",
                    what, reason)


def read_with_fallback(length: int, index: int, read: Callable[[int], Any],
                       describe: Callable[[int], str]) -> Any:
  """read(index), or read(index + 1), ... for the first index that decodes.

  Any exception from decoding counts as a bad file (decoders raise a zoo of
  types: OSError, ValueError, SyntaxError, av.FFmpegError, zlib.error, ...);
  MAX_CONSECUTIVE_SKIPS failures in a row re-raise the last one.
  """
  last_error = None
  for attempt in range(min(length, MAX_CONSECUTIVE_SKIPS)):
    i = (index + attempt) % length
    try:
      return read(i)
    except Exception as e:  # pylint: disable=broad-except
      _record_skip(describe(i), e)
      last_error = e
  raise RuntimeError(
      f"{min(length, MAX_CONSECUTIVE_SKIPS)} consecutive examples failed to decode, starting at "
      f"{describe(index % length)}; the data set looks broken (see skipped_files())."
  ) from last_error


def _example(key: str, array: np.ndarray, label: int) -> dict[str, np.ndarray]:
  return {key: array, "label": np.int32(label)}


# ------------------------------------------------------------- fashion-mnist


def fashion_mnist_files(path: str, split: str, split_field: str = "config.data.split") -> tuple[str, str]:
  """(images file, labels file) of a Fashion-MNIST split; checks they exist."""
  if split not in _FASHION_MNIST_PREFIX:
    raise SourceError(f"{split_field}={split!r} is not a Fashion-MNIST split; "
                      f"allowed: {sorted(_FASHION_MNIST_PREFIX)}.")
  folder = path or FASHION_MNIST_DIR
  prefix = _FASHION_MNIST_PREFIX[split]
  files = (os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"),
           os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"))
  for f in files:
    if not os.path.isfile(f):
      raise SourceError(
          f"Fashion-MNIST file {f} not found (config.data.path={path!r}). Install the data with "
          f"`apt-get install dataset-fashion-mnist` (files in {FASHION_MNIST_DIR}), or set "
          "config.data.path to a folder holding the original idx .gz files.")
  return files


def _idx_header(f) -> tuple[int, ...]:
  """Dimensions from an idx header: magic 0x0000 08 <ndim>, then ndim big-endian int32."""
  magic = f.read(4)
  if len(magic) != 4 or magic[:3] != b"\x00\x00\x08":
    raise ValueError("not an idx file of uint8 values")
  ndim = magic[3]
  return tuple(int(d) for d in np.frombuffer(f.read(4 * ndim), dtype=">i4"))


def idx_length(file: str) -> int:
  """Number of records in an idx .gz file, reading only its header."""
  with gzip.open(file, "rb") as f:
    return _idx_header(f)[0]


@functools.lru_cache(maxsize=8)
def load_idx(file: str) -> np.ndarray:
  """Whole idx .gz file as a uint8 array (cached: the set is 50 MB in memory)."""
  with gzip.open(file, "rb") as f:
    dims = _idx_header(f)
    data = np.frombuffer(f.read(), dtype=np.uint8)
  if data.size != int(np.prod(dims)):
    raise ValueError(f"{file}: header says {dims} but holds {data.size} values")
  return data.reshape(dims)


class FashionMnistSource:
  """Fashion-MNIST from the idx files: uint8 [28, 28, channels] and labels 0..9."""

  def __init__(self, path: str, split: str, channels: int = 1,
               split_field: str = "config.data.split"):
    image_file, label_file = fashion_mnist_files(path, split, split_field)
    images = load_idx(image_file)[..., None]
    self._images = images if channels == 1 else transforms.match_channels(images, channels)
    self._labels = load_idx(label_file).astype(np.int32)
    if len(self._images) != len(self._labels):
      raise ValueError(f"{image_file} and {label_file} differ in length")

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return _example("image", self._images[index], self._labels[index])


# -------------------------------------------------------------- image folder


def _is_image_file(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _has_images(folder: str) -> bool:
  with os.scandir(folder) as it:
    return any(e.is_file() and _is_image_file(e.name) for e in it)


def _subfolders(folder: str) -> list[str]:
  with os.scandir(folder) as it:
    return sorted(e.name for e in it if e.is_dir())


@functools.lru_cache(maxsize=None)
def _warn_unsplit(path: str) -> None:
  logging.warning("%s has no split sub-folders: treating its class folders as one set, used for "
                  "every split (train and eval see the same images).", path)


def image_folder_root(path: str, split: str, split_field: str = "config.data.split") -> str:
  """The folder whose sub-folders are the classes, per the layout rules above."""
  if not path or not os.path.isdir(path):
    raise SourceError(f"config.data.path={path!r} is not a directory; image_folder needs "
                      "path/<split>/<class>/*.jpg|jpeg|png (or path/<class>/...).")
  split_dir = os.path.join(path, split)
  if os.path.isdir(split_dir):
    return split_dir
  classes = _subfolders(path)
  if classes and any(_has_images(os.path.join(path, c)) for c in classes):
    _warn_unsplit(path)
    return path
  raise SourceError(f"{split_field}={split!r}: {split_dir} does not exist and the class folders of "
                    f"config.data.path={path!r} hold no images directly; found sub-folders "
                    f"{classes[:10]}. Expected path/<split>/<class>/*.jpg|jpeg|png.")


@functools.lru_cache(maxsize=16)
def scan_image_folder(root: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]]:
  """(class names, files, labels) of root/<class>/**/<image>, all sorted."""
  classes = tuple(_subfolders(root))
  files, labels = [], []
  for label, name in enumerate(classes):
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
      dirnames.sort()  # os.walk visits sub-folders in this list's order
      for f in sorted(filenames):
        if _is_image_file(f):
          files.append(os.path.join(dirpath, f))
          labels.append(label)
  return classes, tuple(files), tuple(labels)


def decode_image(file: str, channels: int) -> np.ndarray:
  """Decodes an image file to uint8 [H, W, channels] with PIL."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(file) as im:
    im = im.convert("L" if channels == 1 else "RGB")
    out = np.asarray(im)
  return out[..., None] if channels == 1 else out


class ImageFolderSource:
  """Images in class sub-folders, decoded with PIL; undecodable files skipped."""

  def __init__(self, path: str, split: str, channels: int = 3,
               split_field: str = "config.data.split"):
    root = image_folder_root(path, split, split_field)
    self.class_names, self._files, self._labels = scan_image_folder(root)
    self._channels = channels

  def __len__(self) -> int:
    return len(self._files)

  def _read(self, index: int) -> dict[str, np.ndarray]:
    return _example("image", decode_image(self._files[index], self._channels), self._labels[index])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return read_with_fallback(len(self), index, self._read, self._files.__getitem__)


# ---------------------------------------------------------------------- tfds


def _tfds_builder(name: str, data_dir: str):
  """The tfds builder of a prepared data set; SourceError naming the fields if absent."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not name:
    raise SourceError("config.data.tfds_name is empty; the tfds source needs a builder name, "
                      "e.g. 'imagenet2012'.")
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except Exception as e:  # pylint: disable=broad-except
    raise SourceError(f"config.data.tfds_name={name!r} with config.data.path={data_dir!r}: no "
                      f"prepared tfds data set found ({type(e).__name__}: {e}).") from e
  if not builder.is_prepared():
    raise SourceError(f"config.data.tfds_name={name!r} is not prepared under config.data.path="
                      f"{data_dir!r}; prepare it first (nothing is downloaded at run time).")
  if builder.info.file_format is None or builder.info.file_format.value != "array_record":
    raise SourceError(
        f"config.data.tfds_name={name!r} is stored as {builder.info.file_format}; random access "
        "needs array_record files (tfds build --file_format=array_record).")
  return builder


def tfds_length(name: str, split: str, data_dir: str, split_field: str = "config.data.split") -> int:
  splits = _tfds_builder(name, data_dir).info.splits
  if split not in splits:
    raise SourceError(f"{split_field}={split!r} is not a split of tfds data set {name!r}; "
                      f"allowed: {sorted(splits.keys())}.")
  return splits[split].num_examples


class TfdsSource:
  """A prepared tfds data set read through tfds.data_source (random access)."""

  def __init__(self, name: str, split: str, data_dir: str, channels: int = 3,
               split_field: str = "config.data.split"):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds_length(name, split, data_dir, split_field)  # clear errors first
    self._source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    self._channels = channels
    self._name, self._split = name, split

  def _describe(self, index: int) -> str:
    return f"tfds:{self._name}/{self._split}[{index}]"

  def __len__(self) -> int:
    return len(self._source)

  def _read(self, index: int) -> dict[str, np.ndarray]:
    record = self._source[index]
    image = np.asarray(record["image"], dtype=np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    return _example("image", transforms.match_channels(image, self._channels),
                    int(record.get("label", -1)))

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return read_with_fallback(len(self), index, self._read, self._describe)


# ---------------------------------------------------------------- video list


def video_list_file(path: str, split: str, split_field: str = "config.data.split") -> str:
  """The annotation file of `split` per the rules in the module docstring."""
  if not path:
    raise SourceError("config.data.path is empty; video_list needs an annotation file "
                      "('<video path> <label>' per line) or a folder with <split>.csv.")
  if "{split}" in path:
    file = path.format(split=split)
  elif os.path.isdir(path):
    candidates = [os.path.join(path, split + ext) for ext in (".csv", ".txt")]
    file = next((c for c in candidates if os.path.isfile(c)), candidates[0])
  else:
    file = path
  if not os.path.isfile(file):
    raise SourceError(f"config.data.path={path!r} ({split_field}={split!r}): annotation file "
                      f"{file} does not exist.")
  return file


def parse_video_list(file: str, video_root: str = "") -> list[tuple[str, int]]:
  """[(video path, label)] from '<path> <label>' lines; errors name the line."""
  entries = []
  with open(file, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      parts = line.rsplit(None, 1)
      try:
        if len(parts) != 2:
          raise ValueError
        video, label = parts[0], int(parts[1])
      except ValueError:
        raise SourceError(f"{file}:{n}: expected '<video path> <integer label>', got {line!r} "
                          "(config.data.path).") from None
      entries.append((os.path.join(video_root, video) if video_root else video, label))
  return entries


class VideoListSource:
  """Videos listed in an annotation file, decoded with PyAV into num_frames clips."""

  def __init__(self, path: str, split: str, video_root: str, num_frames: int, sampling_rate: int,
               channels: int = 3, split_field: str = "config.data.split"):
    entries = parse_video_list(video_list_file(path, split, split_field), video_root)
    self._paths = tuple(p for p, _ in entries)
    self._labels = tuple(l for _, l in entries)
    self._num_frames = num_frames
    self._stride = sampling_rate
    self._channels = channels

  def __len__(self) -> int:
    return len(self._paths)

  def _read(self, index: int, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    clip = video_lib.read_clip(self._paths[index], self._num_frames, self._stride, rng)
    return _example("video", transforms.match_channels(clip, self._channels), self._labels[index])

  def read(self, index: int, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """Clip at a random position (rng given) or centred (rng None); bad files skipped."""
    return read_with_fallback(len(self), index, lambda i: self._read(i, rng), self._paths.__getitem__)

  def read_views(self, index: int, num_clips: int) -> dict[str, np.ndarray]:
    """num_clips clips evenly spaced in time, [num_clips, T, H, W, C]; bad files skipped."""
    def read(i: int) -> dict[str, np.ndarray]:
      clips = video_lib.read_clips(self._paths[i], self._num_frames, self._stride, num_clips)
      return _example("video", transforms.match_channels(clips, self._channels), self._labels[i])
    return read_with_fallback(len(self), index, read, self._paths.__getitem__)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self.read(index, None)


# ----------------------------------------------------------------- synthetic


class SyntheticSource:
  """Deterministic random uint8 images [S, S, C] or clips [T, S, S, C], for tests."""

  def __init__(self, size: int, split: str, modality: str, image_size: int, channels: int,
               num_frames: int, num_classes: int):
    self._size = size
    self._split_key = zlib.crc32(split.encode())  # different splits, different data
    self._key = "video" if modality == "video" else "image"
    shape = (image_size, image_size, channels)
    self._shape = (num_frames,) + shape if modality == "video" else shape
    self._num_classes = max(num_classes, 1)

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self._size:
      raise IndexError(index)
    rng = np.random.default_rng([self._split_key, index])
    data = rng.integers(0, 256, self._shape, dtype=np.uint8)
    return _example(self._key, data, index % self._num_classes)

  def read(self, index: int, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    del rng  # a synthetic clip has no temporal position to choose
    return self[index]

  def read_views(self, index: int, num_clips: int) -> dict[str, np.ndarray]:
    """The clip repeated num_clips times: a synthetic video is exactly one clip long."""
    element = self[index]
    return _example("video", np.stack([element["video"]] * num_clips), element["label"])


# ------------------------------------------------------------------ factory


def make_source(data_cfg, split: str, split_field: str = "config.data.split"):
  """The source of config.data.source for `split` (split_field names it in errors)."""
  c = data_cfg
  if c.source == "fashion_mnist":
    return FashionMnistSource(c.path, split, c.channels, split_field)
  if c.source == "image_folder":
    return ImageFolderSource(c.path, split, c.channels, split_field)
  if c.source == "tfds":
    return TfdsSource(c.tfds_name, split, c.path, c.channels, split_field)
  if c.source == "video_list":
    return VideoListSource(c.path, split, c.video_root, c.num_frames, c.sampling_rate,
                           c.channels, split_field)
  if c.source == "synthetic":
    return SyntheticSource(c.synthetic_size, split, c.modality, c.image_size, c.channels,
                           c.num_frames, c.num_classes)
  raise SourceError(f"config.data.source={c.source!r} is unknown; allowed: {list(SOURCES)}.")


def count_examples(data_cfg, split: str, split_field: str = "config.data.split") -> int:
  """Examples in a split without decoding any (headers, listings, metadata only)."""
  c = data_cfg
  if c.source == "fashion_mnist":
    return idx_length(fashion_mnist_files(c.path, split, split_field)[1])
  if c.source == "image_folder":
    return len(scan_image_folder(image_folder_root(c.path, split, split_field))[1])
  if c.source == "tfds":
    return tfds_length(c.tfds_name, split, c.path, split_field)
  if c.source == "video_list":
    return len(parse_video_list(video_list_file(c.path, split, split_field), c.video_root))
  if c.source == "synthetic":
    return int(c.synthetic_size)
  raise SourceError(f"config.data.source={c.source!r} is unknown; allowed: {list(SOURCES)}.")
