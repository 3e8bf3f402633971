"""Moving garments: a video data set rendered from Fashion-MNIST, written as real H.264 files.

  python -m amd_jax.data.make_moving --out DIR [--num_train N --num_test M --frames 16 --size S --seed K]

Each clip shows one Fashion-MNIST garment (train images for the train split,
test images for the test split), shrunk to --garment_size pixels, gliding over a
black --size x --size canvas: a random position, a random speed in [--min_speed,
--max_speed] pixels per frame, one of 8 directions (multiples of 45 degrees),
bouncing off the canvas edges. Every clip has two labels:

  direction  the direction the garment moves in at the middle frame (frame
             --frames // 2), 0..7 (DIRECTIONS): right, down-right, down,
             down-left, left, up-left, up, up-right. The garment's position at the
             middle frame is drawn uniformly from a square that depends on the
             speed alone, never on the direction, so that frame cannot tell it (as
             in Something-Something); no bounce happens within --clear_steps
             frames of it, so the clip's middle shows the labelled motion.
             Elsewhere the garment bounces off the canvas edges (a bounce reflects
             the velocity), forwards and backwards in time from the middle.
  garment    the Fashion-MNIST class, 0..9 (GARMENTS): appearance (as in Kinetics).

Layout of DIR (the VideoMAE list format config.data.source='video_list' reads,
"<path> <label>" per line, paths relative to DIR: set config.data.video_root=DIR):

  train/000000.mp4 ...        test/000000.mp4 ...      grey clips, yuv420p H.264 (libx264)
  train_direction.csv         test_direction.csv       direction labels
  train_garment.csv           test_garment.csv         garment labels
  train_joint.csv             test_joint.csv           10 * direction + garment (80 classes): one
                                                       decoding pass yields features for both labels
  moving.json                 the parameters, counts and label names; "complete" once every file is written

config.data.path=DIR/{split}_direction.csv (or _garment) picks the label.
Everything is a pure function of the parameters and --seed: a clip's random
draws come from its own generator seeded with (seed, split, index), so the same
command writes the same frames (and, with the same PyAV/libx264 build, the same
bytes) in any order and with any number of --workers. Rerunning on a finished
DIR with the same parameters does nothing; a DIR holding anything else is
refused, never overwritten.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import io
import json
import os
import sys
import time
import zlib

import av
import numpy as np
from PIL import Image

from amd_jax import errors, paths
from amd_jax.data import sources

DIRECTIONS = ("right", "down-right", "down", "down-left", "left", "up-left", "up", "up-right")
GARMENTS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
            "Ankle boot")
LABELS = ("direction", "garment", "joint")
SPLITS = ("train", "test")
META_FILE = "moving.json"
FORMAT_VERSION = 2
# Near-transparent H.264 for grey garments on black (max decoded error a few grey levels); x264 on one thread
# and FFmpeg's bitexact flags make the bytes a function of the frames alone.
_X264_OPTIONS = {"crf": "12", "preset": "medium", "threads": "1"}


@dataclasses.dataclass(frozen=True)
class MovingSpec:
  """What a moving-garments set is made of (everything but the clip counts)."""
  frames: int = 16          # frames per clip file
  size: int = 32            # canvas side in pixels (even: yuv420p halves it)
  garment_size: int = 16    # the 28x28 Fashion-MNIST image is resized to this side
  min_speed: float = 1.0    # pixels per frame
  max_speed: float = 2.0
  clear_steps: int = 2      # frames either side of the middle frame without a bounce
  fps: int = 8              # frame rate written into the files
  seed: int = 0

  def check(self) -> None:
    """ConfigError naming the flag when the parameters cannot make a valid set."""
    _check_int("frames", self.frames, 2)
    _check_int("garment_size", self.garment_size, 2)
    _check_int("fps", self.fps, 1)
    _check_int("seed", self.seed, 0)
    if not _is_int(self.size) or self.size <= self.garment_size or self.size % 2:
      _flag_error("size", self.size, f"an even number of pixels > --garment_size={self.garment_size} "
                  "(H.264 yuv420p needs even sides; the garment must have room to move)")
    if not self.min_speed > 0:
      _flag_error("min_speed", self.min_speed, "must be > 0")
    if self.max_speed < self.min_speed:
      _flag_error("max_speed", self.max_speed, f"must be >= --min_speed={self.min_speed}")
    _check_int("clear_steps", self.clear_steps, 0)
    if self.clear_steps > self.middle or self.middle + self.clear_steps > self.frames - 1:
      _flag_error("clear_steps", self.clear_steps, f"the clear stretch around the middle frame {self.middle} must lie "
                  f"inside the {self.frames} frames, i.e. <= {min(self.middle, self.frames - 1 - self.middle)}")
    room, steps = self.size - self.garment_size, 2 * self.clear_steps
    if self.max_speed * steps > room:
      _flag_error("max_speed", self.max_speed,
                  f"the {steps} steps around the middle frame must fit on the canvas without a bounce: "
                  f"max_speed x {steps} <= size - garment_size = {room}, i.e. <= {room / max(steps, 1):g}")

  @property
  def middle(self) -> int:
    """The frame whose motion the direction label names."""
    return self.frames // 2


def _flag_error(flag: str, value, allowed: str):
  raise errors.ConfigError(f"--{flag}={value!r} is not valid: {allowed}")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_int(flag: str, value, minimum: int) -> None:
  if not _is_int(value) or value < minimum:
    _flag_error(flag, value, f"expected an integer >= {minimum}")


# ------------------------------------------------------------------------------------------ one clip


@dataclasses.dataclass(frozen=True)
class ClipPlan:
  """The random draws of one clip."""
  image_index: int          # into the split's Fashion-MNIST images
  direction: int            # index into DIRECTIONS
  speed: float              # pixels per frame
  middle: tuple[float, float]  # (x, y) of the garment's top-left corner at the middle frame


def velocity(direction: int, speed: float) -> np.ndarray:
  """(vx, vy) in image coordinates (y grows downwards) for DIRECTIONS[direction]."""
  angle = direction * np.pi / 4
  return speed * np.array([np.cos(angle), np.sin(angle)])


def _split_code(split: str) -> int:
  return zlib.crc32(split.encode())


def image_order(spec: MovingSpec, split: str, num_images: int) -> np.ndarray:
  """Which image clip i shows: a seeded permutation of the split's images, cycled."""
  return np.random.default_rng([spec.seed, _split_code(split), 0]).permutation(num_images)


