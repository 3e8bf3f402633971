"""D-MAE (MAE-lite, Wang et al., ICML 2023): MAE plus attention distillation. Spec: docs/methods/dmae.md.

A frozen MAE teacher encoder runs on the SAME visible tokens as the student (one
mask, shared). The student is trained with
  L = f_rec * L_rec + f_attn * sum_pairs L_attn + f_hidden * sum_pairs L_hidden
- L_rec: MAE pixel reconstruction of the masked patches (per-patch normalised target);
- L_attn: MSE between the student's PRE-softmax attention logits Q K^T / sqrt(d_h)
  at a block, mixed over heads by a learned adapter W [H_s, H_t] (a 1x1 convolution
  over heads without bias, on by default even when head counts match), and the
  teacher's logits at its block; [B, H_t, 1+K, 1+K], cls included;
- L_hidden (optional, off by default): MSE between a student hidden state, mapped to
  the teacher width by a Linear without bias, and the teacher's. MAE-lite's hidden
  state at index l (0..depth) is the input of block l+1's attention after its norm1
  (LN1(h_l)), or the final-normed output at l = depth; cls included.
Both distillation terms SUM over the configured layer pairs, as the official code does.

Head counts are explicit fields (config.model.num_heads, config.teacher.model.num_heads):
MAE-lite's ViT-Ti has 12 heads, not DeiT's 3, and a checkpoint loads into either silently.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from amd_jax import config_base, losses, masking
from amd_jax.errors import ConfigError
from amd_jax.methods.mae import MAE
from amd_jax.models import flops, logical, vit
from amd_jax.models.check import validate_model

# PyTorch's default init of Linear / Conv2d weights (kaiming_uniform, a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _layers(text: str) -> tuple[int, ...]:
  return config_base.parse_ints(text)


class DMAE(MAE):
  has_teacher = True
  decoder_embed = "bias"

  @staticmethod
  def extra_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        teacher=config_base.teacher_config("B"),
        dmae=dict(
            attn_student_layers="12",  # 1-based student blocks whose attention logits are distilled
            attn_teacher_layers="12",  # the teacher blocks they match, pairwise (official: the same indices)
            factor_attn=1.0,
            attn_adapter=True,         # learned head mix W [H_s, H_t]; must be True when head counts differ
            hidden_student_layers="",  # 0..depth (see the module doc); '' = no hidden distillation (official)
            hidden_teacher_layers="",
            factor_hidden=1.0,
            hidden_adapter=True,       # Linear(student width -> teacher width, no bias); True when widths differ
            factor_rec=1.0,
        ),
    ))

  @staticmethod
  def validate_config(config) -> None:
    s_width, s_depth, s_heads = validate_model(config.model, config.data)
    t_width, t_depth, t_heads = validate_model(config.teacher.model, config.data, "teacher.model")
    d = config.dmae
    if config.data.modality != "image" or config.mask.kind != "random":
      raise ConfigError(f"D-MAE is an image method: config.data.modality={config.data.modality!r} and "
                        f"config.mask.kind={config.mask.kind!r} must be 'image' and 'random'")
    pairs = {}
    for kind, lo in (("attn", 1), ("hidden", 0)):
      s_field, t_field = f"{kind}_student_layers", f"{kind}_teacher_layers"
      try:
        s_layers, t_layers = _layers(d[s_field]), _layers(d[t_field])
      except ValueError:
        raise ConfigError(f"config.dmae.{s_field}={d[s_field]!r} / {t_field}={d[t_field]!r} must be "
                          "comma-separated integers, e.g. '12'") from None
      if len(s_layers) != len(t_layers):
        raise ConfigError(f"config.dmae.{s_field}={d[s_field]!r} and config.dmae.{t_field}={d[t_field]!r} must "
                          "list the same number of layers (one pair each)")
      for field, layers, depth, who in ((s_field, s_layers, s_depth, "student"), (t_field, t_layers, t_depth,
                                                                                   "teacher")):
        for l in layers:
          if not lo <= l <= depth:
            raise ConfigError(f"config.dmae.{field}={d[field]!r}: layer {l} is outside the {who}'s range "
                              f"{lo}..{depth}")
      pairs[kind] = s_layers
    if not pairs["attn"] and not pairs["hidden"]:
      raise ConfigError("config.dmae.attn_student_layers and config.dmae.hidden_student_layers are both empty: "
                        "D-MAE needs at least one distillation term (use method='mae' for plain MAE)")
    if pairs["attn"] and not d.attn_adapter and s_heads != t_heads:
      raise ConfigError(f"config.dmae.attn_adapter=False needs equal head counts, but the student has {s_heads} "
                        f"(config.model.num_heads) and the teacher {t_heads} (config.teacher.model.num_heads)")
    if pairs["hidden"] and not d.hidden_adapter and s_width != t_width:
      raise ConfigError(f"config.dmae.hidden_adapter=False needs equal widths, but the student is {s_width} wide "
                        f"and the teacher {t_width}")
    for field in ("patch_size", "cls_token"):
      if config.teacher.model[field] != config.model[field]:
        raise ConfigError(f"config.teacher.model.{field}={config.teacher.model[field]} must equal config.model."
                          f"{field}={config.model[field]}: teacher and student see the same tokens")
    for field in ("model", "teacher.model"):
      m = config.model if field == "model" else config.teacher.model
      if m.scan:
        raise ConfigError(f"config.{field}.scan=True: D-MAE reads attention logits and hidden states inside "
                          "blocks, which needs an unscanned stack; set it to False")
    for field in ("factor_rec", "factor_attn", "factor_hidden"):
      if d[field] < 0:
        raise ConfigError(f"config.dmae.{field}={d[field]} must be >= 0")
    if not config.teacher.checkpoint:
      raise ConfigError("config.teacher.checkpoint is empty: D-MAE needs a pre-trained MAE teacher (an amd_jax "
                        "workdir or an official .pth/.safetensors file)")

  def __init__(self, config):
    super().__init__(config)
    d, t = config.dmae, config.teacher.model
    self.attn_s, self.attn_t = _layers(d.attn_student_layers), _layers(d.attn_teacher_layers)
    self.hidden_s, self.hidden_t = _layers(d.hidden_student_layers), _layers(d.hidden_teacher_layers)
    self.s_width, self.s_depth, self.s_heads = vit.resolve_variant(config.model.variant, config.model.width,
                                                                   config.model.depth, config.model.num_heads)
    self.t_width, self.t_depth, self.t_heads = vit.resolve_variant(t.variant, t.width, t.depth, t.num_heads)
    self.student = vit.encoder_from_config(
        config.model, attn_layers=self.attn_s, norm1_layers=tuple(l + 1 for l in self.hidden_s if l < self.s_depth))
    # The teacher runs only as deep as its deepest target, with its final norm only when a target needs it.
    self.teacher_final_norm = self.t_depth in self.hidden_t
    t_norm1 = tuple(l + 1 for l in self.hidden_t if l < self.t_depth)
    deepest = self.t_depth if self.teacher_final_norm else max(self.attn_t + t_norm1, default=self.t_depth)
    self.teacher = vit.encoder_from_config(t, attn_layers=self.attn_t, norm1_layers=t_norm1,
                                           final_norm=self.teacher_final_norm,
                                           max_depth=deepest if deepest < self.t_depth else 0, drop_path=0.0)

  # --- interface ----------------------------------------------------------------
  def _hidden_projection(self) -> nn.Dense:
    return nn.Dense(self.t_width, use_bias=False,
                    kernel_init=logical.with_axes(torch_default_init, (logical.Axis.EMBED, logical.Axis.TEACHER_EMBED)),
                    dtype=jnp.dtype(self.config.model.dtype))

  def init_with_axes(self, rng, example_batch):
    params = super().init_with_axes(rng, example_batch)
    d = self.config.dmae
    k_attn, k_hidden = jax.random.split(jax.random.fold_in(rng, 1))
    if self.attn_s and (d.attn_adapter or self.s_heads != self.t_heads):
      adapter_init = logical.with_axes(torch_default_init, (logical.Axis.STUDENT_HEADS, logical.Axis.TEACHER_HEADS))
      params["attn_adapters"] = {
          f"adapter_{i}": {"kernel": adapter_init(jax.random.fold_in(k_attn, i), (self.s_heads, self.t_heads))}
          for i in range(len(self.attn_s))}
    if self.hidden_s and (d.hidden_adapter or self.s_width != self.t_width):
      z = jnp.zeros((1, 1, self.s_width), jnp.float32)
      proj = self._hidden_projection()
      params["hidden_adapters"] = {f"adapter_{i}": proj.init(jax.random.fold_in(k_hidden, i), z)["params"]
                                   for i in range(len(self.hidden_s))}
    return params

  def teacher_init_with_axes(self, rng, example_batch):
    x = example_batch[self.input_key()]
    # Every block; the final norm only when a hidden target needs it (the loader drops an unused one).
    full = vit.encoder_from_config(self.config.teacher.model, final_norm=self.teacher_final_norm)
    mask = masking.random_mask(jax.random.PRNGKey(0), x.shape[0], self.mask_spec(x), self.config.mask.ratio)
    return full.init(rng, x, mask.keep)["params"]

  def teacher_features(self, teacher_params, x, keep) -> dict[str, jax.Array]:
    """The teacher's attention logits ('attn_{l}') and hidden states ('hidden_{l}') on the student's tokens."""
    params = dict(teacher_params)
    if self.teacher.max_depth:
      params = {k: v for k, v in params.items()
                if not (k.startswith("blocks_") and int(k.split("_")[1]) >= self.teacher.max_depth)}
    if not self.teacher_final_norm:
      params.pop("norm", None)
    tokens, out = self.teacher.apply({"params": params}, x, keep)
    feats = {f"attn_{l}": out[f"attn_logits_{l}"] for l in self.attn_t}
    for l in self.hidden_t:
      feats[f"hidden_{l}"] = tokens if l == self.t_depth else out[f"norm1_{l + 1}"]
    return {k: jax.lax.stop_gradient(v).astype(jnp.float32) for k, v in feats.items()}

  def loss(self, params, teacher_params, batch, rng):
    x = batch[self.input_key()]
    d = self.config.dmae
    k_mask, k_drop = jax.random.split(rng)
    mask = masking.random_mask(k_mask, x.shape[0], self.mask_spec(x), self.config.mask.ratio)

    latent, out = self.student.apply({"params": params["encoder"]}, x, mask.keep, train=True,
                                     rngs={"dropout": k_drop})
    pred = self.decoder(self.grid(x), x.shape[-1]).apply({"params": params["decoder"]}, latent, mask.keep,
                                                         mask.masked)
    loss_rec = losses.regression(pred, masking.gather_tokens(self.pixel_target(x), mask.masked), "l2")

    teacher = self.teacher_features(teacher_params, x, mask.keep)  # the SAME visible tokens
    metrics = {"loss_rec": loss_rec}
    loss_attn = jnp.zeros((), jnp.float32)
    for i, (ls, lt) in enumerate(zip(self.attn_s, self.attn_t)):
      mix = params["attn_adapters"][f"adapter_{i}"]["kernel"] if "attn_adapters" in params else None
      term = losses.attention_logit_mse(out[f"attn_logits_{ls}"], teacher[f"attn_{lt}"], mix)
      metrics[f"loss_attn_{ls}_{lt}"] = term
      loss_attn += term
    loss_hidden = jnp.zeros((), jnp.float32)
    for i, (ls, lt) in enumerate(zip(self.hidden_s, self.hidden_t)):
      h = latent if ls == self.s_depth else out[f"norm1_{ls + 1}"]
      if "hidden_adapters" in params:
        h = self._hidden_projection().apply({"params": params["hidden_adapters"][f"adapter_{i}"]}, h)
      term = losses.regression(h, teacher[f"hidden_{lt}"], "l2")
      metrics[f"loss_hidden_{ls}_{lt}"] = term
      loss_hidden += term
    if self.attn_s:
      metrics["loss_attn"] = loss_attn
    if self.hidden_s:
      metrics["loss_hidden"] = loss_hidden
    total = d.factor_rec * loss_rec + d.factor_attn * loss_attn + d.factor_hidden * loss_hidden
    return total, metrics

  def flops_per_example(self, example_batch):
    x = example_batch[self.input_key()]
    g = self.grid(x)
    student = super().flops_per_example(example_batch)["student"]
    n = masking.num_visible(self.mask_spec(x), self.config.mask.ratio) + int(self.config.model.cls_token)
    student += len(self.attn_s) * 2.0 * self.s_heads * self.t_heads * n * n
    student += len(self.hidden_s) * flops.linear_flops(n, self.s_width, self.t_width)
    t = self.config.teacher.model
    teacher = flops.linear_flops(g.num_tokens, self.patch_dim(x), self.t_width)
    teacher += flops.stack_flops(n, self.t_width, self.teacher.max_depth or self.t_depth, t.mlp_ratio)
    return {"student": student, "teacher": teacher}

  def patch_dim(self, x) -> int:
    return self.config.model.patch_size**2 * x.shape[-1]
