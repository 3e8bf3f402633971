"""Grain input pipelines: per-process, shuffled, augmented, checkpointable.

Training stream (one per process):

  source -> seed(seed) -> shuffle -> repeat (forever) -> random_map(augment)
         -> [this process's rows of each global batch] -> to_iter_dataset -> batch
         -> [merge repeated copies] -> normalise -> [random erasing]
         -> mp_prefetch(num_workers) | thread prefetch

* grain's shuffle folds the epoch number into its seed, so every epoch has a new
  order that is still a pure function of `seed`.
* The augmentation runs BEFORE the per-process slice, so each element's random
  numbers are drawn from its position in the global stream: the same global
  example gets the same augmentation whatever the number of processes, and no
  two processes share random streams.
* A process keeps the rows of each global batch its devices hold
  (GlobalBatchRows), so the global batches, and where each example sits in
  them, do not depend on the number of processes either.
* Every random choice comes from the generator grain passes to random_map, so
  the iterator's state (grain DatasetIterator.get_state / set_state) is enough
  to resume the stream bit-exactly.
* Images stay uint8 until a batch is complete; normalisation is one vectorised
  pass per batch.
* Fine-tuning augmentation (amd_jax/data/augment.py, off by default):
  RandAugment runs in the element transform after the crop and flip. Random
  erasing works on normalised pixels, so the element transform only draws the
  rectangle (and a noise seed) and the batch transform after normalisation
  fills it. With config.data.repeated_aug = r, one element holds r
  independently augmented copies of one example (a video is decoded once: the
  copies share their temporal position, as VideoMAE's repeated augmentation);
  the batch holds per-process batch / r elements whose copies are then laid
  out consecutively, so a batch of B rows holds B / r distinct examples and the
  copies never straddle processes.

Validation (validate_data_config) reads listings, list files and metadata, never
pixels: every field, that the configured splits exist (a missing eval split is an
error naming the splits found; config.data.eval_split equal to config.data.split
evaluates on the training data on purpose, see eval_is_train), the class count
(num_classes: 0 infers it, an explicit count must agree with the data) and the
labels of annotation lists. config.data.mean/std 'auto' pass validation but are
replaced by numbers (amd_jax.data.stats.resolve_normalisation) before a pipeline
is built.

Evaluation stream: one ordered pass over the split (or its first max_examples),
split across processes, the last batch padded to full size with a 'mask' field
(True = real example) and 'index' (the example's index in the source, -1 for
padding). Every process yields the same number of batches, as a multi-host
jitted step requires. A multi-view video test (test_num_clips x test_num_crops
> 1) gives each example V = clips x crops views: 'video' [b, V, T, H, W, C].
"""
from __future__ import annotations

import math
import os
from typing import NoReturn

from absl import flags
import grain
import numpy as np

from amd_jax import errors
from amd_jax import paths
from amd_jax.config_base import parse_floats
from amd_jax.data import augment
from amd_jax.data import sources
from amd_jax.data import transforms

MODALITIES = ("image", "video")
# Threads that read and augment elements inside one process, for sources that
# decode files (PIL, PyAV and array_record release the GIL while they work).
_READ_THREADS_PER_CPU = 2
_MAX_READ_THREADS = 16
# Sources held in memory are read in the iterating thread: for tiny images the
# per-element work is ~30 us of Python, and reader threads only fight over the
# GIL (Fashion-MNIST at 32 px, 2 cores: ~10,700 img/s with none, ~3,000 with 16).
# An image folder held in memory joins them when its images are small
# (ImageFolderSource.cheap_reads); larger ones keep the threads, which then
# crop and resize in parallel (PIL releases the GIL).
_IN_MEMORY_SOURCES = ("fashion_mnist", "synthetic")
TRAIN_CROPS = ("default", "rrc")
# Batch field carrying each example's erasing rectangle from the element
# transform to the batch transform that applies it (removed there).
_ERASE_KEY = "erase_params"


# --------------------------------------------------------------- validation

AUTO = "auto"  # config.data.mean / std: measured from the data (amd_jax.data.stats.resolve_normalisation)


def _fail(field: str, value, allowed: str) -> NoReturn:
  errors.fail(f"data.{field}", value, allowed)


def _check_floats(data_cfg, field: str, count: int) -> tuple[float, ...]:
  text = data_cfg[field]
  if text == AUTO:
    return ()
  try:
    values = parse_floats(text)
  except ValueError:
    _fail(field, text, "expected comma-separated numbers, e.g. '0.485,0.456,0.406', or 'auto' (measured "
          "from the training split)")
  if len(values) != count:
    _fail(field, text, f"expected {count} comma-separated value(s), one per channel "
          f"(config.data.channels={data_cfg.channels}), or 'auto'")
  return values