def plan_clip(spec: MovingSpec, split: str, index: int, order: np.ndarray) -> ClipPlan:
  """Clip `index`'s draws. Directions cycle with the index, so every prefix of a split is balanced."""
  rng = np.random.default_rng([spec.seed, _split_code(split), 1, index])
  direction = index % len(DIRECTIONS)
  speed = float(rng.uniform(spec.min_speed, spec.max_speed))
  # The middle position keeps the clear stretch on the canvas in every direction at this speed: its range is the
  # same whatever the direction, so the middle frame says nothing about it.
  margin = speed * spec.clear_steps
  room = spec.size - spec.garment_size
  middle = rng.uniform(margin, room - margin, size=2)
  return ClipPlan(int(order[index % len(order)]), direction, speed, (float(middle[0]), float(middle[1])))


def trajectory(spec: MovingSpec, plan: ClipPlan) -> np.ndarray:
  """int [frames, 2] top-left (x, y) per frame: straight motion through the middle position, reflected at the
  canvas edges."""
  room = spec.size - spec.garment_size
  t = np.arange(spec.frames)[:, None] - spec.middle
  free = np.asarray(plan.middle) + velocity(plan.direction, plan.speed) * t
  folded = np.mod(free, 2 * room)   # a reflection at 0 and at `room` is a triangle wave of period 2 room
  bounced = np.where(folded > room, 2 * room - folded, folded)
  return np.rint(bounced).astype(np.int64)


def garment_image(image: np.ndarray, garment_size: int) -> np.ndarray:
  """A 28x28 uint8 Fashion-MNIST image resized to garment_size (Lanczos; [H, W] uint8)."""
  return np.asarray(Image.fromarray(image.reshape(image.shape[0], image.shape[1])).resize(
      (garment_size, garment_size), Image.LANCZOS))


