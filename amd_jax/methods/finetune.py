"""Classification fine-tuning of a pre-trained encoder, and G2SD's specific distillation.

`finetune` (MAE / VideoMAE / AMD fine-tuning recipes): the encoder of any amd_jax
pre-training run (or an official .pth) under a classifier (models/classifier.py),
trained on mixup/cutmix soft targets with label smoothing (amd_jax/mixup.py, on
device), drop path (config.model.drop_path), layer-wise lr decay
(config.finetune.layer_decay, applied by the train loop through `layer_scales`),
optional EMA of the weights (config.optim.ema_decay). RandAugment, random erasing
and repeated augmentation are input-pipeline options (config.data).

`g2sd_sd` (G2SD's specific distillation, DeiT's recipe): the student carries a
distillation token with its own head; a frozen fine-tuned teacher classifier sees the
same mixed batch; L = (1 - alpha) SoftCE(head(cls), targets) + alpha * D(head_dist(dist),
teacher logits), D = CE to the teacher's argmax (hard, the official choice) or
T^2-scaled KL at temperature T (soft). At test time both heads' logits are averaged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from amd_jax import config_base, losses, methods, mixup, weights
from amd_jax.errors import ConfigError
from amd_jax.methods import layer_decay
from amd_jax.methods.base import Method
from amd_jax.models import classifier, flops, vit
from amd_jax.models.check import validate_model

POOLS = classifier.POOLS


def finetune_fields() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      init="",               # pre-trained encoder: an amd_jax workdir (any method) | .pth/.safetensors | '' = scratch
      pool="mean",           # mean: mean of patch tokens -> fc_norm (MAE global pool, VideoMAE, AMD) | cls
      head_init_scale=1e-3,  # head kernel = trunc-normal(0.02) x this (official recipes: 2e-5 in all)
      layer_decay=0.75,      # lr x layer_decay**(depth + 1 - layer id); 1.0 switches it off
      mixup=0.8,             # mixup Beta(alpha, alpha); 0 disables
      cutmix=1.0,            # cutmix Beta(alpha, alpha); 0 disables
      mixup_prob=1.0,        # probability that a batch is mixed at all
      mixup_switch_prob=0.5,  # with both on: probability of cutmix rather than mixup
      label_smoothing=0.1,
  ))


class Finetune(Method):
  """Supervised classification with a pre-trained encoder."""

  distill = False
  is_classifier = True

  @staticmethod
  def extra_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(finetune=finetune_fields()))

  @staticmethod
  def validate_config(config) -> None:
    validate_model(config.model, config.data)
    f = config.finetune
    if f.pool not in POOLS:
      raise ConfigError(f"config.finetune.pool={f.pool!r} is not valid: allowed: {', '.join(POOLS)}")
    if f.pool == "cls" and not config.model.cls_token:
      raise ConfigError("config.finetune.pool='cls' needs config.model.cls_token=True (the encoder has no cls token)")
    if not 0.0 < f.layer_decay <= 1.0:
      raise ConfigError(f"config.finetune.layer_decay={f.layer_decay!r} is not valid: must be in (0, 1]")
    for name in ("mixup", "cutmix"):
      if f[name] < 0:
        raise ConfigError(f"config.finetune.{name}={f[name]!r} is not valid: must be >= 0 (0 disables it)")
    for name in ("mixup_prob", "mixup_switch_prob", "label_smoothing"):
      if not 0.0 <= f[name] <= 1.0:
        raise ConfigError(f"config.finetune.{name}={f[name]!r} is not valid: must be in [0, 1]")
    if config.data.num_classes == 1:   # 0: counted from the data when the run starts
      raise ConfigError(f"config.data.num_classes={config.data.num_classes!r} is not valid: fine-tuning needs >= 2 "
                        "(or 0 to count the classes in the data)")
    if f.init and not weights.exists(f.init):
      raise ConfigError(f"config.finetune.init={f.init!r} is neither a workdir nor a file: give the workdir of a "
                        "pre-training run, an official .pth/.safetensors, or '' to train from scratch")

  def __init__(self, config):
    super().__init__(config)
    if config.data.num_classes < 1:
      raise ValueError("config.data.num_classes=0 must be resolved before the method is built "
                       "(amd_jax.train.loop.resolve_data_fields counts the classes in the data)")
    f = config.finetune
    self.model = classifier.classifier_from_config(
        config.model, num_classes=config.data.num_classes, pool=f.pool, head_init_scale=f.head_init_scale,
        distill=self.distill)
    self.mix = mixup.config_from(f)

  # --- interface ----------------------------------------------------------
  def init_with_axes(self, rng, example_batch):
    return self.model.init(rng, example_batch[self.input_key()])["params"]

  def mixed_batch(self, rng, batch):
    return mixup.mix_batch(rng, batch[self.input_key()], batch["label"], self.config.data.num_classes, self.mix)

  def loss(self, params, teacher_params, batch, rng):
    del teacher_params
    k_mix, k_drop = jax.random.split(rng)
    x, targets, mix_metrics = self.mixed_batch(k_mix, batch)
    logits, _ = self.model.apply({"params": params}, x, train=True, rngs={"dropout": k_drop})
    loss = losses.soft_cross_entropy(logits, targets)
    return loss, {"loss_ce": loss, **mix_metrics}

  def predict(self, params, batch) -> jax.Array:
    """Logits [B, C] at test time (both heads averaged when distilled)."""
    return classifier.predict_logits(*self.model.apply({"params": params}, batch[self.input_key()]))

  def features(self, params, batch):
    return self.model.apply({"params": params}, batch[self.input_key()], features=True)

  def layer_scales(self, params):
    """Per-parameter lr multipliers (layer-wise decay), or None when switched off."""
    decay = self.config.finetune.layer_decay
    if decay >= 1.0:
      return None
    return layer_decay.layer_decay_scales(params, self.model.encoder.depth, decay)

  def load_pretrained(self, params):
    """`params` with the encoder replaced by config.finetune.init's (host arrays), or None (scratch)."""
    source = self.config.finetune.init
    if not source:
      logging.warning("config.finetune.init is empty: the classifier is trained FROM SCRATCH")
      return None
    loaded = load_encoder(source, self.config, expected=params["encoder"])
    out = dict(params)
    out["encoder"] = loaded
    return out

  def flops_per_example(self, example_batch):
    return {"student": classifier_flops(self.model, example_batch[self.input_key()]), "teacher": 0.0}


