"""Host-side augmentation for classification fine-tuning, and multi-view test crops.

* RandAugment as timm defines it, configured by a string such as
  'rand-m9-mstd0.5-inc1' (config.data.randaugment). Each image draws
  `num_ops` ops uniformly with replacement; each drawn op is applied with
  probability 1/2, at a magnitude drawn around `m` on timm's 0..10 scale. A
  clip draws once and every frame gets the same ops at the same magnitudes, as
  VideoMAE does (the motion is not disturbed by per-frame jitter).
* Random erasing in timm's 'pixel' mode, on normalised float32 pixels: one
  rectangle of 2%..1/3 of the area, log-uniform aspect in (0.3, 1/0.3), filled
  with N(0, 1) noise. A clip gets the same rectangle on every frame (a cube).
  The rectangle is drawn per example on the host, while pixels are still
  uint8 (`sample_erase`), and applied after the batch is normalised
  (`erase_in_place`); the noise comes from a seed drawn with the rectangle.
* The random resized crop of clips (VideoMAE fine-tuning) and the spatial
  crops of the multi-view test.

Every random number comes from the np.random.Generator that grain gives each
element, so the stream stays a pure function of the pipeline seed.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps

from amd_jax.data import transforms

# --------------------------------------------------------------- RandAugment

_FIELD = "config.data.randaugment"
_FORMAT = ("expected '' (off) or 'rand' followed by '-'-separated settings m<magnitude>, "
           "n<number of ops>, mstd<magnitude std>, mmax<magnitude cap>, inc<0|1>, "
           "e.g. 'rand-m9-mstd0.5-inc1' or 'rand-m7-n4-mstd0.5-inc1'")
# timm's magnitude scale: a magnitude of 10 is an op's strongest setting.
LEVEL_SCALE = 10.0
# Probability that each drawn op is applied (timm's RandAugment default).
APPLY_PROB = 0.5
# Geometric ops resample bicubically, as the timm/DeiT/VideoMAE fine-tuning recipes set.
_RESAMPLE = Image.BICUBIC
# mstd above this means 'uniform in [0, m]' (timm's convention for mstd > 100).
_UNIFORM_MSTD = 100.0


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
  """A parsed RandAugment string."""
  magnitude: float = 10.0
  num_ops: int = 2
  magnitude_std: float = 0.0   # 0: fixed magnitude; inf: uniform in [0, magnitude]
  magnitude_max: float = LEVEL_SCALE
  increasing: bool = False     # the op set whose severity grows with the magnitude

  @property
  def op_names(self) -> tuple[str, ...]:
    return INCREASING_OPS if self.increasing else STANDARD_OPS


def _bad_randaugment(text: str, why: str):
  raise ValueError(f"{_FIELD}={text!r} is invalid; {why}. {_FORMAT}.")


def _setting_value(text: str, key: str, value: str):
  """The number of one 'key<value>' setting, checked for its range."""
  try:
    number = float(value)
  except ValueError:
    _bad_randaugment(text, f"'{key}{value}' is not a number")
  if key == "n":
    if number != int(number) or number < 1:
      _bad_randaugment(text, f"n (number of ops) must be an integer >= 1, got {value}")
    return int(number)
  if key == "inc":
    if number not in (0, 1):
      _bad_randaugment(text, f"inc must be 0 or 1, got {value}")
    return bool(number)
  if key == "mmax" and number <= 0:
    _bad_randaugment(text, f"mmax must be > 0, got {value}")
  if key == "mstd" and number > _UNIFORM_MSTD:
    return math.inf
  return number


_SETTING_FIELDS = {"m": "magnitude", "n": "num_ops", "mstd": "magnitude_std",
                   "mmax": "magnitude_max", "inc": "increasing"}


def parse_randaugment(text: str) -> RandAugmentSpec | None:
  """'rand-m9-mstd0.5-inc1' -> RandAugmentSpec; '' -> None (off).

  Raises ValueError naming config.data.randaugment for anything unparsable.
  Unlike timm, 'inc0' turns the increasing set off (timm takes any 'inc' as on).
  """
  if not isinstance(text, str):
    _bad_randaugment(text, "expected a string")
  if not text:
    return None
  parts = text.split("-")
  if parts[0] != "rand":
    _bad_randaugment(text, "it must start with 'rand'")
  settings = {}
  for part in parts[1:]:
    match = re.fullmatch(r"([a-z]+)([0-9.]+)", part)
    if match is None or match.group(1) not in _SETTING_FIELDS:
      _bad_randaugment(text, f"cannot read the setting {part!r}")
    key, value = match.groups()
    if _SETTING_FIELDS[key] in settings:
      _bad_randaugment(text, f"the setting {key!r} is given twice")
    settings[_SETTING_FIELDS[key]] = _setting_value(text, key, value)
  spec = RandAugmentSpec(**settings)
  if spec.magnitude > spec.magnitude_max:
    _bad_randaugment(text, f"m{spec.magnitude:g} exceeds the magnitude cap {spec.magnitude_max:g} "
                     "(raise it with mmax)")
  return spec


# Level functions: fraction of the strongest setting (magnitude / 10) -> op argument.
# Some flip the sign of their argument at random, as timm does.


def _signed(value: float, rng: np.random.Generator) -> float:
  return -value if rng.random() < 0.5 else value


def _rotate_level(frac, rng):
  return _signed(30.0 * frac, rng)  # degrees


def _shear_level(frac, rng):
  return _signed(0.3 * frac, rng)


def _translate_level(frac, rng):
  return _signed(0.45 * frac, rng)  # fraction of the image side


def _enhance_level(frac, rng):
  del rng
  return 1.8 * frac + 0.1  # blend factor: 0.1 .. 1.9, weakest at magnitude 5


def _enhance_increasing_level(frac, rng):
  return max(0.1, 1.0 + _signed(0.9 * frac, rng))  # 1.0 is the identity


def _posterize_level(frac, rng):
  del rng
  return int(4 * frac)  # bits kept: 0 .. 4, milder as the magnitude grows


def _posterize_increasing_level(frac, rng):
  del rng
  return 4 - int(4 * frac)  # bits kept: 4 .. 0


def _solarize_level(frac, rng):
  del rng
  return int(256 * frac)  # threshold: 0 (invert all) .. 256 (identity)


def _solarize_increasing_level(frac, rng):
  del rng
  return 256 - int(256 * frac)


def _solarize_add_level(frac, rng):
  del rng
  return int(110 * frac)


# Ops: (PIL image, argument, fill colour) -> PIL image.
# pylint: disable=unused-argument


def _auto_contrast(img, arg, fill):
  return ImageOps.autocontrast(img)


def _equalize(img, arg, fill):
  return ImageOps.equalize(img)


def _invert(img, arg, fill):
  return ImageOps.invert(img)


def _lookup(img: Image.Image, table: Sequence[int]) -> Image.Image:
  """Applies a 256-entry table to every band."""
  return img.point(list(table) * len(img.getbands()))


def _posterize(img, bits, fill):
  # Written as a table: PIL refuses 0 bits, which timm's scale reaches at its ends (black image).
  bits = min(max(int(bits), 0), 8)
  mask = (0xFF << (8 - bits)) & 0xFF
  return _lookup(img, [i & mask for i in range(256)])


def _solarize(img, threshold, fill):
  return _lookup(img, [i if i < threshold else 255 - i for i in range(256)])


def _solarize_add(img, add, fill):
  return _lookup(img, [min(255, i + add) if i < 128 else i for i in range(256)])


def _enhancer(kind) -> Callable:
  def op(img, factor, fill):
    # Colour on a grey image is the identity: PIL blends with its own grey version.
    return kind(img).enhance(factor)
  return op


def _rotate(img, degrees, fill):
  return img.rotate(degrees, resample=_RESAMPLE, fillcolor=fill)


def _affine(img, matrix, fill):
  return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=_RESAMPLE, fillcolor=fill)


def _shear_x(img, factor, fill):
  return _affine(img, (1, factor, 0, 0, 1, 0), fill)


def _shear_y(img, factor, fill):
  return _affine(img, (1, 0, 0, factor, 1, 0), fill)


def _translate_x(img, fraction, fill):
  return _affine(img, (1, 0, fraction * img.size[0], 0, 1, 0), fill)


def _translate_y(img, fraction, fill):
  return _affine(img, (1, 0, 0, 0, 1, fraction * img.size[1]), fill)


# pylint: enable=unused-argument

# name -> (op, level function or None for ops without argument)
OPS = {
    "AutoContrast": (_auto_contrast, None),
    "Equalize": (_equalize, None),
    "Invert": (_invert, None),
    "Rotate": (_rotate, _rotate_level),
    "Posterize": (_posterize, _posterize_level),
    "PosterizeIncreasing": (_posterize, _posterize_increasing_level),
    "Solarize": (_solarize, _solarize_level),
    "SolarizeIncreasing": (_solarize, _solarize_increasing_level),
    "SolarizeAdd": (_solarize_add, _solarize_add_level),
    "Color": (_enhancer(ImageEnhance.Color), _enhance_level),
    "ColorIncreasing": (_enhancer(ImageEnhance.Color), _enhance_increasing_level),
    "Contrast": (_enhancer(ImageEnhance.Contrast), _enhance_level),
    "ContrastIncreasing": (_enhancer(ImageEnhance.Contrast), _enhance_increasing_level),
    "Brightness": (_enhancer(ImageEnhance.Brightness), _enhance_level),
    "BrightnessIncreasing": (_enhancer(ImageEnhance.Brightness), _enhance_increasing_level),
    "Sharpness": (_enhancer(ImageEnhance.Sharpness), _enhance_level),
    "SharpnessIncreasing": (_enhancer(ImageEnhance.Sharpness), _enhance_increasing_level),
    "ShearX": (_shear_x, _shear_level),
    "ShearY": (_shear_y, _shear_level),
    "TranslateXRel": (_translate_x, _translate_level),
    "TranslateYRel": (_translate_y, _translate_level),
}

_COMMON_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate")
_AFFINE_OPS = ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
STANDARD_OPS = _COMMON_OPS + ("Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
                              "Brightness", "Sharpness") + _AFFINE_OPS
INCREASING_OPS = _COMMON_OPS + ("PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
                                "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                                "SharpnessIncreasing") + _AFFINE_OPS

SampledOp = tuple[str, object]


def _sample_magnitude(spec: RandAugmentSpec, rng: np.random.Generator) -> float:
  magnitude = spec.magnitude
  if spec.magnitude_std == math.inf:
    magnitude = rng.uniform(0.0, magnitude)
  elif spec.magnitude_std > 0:
    magnitude = rng.normal(magnitude, spec.magnitude_std)
  return min(max(magnitude, 0.0), spec.magnitude_max)


def sample_ops(spec: RandAugmentSpec, rng: np.random.Generator) -> list[SampledOp]:
  """The ops one image (or clip) gets: [(name, argument)], skipped ops left out."""
  names = spec.op_names
  chosen = []
  for i in rng.integers(0, len(names), size=spec.num_ops):
    if rng.random() >= APPLY_PROB:
      continue
    name = names[int(i)]
    level = OPS[name][1]
    magnitude = _sample_magnitude(spec, rng)
    chosen.append((name, level(magnitude / LEVEL_SCALE, rng) if level else None))
  return chosen


def fill_colour(mean: Sequence[float]) -> int | tuple[int, ...]:
  """Colour of the area that rotations and shifts expose: the data set's mean (as timm)."""
  values = tuple(int(round(255 * min(max(m, 0.0), 1.0))) for m in mean)
  return values[0] if len(values) == 1 else values


