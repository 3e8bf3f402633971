"""AMD inside your own training loop: amd_jax's pieces, your optax step and your jax.jit.

Nothing here uses amd_jax's train loop, configs or data pipelines. The example takes
  amd_jax.models.vit.Encoder            the ViT (student and teacher), with block outputs on request
  amd_jax.models.decoders.MaskedTokenDecoder
                                        MAE's pixel decoder and AMD's feature generators
  amd_jax.masking.nested_mask           one mask per image: student-visible < teacher-only < hidden
  amd_jax.targets.image_target          MAE's per-patch normalised pixel target
  amd_jax.losses.regression             the loss terms
and writes the AMD objective, L = L_rec + L_dir + L_gen, as a plain function, trained with
optax.adamw in a hand-written jitted step on Fashion-MNIST (or synthetic images when the data
set is not installed). The loss printed every few steps falls.

The teacher is a frozen ViT twice the student's width. By default it is randomly initialised,
which keeps the example self-contained (the alignment terms then teach the student a fixed random
feature map); pass --teacher_workdir=RUN to distil from a pre-trained amd_jax run of the same
shape, e.g. the quickstart's teacher (workdirs/quickstart/teacher). For the full method with all
its options in one call, see amd_jax.methods.amd.AMD.loss (docs/api.md).

  python examples/custom_loop.py [--steps 60] [--batch 64] [--data auto|fashion_mnist|synthetic]
"""
from __future__ import annotations

import argparse
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from amd_jax import losses, masking, targets
from amd_jax.models.decoders import MaskedTokenDecoder
from amd_jax.models.vit import Encoder

PATCH = 4                     # 28x28 images -> 7x7 = 49 tokens
STUDENT_RATIO, TEACHER_RATIO = 0.75, 0.5
LAYERS = (2, 4)               # aligned blocks, the same index in student and teacher (both 4 deep)
MEAN, STD = 0.2860, 0.3530    # Fashion-MNIST pixel statistics
FASHION_MNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


def load_images(kind: str, count: int, seed: int) -> np.ndarray:
  """[count, 28, 28, 1] normalised float32 images."""
  if kind == "auto":
    kind = "fashion_mnist" if os.path.isfile(FASHION_MNIST) else "synthetic"
  if kind == "fashion_mnist":
    from amd_jax.data import sources  # pylint: disable=g-import-not-at-top
    pixels = sources.load_idx(FASHION_MNIST)[:count]
  else:  # smooth random blobs: structure a masked model can learn, unlike pure noise
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    centres = rng.uniform(6, 22, (count, 2, 1, 1))
    pixels = 255 * np.exp(-((yy - centres[:, 0]) ** 2 + (xx - centres[:, 1]) ** 2) / 40.0)
  print(f"data: {kind}, {count} images")
  return ((pixels[..., None].astype(np.float32) / 255.0) - MEAN) / STD


def make_teacher() -> Encoder:
  # Raw block outputs (no final norm) of the aligned blocks: what AMD aligns to.
  return Encoder(width=128, depth=4, num_heads=4, patch_size=PATCH, final_norm=False, block_layers=LAYERS)


class AMDStudent(nn.Module):
  """Student ViT + pixel decoder + one projection and one generator per aligned layer pair."""
  grid: tuple[int, int]
  teacher_width: int = 128

  @nn.compact
  def __call__(self, images, nm: masking.NestedMask):
    encoder = Encoder(width=64, depth=4, num_heads=2, patch_size=PATCH, block_layers=LAYERS, name="encoder")
    latent, out = encoder(images, nm.student)                 # the student sees its visible tokens only
    hidden = nm.student_mask().masked                          # everything it did not see
    decoder = MaskedTokenDecoder(width=64, depth=1, num_heads=2, grid=self.grid, out_dim=PATCH * PATCH,
                                 has_cls=True, name="decoder")
    pixels = decoder(latent, nm.student, hidden)
    projected, generated = [], []
    for i, layer in enumerate(LAYERS):
      z = out[f"block_{layer}"][:, 1:]                         # pre-norm block output, cls dropped
      z = nn.Dense(self.teacher_width, use_bias=False, name=f"proj_{i}")(z)
      generator = MaskedTokenDecoder(width=self.teacher_width, depth=2, num_heads=2, grid=self.grid, out_dim=0,
                                     embed="none", final_norm=False, name=f"generator_{i}")
      projected.append(z)
      generated.append(generator(z, nm.student, nm.diff))      # predicts the teacher at teacher-only tokens
    return pixels, projected, generated