def classifier_flops(model: classifier.Classifier, x) -> float:
  enc = model.encoder
  grid = vit.token_grid(x.shape[1:], enc.patch_size, enc.tubelet_size if x.ndim == 5 else 0)
  patch_dim = int(np.prod(x.shape[1:])) // grid.num_tokens
  tokens = grid.num_tokens + int(enc.cls_token) + int(enc.dist_token)
  total = flops.linear_flops(grid.num_tokens, patch_dim, enc.width)
  total += flops.stack_flops(tokens, enc.width, enc.depth, enc.mlp_ratio)
  total += flops.linear_flops(1 + int(model.distill), enc.width, model.num_classes)
  return total


# Encoder params a pre-trained checkpoint may lack, started fresh: the distillation token
# (pre-training has none) and, for cls pooling, a final norm (fine-tuned mean-pool checkpoints drop it).
FRESH_OK = ("dist_token", "norm")


def _encoder_of_run(params: dict, source: str) -> dict:
  """The encoder a run hands over, by the method that trained it (TinyMIM switches off its last MLP)."""
  saved = weights.read_run_config(source)
  if saved is None or saved.get("method") not in methods.REGISTRY:
    return params["encoder"]
  run_method = methods.get_method(weights.merge_config(methods.known_fields(saved["method"]), saved))
  return run_method.encoder_for_transfer(params)