def normalisation(data_cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) as numbers; 'auto' must have been resolved (amd_jax.data.stats.resolve_normalisation)."""
  for field in ("mean", "std"):
    if data_cfg[field] == AUTO:
      _fail(field, AUTO, "'auto' is resolved into numbers before the pipeline is built: "
            "amd_jax.data.stats.resolve_normalisation(config.data, workdir) (the training loop does it), "
            "or give the numbers that `python -m amd_jax.data.stats` prints")
  return parse_floats(data_cfg.mean), parse_floats(data_cfg.std)


def _check_fields(c) -> None:
  """Checks of single fields and their combinations; no file access."""
  if c.source not in sources.SOURCES:
    _fail("source", c.source, f"allowed: {', '.join(sources.SOURCES)}")
  if c.modality not in MODALITIES:
    _fail("modality", c.modality, f"allowed: {', '.join(MODALITIES)}")
  allowed = sources.VIDEO_SOURCES if c.modality == "video" else sources.IMAGE_SOURCES
  if c.source not in allowed:
    _fail("modality", c.modality, f"config.data.source={c.source!r} provides "
          f"{'videos' if c.source == 'video_list' else 'images'}; sources for modality "
          f"{c.modality!r}: {', '.join(allowed)}")
  if not _is_int(c.image_size) or c.image_size < 1:
    _fail("image_size", c.image_size, "expected an integer >= 1")
  if c.channels not in (1, 3):
    _fail("channels", c.channels, "allowed: 1 (grey) or 3 (RGB)")
  _check_floats(c, "mean", c.channels)
  std = _check_floats(c, "std", c.channels)
  if any(s <= 0 for s in std):
    _fail("std", c.std, "every std must be > 0")
  for field in ("crop_scale_min", "crop_scale_max", "eval_crop_ratio"):
    if not 0 < c[field] <= 1:
      _fail(field, c[field], "crop scales and ratios must lie in (0, 1]")
  if c.crop_scale_min > c.crop_scale_max:
    _fail("crop_scale_min", c.crop_scale_min,
          f"must be <= config.data.crop_scale_max={c.crop_scale_max}")
  if not _is_int(c.num_frames) or c.num_frames < 1:
    _fail("num_frames", c.num_frames, "expected an integer >= 1")
  if not _is_int(c.sampling_rate) or c.sampling_rate < 1:
    _fail("sampling_rate", c.sampling_rate, "expected an integer >= 1")
  try:
    scales = parse_floats(c.multiscale_scales)
  except ValueError:
    scales = ()
  if not scales or not all(0 < s <= 1 for s in scales):
    _fail("multiscale_scales", c.multiscale_scales,
          "expected comma-separated scales in (0, 1], e.g. '1,0.875,0.75,0.66'")
  _check_finetune_fields(c)
  if not _is_int(c.num_workers) or c.num_workers < 0:
    _fail("num_workers", c.num_workers, "expected an integer >= 0 (0: no worker processes)")
  if not _is_int(c.prefetch) or c.prefetch < 0:
    _fail("prefetch", c.prefetch, "expected an integer >= 0")
  if not _is_int(c.num_classes) or c.num_classes < 0:
    _fail("num_classes", c.num_classes, "expected an integer >= 0 (0: inferred from the data)")
  if not _is_int(c.cache_max_bytes) or c.cache_max_bytes < 0:
    _fail("cache_max_bytes", c.cache_max_bytes, "expected an integer >= 0 (0: never hold decoded images "
          "in memory)")
  timeout = c.video_timeout_s
  if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
    _fail("video_timeout_s", timeout, "expected seconds >= 0 (0: no limit)")
  if not _is_int(c.max_image_pixels) or c.max_image_pixels < 0:
    _fail("max_image_pixels", c.max_image_pixels, "expected an integer >= 0 (0: no limit of its own)")
  if c.source == "synthetic" and c.synthetic_size < 1:
    _fail("synthetic_size", c.synthetic_size, "the synthetic source would be empty; expected >= 1")
  if c.source == "video_list" and c.video_root and not paths.isdir(c.video_root):
    _fail("video_root", c.video_root, "not an existing directory")
  if c.source == "tfds":
    sources.import_tfds()  # the one-line message naming the [tfds] extra when it is missing


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_finetune_fields(c) -> None:
  """The fine-tuning augmentation and multi-view test fields."""
  if c.train_crop not in TRAIN_CROPS:
    _fail("train_crop", c.train_crop, f"allowed: {', '.join(TRAIN_CROPS)}")
  augment.parse_randaugment(c.randaugment)  # raises naming config.data.randaugment
  erase = c.random_erase
  if not isinstance(erase, (int, float)) or isinstance(erase, bool) or not 0 <= erase <= 1:
    _fail("random_erase", c.random_erase, "expected a probability in [0, 1] (0: off)")
  if not _is_int(c.repeated_aug) or c.repeated_aug < 1:
    _fail("repeated_aug", c.repeated_aug, "expected an integer >= 1 (1: off)")
  for field in ("test_num_clips", "test_num_crops"):
    if not _is_int(c[field]) or c[field] < 1:
      _fail(field, c[field], "expected an integer >= 1")
    if c[field] > 1 and c.modality != "video":
      _fail(field, c[field], f"multi-view evaluation is for videos; config.data.modality="
            f"{c.modality!r} needs 1")


def _video_list(c, split: str, field: str) -> sources.VideoList:
  return sources.read_video_list(sources.video_list_file(c.path, split, field, c.split), c.video_root)


def _check_first_video(c, split: str, field: str) -> None:
  """A wrong video_root shows on the first line already; checking one file is cheap."""
  entries = _video_list(c, split, field)
  if entries.videos and not paths.isfile(entries.videos[0]):
    raise sources.SourceError(
        f"config.data.path={c.path!r} lists {entries.videos[0]!r} ({entries.file}:{entries.lines[0]}), "
        f"which does not exist; check config.data.video_root={c.video_root!r} (prefix of relative paths).")


def _split_field(data_cfg, split: str) -> str:
  if split == data_cfg.split:
    return "config.data.split"
  if split == data_cfg.get("eval_split"):
    return "config.data.eval_split"
  return f"split {split!r}"


def eval_is_train(data_cfg) -> bool:
  """True when evaluation reads the training split itself (config.data.eval_split == config.data.split):
  results measured on it are not held-out numbers, and printed results should say so."""
  return bool(data_cfg.get("eval_split")) and data_cfg.eval_split == data_cfg.split


def num_classes(data_cfg) -> int:
  """config.data.num_classes resolved: the configured count, or (0) the count the data shows.

  ConfigError when an explicit count disagrees with the data (class folders,
  Fashion-MNIST, a tfds ClassLabel), or when 0 cannot be inferred (a tfds set
  without labels). Reads listings and list files only (cached per process).
  """
  return sources.resolve_num_classes(data_cfg)


def validate_data_config(data_cfg, *, splits: tuple[str, ...] | None = None) -> None:
  """Raises ConfigError naming the field, its value and what is allowed.

  Cheap enough to run before any compile: headers, folder listings, list files
  and tfds metadata are read, nothing is decoded. `splits` defaults to
  config.data.split and, when not empty, config.data.eval_split (set it to ''
  when a data set has no eval split). Also checks config.data.num_classes
  against the data and the labels of annotation lists against it.
  """
  _check_fields(data_cfg)
  if splits is None:
    splits = (data_cfg.split,) + ((data_cfg.eval_split,) if data_cfg.get("eval_split") else ())
  for split in splits:
    field = _split_field(data_cfg, split)
    count = sources.count_examples(data_cfg, split, field)
    if count < 1:
      raise sources.SourceError(f"config.data.source={data_cfg.source!r} at config.data.path="
                                f"{data_cfg.path!r} has 0 examples in {field}={split!r}; expected >= 1.")
    if data_cfg.source == "video_list":
      _check_first_video(data_cfg, split, field)
  classes = num_classes(data_cfg)
  if data_cfg.source == "video_list":
    how = " inferred from config.data.split's list" if data_cfg.num_classes == 0 else ""
    for split in splits:
      _video_list(data_cfg, split, _split_field(data_cfg, split)).check_labels(classes, how)


def num_examples(data_cfg, split: str | None = None) -> int:
  """Examples in `split` (default config.data.split), counted without decoding."""
  split = data_cfg.split if split is None else split
  return sources.count_examples(data_cfg, split, _split_field(data_cfg, split))


# ------------------------------------------------------- element transforms


def data_key(data_cfg) -> str:
  """'video' for video modality, else 'image': the batch field holding the pixels."""
  return "video" if data_cfg.modality == "video" else "image"


class _TrainTransform:
  """What the image and clip transforms share: RandAugment, erasing rectangles, copies."""

  key = "image"

  def __init__(self, data_cfg):
    self.size = data_cfg.image_size
    self.scale = (float(data_cfg.crop_scale_min), float(data_cfg.crop_scale_max))
    self.hflip = bool(data_cfg.hflip)
    self.randaugment = augment.parse_randaugment(data_cfg.randaugment)
    self.fill = augment.fill_colour(normalisation(data_cfg)[0])
    self.erase_prob = float(data_cfg.random_erase)
    self.copies = int(data_cfg.repeated_aug)

  def augment_pixels(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One augmented uint8 copy (crop, flip, RandAugment); defined by the subclasses."""
    raise NotImplementedError

  def _one_copy(self, pixels, label, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = self.augment_pixels(pixels, rng)
    example = {self.key: out, "label": label}
    # Drawn only when erasing is on, so that pre-training streams are unchanged.
    if self.erase_prob > 0:
      example[_ERASE_KEY] = augment.sample_erase(out.shape[-3], out.shape[-2], self.erase_prob, rng)
    return example

  def examples(self, pixels, label, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One augmented example, or with repeated_aug = r > 1 r of them stacked on a new axis 0."""
    if self.copies == 1:
      return self._one_copy(pixels, label, rng)
    copies = [self._one_copy(pixels, label, rng) for _ in range(self.copies)]
    return {k: np.stack([c[k] for c in copies]) for k in copies[0]}


class TrainImage(_TrainTransform):
  """random_map transform: random resized crop + flip of element['image'], then RandAugment."""

  def augment_pixels(self, image, rng):
    image = transforms.train_image(image, rng, size=self.size, scale=self.scale, hflip=self.hflip)
    if self.randaugment:
      image = augment.rand_augment_image(image, self.randaugment, rng, self.fill)
    return image

  def __call__(self, element, rng: np.random.Generator):
    return self.examples(element["image"], element["label"], rng)


class TrainClip(_TrainTransform):
  """random_map transform from a source index: random temporal clip, crop, flip, RandAugment.

  The crop is VideoMAE's multi-scale crop (train_crop='default') or a random
  resized crop (train_crop='rrc'). It reads from the source itself (rather
  than transforming what an upstream source op read) because the clip's
  temporal position is random too.
  """

  key = "video"

  def __init__(self, source, data_cfg):
    super().__init__(data_cfg)
    self.source = source
    self.scales = parse_floats(data_cfg.multiscale_scales)
    self.crop = data_cfg.train_crop

  def augment_pixels(self, clip, rng):
    if self.crop == "rrc":
      clip = augment.random_resized_crop_clip(clip, rng, size=self.size, scale=self.scale,
                                              hflip=self.hflip)
    else:
      clip = transforms.train_clip(clip, rng, size=self.size, scales=self.scales, hflip=self.hflip)
    if self.randaugment:
      clip = augment.rand_augment_clip(clip, self.randaugment, rng, self.fill)
    return clip

  def __call__(self, index, rng: np.random.Generator):
    element = self.source.read(int(index), rng)
    return self.examples(element["video"], element["label"], rng)


class EvalView:
  """map_with_index transform: deterministic eval view, plus 'index' and 'mask'."""

  def __init__(self, data_cfg):
    self.key = data_key(data_cfg)
    self.size = data_cfg.image_size
    self.crop_ratio = float(data_cfg.eval_crop_ratio)

  def __call__(self, index: int, element):
    if self.key == "video":
      view = transforms.eval_clip(element[self.key], size=self.size)
    else:
      view = transforms.eval_image(element[self.key], size=self.size, crop_ratio=self.crop_ratio)
    return {self.key: view, "label": element["label"],
            "mask": np.bool_(True), "index": np.int32(index)}


class EvalClipViews:
  """map transform from a source index: the test_num_clips x test_num_crops views of a video."""

  def __init__(self, source, data_cfg):
    self.source = source
    self.size = data_cfg.image_size
    self.num_clips = data_cfg.test_num_clips
    self.num_crops = data_cfg.test_num_crops

  def __call__(self, index):
    element = self.source.read_views(int(index), self.num_clips)
    views = augment.eval_views(element["video"], size=self.size, num_crops=self.num_crops)
    return {"video": views, "label": element["label"], "mask": np.bool_(True),
            "index": np.int32(index)}


def num_eval_views(data_cfg) -> int:
  """Views per eval example: test_num_clips x test_num_crops for videos, else 1."""
  if data_cfg.modality != "video":
    return 1
  return int(data_cfg.test_num_clips) * int(data_cfg.test_num_crops)


class MergeCopies:
  """Batch transform: [b, r, ...] repeated-augmentation copies -> [b * r, ...], copies adjacent."""

  def __call__(self, batch):
    return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}


class Normalize:
  """Batch transform: uint8 pixels -> float32 (x / 255 - mean) / std."""

  def __init__(self, data_cfg):
    self.key = data_key(data_cfg)
    self.mean, self.std = normalisation(data_cfg)

  def __call__(self, batch):
    return {**batch, self.key: transforms.normalize(batch[self.key], self.mean, self.std)}


class RandomErase:
  """Batch transform after Normalize: erases each example's drawn rectangle, drops its field."""

  def __init__(self, data_cfg):
    self.key = data_key(data_cfg)

  def __call__(self, batch):
    batch = dict(batch)
    params = batch.pop(_ERASE_KEY)
    pixels = batch[self.key]  # a fresh array from Normalize: safe to write
    for example, rectangle in zip(pixels, params):
      augment.erase_in_place(example, rectangle)
    return batch


def padding_example(data_cfg) -> dict[str, np.ndarray]:
  """The filler of a padded eval batch: zero pixels, label -1, mask False."""
  size, channels = data_cfg.image_size, data_cfg.channels
  shape = (size, size, channels)
  if data_cfg.modality == "video":
    shape = (data_cfg.num_frames,) + shape
  views = num_eval_views(data_cfg)
  if views > 1:
    shape = (views,) + shape
  return {data_key(data_cfg): np.zeros(shape, np.uint8), "label": np.int32(-1),
          "mask": np.bool_(False), "index": np.int32(-1)}


# ----------------------------------------------------------------- pipelines


def _read_options(data_cfg, elements_buffered: int, source=None) -> grain.ReadOptions:
  """Reader threads and element buffer of one process (see _IN_MEMORY_SOURCES)."""
  if data_cfg.source in _IN_MEMORY_SOURCES or getattr(source, "cheap_reads", False):
    return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  threads = min(_MAX_READ_THREADS, _READ_THREADS_PER_CPU * (os.cpu_count() or 1))
  return grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=max(elements_buffered, threads))


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside absl.app (tests, notebooks)
  nobody parsed them, so take the defaults. A later app.run still parses argv."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _prefetch(ds: grain.IterDataset, data_cfg) -> grain.IterDataset:
  """Worker processes when num_workers > 0, else a background thread of `prefetch` batches."""
  if data_cfg.num_workers > 0:
    _ensure_absl_flags_parsed()
    options = grain.MultiprocessingOptions(num_workers=data_cfg.num_workers,
                                           per_worker_buffer_size=max(1, data_cfg.prefetch))
    return ds.mp_prefetch(options)
  if data_cfg.prefetch > 0:
    return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=data_cfg.prefetch)
  return ds