def render_clip(garment: np.ndarray, positions: np.ndarray, size: int) -> np.ndarray:
  """uint8 [frames, size, size]: the garment pasted on a black canvas at each frame's position."""
  g = garment.shape[0]
  frames = np.zeros((len(positions), size, size), np.uint8)
  for frame, (x, y) in zip(frames, positions):
    frame[y:y + g, x:x + g] = garment
  return frames


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
  """H.264 (libx264, yuv420p) in an MP4 container, in memory, from grey frames [T, H, W]."""
  buffer = io.BytesIO()
  with av.open(buffer, "w", format="mp4", options={"fflags": "+bitexact"}) as container:
    stream = container.add_stream("libx264", rate=fps, options=_X264_OPTIONS)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    stream.codec_context.flags |= av.codec.context.Flags.bitexact
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="gray")))
    container.mux(stream.encode())   # flush the encoder's delayed frames
  return buffer.getvalue()


def make_clip(spec: MovingSpec, split: str, index: int, images: np.ndarray, order: np.ndarray,
              garment_labels: np.ndarray) -> tuple[np.ndarray, int, int]:
  """(uint8 frames [T, S, S], direction, garment) of clip `index` of `split`."""
  plan = plan_clip(spec, split, index, order)
  garment = garment_image(images[plan.image_index], spec.garment_size)
  frames = render_clip(garment, trajectory(spec, plan), spec.size)
  return frames, plan.direction, int(garment_labels[plan.image_index])


# ------------------------------------------------------------------------------------------ a data set


def clip_name(split: str, index: int) -> str:
  return f"{split}/{index:06d}.mp4"


def list_file(out: str, split: str, label: str) -> str:
  """The annotation list of `split` for `label` (one of LABELS)."""
  return paths.join(out, f"{split}_{label}.csv")


def _fashion_mnist(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images [N, 28, 28, 1], labels [N]) through the library's Fashion-MNIST reader."""
  source = sources.FashionMnistSource(path, split, channels=1, split_field="--fashion_mnist")
  examples = [source[i] for i in range(len(source))]
  return np.stack([e["image"] for e in examples]), np.array([int(e["label"]) for e in examples])


def _write_split(out: str, split: str, count: int, spec: MovingSpec, fashion_mnist: str,
                 workers: int) -> list[tuple[str, int, int]]:
  """Writes `count` clips of `split`; returns [(relative path, direction, garment)] in index order."""
  images, garment_labels = _fashion_mnist(fashion_mnist, split)
  order = image_order(spec, split, len(images))
  paths.makedirs(paths.join(out, split))

  def write(index: int) -> tuple[str, int, int]:
    frames, direction, garment = make_clip(spec, split, index, images, order, garment_labels)
    name = clip_name(split, index)
    paths.write_bytes(paths.join(out, name), encode_mp4(frames, spec.fps))
    return name, direction, garment

  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
    return list(pool.map(write, range(count)))


def _write_lists(out: str, split: str, entries: list[tuple[str, int, int]]) -> None:
  columns = {
      "direction": lambda d, g: d,
      "garment": lambda d, g: g,
      "joint": lambda d, g: d * len(GARMENTS) + g,
  }
  for label, value in columns.items():
    lines = "".join(f"{name} {value(d, g)}\n" for name, d, g in entries)
    paths.write_text(list_file(out, split, label), lines)


def describe(spec: MovingSpec, num_train: int, num_test: int, complete: bool) -> dict:
  """The moving.json record of a set."""
  return {
      "format_version": FORMAT_VERSION,
      "spec": dataclasses.asdict(spec),
      "num_examples": {"train": num_train, "test": num_test},
      "labels": {"direction": list(DIRECTIONS), "garment": list(GARMENTS),
                 "joint": f"{len(GARMENTS)} * direction + garment"},
      "num_classes": {"direction": len(DIRECTIONS), "garment": len(GARMENTS),
                      "joint": len(DIRECTIONS) * len(GARMENTS)},
      "complete": complete,
  }


def read_meta(out: str) -> dict | None:
  """moving.json of DIR, or None when DIR holds none."""
  file = paths.join(out, META_FILE)
  return json.loads(paths.read_text(file)) if paths.isfile(file) else None