def load_encoder(source: str, config, expected):
  """Pre-trained encoder params from a workdir, a PyTorch file or a save_pretrained folder, fitted to
  the `expected` tree (host arrays).

  The pre-training encoder's final `norm` is dropped for mean pooling (fc_norm replaces it);
  a distillation token is started fresh. Anything else that does not fit stops the run
  with the missing / unexpected / mis-shaped keys.
  """
  return weights.load_encoder(source, config.model, expected, data_cfg=config.data, field="config.finetune.init",
                              hand_over=lambda params: _encoder_of_run(params, source), fresh_ok=FRESH_OK,
                              what="pre-trained encoder", fit_field="config.model")


class SpecificDistillation(Finetune):
  """G2SD specific distillation: distillation token + head, a frozen fine-tuned teacher classifier."""

  distill = True
  has_teacher = True

  @staticmethod
  def extra_config() -> ml_collections.ConfigDict:
    teacher = config_base.teacher_config("B")
    teacher.pool = "mean"   # the fine-tuned teacher's pooling (MAE fine-tuning: mean + fc_norm)
    return ml_collections.ConfigDict(dict(
        finetune=finetune_fields(),
        teacher=teacher,
        distill=dict(
            kind="hard",       # hard: CE to the teacher's argmax (G2SD, DeiT) | soft: KL at `temperature`
            alpha=0.5,         # weight of the distillation head's loss; 1 - alpha on the class head
            temperature=1.0,   # soft only
        ),
    ))

  @staticmethod
  def validate_config(config) -> None:
    Finetune.validate_config(config)
    validate_model(config.teacher.model, config.data, "teacher.model")
    d, t = config.distill, config.teacher
    if not config.model.cls_token:
      raise ConfigError("g2sd_sd needs config.model.cls_token=True: the distillation token follows the cls token")
    if t.pool not in POOLS:
      raise ConfigError(f"config.teacher.pool={t.pool!r} is not valid: allowed: {', '.join(POOLS)}")
    if d.kind not in ("hard", "soft"):
      raise ConfigError(f"config.distill.kind={d.kind!r} is not valid: allowed: hard, soft")
    if not 0.0 <= d.alpha <= 1.0:
      raise ConfigError(f"config.distill.alpha={d.alpha!r} is not valid: must be in [0, 1]")
    if not d.temperature > 0:
      raise ConfigError(f"config.distill.temperature={d.temperature!r} is not valid: must be > 0")

  def __init__(self, config):
    super().__init__(config)
    t = config.teacher
    self.teacher = classifier.classifier_from_config(t.model, num_classes=config.data.num_classes, pool=t.pool)
    self.teacher_parts = ("encoder", "fc_norm", "head") if t.pool == "mean" else ("encoder", "head")

  def teacher_init_with_axes(self, rng, example_batch):
    return self.teacher.init(rng, example_batch[self.input_key()])["params"]

  def loss(self, params, teacher_params, batch, rng):
    k_mix, k_drop = jax.random.split(rng)
    x, targets, mix_metrics = self.mixed_batch(k_mix, batch)
    # The teacher sees the very batch the student sees (mixed), in eval mode, frozen.
    t_logits, _ = self.teacher.apply({"params": jax.lax.stop_gradient(teacher_params)}, x)
    t_logits = jax.lax.stop_gradient(t_logits)
    logits, dist_logits = self.model.apply({"params": params}, x, train=True, rngs={"dropout": k_drop})
    d = self.config.distill
    loss_cls = losses.soft_cross_entropy(logits, targets)
    loss_dist = losses.logit_distillation(dist_logits, t_logits, temperature=d.temperature, hard=d.kind == "hard")
    loss = (1.0 - d.alpha) * loss_cls + d.alpha * loss_dist
    agree = jnp.mean(jnp.argmax(dist_logits, -1) == jnp.argmax(t_logits, -1)).astype(jnp.float32)
    return loss, {"loss_ce": loss_cls, "loss_distill": loss_dist, "teacher_agreement": agree, **mix_metrics}

  def flops_per_example(self, example_batch):
    x = example_batch[self.input_key()]
    return {"student": classifier_flops(self.model, x), "teacher": classifier_flops(self.teacher, x)}
