"""Random-access data sources (grain's RandomAccessDataSource protocol).

Each source has `__len__` and `__getitem__(index)`, returning a dict of numpy
values: {'image': uint8 [H, W, C], 'label': int32} for images, or
{'video': uint8 [T, H, W, C], 'label': int32} for videos (the centred clip;
video sources also have `read(index, rng)` for a randomly placed clip, since
the temporal position is part of the augmentation, and `read_views(index,
num_clips)` for the [num_clips, T, H, W, C] clips of a multi-clip test, evenly
spaced in time). Every path may be local or a URL (gs://...): files are read
through amd_jax.paths. Sources are chosen by config.data.source:

  fashion_mnist  path: folder of the original idx .gz files ('' = the Debian
                 package's /usr/share/datasets/fashion-mnist). Splits: train,
                 test. 10 classes.
  image_folder   path/<split>/<class>/**/<image> (jpg, jpeg, png, bmp, ppm, pgm,
                 tif, tiff, webp). Classes are the sorted sub-folders of the
                 training split (config.data.split); another split may hold a
                 subset of them (its labels are the training split's). A folder
                 without split sub-folders whose sub-folders hold images itself
                 (path/<class>/x.jpg) is ONE unsplit set: it serves as the
                 training split, and as the eval split only when
                 config.data.eval_split names the training split explicitly.
                 Symbolic links are followed, each folder at most once per class
                 (a link back up the tree is a cycle, not more images).
  tfds           tfds.data_source(tfds_name, split, data_dir=path): a data set
                 prepared by the user in array_record format (tfds build
                 --file_format=array_record). Features 'image' and 'label'
                 (label -1 when the data set has none). Needs the [tfds] extra.
  video_list     VideoMAE-style list file, one video per line:
                 "<path> <label>" (label: last whitespace-separated token, so
                 paths may contain spaces; blank lines and '#' lines skipped).
                 Relative paths are joined to video_root. `path` is the list
                 file of the training split; a path containing '{split}' is
                 formatted with the split; a folder means <folder>/<split>.csv
                 (or .txt) as VideoMAE lays out train.csv/val.csv/test.csv. A
                 single list file serves another split only when that split is
                 the training split.
  synthetic      synthetic_size random uint8 images or clips with labels
                 index % num_classes, a pure function of (split, index).

Classes (config.data.num_classes, 0 = infer): `count_classes` says what the
data shows: Fashion-MNIST 10, an image folder its class sub-folders, a tfds set
its ClassLabel, a list the largest label + 1, synthetic data 10. Labels outside
[0, num_classes) in a list stop the run naming the file, the line and the label.

Image files are converted to uint8 by `image_to_uint8`: 16-bit and 32-bit grey
(PIL modes I;16*, I) are scaled from 0..65535 and float images (F) from 0..1
(or taken as 0..255 when their values exceed 1), never clipped; palette, alpha,
CMYK and bilevel images go through PIL's own conversions (alpha is dropped, as
torchvision's loaders do). A file whose header promises more than
config.data.max_image_pixels pixels is never decoded: it is skipped (for
videos the same limit applies to a frame, checked from the stream's header).

Files that fail to decode (or are too large) are skipped: the next index
(wrapping round) is read instead, so the replacement is deterministic. Each
skipped path is logged once and recorded in `skipped_files()` (per process:
with grain worker processes the skips happen, and are logged, in the workers).

An image folder split whose decoded pixels fit config.data.cache_max_bytes (and
that is read in this process: num_workers == 0) is decoded once, in threads, and
served from memory; the pixels, the skips and therefore the batches are exactly
those of reading the files each time.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import gzip
import os
import threading
import zlib
from typing import Any, Callable, Iterable, Sequence

from absl import logging
import numpy as np
from PIL import Image

from amd_jax import errors
from amd_jax import paths
from amd_jax.data import transforms
from amd_jax.data import video as video_lib

SOURCES = ("fashion_mnist", "image_folder", "tfds", "video_list", "synthetic")
IMAGE_SOURCES = ("fashion_mnist", "image_folder", "tfds", "synthetic")
VIDEO_SOURCES = ("video_list", "synthetic")
# The still-image formats torchvision's ImageFolder reads (GIF is left out: its frames are a video).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_MNIST_PREFIX = {"train": "train", "test": "t10k"}
FASHION_MNIST_CLASSES = 10
# Classes of the synthetic source when config.data.num_classes is 0 (infer): the count tests have always used.
SYNTHETIC_CLASSES = 10
# config.data.max_image_pixels' default: a 64-megapixel photo decodes to 192 MB of RGB; larger files are
# panoramas, scans or attacks, and one of them can cost gigabytes and seconds per read.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
TFDS_INSTALL = "pip install 'amd_jax[tfds]'"
# A run of this many unreadable files in a row is not bad luck but a broken
# data set (or a bug): stop instead of spinning through the whole source.
MAX_CONSECUTIVE_SKIPS = 100
# Threads that read image headers and decode files when an image folder is cached.
_CACHE_THREADS = min(16, 2 * (os.cpu_count() or 1))
# Files handed to the thread pool at a time while caching (bounds the futures alive at once).
_CACHE_CHUNK = 256
# Average decoded size (pixels) up to which an image folder held in memory is read without reader threads.
SMALL_IMAGE_PIXELS = 64 * 64


class SourceError(errors.ConfigError):
  """A configuration problem with the data: the message names the config field."""


class ImageTooLarge(ValueError):
  """An image whose header promises more pixels than config.data.max_image_pixels (never decoded)."""


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


def _names(items: Sequence[str], limit: int = 10) -> str:
  """'a, b, c' (the first `limit`, then '... (N in all)') for messages."""
  shown = ", ".join(items[:limit])
  return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


# ------------------------------------------------------------- fashion-mnist


def fashion_mnist_files(path: str, split: str, split_field: str = "config.data.split") -> tuple[str, str]:
  """(images file, labels file) of a Fashion-MNIST split; checks they exist."""
  if split not in _FASHION_MNIST_PREFIX:
    raise SourceError(f"{split_field}={split!r} is not a Fashion-MNIST split; "
                      f"allowed: {sorted(_FASHION_MNIST_PREFIX)}.")
  folder = path or FASHION_MNIST_DIR
  prefix = _FASHION_MNIST_PREFIX[split]
  files = (paths.join(folder, f"{prefix}-images-idx3-ubyte.gz"),
           paths.join(folder, f"{prefix}-labels-idx1-ubyte.gz"))
  for f in files:
    if not paths.isfile(f):
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
  with paths.open_read(file) as raw, gzip.GzipFile(fileobj=raw) as f:
    return _idx_header(f)[0]


@functools.lru_cache(maxsize=8)
def load_idx(file: str) -> np.ndarray:
  """Whole idx .gz file as a uint8 array (cached: the set is 50 MB in memory)."""
  with paths.open_read(file) as raw, gzip.GzipFile(fileobj=raw) as f:
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


# ------------------------------------------------------------ image decoding

# Integer grey modes holding 16-bit samples ('I' is how older Pillows open 16-bit PNGs, and how TIFFs of
# 32-bit integers open: their values are taken on the same 0..65535 scale).
_WIDE_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _scaled_grey(values: np.ndarray, top: float) -> np.ndarray:
  """Grey samples on a 0..top scale -> uint8 0..255, rounded (values outside the scale saturate)."""
  values = np.nan_to_num(values.astype(np.float64), nan=0.0)
  return np.rint(np.clip(values, 0.0, top) * (255.0 / top)).astype(np.uint8)


def image_to_uint8(im: Image.Image, channels: int) -> np.ndarray:
  """A PIL image as uint8 [H, W, channels] (1 grey or 3 RGB); the rules are in the module doc."""
  if im.mode in _WIDE_INT_MODES:
    grey = _scaled_grey(np.asarray(im), 65535.0)
  elif im.mode == "F":
    values = np.asarray(im, dtype=np.float32)
    finite_max = float(np.max(values, initial=0.0, where=np.isfinite(values)))
    grey = _scaled_grey(values, 1.0 if finite_max <= 1.0 else 255.0)
  else:
    if im.mode == "P" and "transparency" in im.info:
      im = im.convert("RGBA")  # PIL's advice for palette transparency; the alpha is then dropped
    out = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    return out[..., None] if channels == 1 else out
  grey = grey[..., None]
  return grey if channels == 1 else np.repeat(grey, 3, axis=-1)


def _check_pixels(im: Image.Image, max_pixels: int) -> None:
  width, height = im.size
  if max_pixels and width * height > max_pixels:
    raise ImageTooLarge(f"{width}x{height} = {width * height} pixels > config.data.max_image_pixels="
                        f"{max_pixels}; not decoded")


def image_header_bytes(file: str, channels: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> int:
  """Bytes the decoded image will take (from the header alone); raises ImageTooLarge like decode_image."""
  with paths.open_read(file) as f, Image.open(f) as im:
    _check_pixels(im, max_pixels)
    width, height = im.size
  return width * height * channels


def decode_image(file: str, channels: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
  """Decodes an image file to uint8 [H, W, channels] with PIL; the header is checked first."""
  with paths.open_read(file) as f, Image.open(f) as im:
    _check_pixels(im, max_pixels)
    return image_to_uint8(im, channels)


# -------------------------------------------------------------- image folder


def _is_image_file(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _local_entries(folder: str) -> tuple[list[str], list[str]]:
  """(sub-folder names, image file names) of a local folder, symbolic links followed, both sorted."""
  dirs, files = [], []
  with os.scandir(folder) as it:
    for entry in it:
      try:
        if entry.is_dir():
          dirs.append(entry.name)
        elif entry.is_file() and _is_image_file(entry.name):
          files.append(entry.name)
      except OSError:  # a dangling link or a vanished file: not an image
        continue
  return sorted(dirs), sorted(files)


def _walk_local(top: str) -> tuple[list[str], int]:
  """(image files under `top` in walk order, folder links not followed).

  Walk order: a folder's files, then its sub-folders one by one, names sorted.
  Symbolic links are followed, but each real folder is entered at most once, and
  never one that holds `top` itself: a link back up the tree (a cycle) or a
  second link to the same folder adds nothing. os.scandir rather than epath:
  local listings of a million files need the file types readdir hands out.
  """
  top_real = os.path.realpath(top)
  files: list[str] = []
  visited: set[str] = set()
  refused = 0
  stack = [top]
  while stack:
    folder = stack.pop()
    real = os.path.realpath(folder)
    if real in visited or top_real.startswith(real + os.sep):
      refused += 1
      continue
    visited.add(real)
    try:
      dirs, names = _local_entries(folder)
    except OSError as e:  # unreadable folder: say so rather than lose its images without a word
      logging.warning("Cannot list %s (%s): its images are left out.", folder, e)
      continue
    files.extend(os.path.join(folder, n) for n in names)
    stack.extend(os.path.join(folder, d) for d in reversed(dirs))
  return files, refused


def _walk_remote(top: str) -> list[str]:
  """Image files under a URL folder, in the same order as `_walk_local` (buckets have no links).

  epath's walk lists one folder level per request (no recursive glob); sorting
  the folders by their path components gives the local walk's order.
  """
  top = top.rstrip("/")
  scheme, bare_top = top.split("://", 1)
  by_folder = {}
  for folder, _, names in paths.as_path(top).walk():
    # fsspec hands the folders back without their scheme ('bucket/key'); accept either form.
    folder = os.fspath(folder).split("://", 1)[-1].rstrip("/")
    if folder != bare_top and not folder.startswith(bare_top + "/"):
      raise ValueError(f"walking {top} listed {folder}, which is outside it")
    relative = tuple(p for p in folder[len(bare_top):].split("/") if p)
    by_folder[relative] = [f"{scheme}://{folder}/{n}" for n in sorted(names) if _is_image_file(n)]
  return [f for key in sorted(by_folder) for f in by_folder[key]]


def _subfolders(folder: str) -> list[str]:
  if paths.is_remote(folder):
    return sorted(p.name for p in paths.as_path(folder).iterdir() if p.is_dir())
  return _local_entries(folder)[0]


def _has_images(folder: str) -> bool:
  if paths.is_remote(folder):
    return any(_is_image_file(n) for n in paths.listdir(folder))
  return bool(_local_entries(folder)[1])


@functools.lru_cache(maxsize=32)
def _scan(root: str) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
  """(class folder names, image files of each class) of root/<class>/**, sorted."""
  classes = tuple(_subfolders(root))
  per_class = []
  for name in classes:
    folder = paths.join(root, name)
    if paths.is_remote(folder):
      files = _walk_remote(folder)
    else:
      files, refused = _walk_local(folder)
      if refused:
        logging.warning("%s: %d folder link(s) not followed: they lead to a folder already listed or to one "
                        "that holds this class (a cycle); each folder is read once.", folder, refused)
    per_class.append(tuple(files))
  return classes, tuple(per_class)


def image_folder_root(path: str, split: str, split_field: str = "config.data.split",
                      train_split: str | None = None) -> str:
  """The folder whose sub-folders are the classes of `split`, per the layout rules above.

  train_split (default: `split`) is config.data.split: an unsplit folder
  serves that split, and only that one.
  """
  train_split = split if train_split is None else train_split
  if not path or not paths.isdir(path):
    raise SourceError(f"config.data.path={path!r} is not a directory; image_folder needs "
                      "path/<split>/<class>/<images> (or path/<class>/<images>).")
  subfolders = _subfolders(path)
  if split in subfolders:
    return paths.join(path, split)
  unsplit = train_split not in subfolders and any(_has_images(paths.join(path, c)) for c in subfolders)
  if unsplit and split == train_split:
    return path
  if unsplit:
    raise SourceError(
        f"{split_field}={split!r}: {path} has no split sub-folders (its sub-folders {_names(subfolders)} "
        f"hold images: one unsplit set, read as config.data.split={train_split!r}). Set {split_field}="
        f"{train_split!r} to evaluate on the training images, or '' for no evaluation, or add "
        f"{paths.join(path, split)}/<class>/<images>.")
  if not subfolders:
    raise SourceError(f"config.data.path={path!r} has no sub-folders; image_folder reads "
                      "path/<split>/<class>/<images> (or path/<class>/<images>).")
  raise SourceError(f"{split_field}={split!r} is not a split of config.data.path={path!r}; splits found: "
                    f"{_names(subfolders)}. Expected path/<split>/<class>/<images>.")


def scan_image_folder(root: str, classes: Sequence[str] | None = None,
                      split_field: str = "config.data.split"
                      ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...]]:
  """(class names, files, labels) of root/<class>/**/<image>, all sorted.

  `classes` (the training split's) gives the labels: root's class folders must
  be among them. Default: root's own class folders.
  """
  own, per_class = _scan(root)
  classes = own if classes is None else tuple(classes)
  unknown = [c for c in own if c not in classes]
  if unknown:
    raise SourceError(f"{split_field}: class folders {_names(unknown)} in {root} are not classes of the "
                      f"training split (config.data.split), whose classes are {_names(list(classes))}.")
  label_of = {c: i for i, c in enumerate(classes)}
  files, labels = [], []
  for name, class_files in zip(own, per_class):
    files.extend(class_files)
    labels.extend([label_of[name]] * len(class_files))
  return classes, tuple(files), tuple(labels)


def image_folder_split(path: str, split: str, split_field: str = "config.data.split",
                       train_split: str | None = None):
  """(root, (class names, files, labels)) of a split, labelled by the training split's classes."""
  train_split = split if train_split is None else train_split
  classes = None
  if split != train_split:
    classes = scan_image_folder(image_folder_root(path, train_split, "config.data.split", train_split))[0]
  root = image_folder_root(path, split, split_field, train_split)
  return root, scan_image_folder(root, classes, split_field)


# ----------------------------------------------------------- in-memory cache


class _Undecodable:
  """What the cache keeps for a file that did not decode: the error, raised again on every read."""

  def __init__(self, error: Exception):
    self.error = error

  def raise_again(self):
    raise self.error.with_traceback(None)


@dataclasses.dataclass
class DecodedImages:
  """Every image of one folder split, decoded once (uint8 arrays, read-only) or the error that stopped it."""
  pixels: list
  nbytes: int


_image_cache: collections.OrderedDict[tuple, DecodedImages] = collections.OrderedDict()
_image_cache_lock = threading.Lock()


def clear_image_cache() -> None:
  """Forget every cached image folder (the memory is freed when no source holds it any more)."""
  with _image_cache_lock:
    _image_cache.clear()


def cached_bytes() -> int:
  with _image_cache_lock:
    return sum(entry.nbytes for entry in _image_cache.values())


def _in_chunks(items: Sequence[Any], function: Callable[[Any], Any],
               pool: concurrent.futures.ThreadPoolExecutor) -> Iterable[Any]:
  """function(item) for every item, in order, computed in the pool a chunk at a time."""
  for start in range(0, len(items), _CACHE_CHUNK):
    yield from pool.map(function, items[start:start + _CACHE_CHUNK])


def _decoded_size(files: Sequence[str], channels: int, max_pixels: int, budget: int,
                  pool: concurrent.futures.ThreadPoolExecutor) -> int | None:
  """Bytes of the decoded images from their headers; None as soon as the total passes `budget`."""
  def size(file: str) -> int:
    try:
      return image_header_bytes(file, channels, max_pixels)
    except Exception:  # pylint: disable=broad-except
      return 0  # not decodable (or too large): it will be kept as its error, not as pixels
  total = 0
  for nbytes in _in_chunks(files, size, pool):
    total += nbytes
    if total > budget:
      return None
  return total


def _decode_or_error(file: str, channels: int, max_pixels: int):
  try:
    pixels = decode_image(file, channels, max_pixels)
  except Exception as e:  # pylint: disable=broad-except
    return _Undecodable(e)
  pixels.flags.writeable = False  # shared by every read: a transform writing into it would be a bug
  return pixels


def cache_image_folder(files: Sequence[str], channels: int, max_pixels: int, budget: int,
                       key: tuple, data_set: str = "") -> DecodedImages | None:
  """The decoded images of `files` if they fit `budget` bytes with what is cached already, else None.

  An entry is built once per process and shared by every source of the same
  files (the eval split is read again at every evaluation). Entries of other
  data sets (`data_set`: config.data.path) are dropped, oldest first, to make
  room; the splits of one data set never push each other out: the split built
  first (training) stays, a later one that does not fit reads its files.
  """
  if budget <= 0 or not files:
    return None
  key = (data_set,) + tuple(key)
  with _image_cache_lock:
    if key in _image_cache:
      _image_cache.move_to_end(key)
      return _image_cache[key]
    same_data = sum(e.nbytes for k, e in _image_cache.items() if k[0] == data_set)
    with concurrent.futures.ThreadPoolExecutor(max_workers=_CACHE_THREADS) as pool:
      nbytes = _decoded_size(files, channels, max_pixels, budget - same_data, pool)
      if nbytes is None:
        return None
      decode = functools.partial(_decode_or_error, channels=channels, max_pixels=max_pixels)
      entry = DecodedImages(pixels=list(_in_chunks(files, decode, pool)), nbytes=nbytes)
    for other in [k for k in _image_cache if k[0] != data_set]:
      if sum(e.nbytes for e in _image_cache.values()) + nbytes <= budget:
        break
      del _image_cache[other]
    _image_cache[key] = entry
    return entry


class ImageFolderSource:
  """Images in class sub-folders, decoded with PIL (or served from memory); undecodable files skipped."""

  def __init__(self, path: str, split: str, channels: int = 3,
               split_field: str = "config.data.split", *, train_split: str | None = None,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, cache_max_bytes: int = 0):
    root, (self.class_names, self._files, self._labels) = image_folder_split(path, split, split_field,
                                                                             train_split)
    self._channels = channels
    self._max_pixels = max_pixels
    self._decoded = cache_image_folder(self._files, channels, max_pixels, cache_max_bytes,
                                       key=(root, channels, max_pixels), data_set=path)
    size = f"{self._decoded.nbytes / 2**20:.1f} MiB" if self._decoded else "too large or off"
    logging.info("image_folder %s: %d images; in-memory copy (config.data.cache_max_bytes=%d): %s",
                 root, len(self._files), cache_max_bytes, size)

  @property
  def in_memory(self) -> bool:
    return self._decoded is not None

  @property
  def cheap_reads(self) -> bool:
    """Held in memory and small (at most SMALL_IMAGE_PIXELS on average): reader threads would cost more
    than they save (2 cores: 28 px PNGs 2,400 img/s without threads, 1,900 with; 300x400 JPEGs cropped to
    128 px 430 img/s without, 710 with)."""
    if self._decoded is None or not self._files:
      return False
    return self._decoded.nbytes / (len(self._files) * self._channels) <= SMALL_IMAGE_PIXELS

  def __len__(self) -> int:
    return len(self._files)

  def __getstate__(self):
    # A copy sent to a worker process reads the files (the same pixels) instead of pickling the images.
    return {**self.__dict__, "_decoded": None}

  def _pixels(self, index: int) -> np.ndarray:
    if self._decoded is None:
      return decode_image(self._files[index], self._channels, self._max_pixels)
    pixels = self._decoded.pixels[index]
    if isinstance(pixels, _Undecodable):
      pixels.raise_again()
    return pixels

  def _read(self, index: int) -> dict[str, np.ndarray]:
    return _example("image", self._pixels(index), self._labels[index])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return read_with_fallback(len(self), index, self._read, self._files.__getitem__)


# ---------------------------------------------------------------------- tfds


def _hide_accelerators_from_tensorflow(tf) -> None:
  """TensorFlow would claim the GPUs/TPUs JAX owns (and their memory); tfds only needs the CPU."""
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # devices already initialised, or no such device type
      pass


@functools.lru_cache(maxsize=None)
def import_tfds():
  """tensorflow_datasets, with TensorFlow kept off the accelerators; SourceError naming the extra if absent."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SourceError(f"config.data.source='tfds' needs TensorFlow Datasets, which is not installed "
                      f"({e}): {TFDS_INSTALL}") from None
  _hide_accelerators_from_tensorflow(tf)
  return tfds


def _tfds_builder(name: str, data_dir: str):
  """The tfds builder of a prepared data set; SourceError naming the fields if absent."""
  tfds = import_tfds()
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


def tfds_num_classes(name: str, data_dir: str) -> int | None:
  """Classes of the data set's 'label' feature (a ClassLabel); None when it has none."""
  features = _tfds_builder(name, data_dir).info.features
  label = features["label"] if "label" in features else None
  return int(label.num_classes) if label is not None and hasattr(label, "num_classes") else None


class TfdsSource:
  """A prepared tfds data set read through tfds.data_source (random access)."""

  def __init__(self, name: str, split: str, data_dir: str, channels: int = 3,
               split_field: str = "config.data.split"):
    tfds = import_tfds()
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

_LIST_EXTENSIONS = (".csv", ".txt")


def video_list_file(path: str, split: str, split_field: str = "config.data.split",
                    train_split: str | None = None) -> str:
  """The annotation file of `split` per the rules in the module docstring.

  train_split (default: `split`) is config.data.split: a single list file
  serves that split only.
  """
  train_split = split if train_split is None else train_split
  if not path:
    raise SourceError("config.data.path is empty; video_list needs an annotation file "
                      "('<video path> <label>' per line) or a folder with <split>.csv.")
  if "{split}" in path:
    file = path.format(split=split)
  elif paths.isdir(path):
    candidates = [paths.join(path, split + ext) for ext in _LIST_EXTENSIONS]
    file = next((c for c in candidates if paths.isfile(c)), None)
    if file is None:
      found = sorted(n.rsplit(".", 1)[0] for n in paths.listdir(path) if n.endswith(_LIST_EXTENSIONS))
      raise SourceError(f"{split_field}={split!r}: config.data.path={path!r} has no {split}.csv or "
                        f"{split}.txt; splits found: {_names(found) or 'none'}.")
  elif split != train_split:
    raise SourceError(
        f"{split_field}={split!r}: config.data.path={path!r} is one annotation file, the list of "
        f"config.data.split={train_split!r}. Give a folder holding <split>.csv or a path with '{{split}}' "
        f"for other splits, or set {split_field}={train_split!r} to evaluate on the training list, or '' "
        "for no evaluation.")
  else:
    file = path
  if not paths.isfile(file):
    raise SourceError(f"config.data.path={path!r} ({split_field}={split!r}): annotation file "
                      f"{file} does not exist.")
  return file


def _join_root(video_root: str, video: str) -> str:
  """A listed path joined to video_root unless it is absolute or a URL already."""
  if not video_root or paths.is_remote(video) or os.path.isabs(video):
    return video
  return paths.join(video_root, video)


@dataclasses.dataclass(frozen=True)
class VideoList:
  """A parsed annotation file: video paths, labels and the line each came from."""
  file: str
  videos: tuple[str, ...]
  labels: tuple[int, ...]
  lines: tuple[int, ...]

  def check_labels(self, num_classes: int, how: str = "") -> None:
    """SourceError naming the file, line and label of the first label outside [0, num_classes)."""
    for label, line in zip(self.labels, self.lines):
      if not 0 <= label < num_classes:
        raise SourceError(f"{self.file}:{line}: label {label} is outside [0, {num_classes}) "
                          f"(config.data.num_classes={num_classes}{how}).")


@functools.lru_cache(maxsize=16)
def read_video_list(file: str, video_root: str = "") -> VideoList:
  """The entries of '<path> <label>' lines; errors name the line."""
  videos, labels, lines = [], [], []
  for n, line in enumerate(paths.read_text(file).splitlines(), 1):
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
    videos.append(_join_root(video_root, video))
    labels.append(label)
    lines.append(n)
  return VideoList(file, tuple(videos), tuple(labels), tuple(lines))


def parse_video_list(file: str, video_root: str = "") -> list[tuple[str, int]]:
  """[(video path, label)] from '<path> <label>' lines; errors name the line."""
  entries = read_video_list(file, video_root)
  return list(zip(entries.videos, entries.labels))


class VideoListSource:
  """Videos listed in an annotation file, decoded with PyAV into num_frames clips."""

  def __init__(self, path: str, split: str, video_root: str, num_frames: int, sampling_rate: int,
               channels: int = 3, split_field: str = "config.data.split", *,
               train_split: str | None = None, num_classes: int = 0, max_frame_pixels: int = 0,
               timeout_s: float = video_lib.DEFAULT_TIMEOUT_S):
    entries = read_video_list(video_list_file(path, split, split_field, train_split), video_root)
    if num_classes:
      entries.check_labels(num_classes)
    self._paths = entries.videos
    self._labels = entries.labels
    self._num_frames = num_frames
    self._stride = sampling_rate
    self._channels = channels
    self._max_frame_pixels = max_frame_pixels
    self._timeout_s = timeout_s

  def __len__(self) -> int:
    return len(self._paths)

  def _read(self, index: int, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    clip = video_lib.read_clip(self._paths[index], self._num_frames, self._stride, rng,
                               max_frame_pixels=self._max_frame_pixels, timeout_s=self._timeout_s)
    return _example("video", transforms.match_channels(clip, self._channels), self._labels[index])

  def read(self, index: int, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """Clip at a random position (rng given) or centred (rng None); bad files skipped."""
    return read_with_fallback(len(self), index, lambda i: self._read(i, rng), self._paths.__getitem__)

  def read_views(self, index: int, num_clips: int) -> dict[str, np.ndarray]:
    """num_clips clips evenly spaced in time, [num_clips, T, H, W, C]; bad files skipped."""
    def read(i: int) -> dict[str, np.ndarray]:
      clips = video_lib.read_clips(self._paths[i], self._num_frames, self._stride, num_clips,
                                   max_frame_pixels=self._max_frame_pixels, timeout_s=self._timeout_s)
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
    self._num_classes = num_classes or SYNTHETIC_CLASSES

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


# ------------------------------------------------------------------- classes


@dataclasses.dataclass(frozen=True)
class ClassCount:
  """The classes a source shows.

  exact: an explicit config.data.num_classes must equal `count` (folders,
  Fashion-MNIST, a tfds ClassLabel). Otherwise (annotation lists, whose labels
  may leave out classes of a larger label set: a subset of Kinetics) a larger
  value is fine, and each label is checked against it (VideoList.check_labels).
  """
  count: int
  exact: bool
  evidence: str


def count_classes(data_cfg) -> ClassCount | None:
  """What the training split shows about the number of classes; None when it cannot tell (tfds without
  a ClassLabel 'label'). Reads listings, list files and metadata only."""
  c = data_cfg
  if c.source == "fashion_mnist":
    return ClassCount(FASHION_MNIST_CLASSES, True, "Fashion-MNIST has 10 classes")
  if c.source == "synthetic":
    return None if c.num_classes else ClassCount(SYNTHETIC_CLASSES, False, "synthetic data")
  if c.source == "image_folder":
    root = image_folder_root(c.path, c.split, "config.data.split", c.split)
    classes = scan_image_folder(root)[0]
    folders = "class folder" if len(classes) == 1 else "class folders"
    return ClassCount(len(classes), True, f"{len(classes)} {folders} in {root}: {_names(list(classes))}")
  if c.source == "video_list":
    entries = read_video_list(video_list_file(c.path, c.split, "config.data.split", c.split), c.video_root)
    if not entries.labels:
      return None
    distinct = sorted(set(entries.labels))
    return ClassCount(max(distinct) + 1, False,
                      f"{entries.file} has labels {distinct[0]}..{distinct[-1]} ({len(distinct)} distinct)")
  if c.source == "tfds":
    count = tfds_num_classes(c.tfds_name, c.path)
    return None if count is None else ClassCount(count, True, f"tfds {c.tfds_name!r} has {count} classes")
  raise SourceError(f"config.data.source={c.source!r} is unknown; allowed: {list(SOURCES)}.")


def resolve_num_classes(data_cfg) -> int:
  """config.data.num_classes, or (0) the count the data shows; SourceError when they disagree."""
  value = data_cfg.num_classes
  found = count_classes(data_cfg)
  if value == 0:
    if found is None:
      errors.fail("data.num_classes", value, f"cannot be inferred from config.data.source="
                  f"{data_cfg.source!r} ({data_cfg.tfds_name or data_cfg.path}): it has no class labels "
                  "to count; set the number of classes")
    return found.count
  # A list's labels are checked one by one instead (VideoList.check_labels names the file and line).
  if found is not None and found.exact and value != found.count:
    raise SourceError(f"config.data.num_classes={value!r} is not valid: {found.evidence}; set it to "
                      f"{found.count}, or to 0 to infer it.")
  return value


# ------------------------------------------------------------------ factory


def make_source(data_cfg, split: str, split_field: str = "config.data.split"):
  """The source of config.data.source for `split` (split_field names it in errors)."""
  c = data_cfg
  if c.source == "fashion_mnist":
    return FashionMnistSource(c.path, split, c.channels, split_field)
  if c.source == "image_folder":
    # Worker processes get their copy of the source pickled: they read the files (see __getstate__).
    cache = c.cache_max_bytes if c.num_workers == 0 else 0
    return ImageFolderSource(c.path, split, c.channels, split_field, train_split=c.split,
                             max_pixels=c.max_image_pixels, cache_max_bytes=cache)
  if c.source == "tfds":
    return TfdsSource(c.tfds_name, split, c.path, c.channels, split_field)
  if c.source == "video_list":
    return VideoListSource(c.path, split, c.video_root, c.num_frames, c.sampling_rate,
                           c.channels, split_field, train_split=c.split,
                           num_classes=resolve_num_classes(c), max_frame_pixels=c.max_image_pixels,
                           timeout_s=float(c.video_timeout_s))
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
    return len(image_folder_split(c.path, split, split_field, c.split)[1][1])
  if c.source == "tfds":
    return tfds_length(c.tfds_name, split, c.path, split_field)
  if c.source == "video_list":
    return len(read_video_list(video_list_file(c.path, split, split_field, c.split), c.video_root).videos)
  if c.source == "synthetic":
    return int(c.synthetic_size)
  raise SourceError(f"config.data.source={c.source!r} is unknown; allowed: {list(SOURCES)}.")