def _same_set(meta: dict, wanted: dict) -> bool:
  keys = ("format_version", "spec", "num_examples")
  return all(meta.get(k) == wanted[k] for k in keys)


def generate(out: str, num_train: int, num_test: int, spec: MovingSpec = MovingSpec(), *,
             fashion_mnist: str = "", workers: int = 0, log=print) -> dict:
  """Writes the set into `out` (see the module doc) unless it is already there; returns its moving.json.

  A folder holding a finished set of the same parameters is left as it is; one holding an unfinished set
  of the same parameters (an interrupted run) is written again; anything else is refused (ConfigError).
  """
  spec.check()
  _check_int("num_train", num_train, 1)
  _check_int("num_test", num_test, 1)
  wanted = describe(spec, num_train, num_test, complete=True)
  meta = read_meta(out) if paths.isdir(out) else None
  if meta is not None and _same_set(meta, wanted):
    if meta.get("complete"):
      log(f"{paths.resolve(out)} already holds this moving-garments set; nothing to do.")
      return meta
  elif meta is not None:
    raise errors.ConfigError(
        f"--out={out!r} holds a moving-garments set with other parameters ({meta.get('spec')}, "
        f"{meta.get('num_examples')}); nothing was changed. Use another --out, or the same parameters.")
  elif paths.isdir(out) and paths.listdir(out):
    raise errors.ConfigError(f"--out={out!r} is a folder that is not empty and holds no {META_FILE}; "
                             "nothing was changed. Give a new or empty folder.")
  paths.makedirs(out)
  paths.write_text(paths.join(out, META_FILE), json.dumps(describe(spec, num_train, num_test, False), indent=2))
  workers = workers or os.cpu_count() or 1
  for split, count in (("train", num_train), ("test", num_test)):
    t0 = time.perf_counter()
    entries = _write_split(out, split, count, spec, fashion_mnist, workers)
    _write_lists(out, split, entries)
    log(f"{split}: {count} clips in {time.perf_counter() - t0:.1f}s")
  paths.write_text(paths.join(out, META_FILE), json.dumps(wanted, indent=2))
  log(f"wrote {num_train} + {num_test} clips ({spec.frames} frames, {spec.size}x{spec.size}) to "
      f"{paths.resolve(out)}")
  return wanted


def main(argv=None) -> int:
  defaults = MovingSpec()
  parser = argparse.ArgumentParser(prog="python -m amd_jax.data.make_moving",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="folder to write (local path or gs:// URL)")
  parser.add_argument("--num_train", type=int, default=4000, help="clips in the train split")
  parser.add_argument("--num_test", type=int, default=1000, help="clips in the test split")
  parser.add_argument("--frames", type=int, default=defaults.frames, help="frames per clip")
  parser.add_argument("--size", type=int, default=defaults.size, help="canvas side in pixels (even)")
  parser.add_argument("--garment_size", type=int, default=defaults.garment_size,
                      help="side of the garment in pixels (Fashion-MNIST's 28x28 resized)")
  parser.add_argument("--min_speed", type=float, default=defaults.min_speed, help="pixels per frame")
  parser.add_argument("--max_speed", type=float, default=defaults.max_speed, help="pixels per frame")
  parser.add_argument("--clear_steps", type=int, default=defaults.clear_steps,
                      help="frames either side of the middle frame without a bounce")
  parser.add_argument("--fps", type=int, default=defaults.fps, help="frame rate written into the files")
  parser.add_argument("--seed", type=int, default=defaults.seed)
  parser.add_argument("--fashion_mnist", default="",
                      help=f"folder of the Fashion-MNIST idx .gz files (default {sources.FASHION_MNIST_DIR})")
  parser.add_argument("--workers", type=int, default=0, help="encoding threads (default: one per CPU)")
  args = parser.parse_args(argv)
  spec = MovingSpec(frames=args.frames, size=args.size, garment_size=args.garment_size, min_speed=args.min_speed,
                    max_speed=args.max_speed, clear_steps=args.clear_steps, fps=args.fps, seed=args.seed)
  try:
    generate(args.out, args.num_train, args.num_test, spec, fashion_mnist=args.fashion_mnist,
             workers=args.workers)
  except (errors.ConfigError, sources.SourceError) as e:
    print(f"make_moving: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
