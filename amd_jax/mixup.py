"""Mixup and CutMix with label smoothing, on device inside the jitted step.

Batch mode, as the official fine-tuning recipes use it (timm's Mixup with
mode='batch'): one mixing coefficient per batch, each example mixed with the
batch in reverse order. With probability `prob` the batch is mixed at all; when
both alphas are positive, CutMix is chosen with probability `switch_prob`, else
Mixup. CutMix pastes one box (the same one on every frame of a clip) and its
coefficient is corrected to the pasted area, so the targets match the pixels.

Done on device rather than in the input pipeline because a distillation teacher
must see exactly the mixed batch the student sees, and the shapes stay static.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MixupConfig:
  mixup_alpha: float = 0.8
  cutmix_alpha: float = 1.0
  prob: float = 1.0
  switch_prob: float = 0.5
  label_smoothing: float = 0.1

  @property
  def active(self) -> bool:
    return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """One-hot targets with `smoothing` spread evenly over all classes (timm's convention)."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box_mask(key: jax.Array, height: int, width: int, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A box of area ~(1 - lam) at a uniform centre, clipped to the image.

  Returns (mask [H, W] float32, 1 inside the box, and the coefficient corrected to the
  box actually pasted: 1 - box area / image area).
  """
  cut = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = jnp.floor(height * cut), jnp.floor(width * cut)
  ky, kx = jax.random.split(key)
  cy = jax.random.randint(ky, (), 0, height).astype(jnp.float32)
  cx = jax.random.randint(kx, (), 0, width).astype(jnp.float32)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height, dtype=jnp.float32)[:, None]
  cols = jnp.arange(width, dtype=jnp.float32)[None, :]
  mask = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)).astype(jnp.float32)
  corrected = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
  return mask, corrected


def mix_batch(key: jax.Array, inputs: jax.Array, labels: jax.Array, num_classes: int, cfg: MixupConfig
              ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """(mixed inputs, soft targets [B, num_classes], {'mix_lambda', 'mix_is_cutmix'}).

  `inputs` is [B, H, W, C] or [B, T, H, W, C]; spatial axes are the two before channels.
  Targets always carry the label smoothing, mixed or not.
  """
  targets = smooth_one_hot(labels, num_classes, cfg.label_smoothing)
  if not cfg.active:
    return inputs, targets, {"mix_lambda": jnp.float32(1.0), "mix_is_cutmix": jnp.float32(0.0)}
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(key, 5)
  apply = jax.random.uniform(k_apply) < cfg.prob
  if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < cfg.switch_prob
  else:
    use_cutmix = jnp.asarray(cfg.cutmix_alpha > 0)
  lam_mix = jax.random.beta(k_mix, cfg.mixup_alpha, cfg.mixup_alpha) if cfg.mixup_alpha > 0 else jnp.float32(1.0)
  lam_cut = jax.random.beta(k_cut, cfg.cutmix_alpha, cfg.cutmix_alpha) if cfg.cutmix_alpha > 0 else jnp.float32(1.0)

  height, width = inputs.shape[-3], inputs.shape[-2]
  box, lam_box = cutmix_box_mask(k_box, height, width, lam_cut)
  flipped = inputs[::-1]
  # Pixel weight of the partner example: a constant (mixup) or the box (cutmix).
  partner = jnp.where(use_cutmix, box, 1.0 - lam_mix)
  partner = jnp.where(apply, partner, 0.0)[..., None].astype(inputs.dtype)
  mixed = inputs * (1 - partner) + flipped * partner
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mix), 1.0).astype(jnp.float32)
  soft = lam * targets + (1.0 - lam) * targets[::-1]
  return mixed, soft, {"mix_lambda": lam, "mix_is_cutmix": (apply & use_cutmix).astype(jnp.float32)}


def config_from(finetune_cfg) -> MixupConfig:
  """From config.finetune (mixup, cutmix, mixup_prob, mixup_switch_prob, label_smoothing)."""
  return MixupConfig(mixup_alpha=float(finetune_cfg.mixup), cutmix_alpha=float(finetune_cfg.cutmix),
                     prob=float(finetune_cfg.mixup_prob), switch_prob=float(finetune_cfg.mixup_switch_prob),
                     label_smoothing=float(finetune_cfg.label_smoothing))