def amd_loss(params, teacher_params, images, key, student: AMDStudent, teacher: Encoder, spec: masking.MaskSpec):
  nm = masking.nested_mask(key, images.shape[0], spec, STUDENT_RATIO, TEACHER_RATIO)
  pixels, projected, generated = student.apply({"params": params}, images, nm)
  target = masking.gather_tokens(targets.image_target(images, PATCH), nm.student_mask().masked)
  loss_rec = losses.regression(pixels, target)
  # The frozen teacher sees cat([student-visible, teacher-only]) tokens; no gradient flows into it.
  _, t_out = teacher.apply({"params": teacher_params}, images, nm.teacher)
  ks = nm.student.shape[1]
  loss_dir = loss_gen = 0.0
  for layer, z, g in zip(LAYERS, projected, generated):
    h = jax.lax.stop_gradient(t_out[f"block_{layer}"][:, 1:])
    loss_dir += losses.regression(z, h[:, :ks]) / len(LAYERS)   # direct: the tokens both saw
    loss_gen += losses.regression(g, h[:, ks:]) / len(LAYERS)   # generation: the tokens only the teacher saw
  return loss_rec + loss_dir + loss_gen, {"rec": loss_rec, "dir": loss_dir, "gen": loss_gen}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--lr", type=float, default=2e-3)
  parser.add_argument("--data", default="auto", choices=("auto", "fashion_mnist", "synthetic"))
  parser.add_argument("--teacher_workdir", default="", help="an amd_jax run whose encoder is 128 wide, 4 deep, patch 4")
  parser.add_argument("--log_every", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  images = load_images(args.data, 4096, args.seed)
  grid = (28 // PATCH, 28 // PATCH)
  spec = masking.MaskSpec(num_tokens=grid[0] * grid[1], tokens_per_frame=grid[0] * grid[1], kind="random")
  student, teacher = AMDStudent(grid), make_teacher()

  k_student, k_teacher, k_steps = jax.random.split(jax.random.PRNGKey(args.seed), 3)
  example = jnp.asarray(images[: args.batch])
  nm = masking.nested_mask(k_student, args.batch, spec, STUDENT_RATIO, TEACHER_RATIO)
  params = student.init(k_student, example, nm)["params"]
  if args.teacher_workdir:
    from amd_jax.train.checkpoint import load_params  # pylint: disable=g-import-not-at-top
    teacher_params = load_params(args.teacher_workdir)["encoder"]
    teacher_params = {k: v for k, v in teacher_params.items() if k != "norm"}  # raw block outputs: no final norm
  else:
    teacher_params = teacher.init(k_teacher, example, nm.teacher)["params"]

  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(args.steps // 10, 1), args.steps)
  tx = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.05)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, teacher_params, batch, key):  # the teacher is an argument, not a constant
    grad_fn = jax.value_and_grad(amd_loss, has_aux=True)
    (loss, parts), grads = grad_fn(params, teacher_params, batch, key, student, teacher, spec)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, parts

  order = np.random.default_rng(args.seed).permutation(len(images))
  history = []
  t0 = time.perf_counter()
  for step in range(args.steps):
    start = (step * args.batch) % (len(images) - args.batch + 1)
    batch = jnp.asarray(images[order[start:start + args.batch]])
    params, opt_state, loss, parts = train_step(params, opt_state, teacher_params, batch,
                                                   jax.random.fold_in(k_steps, step))
    history.append(float(loss))
    if step % args.log_every == 0 or step == args.steps - 1:
      terms = "  ".join(f"{k} {float(v):.4f}" for k, v in parts.items())
      print(f"step {step:4d}  loss {float(loss):.4f}  ({terms})", flush=True)
  window = max(1, min(5, args.steps // 4))
  first, last = float(np.mean(history[:window])), float(np.mean(history[-window:]))
  print(f"mean loss of the first {window} steps: {first:.4f}; of the last {window}: {last:.4f} "
        f"({args.steps} steps in {time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
  main()
