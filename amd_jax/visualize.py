"""Pictures of a pre-training run: masked views, reconstructions and attention maps, as one image grid.

One row per example, one column per view:
  original | student sees | teacher sees (AMD only) | reconstruction | attention (block N)
Hidden patches are drawn grey. Reconstructions come from the method's `reconstruct`
(MAE, VideoMAE, AMD, D-MAE: the pixel decoder's prediction, de-normalised with the true
statistics of each hidden patch when norm_pix_loss is on, visible patches pasted back);
methods without a pixel decoder (TinyMIM, G2SD) show the original and the attention map.
Videos show a few evenly spaced frames per cell, side by side.

Attention maps: block N's attention weights, averaged over heads; with a cls token the cls
row (how much the cls token attends to each patch), without one the attention each token
receives, averaged over all queries. Each map is scaled to [0, 1] per example.

  python -m amd_jax.visualize --workdir RUN --out pictures.png [--num_images 8] [--attention_block N]
                              [--step S] [--split test] [--num_frames 4] [--seed 0]

During pre-training, `config.image_every_steps > 0` writes the same grid to TensorBoard
(`TrainingPictures`, called from the train loop).
"""
from __future__ import annotations

import argparse
import io
import math
import os
import sys
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from amd_jax import evaluate, paths
from amd_jax.config_base import parse_floats
from amd_jax.data import pipeline
from amd_jax.models import vit

HIDDEN_GREY = 110          # pixel value of hidden patches
MIN_CELL_PIXELS = 112      # small inputs (28x28) are enlarged to at least this height
GAP = 2                    # pixels between cells
TITLE_HEIGHT = 14
# Colour map for heat maps (low -> high): dark blue, purple, red, orange, pale yellow.
_HEAT_ANCHORS = np.array([[10, 10, 60], [90, 20, 130], [200, 40, 60], [245, 140, 30], [252, 240, 170]], np.float32)


# ----------------------------------------------------------------------------- pixels