def apply_ops(image: np.ndarray, ops: Sequence[SampledOp], fill) -> np.ndarray:
  """Applies sampled ops to one uint8 [H, W, C] image (C = 1 or 3)."""
  if not ops:
    return image
  img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)  # 'L' or 'RGB'
  for name, arg in ops:
    img = OPS[name][0](img, arg, fill)
  out = np.asarray(img)
  return out[..., None] if image.shape[-1] == 1 else out


def rand_augment_image(image: np.ndarray, spec: RandAugmentSpec, rng: np.random.Generator,
                       fill) -> np.ndarray:
  return apply_ops(image, sample_ops(spec, rng), fill)


def rand_augment_clip(clip: np.ndarray, spec: RandAugmentSpec, rng: np.random.Generator,
                      fill) -> np.ndarray:
  """One draw for the whole clip [T, H, W, C]: every frame gets the same ops and arguments."""
  ops = sample_ops(spec, rng)
  if not ops:
    return clip
  return np.stack([apply_ops(frame, ops, fill) for frame in clip])


# ----------------------------------------------------------- random erasing

ERASE_AREA = (0.02, 1.0 / 3.0)   # fraction of the image area
ERASE_ASPECT = (0.3, 1.0 / 0.3)  # height / width, sampled log-uniformly
ERASE_ATTEMPTS = 10
# sample_erase's result: [top, left, height, width, noise seed]; height 0 = nothing erased.
NO_ERASE = np.zeros(5, np.int64)


