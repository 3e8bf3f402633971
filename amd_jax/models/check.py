"""Checks of a model description (config.model, config.teacher.model) against the data it will see."""
from __future__ import annotations

from amd_jax import errors
from amd_jax.models import vit

QKV_BIASES = ("fused", "qv", "none")
POS_EMBS = ("sincos2d", "sincos1d")
DTYPES = ("float32", "bfloat16")
ATTENTIONS = ("xla", "cudnn")


def validate_model(model_cfg, data_cfg, field: str = "model") -> tuple[int, int, int]:
  """Raise errors.ConfigError naming `field`.<name> on a bad value; returns (width, depth, heads)."""
  m = model_cfg
  errors.check_choice(f"{field}.variant", m.variant, list(vit.VARIANTS))
  width, depth, heads = vit.resolve_variant(m.variant, m.width, m.depth, m.num_heads)
  if width % heads:
    errors.fail(f"{field}.num_heads", heads, f"must divide the width {width}")
  errors.check_choice(f"{field}.qkv_bias", m.qkv_bias, QKV_BIASES)
  errors.check_choice(f"{field}.pos_emb", m.pos_emb, POS_EMBS)
  if m.pos_emb == "sincos2d" and width % 4:
    errors.fail(f"{field}.width", width, "sincos2d position embeddings need a width divisible by 4")
  errors.check_choice(f"{field}.dtype", m.dtype, DTYPES)
  errors.check_choice(f"{field}.remat", m.remat, list(vit.REMAT_POLICIES))
  errors.check_range(f"{field}.drop_path", m.drop_path, 0.0, 1.0)
  errors.check_positive(f"{field}.patch_size", m.patch_size)
  errors.check_positive(f"{field}.mlp_ratio", m.mlp_ratio)
  errors.check_choice(f"{field}.attention", m.attention, ATTENTIONS)
  errors.check_choice(f"{field}.init_scheme", m.init_scheme, vit.INIT_SCHEMES)
  if data_cfg.image_size % m.patch_size:
    errors.fail("data.image_size", data_cfg.image_size, f"must be divisible by {field}.patch_size={m.patch_size}")
  if data_cfg.modality == "video":
    errors.check_positive(f"{field}.tubelet_size", m.tubelet_size)
    if data_cfg.num_frames % m.tubelet_size:
      errors.fail("data.num_frames", data_cfg.num_frames,
                  f"must be divisible by {field}.tubelet_size={m.tubelet_size}")
  return width, depth, heads
