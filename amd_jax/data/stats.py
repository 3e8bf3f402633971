"""Statistics of a data source: per-channel mean/std and the image size distribution.

  python -m amd_jax.data.stats --config configs/quickstart.py \\
      --config.data.source=image_folder --config.data.path=/data/flowers --config.data.channels=3

prints the mean and std of the training split's pixels (as the pipeline decodes
them: uint8 / 255, before any crop or normalisation), the distribution of image
(or video frame) sizes, and the overrides to paste:

  --config.data.mean=0.4330,0.3819,0.2964 --config.data.std=0.2926,0.2459,0.2710

The numbers come from a fixed random sample of examples (--num_examples, default
DEFAULT_IMAGES images or DEFAULT_VIDEOS clips, and every example of Fashion-MNIST;
0 = every example), pixel-weighted (a large image counts for more pixels than a
small one); a sample of 10,000 images puts the mean within about 1e-3 of the
whole set's.

config.data.mean='auto' / config.data.std='auto' ask the training loop for the
same numbers: `resolve_normalisation(config.data, workdir)` measures them once,
caches them in WORKDIR/data_stats.json (reused while the data fields are the
same) and returns the data config with the numbers in place, so the run's
config.json records them.

`stale_fields(config.data)` names the fields that still hold ANOTHER data set's
values after the data was switched (the rule is in its docstring); the loop
warns with `describe_stale`.
"""
from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import numpy as np

from amd_jax import config_files, errors, paths
from amd_jax.config_base import parse_floats
from amd_jax.data import pipeline
from amd_jax.data import sources

DEFAULT_IMAGES = 10000
DEFAULT_VIDEOS = 500
# Sources read from memory: measuring all of their examples takes seconds.
IN_MEMORY_SOURCES = ("fashion_mnist", "synthetic")
STATS_FILE = "data_stats.json"
# Data fields that decide which pixels the statistics describe: a cached result is reused only while they hold.
IDENTITY_FIELDS = ("source", "modality", "path", "tfds_name", "video_root", "split", "channels", "num_frames",
                   "sampling_rate", "max_image_pixels")
_SAMPLE_SEED = 0
_DIGITS = 4