def sample_erase(height: int, width: int, probability: float,
                 rng: np.random.Generator) -> np.ndarray:
  """Draws the rectangle of one example (an image, or every frame of a clip).

  With probability `probability` a rectangle strictly smaller than the image,
  else (or after ERASE_ATTEMPTS misses, as timm) NO_ERASE.
  """
  if rng.random() >= probability:
    return NO_ERASE.copy()
  log_lo, log_hi = math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])
  for _ in range(ERASE_ATTEMPTS):
    area = rng.uniform(*ERASE_AREA) * height * width
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    h = int(round(math.sqrt(area * aspect)))
    w = int(round(math.sqrt(area / aspect)))
    if 0 < h < height and 0 < w < width:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      seed = int(rng.integers(0, 2**62))
      return np.array([top, left, h, w, seed], np.int64)
  return NO_ERASE.copy()


def erase_in_place(x: np.ndarray, params: np.ndarray) -> None:
  """Fills the rectangle of `params` in x with N(0, 1) noise, in place.

  x is one normalised float example, [H, W, C] or [T, H, W, C]: a clip gets the
  rectangle on every frame, with fresh noise per pixel and frame.
  """
  top, left, h, w, seed = (int(v) for v in params)
  if h == 0:
    return
  noise = np.random.default_rng(seed).standard_normal(x.shape[:-3] + (h, w, x.shape[-1]),
                                                      dtype=np.float32)
  x[..., top:top + h, left:left + w, :] = noise


