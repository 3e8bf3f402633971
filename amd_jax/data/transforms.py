"""Image and clip transforms in numpy/PIL.

Every random transform takes the `np.random.Generator` that grain's
`random_map` hands to each element (seeded from the pipeline seed and the
element's position), so an augmented batch is a pure function of the seed and
the position in the stream. That is what makes a restored data iterator yield
bit-identical batches.

Arrays are uint8 HWC images or THWC clips until `normalize`, which runs once
per batch (vectorised, and it keeps the prefetch buffers 4x smaller).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

# Aspect-ratio range of the random resized crop (MAE / torchvision default).
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def match_channels(x: np.ndarray, channels: int) -> np.ndarray:
  """Makes the last axis hold `channels` (1 or 3) channels.

  Grey -> RGB repeats the channel; RGB -> grey uses ITU-R 601 luma, the weights
  PIL's 'L' conversion uses, so a folder of colour images can feed a grey model.
  """
  if x.shape[-1] == channels:
    return x
  if x.shape[-1] == 1 and channels == 3:
    return np.repeat(x, 3, axis=-1)
  if x.shape[-1] in (3, 4) and channels == 1:
    luma = x[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
  if x.shape[-1] == 4 and channels == 3:
    return x[..., :3]
  raise ValueError(f"cannot convert an array of shape {x.shape} to {channels} channels")


def _to_pil(image: np.ndarray) -> Image.Image:
  """HWC uint8 -> PIL image ('L' for one channel, 'RGB' for three)."""
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(image: Image.Image, channels: int) -> np.ndarray:
  out = np.asarray(image)
  return out[..., None] if channels == 1 else out


def crop_resize(image: np.ndarray, box: tuple[int, int, int, int], size: int,
                resample: int) -> np.ndarray:
  """Crops box = (top, left, height, width) and resizes it to size x size.

  PIL does both in one call (`box=`), which avoids copying the crop.
  """
  top, left, h, w = box
  out = _to_pil(image).resize((size, size), resample, box=(left, top, left + w, top + h))
  return _from_pil(out, image.shape[-1])


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float],
                            rng: np.random.Generator,
                            ratio: tuple[float, float] = CROP_RATIO,
                            attempts: int = 10) -> tuple[int, int, int, int]:
  """(top, left, h, w) of a crop covering `scale` of the area at an aspect in `ratio`.

  Same sampling as MAE's RandomResizedCrop: area uniform in scale, aspect
  log-uniform in ratio; after `attempts` misses, the largest centred crop with
  the aspect clamped into `ratio`.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(attempts):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif aspect > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def random_flip(x: np.ndarray, rng: np.random.Generator, enabled: bool) -> np.ndarray:
  """Horizontal flip (width is axis -2 of HWC and THWC) with probability 1/2.

  The coin is tossed even when disabled so that turning flips on or off does
  not shift the random stream of anything drawn after it.
  """
  flip = rng.random() < 0.5
  return np.ascontiguousarray(x[..., ::-1, :]) if (enabled and flip) else x


def train_image(image: np.ndarray, rng: np.random.Generator, *, size: int,
                scale: tuple[float, float], hflip: bool) -> np.ndarray:
  """Pre-training augmentation: random resized crop (bicubic, as MAE) + flip."""
  box = random_resized_crop_box(image.shape[0], image.shape[1], scale, rng)
  out = crop_resize(image, box, size, Image.BICUBIC)
  return random_flip(out, rng, hflip)


def centre_crop_box(height: int, width: int, crop_h: int, crop_w: int) -> tuple[int, int, int, int]:
  return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def resize_shorter_centre_crop(image: np.ndarray, size: int, resample: int = Image.BICUBIC,
                               crop_ratio: float = 1.0) -> np.ndarray:
  """Eval view: shorter side to `size / crop_ratio`, then the centred size x size square.

  Done as one crop+resize: the centred square of side crop_ratio * min(H, W)
  resized to `size` is exactly that (the aspect is kept, only the border is
  cut). crop_ratio 1: a square input (Fashion-MNIST 28 -> 32) is just resized;
  0.875: the ImageNet eval view of MAE/DeiT (resize 256, centre crop 224).
  """
  if not 0.0 < crop_ratio <= 1.0:
    raise ValueError(f"eval crop_ratio={crop_ratio}: expected a fraction in (0, 1]")
  side = max(1, int(round(min(image.shape[0], image.shape[1]) * crop_ratio)))
  box = centre_crop_box(image.shape[0], image.shape[1], side, side)
  return crop_resize(image, box, size, resample)


