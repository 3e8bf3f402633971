"""AMD: asymmetric masked distillation (Zhao et al., CVPR 2024). Spec: docs/methods/amd.md.

A frozen MAE teacher sees more of the input than the student: one nested mask
splits the tokens into student-visible < diff (teacher only) < masked. The
student is trained with
  L = f_rec * L_rec + f_dir * L_dir + f_gen * L_gen
- L_rec: MAE pixel reconstruction of everything the student did not see;
- L_dir: projected pre-norm student block outputs regressed onto the teacher's RAW
  block outputs at the student-visible tokens (direct alignment);
- L_gen: a generator (2 blocks at the teacher width) takes the projected student
  tokens plus mask tokens at the diff positions and regresses the teacher's
  features there (generation alignment).
Both alignment terms average over the configured (student layer, teacher layer) pairs.

Faithful to the official video code, with two documented switches:
- amd.shared_heads=True (official): one projection per layer pair feeds both the
  direct and the generation path; False gives the generator its own projection.
- amd.train_generator_mask_tokens=True (default): the generators' mask tokens are
  learned. The official code keeps them in a plain Python list, so they are never
  registered, trained or saved; False freezes them at their init for parity.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from amd_jax import config_base, losses, masking, targets
from amd_jax.errors import ConfigError
from amd_jax.methods.mae import MAE
from amd_jax.models import flops, logical, vit
from amd_jax.models.check import validate_model
from amd_jax.models.decoders import MaskedTokenDecoder


def _projection(width: int, dtype) -> nn.Dense:
  axes = (logical.Axis.EMBED, logical.Axis.TEACHER_EMBED)
  return vit.Dense(width, use_bias=False, dtype=dtype, **vit.named_dense(axes))


class AMD(MAE):
  has_teacher = True

  @staticmethod
  def extra_config() -> ml_collections.ConfigDict:
    teacher_model = config_base.model_config("L")
    return ml_collections.ConfigDict(dict(
        teacher=dict(
            model=teacher_model,
            checkpoint="",         # amd_jax workdir | .pth/.safetensors | 'random' (benchmarks/tests only)
            mask_ratio=0.75,       # the teacher sees more: lower ratio than config.mask.ratio
        ),
        amd=dict(
            student_layers="6,12",   # 1-based student blocks whose outputs are aligned
            teacher_layers="12,24",  # the teacher blocks they are aligned to, pairwise
            factor_rec=1.0,
            factor_dir=1.0,
            factor_gen=1.0,
            align_loss="l2",         # l2 | l1 | smooth_l1
            smooth_l1_beta=1.0,
            shared_heads=True,
            generator_depth=2,
            generator_heads=0,       # 0: teacher width / 64
            train_generator_mask_tokens=True,
        ),
    ))

  @staticmethod
  def validate_config(config) -> None:
    _, s_depth, _ = vit.resolve_variant(config.model.variant, config.model.width, config.model.depth,
                                        config.model.num_heads)
    t_width, t_depth, _ = validate_model(config.teacher.model, config.data, "teacher.model")
    a, t = config.amd, config.teacher
    try:
      s_layers, t_layers = config_base.parse_ints(a.student_layers), config_base.parse_ints(a.teacher_layers)
    except ValueError:
      raise ConfigError(f"config.amd.student_layers={a.student_layers!r} / teacher_layers={a.teacher_layers!r} "
                        "must be comma-separated integers, e.g. '6,12'") from None
    if not s_layers or len(s_layers) != len(t_layers):
      raise ConfigError(f"config.amd.student_layers={a.student_layers!r} and config.amd.teacher_layers="
                        f"{a.teacher_layers!r} must list the same, non-zero number of layers (one pair each)")
    for l in s_layers:
      if not 1 <= l <= s_depth:
        raise ConfigError(f"config.amd.student_layers={a.student_layers!r}: layer {l} is outside the student's "
                          f"blocks 1..{s_depth}")
    for l in t_layers:
      if not 1 <= l <= t_depth:
        raise ConfigError(f"config.amd.teacher_layers={a.teacher_layers!r}: layer {l} is outside the teacher's "
                          f"blocks 1..{t_depth}")
    if not 0.0 < t.mask_ratio < config.mask.ratio:
      raise ConfigError(f"config.teacher.mask_ratio={t.mask_ratio!r} must be in (0, config.mask.ratio="
                        f"{config.mask.ratio}): the teacher must see more tokens than the student")
    for field in ("patch_size", "tubelet_size"):
      if t.model[field] != config.model[field]:
        raise ConfigError(f"config.teacher.model.{field}={t.model[field]} must equal config.model.{field}="
                          f"{config.model[field]}: teacher and student tokens must line up")
    if a.align_loss not in losses.REGRESSIONS:
      raise ConfigError(f"config.amd.align_loss={a.align_loss!r} is not valid: allowed: "
                        f"{', '.join(losses.REGRESSIONS)}")
    heads = a.generator_heads or t_width // 64
    if heads < 1 or t_width % heads:
      raise ConfigError(f"config.amd.generator_heads={a.generator_heads} gives {heads} heads, which must divide the "
                        f"teacher width {t_width} (0 means width/64)")
    for field in ("factor_rec", "factor_dir", "factor_gen"):
      if a[field] < 0:
        raise ConfigError(f"config.amd.{field}={a[field]} must be >= 0")
    if a.generator_depth < 1:
      raise ConfigError(f"config.amd.generator_depth={a.generator_depth} must be >= 1")
    if not t.checkpoint:
      raise ConfigError("config.teacher.checkpoint is empty: AMD needs a pre-trained teacher (an amd_jax workdir "
                        "or an official .pth/.safetensors file)")

  def __init__(self, config):
    super().__init__(config)
    self.decoder_embed = "nobias" if config.data.modality == "video" else "bias"
    a = config.amd
    self.student_layers = config_base.parse_ints(a.student_layers)
    self.teacher_layers = config_base.parse_ints(a.teacher_layers)
    self.student = vit.encoder_from_config(config.model, block_layers=self.student_layers)
    t = config.teacher.model
    self.teacher_width, self.teacher_depth, _ = vit.resolve_variant(t.variant, t.width, t.depth, t.num_heads)
    # The teacher runs only up to the deepest aligned block and returns raw block outputs.
    self.teacher = vit.encoder_from_config(t, block_layers=self.teacher_layers, final_norm=False,
                                           max_depth=max(self.teacher_layers), drop_path=0.0)

  # --- parts ----------------------------------------------------------------
  def generator(self, grid: vit.TokenGrid) -> MaskedTokenDecoder:
    a, m = self.config.amd, self.config.model
    return MaskedTokenDecoder(
        width=self.teacher_width, depth=a.generator_depth,
        num_heads=a.generator_heads or self.teacher_width // 64, grid=grid.shape, out_dim=0,
        mlp_ratio=4.0, qkv_bias=m.qkv_bias, pos_emb=m.pos_emb, has_cls=False, embed="none",
        final_norm=False, train_mask_token=a.train_generator_mask_tokens, dtype=jnp.dtype(m.dtype),
        init_scheme=m.init_scheme)

  def nested_mask(self, key, x) -> masking.NestedMask:
    return masking.nested_mask(key, x.shape[0], self.mask_spec(x), self.config.mask.ratio,
                               self.config.teacher.mask_ratio)

  def _without_cls(self, tokens, has_cls: bool):
    return tokens[:, 1:] if has_cls else tokens

  # --- interface --------------------------------------------------------------
  def init_with_axes(self, rng, example_batch):
    x = example_batch[self.input_key()]
    nm = self.nested_mask(jax.random.PRNGKey(0), x)
    params = super().init_with_axes(rng, example_batch)
    dtype = jnp.dtype(self.config.model.dtype)
    k_proj, k_gen, k_gproj = jax.random.split(jax.random.fold_in(rng, 1), 3)
    z = jnp.zeros((x.shape[0], nm.student.shape[1], self.student.width), jnp.float32)
    n = len(self.student_layers)
    proj = _projection(self.teacher_width, dtype)
    params["projections"] = {f"proj_{i}": proj.init(jax.random.fold_in(k_proj, i), z)["params"] for i in range(n)}
    if not self.config.amd.shared_heads:
      params["generator_projections"] = {
          f"proj_{i}": proj.init(jax.random.fold_in(k_gproj, i), z)["params"] for i in range(n)}
    gen = self.generator(self.grid(x))
    zt = jnp.zeros(z.shape[:2] + (self.teacher_width,), jnp.float32)
    params["generators"] = {f"gen_{i}": gen.init(jax.random.fold_in(k_gen, i), zt, nm.student, nm.diff)["params"]
                            for i in range(n)}
    return params

  def teacher_init_with_axes(self, rng, example_batch):
    x = example_batch[self.input_key()]
    # All blocks (whatever the aligned layers) but no final norm: AMD aligns raw block outputs.
    full_teacher = vit.encoder_from_config(self.config.teacher.model, final_norm=False)
    nm = self.nested_mask(jax.random.PRNGKey(0), x)
    return full_teacher.init(rng, x, nm.teacher)["params"]

  def teacher_features(self, teacher_params, x, nm: masking.NestedMask):
    """Raw teacher block outputs on cat([student-visible, diff]) tokens, stop_gradient'ed."""
    params = teacher_params
    if not self.teacher.scan:  # blocks past the deepest aligned one are never run
      params = {k: v for k, v in params.items()
                if not (k.startswith("blocks_") and int(k.split("_")[1]) >= self.teacher.max_depth)}
    else:
      params = dict(params)
      params["blocks"] = jax.tree.map(lambda p: p[: self.teacher.max_depth], params["blocks"])
    _, out = self.teacher.apply({"params": params}, x, nm.teacher)
    has_cls = self.config.teacher.model.cls_token
    return {l: jax.lax.stop_gradient(self._without_cls(out[f"block_{l}"], has_cls)).astype(jnp.float32)
            for l in self.teacher_layers}

  def loss(self, params, teacher_params, batch, rng):
    x = batch[self.input_key()]
    a = self.config.amd
    k_mask, k_drop = jax.random.split(rng)
    nm = self.nested_mask(k_mask, x)
    smask = nm.student_mask()
    ks = nm.student.shape[1]

    # Student: encoder on its visible tokens (recording block outputs), pixel decoder on the rest.
    latent, out = self.student.apply({"params": params["encoder"]}, x, smask.keep, train=True,
                                     rngs={"dropout": k_drop})
    pred = self.decoder(self.grid(x), x.shape[-1]).apply({"params": params["decoder"]}, latent, smask.keep,
                                                         smask.masked)
    target = masking.gather_tokens(self.pixel_target(x), smask.masked)
    loss_rec = losses.regression(pred, target, "l2")

    # Teacher: frozen, on student-visible + diff tokens.
    teacher_out = self.teacher_features(teacher_params, x, nm)

    dtype = jnp.dtype(self.config.model.dtype)
    proj = _projection(self.teacher_width, dtype)
    gen = self.generator(self.grid(x))
    reg = lambda p, t: losses.regression(p, t, a.align_loss, a.smooth_l1_beta)
    loss_dir, loss_gen = 0.0, 0.0
    metrics = {}
    for i, (ls, lt) in enumerate(zip(self.student_layers, self.teacher_layers)):
      z = self._without_cls(out[f"block_{ls}"], self.config.model.cls_token)
      h_t = teacher_out[lt]
      z_dir = proj.apply({"params": params["projections"][f"proj_{i}"]}, z).astype(jnp.float32)
      if a.shared_heads:
        z_gen = z_dir
      else:
        z_gen = proj.apply({"params": params["generator_projections"][f"proj_{i}"]}, z).astype(jnp.float32)
      generated = gen.apply({"params": params["generators"][f"gen_{i}"]}, z_gen, nm.student, nm.diff)
      l_dir, l_gen = reg(z_dir, h_t[:, :ks]), reg(generated, h_t[:, ks:])
      metrics[f"loss_dir_{ls}_{lt}"], metrics[f"loss_gen_{ls}_{lt}"] = l_dir, l_gen
      loss_dir += l_dir
      loss_gen += l_gen
    n = len(self.student_layers)
    loss_dir, loss_gen = loss_dir / n, loss_gen / n
    total = a.factor_rec * loss_rec + a.factor_dir * loss_dir + a.factor_gen * loss_gen
    metrics.update(loss_rec=loss_rec, loss_dir=loss_dir, loss_gen=loss_gen)
    return total, metrics

  def reconstruct(self, params, batch, rng):
    """MAE's pictures under one nested mask, plus what the teacher saw ('teacher_visible', '_mask')."""
    x = batch[self.input_key()]
    nm = self.nested_mask(rng, x)
    out = self.pictures(params, x, nm.student_mask(), rng)
    m = self.config.model
    tub = m.tubelet_size if x.ndim == 5 else 0
    view, shown = self.masked_view(targets.patchify(x, m.patch_size, tub), nm.teacher)
    unpatch = lambda t: targets.unpatchify(t, self.grid(x).shape, m.patch_size, x.shape[-1], tub)
    out.update(teacher_visible=unpatch(view), teacher_visible_mask=unpatch(shown))
    return out

  def flops_per_example(self, example_batch):
    x = example_batch[self.input_key()]
    spec = self.mask_spec(x)
    ks = masking.num_visible(spec, self.config.mask.ratio)
    kt = masking.num_visible(spec, self.config.teacher.mask_ratio)
    base = super().flops_per_example(example_batch)["student"]  # encoder + pixel decoder on the student's view
    tw, n = self.teacher_width, len(self.student_layers)
    t = self.config.teacher.model
    student = base + n * flops.linear_flops(ks, self.student.width, tw) * (1 if self.config.amd.shared_heads else 2)
    student += n * flops.stack_flops(kt, tw, self.config.amd.generator_depth)
    teacher = flops.linear_flops(kt, self.patch_dim(x), tw)   # only the teacher's tokens are embedded
    teacher += flops.stack_flops(kt + int(t.cls_token), tw, max(self.teacher_layers), t.mlp_ratio)
    return {"student": student, "teacher": teacher}

  def patch_dim(self, x) -> int:
    m = self.config.model
    return m.patch_size**2 * x.shape[-1] * (m.tubelet_size if x.ndim == 5 else 1)