# ----------------------------------------------------------------- clip crops


def random_resized_crop_clip(clip: np.ndarray, rng: np.random.Generator, *, size: int,
                             scale: tuple[float, float], hflip: bool) -> np.ndarray:
  """VideoMAE fine-tuning crop: one random resized crop (bilinear) for all frames, then flip."""
  box = transforms.random_resized_crop_box(clip.shape[1], clip.shape[2], scale, rng)
  out = transforms.crop_resize_clip(clip, box, size, Image.BILINEAR)
  return transforms.random_flip(out, rng, hflip)


def view_crop_boxes(height: int, width: int, num_crops: int) -> list[tuple[int, int, int, int]]:
  """(top, left, h, w) squares of side min(H, W), spread evenly along the longer side.

  One crop is the centre one; three are left/centre/right (or top/centre/bottom),
  VideoMAE's test crops of the shorter-side-resized clip.
  """
  side = min(height, width)
  if num_crops == 1:
    return [transforms.centre_crop_box(height, width, side, side)]
  room = max(height, width) - side
  offsets = [int(k * room / (num_crops - 1)) for k in range(num_crops)]
  if height > width:
    return [(o, 0, side, side) for o in offsets]
  return [(0, o, side, side) for o in offsets]


def eval_views(clips: np.ndarray, *, size: int, num_crops: int) -> np.ndarray:
  """uint8 [K, T, H, W, C] temporal clips -> [K * num_crops, T, size, size, C].

  View k * num_crops + j is clip k at crop j (clip-major).
  """
  boxes = view_crop_boxes(clips.shape[2], clips.shape[3], num_crops)
  return np.stack([transforms.crop_resize_clip(clip, box, size, Image.BILINEAR)
                   for clip in clips for box in boxes])