def eval_image(image: np.ndarray, *, size: int, crop_ratio: float = 1.0) -> np.ndarray:
  return resize_shorter_centre_crop(image, size, Image.BICUBIC, crop_ratio)


# ----------------------------------------------------------------------- video


def fixed_crop_offsets(width: int, height: int, crop_w: int, crop_h: int,
                       more_fixed: bool = True) -> list[tuple[int, int]]:
  """(x, y) top-left corners of the fixed crop positions of TSN / VideoMAE.

  The image is divided into a 4 x 4 grid of steps of the free space. Five
  positions: the four corners and the centre; with `more_fixed`, eight more:
  the middles of the four edges and the centres of the four quadrants (13).
  """
  sx, sy = (width - crop_w) // 4, (height - crop_h) // 4
  grid = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2)]
  if more_fixed:
    grid += [(0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3)]
  return [(gx * sx, gy * sy) for gx, gy in grid]


def multiscale_crop_box(height: int, width: int, size: int, scales: Sequence[float],
                        rng: np.random.Generator, max_distort: int = 1,
                        more_fixed: bool = True) -> tuple[int, int, int, int]:
  """(top, left, h, w) of VideoMAE's GroupMultiScaleCrop.

  Crop width and height are each one of scales x min(H, W), chosen
  independently except that their scale indices may differ by at most
  `max_distort` (so aspect ratios stay moderate). Sizes within 3 pixels of the
  output size snap to it (no pointless resampling). The crop sits at one of the
  13 fixed positions, never at an arbitrary offset.
  """
  base = min(height, width)
  sizes = [int(base * s) for s in scales]
  sizes = [size if abs(s - size) < 3 else s for s in sizes]
  pairs = [(w, h) for i, h in enumerate(sizes) for j, w in enumerate(sizes)
           if abs(i - j) <= max_distort]
  w, h = pairs[int(rng.integers(len(pairs)))]
  # Snapping can push a side past the frame when the frame is smaller than size.
  w, h = min(w, width), min(h, height)
  offsets = fixed_crop_offsets(width, height, w, h, more_fixed)
  x, y = offsets[int(rng.integers(len(offsets)))]
  return y, x, h, w


def crop_resize_clip(clip: np.ndarray, box: tuple[int, int, int, int], size: int,
                     resample: int) -> np.ndarray:
  """The same crop and resize for every frame of a THWC clip."""
  return np.stack([crop_resize(frame, box, size, resample) for frame in clip])


def train_clip(clip: np.ndarray, rng: np.random.Generator, *, size: int,
               scales: Sequence[float], hflip: bool) -> np.ndarray:
  """VideoMAE pre-training augmentation: multi-scale crop (bilinear) + optional flip."""
  box = multiscale_crop_box(clip.shape[1], clip.shape[2], size, scales, rng)
  out = crop_resize_clip(clip, box, size, Image.BILINEAR)
  return random_flip(out, rng, hflip)


def eval_clip(clip: np.ndarray, *, size: int) -> np.ndarray:
  """Eval view of a clip: shorter side to `size`, centre crop (VideoMAE's test view)."""
  side = min(clip.shape[1], clip.shape[2])
  box = centre_crop_box(clip.shape[1], clip.shape[2], side, side)
  return crop_resize_clip(clip, box, size, Image.BILINEAR)


# ------------------------------------------------------------------ normalise


def normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 [..., C] -> float32 (x / 255 - mean) / std, per channel.

  Written as x * a + b with a = 1 / (255 std), b = -mean / std: one fused pass.
  """
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  # A std so small that 1/std is past float32's range gives Inf/NaN pixels: the run's NaN/Inf guard names
  # them (config.nan_policy); numpy's overflow warnings would only repeat it, at every batch.
  with np.errstate(over="ignore", invalid="ignore"):
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    offset = (-mean / std).astype(np.float32)
    y = x.astype(np.float32)   # in place from here: no temporaries the size of a clip
    y *= scale
    y += offset
  return y