def _check_process(process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, process_count="
                     f"{process_count}).")


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size < 1 or global_batch_size % process_count:
    errors.fail("batch_size", global_batch_size, f"must be a positive multiple of the number of processes "
                f"({process_count})")
  return global_batch_size // process_count


class GlobalBatchRows(grain.MapDataset):
  """One process's share of a stream cut into global batches: element i is row rows[i % k] of
  global batch i // k (k = len(rows)). Every process count then sees the same global batches."""

  def __init__(self, parent: grain.MapDataset, global_size: int, rows):
    super().__init__(parent)
    self._global_size, self._rows = int(global_size), tuple(int(r) for r in rows)

  def __len__(self) -> int:
    return len(self._parents[0]) // self._global_size * len(self._rows)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, row = divmod(index, len(self._rows))
    return self._parents[0][batch * self._global_size + self._rows[row]]


def _element_rows(rows, global_batch_size: int, copies: int, process_index: int, batch_size: int):
  """Element positions in a global batch of elements (an element holds `copies` consecutive rows)."""
  if rows is None:
    rows = range(process_index * batch_size, (process_index + 1) * batch_size)
  rows = tuple(rows)
  starts = rows[::copies]
  if (len(rows) != batch_size or any(not 0 <= r < global_batch_size for r in rows)
      or any(s % copies or rows[i * copies:(i + 1) * copies] != tuple(range(s, s + copies))
             for i, s in enumerate(starts))):
    raise ValueError(f"rows={rows} must be {batch_size} ascending rows of the global batch of {global_batch_size}, "
                     f"in aligned groups of repeated_aug={copies}.")
  return tuple(s // copies for s in starts)


def make_train_dataset(data_cfg, *, global_batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1, rows=None) -> grain.IterDataset:
  """Infinite shuffled, augmented, normalised stream of per-process batches.

  Batches hold global_batch_size // process_count examples:
  images {'image': float32 [b, H, W, C], 'label': int32 [b]},
  videos {'video': float32 [b, T, H, W, C], 'label': int32 [b]}.
  With repeated_aug = r, rows r*i .. r*i + r - 1 are copies of one example.
  The process loads `rows` of each global batch (ascending; default the
  process_index-th contiguous block): sharding.process_batch_rows gives the rows
  its devices hold, so the global batch is the same for any number of processes.
  iter(dataset) is a grain DatasetIterator: save get_state() with the
  checkpoint and set_state() it on resume to continue the same stream.
  """
  _check_process(process_index, process_count)
  batch_size = per_process_batch_size(global_batch_size, process_count)
  validate_data_config(data_cfg, splits=(data_cfg.split,))
  copies = data_cfg.repeated_aug
  if batch_size % copies:
    _fail("repeated_aug", copies, f"the per-process batch (config.batch_size={global_batch_size} / "
          f"{process_count} process(es) = {batch_size}) must be a multiple of it")
  source = sources.make_source(data_cfg, data_cfg.split)
  if data_cfg.modality == "video":
    ds = grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat()
    ds = ds.random_map(TrainClip(source, data_cfg))
  else:
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
    ds = ds.random_map(TrainImage(data_cfg))
  elements = batch_size // copies  # an element holds all copies of one example
  ds = GlobalBatchRows(ds, global_batch_size // copies,
                       _element_rows(rows, global_batch_size, copies, process_index, batch_size))
  ds = ds.to_iter_dataset(_read_options(data_cfg, elements * max(1, data_cfg.prefetch), source))
  ds = ds.batch(elements, drop_remainder=True)
  if copies > 1:
    ds = ds.map(MergeCopies())
  ds = ds.map(Normalize(data_cfg))
  if data_cfg.random_erase > 0:
    ds = ds.map(RandomErase(data_cfg))
  return _prefetch(ds, data_cfg)


def eval_batches_per_process(num: int, batch_size: int, process_count: int) -> int:
  """Batches each process yields: enough for the largest process slice."""
  return max(1, math.ceil(math.ceil(num / process_count) / batch_size))


def make_eval_dataset(data_cfg, *, split: str, batch_size: int, process_index: int = 0,
                      process_count: int = 1, max_examples: int = 0) -> grain.IterDataset:
  """One ordered pass over `split` (first max_examples if > 0), padded batches of batch_size.

  Process p gets examples p, p + process_count, ...; batches carry 'mask'
  (bool, True = real) and 'index' (int32 source index, -1 = padding) besides
  the pixels and 'label' (-1 for padding). With num_eval_views(data_cfg) = V
  > 1 (videos), 'video' is [b, V, T, H, W, C]: view c * test_num_crops + k is
  temporal clip c at spatial crop k.
  """
  _check_process(process_index, process_count)
  if batch_size < 1:
    raise ValueError(f"eval batch_size={batch_size} must be >= 1.")
  source = sources.make_source(data_cfg, split, _split_field(data_cfg, split))
  num = len(source) if max_examples <= 0 else min(max_examples, len(source))
  if num_eval_views(data_cfg) > 1:
    ds = grain.MapDataset.range(num).map(EvalClipViews(source, data_cfg))
  else:
    ds = grain.MapDataset.source(source)[:num].map_with_index(EvalView(data_cfg))
  ds = ds[process_index::process_count]
  padded = eval_batches_per_process(num, batch_size, process_count) * batch_size
  if padded > len(ds):
    filler = grain.MapDataset.source([padding_example(data_cfg)] * (padded - len(ds)))
    ds = grain.MapDataset.concatenate([ds, filler]) if len(ds) else filler
  ds = ds.to_iter_dataset(_read_options(data_cfg, batch_size * max(1, data_cfg.prefetch), source))
  if data_cfg.num_workers > 0:
    # Elements, not batches, cross the process boundary here: batching inside
    # workers would split the padded tail into partial batches.
    _ensure_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
  ds = ds.batch(batch_size, drop_remainder=False)
  ds = ds.map(Normalize(data_cfg))
  if data_cfg.num_workers == 0 and data_cfg.prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=data_cfg.prefetch)
  return ds
