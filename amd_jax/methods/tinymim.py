"""TinyMIM (Ren et al., CVPR 2023): token-relation distillation from a frozen MIM teacher.

Spec: docs/methods/tinymim.md. No mask and no decoder: student and
teacher see the whole image (the same crop and flip from the data pipeline; the
student's copy is additionally colour-jittered inside the loss). At the teacher's
block `tinymim.teacher_layer` and at the student's LAST block, with
(Q, K, V) = qkv(LN1(h)) of that block, each [B, H, 1+N, d]:
  R_QK = softmax(Q K^T / sqrt(d)),   R_VV = softmax(V V^T / sqrt(d))
(d: each model's own head_dim, cls included), and
  L = f_qk * KL(R_QK^T || R_QK^S) + f_vv * KL(R_VV^T || R_VV^S),
each KL summed over the last axis and averaged over (batch, head, query token).
The student's last block uses the teacher's head count (`tinymim.student_last_heads`,
checked against the teacher) so the relation maps have the same shape; its other
blocks use config.model.num_heads. The last block's MLP and the final norm are never
on the loss path, so they get no gradient.

Sequential distillation (B -> S -> T): the teacher is a previous TinyMIM run's student,
i.e. `teacher.checkpoint` = that run's workdir and `teacher.model` = its encoder, with
`tinymim.teacher_last_heads` = its `tinymim.student_last_heads` (its last block's head count).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from amd_jax import config_base, losses
from amd_jax.errors import ConfigError
from amd_jax.methods.base import Method
from amd_jax.models import flops, vit
from amd_jax.models.check import validate_model

# ITU-R 601 luma, as torchvision's rgb_to_grayscale.
_GREY = (0.299, 0.587, 0.114)
_ORDERS = np.array([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]], np.int32)


def _grey(img):
  """[..., H, W, C] in [0, 1] -> [..., H, W, 1]; identity for one channel."""
  if img.shape[-1] == 1:
    return img
  return jnp.sum(img * jnp.asarray(_GREY, img.dtype), axis=-1, keepdims=True)


def adjust_brightness(img, factor):
  return jnp.clip(img * factor, 0.0, 1.0)


def adjust_contrast(img, factor):
  """Blend with the mean grey level of the image (torchvision's adjust_contrast)."""
  mean = jnp.mean(_grey(img), axis=(-3, -2, -1), keepdims=True)
  return jnp.clip(factor * img + (1.0 - factor) * mean, 0.0, 1.0)


def adjust_saturation(img, factor):
  """Blend with the per-pixel grey image; a no-op for one channel (as torchvision)."""
  if img.shape[-1] == 1:
    return img
  return jnp.clip(factor * img + (1.0 - factor) * _grey(img), 0.0, 1.0)


def jitter_params(key, batch: int, strength: float) -> tuple[jax.Array, jax.Array]:
  """Per-sample factors [B, 3] (brightness, contrast, saturation), each U[max(0, 1-s), 1+s], and orders [B, 3]."""
  k_factor, k_order = jax.random.split(key)
  factors = jax.random.uniform(k_factor, (batch, 3), minval=max(0.0, 1.0 - strength), maxval=1.0 + strength)
  orders = jnp.asarray(_ORDERS)[jax.random.randint(k_order, (batch,), 0, len(_ORDERS))]
  return factors, orders


def apply_color_jitter(images, factors, orders):
  """images [B, H, W, C] in [0, 1]; op j of sample b is orders[b, j] (0 brightness, 1 contrast, 2 saturation)."""
  def one(img, f, order):
    ops = [lambda im: adjust_brightness(im, f[0]), lambda im: adjust_contrast(im, f[1]),
           lambda im: adjust_saturation(im, f[2])]
    for j in range(3):
      img = jax.lax.switch(order[j], ops, img)
    return img
  return jax.vmap(one)(images, factors, orders)


def color_jitter(key, images, strength: float, mean, std):
  """torchvision ColorJitter(strength, strength, strength) on NORMALISED images, deterministic in `key`.

  Un-normalises to [0, 1], applies brightness, contrast and saturation with per-sample
  factors in a per-sample random order, and normalises again.
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  pixels = images.astype(jnp.float32) * std + mean
  factors, orders = jitter_params(key, images.shape[0], strength)
  return ((apply_color_jitter(pixels, factors, orders) - mean) / std).astype(images.dtype)


class TinyMIM(Method):
  has_teacher = True

  @staticmethod
  def extra_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        teacher=config_base.teacher_config("B"),
        tinymim=dict(
            teacher_layer=12,        # 1-based teacher block whose relations are the targets (ViT-L: 18)
            student_last_heads=12,   # heads of the student's LAST block: the teacher's head count there
            teacher_last_heads=0,    # >0: the teacher's last block has its own head count (a TinyMIM student)
            factor_qk=1.0,
            factor_vv=1.0,
            color_jitter=0.4,        # brightness = contrast = saturation strength on the student's view; 0: off
            constant_drop_path=True,  # official: model.drop_path on blocks 1..depth-1, none on the last
        ),
    ))

  @staticmethod
  def teacher_heads_at_layer(config) -> int:
    t = config.teacher.model
    _, t_depth, t_heads = vit.resolve_variant(t.variant, t.width, t.depth, t.num_heads)
    if config.tinymim.teacher_last_heads and config.tinymim.teacher_layer == t_depth:
      return config.tinymim.teacher_last_heads
    return t_heads

  @staticmethod
  def validate_config(config) -> None:
    s_width, _, _ = validate_model(config.model, config.data)
    t_width, t_depth, _ = validate_model(config.teacher.model, config.data, "teacher.model")
    c = config.tinymim
    if config.data.modality != "image":
      raise ConfigError(f"TinyMIM is an image method: config.data.modality={config.data.modality!r} must be 'image'")
    if not 1 <= c.teacher_layer <= t_depth:
      raise ConfigError(f"config.tinymim.teacher_layer={c.teacher_layer} is outside the teacher's blocks 1..{t_depth}")
    if c.teacher_last_heads < 0 or c.teacher_last_heads and t_width % c.teacher_last_heads:
      raise ConfigError(f"config.tinymim.teacher_last_heads={c.teacher_last_heads} must be 0 or divide the teacher "
                        f"width {t_width}")
    want = TinyMIM.teacher_heads_at_layer(config)
    if c.student_last_heads != want:
      raise ConfigError(f"config.tinymim.student_last_heads={c.student_last_heads} must equal the teacher's head "
                        f"count at block {c.teacher_layer} ({want}): the relation maps are compared head by head")
    if s_width % c.student_last_heads:
      raise ConfigError(f"config.tinymim.student_last_heads={c.student_last_heads} must divide the student width "
                        f"{s_width}")
    for field in ("patch_size", "cls_token"):
      if config.teacher.model[field] != config.model[field]:
        raise ConfigError(f"config.teacher.model.{field}={config.teacher.model[field]} must equal config.model."
                          f"{field}={config.model[field]}: both relation maps are over the same tokens")
    for field in ("model", "teacher.model"):
      if (config.model if field == "model" else config.teacher.model).scan:
        raise ConfigError(f"config.{field}.scan=True: TinyMIM reads q/k/v inside a block and gives the student's "
                          "last block its own head count, which needs an unscanned stack; set it to False")
    if not 0.0 <= c.color_jitter < 1.0:
      raise ConfigError(f"config.tinymim.color_jitter={c.color_jitter} must be in [0, 1)")
    for field in ("factor_qk", "factor_vv"):
      if c[field] < 0:
        raise ConfigError(f"config.tinymim.{field}={c[field]} must be >= 0")
    if not config.teacher.checkpoint:
      raise ConfigError("config.teacher.checkpoint is empty: TinyMIM needs a pre-trained teacher (an amd_jax "
                        "workdir, e.g. an MAE run or a previous TinyMIM run for sequential distillation, or an "
                        "official .pth/.safetensors file)")

  def __init__(self, config):
    super().__init__(config)
    m, c, t = config.model, config.tinymim, config.teacher.model
    _, self.depth, _ = vit.resolve_variant(m.variant, m.width, m.depth, m.num_heads)
    rates = ()
    if c.constant_drop_path:
      rates = (float(m.drop_path),) * (self.depth - 1) + (0.0,)
    kwargs = dict(last_block_num_heads=c.student_last_heads, drop_path_rates=rates)
    self.encoder = vit.encoder_from_config(m, **kwargs)                                 # the whole encoder
    self.student = vit.encoder_from_config(m, attn_layers=(self.depth,), **kwargs)      # pre-training
    # Frozen features: without the last block's MLP, which pre-training never trains.
    self.feature_encoder = vit.encoder_from_config(m, last_block_mlp=False, **kwargs)
    self.t_width, self.t_depth, _ = vit.resolve_variant(t.variant, t.width, t.depth, t.num_heads)
    self.teacher_layer = c.teacher_layer
    self.teacher = vit.encoder_from_config(
        t, attn_layers=(c.teacher_layer,), final_norm=False, drop_path=0.0,
        max_depth=c.teacher_layer if c.teacher_layer < self.t_depth else 0,
        last_block_num_heads=c.teacher_last_heads)

  def _full_teacher(self):
    return vit.encoder_from_config(self.config.teacher.model, final_norm=False,
                                   last_block_num_heads=self.config.tinymim.teacher_last_heads)

  # --- interface ----------------------------------------------------------------
  def init_with_axes(self, rng, example_batch):
    return {"encoder": self.encoder.init(rng, example_batch[self.input_key()])["params"]}

  def teacher_init_with_axes(self, rng, example_batch):
    # Every block, no final norm (relations are read inside a block; the loader drops a saved norm).
    return self._full_teacher().init(rng, example_batch[self.input_key()])["params"]

  def relations(self, out, layer: int) -> tuple[jax.Array, jax.Array]:
    """(Q K^T / sqrt(d), V V^T / sqrt(d)) logits [B, H, N, N] of one block from the encoder's intermediates."""
    q, k, v = out[f"q_{layer}"], out[f"k_{layer}"], out[f"v_{layer}"]
    return losses.relation_logits(q, k), losses.relation_logits(v, v)

  def teacher_relations(self, teacher_params, x) -> tuple[jax.Array, jax.Array]:
    params = dict(teacher_params)
    params.pop("norm", None)
    if self.teacher.max_depth:
      params = {k: v for k, v in params.items()
                if not (k.startswith("blocks_") and int(k.split("_")[1]) >= self.teacher.max_depth)}
    _, out = self.teacher.apply({"params": params}, x)
    qk, vv = self.relations(out, self.teacher_layer)
    return jax.lax.stop_gradient(qk), jax.lax.stop_gradient(vv)

  def student_view(self, key, x):
    c, d = self.config.tinymim, self.config.data
    if c.color_jitter <= 0:
      return x
    return color_jitter(key, x, c.color_jitter, config_base.parse_floats(d.mean), config_base.parse_floats(d.std))

  def loss(self, params, teacher_params, batch, rng):
    x = batch[self.input_key()]
    c = self.config.tinymim
    k_jitter, k_drop = jax.random.split(rng)
    _, out = self.student.apply({"params": params["encoder"]}, self.student_view(k_jitter, x), train=True,
                                rngs={"dropout": k_drop})
    s_qk, s_vv = self.relations(out, self.depth)
    t_qk, t_vv = self.teacher_relations(teacher_params, x)  # the teacher sees the un-jittered view
    loss_qk = losses.relation_kl(s_qk, t_qk)
    loss_vv = losses.relation_kl(s_vv, t_vv)
    return c.factor_qk * loss_qk + c.factor_vv * loss_vv, {"loss_qk": loss_qk, "loss_vv": loss_vv}

  def encoder_for_transfer(self, params):
    """Encoder params to fine-tune from, with the never-trained last MLP switched off (host-side).

    Pre-training never reaches the last block's MLP (its weights stay random, and weight
    decay shrinks the matrices); its output projection is zeroed here, so the encoder
    starts as the residual stream after the last block's (trained) attention, as
    `features` reads it. Call it on concrete params, outside jit (see docs/methods/tinymim.md).
    """
    enc = dict(params["encoder"])
    last = f"blocks_{self.depth - 1}"
    block = dict(enc[last])
    block["mlp"] = {**block["mlp"], "fc2": jax.tree.map(lambda a: np.zeros(np.shape(a), np.float32),
                                                        block["mlp"]["fc2"])}
    enc[last] = block
    return enc

  def features(self, params, batch):
    """Mean of the final-normed patch tokens (cls dropped) over the whole input, skipping the untrained last MLP."""
    tokens, _ = self.feature_encoder.apply({"params": params["encoder"]}, batch[self.input_key()])
    if self.config.model.cls_token:
      tokens = tokens[:, 1:]
    return tokens.mean(axis=1)

  def flops_per_example(self, example_batch):
    x = example_batch[self.input_key()]
    m, t = self.config.model, self.config.teacher.model
    g = vit.token_grid(x.shape[1:], m.patch_size)
    n = g.num_tokens + int(m.cls_token)
    patch_dim = m.patch_size**2 * x.shape[-1]
    s_width = self.encoder.width
    student = flops.linear_flops(g.num_tokens, patch_dim, s_width)
    student += flops.stack_flops(n, s_width, self.depth, m.mlp_ratio)
    student += 2 * (2.0 * n * n * s_width)  # the two relation maps (Q K^T recomputed, V V^T)
    teacher = flops.linear_flops(g.num_tokens, patch_dim, self.t_width)
    teacher += flops.stack_flops(n, self.t_width, self.teacher_layer, t.mlp_ratio)
    teacher += 2 * (2.0 * n * n * self.t_width)
    return {"student": student, "teacher": teacher}
