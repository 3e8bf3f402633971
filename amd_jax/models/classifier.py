"""ViT classifier for fine-tuning: encoder -> pooling -> (fc_norm) -> linear head.

Pooling follows the official fine-tuning code:
  mean  mean of the patch tokens, then `fc_norm` (the encoder's final norm is not
        used: MAE / VideoMAE / AMD fine-tuning with global pooling);
  cls   the cls token after the encoder's final `norm` (DeiT style).
With `distill=True` (G2SD specific distillation, DeiT's recipe) the encoder carries a
distillation token right after cls and a second head `head_dist` reads it; the
classifier returns both heads' logits and `predict` averages them.

Parameter names match the official fine-tuned checkpoints (encoder, fc_norm, head),
so amd_jax.convert maps them both ways.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from amd_jax.models import vit
from amd_jax.models.logical import Axis

POOLS = ("mean", "cls")


def head_init(scale: float):
  """Truncated normal(0.02) scaled down: the official recipes start the head near zero
  (MAE: std 2e-5; VideoMAE/AMD: 0.02 x init_scale 1e-3 -> the same 2e-5)."""
  base = nn.initializers.truncated_normal(0.02)
  return lambda key, shape, dtype=jnp.float32: base(key, shape, dtype) * scale


class Classifier(nn.Module):
  encoder: vit.Encoder        # built with final_norm = (pool == 'cls') and dist_token = distill
  num_classes: int
  pool: str = "mean"
  head_init_scale: float = 1e-3
  distill: bool = False

  def _check(self):
    if self.pool not in POOLS:
      raise ValueError(f"pool={self.pool!r}; allowed: {', '.join(POOLS)}")
    if self.pool == "cls" and not self.encoder.cls_token:
      raise ValueError("pool='cls' needs an encoder with a cls token (config.model.cls_token=True)")
    if self.distill and not self.encoder.dist_token:
      raise ValueError("distill=True needs an encoder built with dist_token=True")

  @nn.compact
  def __call__(self, x, *, train: bool = False, features: bool = False):
    """(class logits [B, C], distillation-head logits [B, C] or None), float32.

    features=True returns the pooled features [B, D] instead (linear probe / kNN).
    """
    self._check()
    tokens, _ = self.encoder(x, train=train)
    prefix = int(self.encoder.cls_token) + int(self.distill)
    dist = tokens[:, 1] if self.distill else None
    if self.pool == "cls":
      pooled = tokens[:, 0]
    else:
      fc_norm = vit.layer_norm("fc_norm")
      pooled = fc_norm(tokens[:, prefix:].mean(axis=1))
      if dist is not None:  # the distillation token gets the same norm as the pooled tokens
        dist = fc_norm(dist)
    if features:
      return pooled.astype(jnp.float32)
    dense = lambda name: nn.Dense(self.num_classes, dtype=jnp.float32, name=name,
                                  **vit.named_dense((Axis.EMBED, Axis.CLASSES),
                                                    head_init(self.head_init_scale)))
    logits = dense("head")(pooled.astype(jnp.float32))
    dist_logits = dense("head_dist")(dist.astype(jnp.float32)) if dist is not None else None
    return logits, dist_logits


def classifier_from_config(model_cfg, *, num_classes: int, pool: str, head_init_scale: float = 1e-3,
                           distill: bool = False, **encoder_overrides) -> Classifier:
  encoder = vit.encoder_from_config(model_cfg, final_norm=pool == "cls", dist_token=distill, **encoder_overrides)
  return Classifier(encoder=encoder, num_classes=num_classes, pool=pool, head_init_scale=head_init_scale,
                    distill=distill)


def predict_logits(logits: jax.Array, dist_logits: Optional[jax.Array]) -> jax.Array:
  """What the model answers at test time: the average of both heads when distilled (DeiT/G2SD)."""
  return logits if dist_logits is None else (logits + dist_logits) / 2