# Published statistics of data sets the configs use, to recognise values kept from one of them.
KNOWN_STATISTICS = {
    "Fashion-MNIST": ((0.2860,), (0.3530,)),
    "ImageNet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# Class counts of those data sets (and of the video sets whose recipes ship here).
KNOWN_CLASS_COUNTS = {"Fashion-MNIST": 10, "ImageNet": 1000, "Kinetics-400": 400, "Something-Something v2": 174}


@dataclasses.dataclass
class DataStats:
  """What `compute_stats` measured."""
  mean: tuple[float, ...]
  std: tuple[float, ...]
  measured: int            # examples read
  total: int               # examples in the split
  heights: tuple[int, int, int]   # min, median, max (of frames, for videos)
  widths: tuple[int, int, int]

  def mean_text(self) -> str:
    return ",".join(f"{v:.{_DIGITS}f}" for v in self.mean)

  def std_text(self) -> str:
    return ",".join(f"{v:.{_DIGITS}f}" for v in self.std)

  def overrides(self) -> str:
    return f"--config.data.mean={self.mean_text()} --config.data.std={self.std_text()}"


def _sample(total: int, num_examples: int) -> np.ndarray:
  """Sorted indices of a fixed random sample (all of them when num_examples is 0 or >= total)."""
  if num_examples <= 0 or num_examples >= total:
    return np.arange(total)
  rng = np.random.default_rng(_SAMPLE_SEED)
  return np.sort(rng.choice(total, size=num_examples, replace=False))


def _reader(source, data_cfg):
  if data_cfg.modality == "video":
    return lambda i: source.read(int(i), None)["video"]   # the centred clip
  return lambda i: source[int(i)]["image"]


def _moments(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int, int]:
  """(per-channel sum, sum of squares, pixel count, height, width) of uint8 [..., H, W, C]."""
  flat = pixels.reshape(-1, pixels.shape[-1])
  values = flat.astype(np.float64)
  return values.sum(0), np.einsum("pc,pc->c", values, values), flat.shape[0], pixels.shape[-3], pixels.shape[-2]


def default_num_examples(data_cfg) -> int:
  """Sample size when none is given: every example of a source held in memory (cheap), else a sample."""
  if data_cfg.source in IN_MEMORY_SOURCES:
    return 0
  return DEFAULT_VIDEOS if data_cfg.modality == "video" else DEFAULT_IMAGES


def compute_stats(data_cfg, *, split: str | None = None, num_examples: int | None = None,
                  threads: int | None = None) -> DataStats:
  """Mean/std per channel (of uint8 / 255) and size distribution of a sample of `split` (default
  config.data.split). Files are decoded in threads; undecodable ones are replaced as in training."""
  split = data_cfg.split if split is None else split
  num_examples = default_num_examples(data_cfg) if num_examples is None else num_examples
  # The cache would hold a copy of the whole split for one pass over a sample: read the files.
  data_cfg = copy.deepcopy(data_cfg)
  with data_cfg.unlocked():
    data_cfg.cache_max_bytes = 0
  source = sources.make_source(data_cfg, split)
  indices = _sample(len(source), num_examples)
  threads = threads or min(16, 2 * (os.cpu_count() or 1))
  read = _reader(source, data_cfg)
  total_sum = total_squares = 0.0
  count, heights, widths = 0, [], []
  with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
    for start in range(0, len(indices), 256):
      for pixels in pool.map(read, indices[start:start + 256]):
        s, sq, n, h, w = _moments(pixels)
        total_sum, total_squares, count = total_sum + s, total_squares + sq, count + n
        heights.append(h)
        widths.append(w)
  mean = total_sum / count
  std = np.sqrt(np.maximum(total_squares / count - mean**2, 0.0))
  spread = lambda v: (int(np.min(v)), int(np.median(v)), int(np.max(v)))
  return DataStats(mean=tuple(float(m) / 255 for m in mean), std=tuple(float(s) / 255 for s in std),
                   measured=len(indices), total=len(source), heights=spread(heights), widths=spread(widths))


def format_stats(stats: DataStats, data_cfg, split: str) -> str:
  what = "clips (centred, frame sizes)" if data_cfg.modality == "video" else "images"
  where = data_cfg.tfds_name if data_cfg.source == "tfds" else (data_cfg.path or "default path")
  lines = [
      f"source {data_cfg.source} ({where}), split {split!r}: {stats.measured} of {stats.total} {what} measured",
      f"  mean {stats.mean_text()}   std {stats.std_text()}   (per channel, of pixels / 255)",
      f"  height min/median/max {stats.heights[0]} / {stats.heights[1]} / {stats.heights[2]}",
      f"  width  min/median/max {stats.widths[0]} / {stats.widths[1]} / {stats.widths[2]}",
      "",
      f"  {stats.overrides()}",
  ]
  return "\n".join(lines)


# ---------------------------------------------------------------- 'auto' in a run


def _identity(data_cfg) -> dict:
  return {field: data_cfg[field] for field in IDENTITY_FIELDS}


def resolve_normalisation(data_cfg, workdir: str, *, num_examples: int | None = None,
                          write_cache: bool = True):
  """data_cfg with mean/std 'auto' replaced by the measured numbers (a copy; unchanged when neither is 'auto').

  The measurement is cached in WORKDIR/data_stats.json and reused while the
  data fields that decide the pixels (IDENTITY_FIELDS) and the sample size are
  the same. write_cache=False measures without writing (other processes of a
  multi-host run, which compute the same numbers from the same sample).
  """
  if pipeline.AUTO not in (data_cfg.mean, data_cfg.std):
    return data_cfg
  num_examples = default_num_examples(data_cfg) if num_examples is None else num_examples
  key = {"data": _identity(data_cfg), "num_examples": num_examples}
  cache_file = paths.join(workdir, STATS_FILE)
  cached = _read_cache(cache_file)
  if cached is not None and cached.get("key") == key:
    mean, std = cached["mean"], cached["std"]
    logging.info("data mean/std 'auto': %s / %s from %s", mean, std, cache_file)
  else:
    stats = compute_stats(data_cfg, num_examples=num_examples)
    mean, std = stats.mean_text(), stats.std_text()
    logging.info("data mean/std 'auto': measured %s / %s on %d of %d examples of config.data.split=%r",
                 mean, std, stats.measured, stats.total, data_cfg.split)
    if write_cache:
      record = {"key": key, "mean": mean, "std": std, "measured": stats.measured, "total": stats.total,
                "heights_min_median_max": stats.heights, "widths_min_median_max": stats.widths}
      paths.write_text(cache_file, json.dumps(record, indent=2) + "\n")
  resolved = copy.deepcopy(data_cfg)
  with resolved.unlocked():
    if resolved.mean == pipeline.AUTO:
      resolved.mean = mean
    if resolved.std == pipeline.AUTO:
      resolved.std = std
  return resolved


def _read_cache(file: str) -> dict | None:
  if not paths.exists(file):
    return None
  try:
    return json.loads(paths.read_text(file))
  except (ValueError, OSError) as e:  # a damaged cache is measured again, not trusted
    logging.warning("ignoring %s (%s); measuring again", file, e)
    return None


# ------------------------------------------------------------ another data set's values


def _matches(text: str, values: tuple[float, ...]) -> bool:
  if text == pipeline.AUTO:
    return False
  try:
    numbers = parse_floats(text)
  except ValueError:
    return False
  return len(numbers) == len(values) and all(abs(a - b) < 5e-4 for a, b in zip(numbers, values))


def _source_dataset(data_cfg) -> str | None:
  """Which known data set the source is: 'Fashion-MNIST', 'ImageNet', or None (the user's own data)."""
  if data_cfg.source == "fashion_mnist":
    return "Fashion-MNIST"
  if data_cfg.source == "tfds" and data_cfg.tfds_name.split(":")[0].startswith("imagenet"):
    return "ImageNet"
  return None


def _stale_statistics(data_cfg) -> str | None:
  """The known data set whose mean/std the config holds although its source is another one."""
  own = _source_dataset(data_cfg)
  for name, (mean, std) in KNOWN_STATISTICS.items():
    if name == own or not (_matches(data_cfg.mean, mean) or _matches(data_cfg.std, std)):
      continue
    # ImageNet's statistics are the customary ones for natural RGB images (VideoMAE uses them for
    # Kinetics and Something-Something): kept with the user's own RGB data they are a choice, not a
    # leftover. Only a known data set with statistics of its own flags them.
    if name == "ImageNet" and own is None:
      continue
    return name
  return None


def stale_fields(data_cfg) -> list[str]:
  """Fields of config.data that keep another data set's values; [] when none do. Synthetic data: [].

  The rule:
  * mean / std: they equal (to 5e-4) the published statistics of a known data
    set (Fashion-MNIST, ImageNet) other than the configured source: Fashion-MNIST's
    with any other source, ImageNet's with Fashion-MNIST. ('auto' never is.)
  * hflip: True while mean/std are stale and the source is the user's own data
    (an image folder, a video list, a tfds set other than ImageNet): the flip came
    with the other data set's settings, and a left-right flip changes the meaning
    of some data (text, digits, directions of motion).
  * num_classes: set explicitly to a known data set's class count (10, 1000,
    400, 174) that is not the source's own, when the source cannot count its
    classes (a tfds set without a ClassLabel). Sources that can count them are
    checked exactly instead (pipeline.num_classes stops the run on a mismatch).
  """
  if data_cfg.source == "synthetic":
    return []
  stale = []
  statistics_of = _stale_statistics(data_cfg)
  if statistics_of:
    own = _source_dataset(data_cfg)
    known_mean, known_std = KNOWN_STATISTICS[statistics_of]
    stale += [f for f, known in (("mean", known_mean), ("std", known_std)) if _matches(data_cfg[f], known)]
    if data_cfg.hflip and own is None:
      stale.append("hflip")
  if data_cfg.num_classes and _uncountable(data_cfg):
    own = _source_dataset(data_cfg)
    if any(count == data_cfg.num_classes and name != own for name, count in KNOWN_CLASS_COUNTS.items()):
      stale.append("num_classes")
  return stale


def _uncountable(data_cfg) -> bool:
  try:
    return sources.count_classes(data_cfg) is None
  except errors.ConfigError:
    return False  # validation reports what is wrong with the source


def describe_stale(data_cfg) -> str:
  """One warning sentence about `stale_fields`, or '' when there is nothing to say."""
  fields = stale_fields(data_cfg)
  if not fields:
    return ""
  name = _stale_statistics(data_cfg)
  parts = []
  if "mean" in fields or "std" in fields:
    shown = ", ".join(f"config.data.{f}={data_cfg[f]!r}" for f in fields if f in ("mean", "std"))
    parts.append(f"{shown} are {name}'s statistics but config.data.source={data_cfg.source!r}"
                 f"{f' ({data_cfg.path})' if data_cfg.path else ''}: set them to 'auto' or to the numbers "
                 "`python -m amd_jax.data.stats` prints")
  if "hflip" in fields:
    parts.append(f"config.data.hflip=True came with {name}'s settings: keep it only if a left-right flip "
                 "keeps the meaning of your images")
  if "num_classes" in fields:
    parts.append(f"config.data.num_classes={data_cfg.num_classes} is another data set's class count and the "
                 "source cannot count its classes: check it")
  return "; ".join(parts) + "."


# ---------------------------------------------------------------------- command line

_FLAGS = {}


def _define_flags() -> None:
  """The command line's flags, defined only when this module is the program (importing it defines none)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _FLAGS["config"] = config_flags.DEFINE_config_file("config", None, "Path to an amd_jax config file.",
                                                     lock_config=True)
  _FLAGS["num_examples"] = flags.DEFINE_integer(
      "num_examples", None,
      f"examples to measure (default {DEFAULT_IMAGES} images / {DEFAULT_VIDEOS} clips; 0: all of them)")
  _FLAGS["split"] = flags.DEFINE_string("split", None, "split to measure (default: config.data.split)")
  flags.mark_flags_as_required(["config"])


def _class_line(data_cfg) -> str:
  """What the data shows about its classes, and whether config.data.num_classes agrees."""
  found = sources.count_classes(data_cfg)
  if found is None:
    return "classes: the source cannot count them (config.data.num_classes must be set for probes)"
  line = f"classes: {found.count} ({found.evidence})"
  try:
    pipeline.num_classes(data_cfg)
  except errors.ConfigError as e:
    line += f"\n  but {e}"
  return line


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  paths.quiet_cloud_logs()
  data_cfg = copy.deepcopy(_FLAGS["config"].value.data)
  split = _FLAGS["split"].value or data_cfg.split
  configured_classes = data_cfg.num_classes
  try:
    with data_cfg.unlocked():
      data_cfg.num_classes = 0  # reported below instead of stopping the measurement
    checked = copy.deepcopy(data_cfg)
    with checked.unlocked():   # what is measured is not checked: it may hold another data set's numbers
      checked.mean = checked.std = pipeline.AUTO
    pipeline.validate_data_config(checked, splits=(split,))
    stats = compute_stats(data_cfg, split=split, num_examples=_FLAGS["num_examples"].value)
    with data_cfg.unlocked():
      data_cfg.num_classes = configured_classes
    classes = _class_line(data_cfg)
  except errors.ConfigError as e:
    print(f"amd_jax: configuration error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  print(format_stats(stats, data_cfg, split))
  print(f"\n{classes}")
  warning = describe_stale(data_cfg)
  if warning:
    print(f"\nnote: {warning}")


def _parse_flags(argv):
  """absl's parsing (--config by shipped name or path); a --config.x override naming no field ends in one line
  (exit 2), not a traceback."""
  try:
    return app.parse_flags_with_usage(config_files.resolve_flag(argv))
  except errors.ConfigError as e:
    print(f"amd_jax: configuration error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except (AttributeError, KeyError) as e:
    inner = e.args[0] if e.args else e
    detail = (inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)).replace("\n", "; ")
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    print(f"amd_jax: configuration error: unknown config field in {', '.join(overrides) or 'the overrides'}: "
          f"{detail}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