def to_uint8(x, mean, std) -> np.ndarray:
  """Normalised pixels [..., C] -> uint8 RGB [..., 3] (grey inputs repeated over the three channels)."""
  x = np.asarray(x, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  x = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
  return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def grey_out(pixels: np.ndarray, shown) -> np.ndarray:
  """Hidden pixels (shown == 0) -> HIDDEN_GREY."""
  shown = np.asarray(shown)[..., :1] > 0.5
  return np.where(shown, pixels, np.uint8(HIDDEN_GREY))


def heat_colors(values: np.ndarray) -> np.ndarray:
  """Values in [0, 1] -> uint8 RGB through _HEAT_ANCHORS (piecewise linear)."""
  v = np.clip(np.asarray(values, np.float32), 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
  lo = np.minimum(np.floor(v).astype(np.int32), len(_HEAT_ANCHORS) - 2)
  frac = (v - lo)[..., None]
  rgb = _HEAT_ANCHORS[lo] * (1.0 - frac) + _HEAT_ANCHORS[lo + 1] * frac
  return np.round(rgb).astype(np.uint8)


def overlay(pixels: np.ndarray, heat: np.ndarray, alpha: float = 0.6) -> np.ndarray:
  """Blend a heat map (same spatial shape, values in [0, 1]) over uint8 RGB pixels."""
  base = pixels.astype(np.float32).mean(axis=-1, keepdims=True)  # grey picture under the colours
  out = (1.0 - alpha) * base + alpha * heat_colors(heat).astype(np.float32)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------- attention


def attention_encoder(method, block: int):
  """The method's student encoder, unscanned, stopping after `block` and returning its attention logits."""
  enc = method.encoder
  if not 1 <= block <= enc.depth:
    raise ValueError(f"attention block {block} is outside the encoder's blocks 1..{enc.depth}")
  return enc.clone(attn_layers=(block,), block_layers=(), norm1_layers=(), scan=False, remat="none",
                   max_depth=block if block < enc.depth else 0)


def attention_maps(method, params, x, block: int) -> np.ndarray:
  """[B, *token grid] attention of `block` (see the module doc), each map scaled to [0, 1]."""
  enc = attention_encoder(method, block)
  enc_params = vit.match_layout(params["encoder"], scan=False, depth=enc.depth)

  def maps(p, inputs):
    _, out = enc.apply({"params": p}, inputs)
    weights = jax.nn.softmax(out[f"attn_logits_{block}"].astype(jnp.float32), axis=-1).mean(axis=1)  # [B, N, N]
    prefix = int(enc.cls_token) + int(enc.dist_token)
    if enc.cls_token:
      m = weights[:, 0, prefix:]           # what the cls token looks at
    else:
      m = weights.mean(axis=1)              # attention each token receives
    lo, hi = m.min(axis=1, keepdims=True), m.max(axis=1, keepdims=True)
    return (m - lo) / jnp.maximum(hi - lo, 1e-12)

  m = np.asarray(_jit(method, f"attention_{block}", maps, params)(enc_params, x))
  grid = vit.token_grid(x.shape[1:], enc.patch_size, enc.tubelet_size if x.ndim == 5 else 0)
  return m.reshape((x.shape[0],) + grid.shape)


def upsample_map(maps: np.ndarray, patch_size: int, tubelet_size: int = 0) -> np.ndarray:
  """Token-grid maps [B, (t,) h, w] -> pixel maps [B, (T,) H, W] by repeating each token's value."""
  out = np.repeat(np.repeat(maps, patch_size, axis=-1), patch_size, axis=-2)
  if maps.ndim == 4:
    out = np.repeat(out, tubelet_size, axis=1)
  return out


# ------------------------------------------------------------------------------ grid


# Compiled picture functions per method object, so that pictures written every N training
# steps compile once.
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _jit(method, name: str, fn, params):
  """jax.jit(fn), cached per (method, name), with replicated outputs when params live on a mesh (so every
  process can read them)."""
  out_sharding = None
  for leaf in jax.tree.leaves(params):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      out_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
      break
  cache = _COMPILED.setdefault(method, {})
  key = (name, out_sharding)
  if key not in cache:
    cache[key] = jax.jit(fn) if out_sharding is None else jax.jit(fn, out_shardings=out_sharding)
  return cache[key]


def _frames(clip: np.ndarray, num_frames: int) -> list[np.ndarray]:
  """[H, W, 3] -> [it]; [T, H, W, 3] -> num_frames evenly spaced frames."""
  if clip.ndim == 3:
    return [clip]
  picks = np.unique(np.round(np.linspace(0, clip.shape[0] - 1, max(1, num_frames))).astype(int))
  return [clip[t] for t in picks]


def _cell(clip: np.ndarray, num_frames: int, scale: int) -> np.ndarray:
  frames = [np.kron(f, np.ones((scale, scale, 1), np.uint8)) for f in _frames(clip, num_frames)]
  gap = np.full((frames[0].shape[0], GAP, 3), 255, np.uint8)
  parts = []
  for i, f in enumerate(frames):
    parts += ([gap] if i else []) + [f]
  return np.concatenate(parts, axis=1)


def _title_strip(titles: list[str], widths: list[int]) -> np.ndarray:
  total = sum(widths) + GAP * (len(widths) - 1)
  img = Image.new("RGB", (total, TITLE_HEIGHT), (255, 255, 255))
  draw = ImageDraw.Draw(img)
  x = 0
  for title, w in zip(titles, widths):
    draw.text((x + 2, 1), title, fill=(0, 0, 0))
    x += w + GAP
  return np.asarray(img)


def assemble(columns: dict[str, np.ndarray], num_frames: int = 4, scale: int = 0, titles: bool = True
             ) -> np.ndarray:
  """{title: uint8 [B, (T,) H, W, 3]} -> one uint8 [rows, cols, 3] grid: a row per example, a column per view."""
  first = next(iter(columns.values()))
  if scale <= 0:
    scale = max(1, math.ceil(MIN_CELL_PIXELS / first.shape[-3]))
  rows = []
  for b in range(first.shape[0]):
    cells = [_cell(v[b], num_frames, scale) for v in columns.values()]
    gap = np.full((cells[0].shape[0], GAP, 3), 255, np.uint8)
    row = []
    for i, c in enumerate(cells):
      row += ([gap] if i else []) + [c]
    rows.append(np.concatenate(row, axis=1))
  widths = [_cell(v[0], num_frames, scale).shape[1] for v in columns.values()]
  gap = np.full((GAP, rows[0].shape[1], 3), 255, np.uint8)
  parts = [_title_strip(list(columns), widths)] if titles else []
  for r in rows:
    parts += [gap, r] if parts else [r]
  return np.concatenate(parts, axis=0)


def picture_columns(method, params, batch: dict, rng, *, attention_block: int = 0) -> dict[str, np.ndarray]:
  """The grid's columns, {title: uint8 [B, (T,) H, W, 3]}, for a batch of normalised inputs."""
  config = method.config
  mean, std = parse_floats(config.data.mean), parse_floats(config.data.std)
  key = method.input_key()
  x = jnp.asarray(batch[key])
  pix = lambda a: to_uint8(a, mean, std)
  columns = {"original": pix(x)}
  if method.can_reconstruct:
    proxy = weakref.proxy(method)  # the compiled cache must not keep the method alive
    reconstruct = _jit(method, "reconstruct", lambda p, b, r: proxy.reconstruct(p, b, r), params)
    out = reconstruct(params, {key: x}, rng)
    out = jax.tree.map(np.asarray, out)
    teacher = "teacher_visible" in out
    columns["student sees" if teacher else "visible"] = grey_out(pix(out["visible"]), out["visible_mask"])
    if teacher:
      columns["teacher sees"] = grey_out(pix(out["teacher_visible"]), out["teacher_visible_mask"])
    columns["reconstruction"] = pix(out["reconstruction"])
  if attention_block:
    enc = method.encoder
    maps = attention_maps(method, params, x, attention_block)
    heat = upsample_map(maps, enc.patch_size, enc.tubelet_size if x.ndim == 5 else 0)
    columns[f"attn block {attention_block}"] = overlay(columns["original"], heat)
  return columns


def reconstruction_grid(method, params, batch: dict, rng=None, *, attention_block: int = 0, num_frames: int = 4,
                        scale: int = 0, titles: bool = True) -> np.ndarray:
  """uint8 [H, W, 3] picture grid of a batch (see the module doc); `rng` draws the masks (default key 0)."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  columns = picture_columns(method, params, batch, rng, attention_block=attention_block)
  return assemble(columns, num_frames=num_frames, scale=scale, titles=titles)


# ------------------------------------------------------------------------ run inputs


def eval_batch(config, num_images: int, split: str | None = None) -> dict[str, np.ndarray]:
  """The first `num_images` examples of the run's eval split, normalised as in training."""
  split = config.data.eval_split if split is None else split
  ds = pipeline.make_eval_dataset(config.data, split=split, batch_size=num_images, max_examples=num_images)
  it = iter(ds)
  batch = next(it)
  it.close()
  real = np.asarray(batch["mask"], bool)
  key = pipeline.data_key(config.data)
  return {key: np.asarray(batch[key])[real]}


def default_attention_block(method) -> int:
  """The last block of the method's encoder; 0 (no attention column) for a method without one."""
  enc = method.encoder
  return enc.depth if isinstance(enc, vit.Encoder) else 0


class TrainingPictures:
  """Writes the picture grid to TensorBoard every config.image_every_steps steps (0: never).

  The inputs are the first images of the eval split and the masks are drawn from a fixed
  key, so successive pictures differ only by training. Computed on the host from the
  current params, outside the jitted step; every process calls it, process 0 writes.
  """
  NUM_IMAGES = 8

  def __init__(self, config, method, writer):
    self.every = int(config.get("image_every_steps", 0))
    self.config, self.method, self.writer = config, method, writer
    self._batch = None

  def maybe_write(self, step: int, params) -> None:
    if self.every <= 0 or step % self.every:
      return
    if self._batch is None:
      self._batch = eval_batch(self.config, self.NUM_IMAGES)
    grid = reconstruction_grid(self.method, params, self._batch, jax.random.PRNGKey(self.config.seed),
                               attention_block=default_attention_block(self.method))
    self.writer.write_images(step, {"pictures": grid[None]})


# ------------------------------------------------------------------------------- CLI


def write_png(grid: np.ndarray, path: str) -> None:
  buffer = io.BytesIO()
  Image.fromarray(grid).save(buffer, format="PNG")
  paths.write_bytes(path, buffer.getvalue())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m amd_jax.visualize", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="an amd_jax run (config.json + checkpoints/)")
  parser.add_argument("--out", required=True, help="the PNG to write")
  parser.add_argument("--num_images", type=int, default=8, help="examples (rows), from the start of the split")
  parser.add_argument("--attention_block", type=int, default=-1,
                      help="block whose attention is drawn (1-based); -1: the last block; 0: no attention column")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  parser.add_argument("--split", default=None, help="data split (default: the run's config.data.eval_split)")
  parser.add_argument("--num_frames", type=int, default=4, help="videos: frames shown per clip")
  parser.add_argument("--seed", type=int, default=0, help="draws the masks")
  args = parser.parse_args(argv)
  if args.num_images < 1:
    parser.error(f"--num_images={args.num_images} must be >= 1")
  try:
    config, method, params = evaluate.load_run(args.workdir, args.step)
    block = default_attention_block(method) if args.attention_block < 0 else args.attention_block
    batch = eval_batch(config, args.num_images, args.split)
    grid = reconstruction_grid(method, params, batch, jax.random.PRNGKey(args.seed), attention_block=block,
                               num_frames=args.num_frames)
  except (FileNotFoundError, ValueError, OSError) as e:
    print(f"amd_jax.visualize: {e}", file=sys.stderr)
    return 2
  write_png(grid, args.out)
  print(f"wrote {args.out} ({grid.shape[1]}x{grid.shape[0]} pixels, {len(batch[method.input_key()])} examples, "
        f"method {config.method})")
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.exit(main())
