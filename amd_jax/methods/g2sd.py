"""G2SD generic distillation (Huang et al., CVPR 2023): the student's decoder predicts the teacher decoder's features.

Spec: docs/methods/g2sd.md. One random mask, SHARED by student and
teacher (the same visible tokens).
- Teacher (frozen, a whole MAE: encoder AND decoder): encoder on the visible tokens ->
  final norm -> decoder_embed -> mask tokens -> fixed decoder position embedding ->
  decoder blocks 1..`g2sd.teacher_decoder_layer` (4 of 8 in the official recipe);
  target y = LayerNorm without affine (eps 1e-6) of that block's output.
- Student: encoder on the same visible tokens -> its own decoder (config.decoder, no
  decoder norm, no pixel head) -> MLP (Linear -> GELU -> Linear, both at the target width).
- L = smooth-L1 (beta `g2sd.smooth_l1_beta`, 2.0) averaged over ALL tokens (visible,
  masked and cls; `g2sd.tokens='masked'` keeps the masked tokens only, the official
  supervise_all=False).

The teacher must include its decoder: teacher params are {'encoder', 'decoder'}, as an
MAE run's workdir holds them. A teacher without decoder weights stops the run
(the official code would load one silently with a random decoder: G2SD issue #7).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from amd_jax import config_base, losses, masking, weights
from amd_jax.errors import ConfigError
from amd_jax.methods.base import Method
from amd_jax.models import flops, vit
from amd_jax.models.check import validate_model
from amd_jax.models.decoders import FeaturePredictor, MaskedTokenDecoder

# amd_jax methods whose params hold an MAE pixel decoder under 'decoder' (usable as a G2SD teacher).
PIXEL_DECODER_METHODS = ("mae", "amd", "dmae")


class MissingTeacherDecoderError(ValueError):
  """A G2SD teacher was given without the decoder weights its targets come from."""


def missing_decoder_message(what: str) -> str:
  return (f"G2SD needs the teacher's DECODER as well as its encoder (the targets are the teacher decoder's "
          f"block features), but {what}. Give the workdir of an amd_jax MAE run (its params hold 'encoder' and "
          "'decoder'), or an official MAE checkpoint that includes the decoder (facebookresearch/mae "
          "'*_full.pth'), not an encoder-only one (mae_pretrain_vit_base.pth): with a random decoder the "
          "distillation silently learns nothing useful (G2SD issue #7).")


def feature_target(h: jax.Array) -> jax.Array:
  """G2SD's target normalisation: LayerNorm over the last axis without affine parameters, eps 1e-6, in float32."""
  h = h.astype(jnp.float32)
  mean = h.mean(axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
  return (h - mean) * jax.lax.rsqrt(var + vit.LN_EPS)


class G2SD(Method):
  has_teacher = True
  # What the loader must bring for the teacher: the whole MAE, not only its encoder.
  teacher_parts = ("encoder", "decoder")

  @staticmethod
  def extra_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        teacher=dict(
            model=config_base.model_config("B"),
            decoder=config_base.decoder_config(512, 8, 16),  # the teacher MAE's decoder (facebookresearch/mae)
            checkpoint="",   # MAE workdir | official .pth WITH decoder | 'random' (benchmarks/tests only)
        ),
        g2sd=dict(
            teacher_decoder_layer=4,  # 1-based teacher decoder block whose output is the target
            tokens="all",             # all (official: cls, visible and masked) | masked
            loss="smooth_l1",         # l2 | l1 | smooth_l1
            smooth_l1_beta=2.0,
        ),
    ))

  @staticmethod
  def validate_config(config) -> None:
    validate_model(config.model, config.data)
    validate_model(config.teacher.model, config.data, "teacher.model")
    g, td = config.g2sd, config.teacher.decoder
    if config.data.modality != "image" or config.mask.kind != "random":
      raise ConfigError(f"G2SD is an image method: config.data.modality={config.data.modality!r} and "
                        f"config.mask.kind={config.mask.kind!r} must be 'image' and 'random'")
    if td.width < 1 or td.depth < 1 or td.num_heads < 1 or td.width % td.num_heads:
      raise ConfigError(f"config.teacher.decoder (width {td.width}, depth {td.depth}, heads {td.num_heads}) must "
                        "describe the teacher MAE's decoder: positive, heads dividing the width")
    if not 1 <= g.teacher_decoder_layer <= td.depth:
      raise ConfigError(f"config.g2sd.teacher_decoder_layer={g.teacher_decoder_layer} is outside the teacher "
                        f"decoder's blocks 1..{td.depth}")
    if g.tokens not in ("all", "masked"):
      raise ConfigError(f"config.g2sd.tokens={g.tokens!r} is not valid: allowed: all, masked")
    if g.loss not in losses.REGRESSIONS:
      raise ConfigError(f"config.g2sd.loss={g.loss!r} is not valid: allowed: {', '.join(losses.REGRESSIONS)}")
    if g.smooth_l1_beta <= 0:
      raise ConfigError(f"config.g2sd.smooth_l1_beta={g.smooth_l1_beta} must be > 0")
    for field in ("patch_size", "cls_token"):
      if config.teacher.model[field] != config.model[field]:
        raise ConfigError(f"config.teacher.model.{field}={config.teacher.model[field]} must equal config.model."
                          f"{field}={config.model[field]}: teacher and student predict the same tokens")
    source = config.teacher.checkpoint
    if not source:
      raise ConfigError("config.teacher.checkpoint is empty: G2SD needs a pre-trained MAE teacher WITH its decoder "
                        "(an amd_jax MAE workdir or an official MAE checkpoint that includes the decoder)")
    saved = weights.read_run_config(source) if weights.is_run(source) else None
    if saved is not None:
      method = saved.get("method")
      if method not in PIXEL_DECODER_METHODS:
        raise ConfigError(f"config.teacher.checkpoint={source!r}: " + missing_decoder_message(
            f"that workdir holds a {method!r} run, whose params have no MAE decoder "
            f"(runs with one: {', '.join(PIXEL_DECODER_METHODS)})"))

  def __init__(self, config):
    super().__init__(config)
    m, t, g = config.model, config.teacher.model, config.g2sd
    self.encoder = vit.encoder_from_config(m)
    self.teacher_encoder = vit.encoder_from_config(t, drop_path=0.0)  # with final norm: MAE's decoder reads it
    self.t_width, _, _ = vit.resolve_variant(t.variant, t.width, t.depth, t.num_heads)
    self.target_dim = config.teacher.decoder.width
    self.all_tokens = g.tokens == "all"

  # --- shapes and parts -------------------------------------------------------------
  def grid(self, x) -> vit.TokenGrid:
    return vit.token_grid(x.shape[1:], self.config.model.patch_size)

  def mask_spec(self, x) -> masking.MaskSpec:
    return masking.MaskSpec(num_tokens=self.grid(x).num_tokens, tokens_per_frame=self.grid(x).num_tokens,
                            kind="random")

  def draw_mask(self, key, x) -> masking.Mask:
    return masking.random_mask(key, x.shape[0], self.mask_spec(x), self.config.mask.ratio)

  def student_decoder(self, grid) -> MaskedTokenDecoder:
    m, d = self.config.model, self.config.decoder
    return MaskedTokenDecoder(
        width=d.width, depth=d.depth, num_heads=d.num_heads, grid=grid.shape, out_dim=0, mlp_ratio=d.mlp_ratio,
        qkv_bias=m.qkv_bias, pos_emb=m.pos_emb, has_cls=m.cls_token, embed="bias", final_norm=False,
        return_all=self.all_tokens, dtype=jnp.dtype(m.dtype))

  def predictor(self) -> FeaturePredictor:
    return FeaturePredictor(self.target_dim, self.target_dim, dtype=jnp.dtype(self.config.model.dtype))

  def teacher_decoder(self, grid, channels: int = 0, full: bool = False) -> MaskedTokenDecoder:
    """The teacher MAE's decoder; `full` builds all of it (norm and pixel head: what a checkpoint holds)."""
    t, d = self.config.teacher.model, self.config.teacher.decoder
    common = dict(width=d.width, depth=d.depth, num_heads=d.num_heads, grid=grid.shape, mlp_ratio=d.mlp_ratio,
                  qkv_bias=t.qkv_bias, pos_emb=t.pos_emb, has_cls=t.cls_token, embed="bias",
                  dtype=jnp.dtype(t.dtype))
    if full:
      return MaskedTokenDecoder(out_dim=t.patch_size**2 * channels, final_norm=True, **common)
    return MaskedTokenDecoder(out_dim=0, final_norm=False, max_depth=self.config.g2sd.teacher_decoder_layer,
                              return_all=self.all_tokens, **common)

  @staticmethod
  def check_teacher_params(teacher_params) -> None:
    """Stop with a clear message when the teacher weights lack the decoder (or the encoder)."""
    keys = sorted(teacher_params.keys()) if hasattr(teacher_params, "keys") else []
    if "decoder" not in keys or "encoder" not in keys:
      raise MissingTeacherDecoderError(missing_decoder_message(
          f"the teacher weights hold only {', '.join(map(repr, keys)) or 'no named parts'} (expected 'encoder' "
          "and 'decoder')"))

  # --- interface ----------------------------------------------------------------------
  def init_with_axes(self, rng, example_batch):
    x = example_batch[self.input_key()]
    mask = self.draw_mask(jax.random.PRNGKey(0), x)
    k_enc, k_dec, k_pred = jax.random.split(rng, 3)
    enc = self.encoder.init(k_enc, x, mask.keep)["params"]
    latent, _ = self.encoder.apply({"params": enc}, x, mask.keep)
    dec_model = self.student_decoder(self.grid(x))
    dec = dec_model.init(k_dec, latent, mask.keep, mask.masked)["params"]
    h = dec_model.apply({"params": dec}, latent, mask.keep, mask.masked)
    pred = self.predictor().init(k_pred, h)["params"]
    return {"encoder": enc, "decoder": dec, "predictor": pred}

  def teacher_init_with_axes(self, rng, example_batch):
    """The whole teacher MAE, {'encoder', 'decoder'} exactly as an MAE run's params (norm and pixel head included)."""
    x = example_batch[self.input_key()]
    mask = self.draw_mask(jax.random.PRNGKey(0), x)
    k_enc, k_dec = jax.random.split(rng)
    enc = self.teacher_encoder.init(k_enc, x, mask.keep)["params"]
    latent, _ = self.teacher_encoder.apply({"params": enc}, x, mask.keep)
    dec = self.teacher_decoder(self.grid(x), x.shape[-1], full=True).init(k_dec, latent, mask.keep, mask.masked)
    return {"encoder": enc, "decoder": dec["params"]}

  def teacher_targets(self, teacher_params, x, mask: masking.Mask) -> jax.Array:
    """LayerNorm-ed teacher decoder features at `g2sd.teacher_decoder_layer`, stop_gradient'ed."""
    self.check_teacher_params(teacher_params)
    layer = self.config.g2sd.teacher_decoder_layer
    dec = {k: v for k, v in teacher_params["decoder"].items()
           if k not in ("norm", "head") and not (k.startswith("blocks_") and int(k.split("_")[1]) >= layer)}
    latent, _ = self.teacher_encoder.apply({"params": teacher_params["encoder"]}, x, mask.keep)
    h = self.teacher_decoder(self.grid(x)).apply({"params": dec}, latent, mask.keep, mask.masked)
    return jax.lax.stop_gradient(feature_target(h))

  def predict_targets(self, params, x, mask: masking.Mask, rng=None) -> jax.Array:
    train = rng is not None
    latent, _ = self.encoder.apply({"params": params["encoder"]}, x, mask.keep, train=train,
                                   rngs={"dropout": rng} if train else {})
    h = self.student_decoder(self.grid(x)).apply({"params": params["decoder"]}, latent, mask.keep, mask.masked)
    return self.predictor().apply({"params": params["predictor"]}, h)

  def loss(self, params, teacher_params, batch, rng):
    x = batch[self.input_key()]
    g = self.config.g2sd
    k_mask, k_drop = jax.random.split(rng)
    mask = self.draw_mask(k_mask, x)  # ONE mask: student and teacher see the same visible tokens
    target = self.teacher_targets(teacher_params, x, mask)
    pred = self.predict_targets(params, x, mask, k_drop)
    loss = losses.regression(pred, target, g.loss, g.smooth_l1_beta)
    return loss, {"loss_feature": loss}

  def features(self, params, batch):
    """Mean of the final-normed patch tokens over the whole (unmasked) input."""
    tokens, _ = self.encoder.apply({"params": params["encoder"]}, batch[self.input_key()])
    if self.config.model.cls_token:
      tokens = tokens[:, 1:]
    return tokens.mean(axis=1)

  def flops_per_example(self, example_batch):
    x = example_batch[self.input_key()]
    g = self.grid(x)
    m, t, d, td = self.config.model, self.config.teacher.model, self.config.decoder, self.config.teacher.decoder
    cls = int(m.cls_token)
    k = masking.num_visible(self.mask_spec(x), self.config.mask.ratio) + cls
    n = g.num_tokens + cls
    patch_dim = m.patch_size**2 * x.shape[-1]
    enc = self.encoder
    student = flops.linear_flops(g.num_tokens, patch_dim, enc.width)
    student += flops.stack_flops(k, enc.width, enc.depth, enc.mlp_ratio)
    student += flops.linear_flops(k, enc.width, d.width)
    student += flops.stack_flops(n, d.width, d.depth, d.mlp_ratio)
    student += flops.linear_flops(n, d.width, self.target_dim) + flops.linear_flops(n, self.target_dim,
                                                                                    self.target_dim)
    te = self.teacher_encoder
    teacher = flops.linear_flops(g.num_tokens, patch_dim, te.width)
    teacher += flops.stack_flops(k, te.width, te.depth, t.mlp_ratio)
    teacher += flops.linear_flops(k, te.width, td.width)
    teacher += flops.stack_flops(n, td.width, self.config.g2sd.teacher_decoder_layer, td.mlp_ratio)
    return {"student": student, "teacher": teacher}
