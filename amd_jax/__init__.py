"""amd_jax: asymmetric masked distillation (AMD) and MAE-family pre-training in JAX/Flax.

The public names below load on first use, so `import amd_jax` costs almost nothing
(no JAX, Flax or TensorFlow import until a name is touched):

  from amd_jax import Encoder, masking, get_method
  enc = amd_jax.encoder_from_config(amd_jax.model_config("S"))

Submodules: models (ViT encoder, decoders), masking, targets, losses, methods
(registry of pre-training methods), data (grain pipelines), train (the loop),
probe (kNN / linear probe), convert (PyTorch checkpoints), visualize (pictures).
docs/api.md documents every name with an example.
"""
from __future__ import annotations

import importlib
import os
import sys

from amd_jax.train import hardware as _hardware

__version__ = "0.1.0"


def _skip_absent_tpu() -> None:
  """With libtpu installed (the [tpu] extra) on a host without a TPU, JAX would initialise libtpu first and
  print screens of host-probing errors before falling back to the CPU or GPU: name the platforms instead.
  Nothing changes where JAX_PLATFORMS is set, where libtpu is absent, or on a TPU host."""
  platforms = _hardware.platforms_without_absent_tpu()
  if not platforms:
    return
  if "jax" in sys.modules:   # imported before amd_jax: still in time unless a backend has started
    sys.modules["jax"].config.update("jax_platforms", platforms)
  else:
    os.environ["JAX_PLATFORMS"] = platforms


_skip_absent_tpu()

# Submodules reachable as attributes (amd_jax.masking, ...) without importing them up front.
_SUBMODULES = ("config_base", "config_files", "config_validation", "convert", "data", "errors", "losses", "masking",
               "methods", "models", "evaluate", "mixup", "paths", "probe", "progress", "quickstart", "recipes",
               "targets", "train", "visualize", "weights")

# public name -> (module, attribute in that module)
_EXPORTS: dict[str, tuple[str, str]] = {
    # models
    "Encoder": ("amd_jax.models.vit", "Encoder"),
    "Block": ("amd_jax.models.vit", "Block"),
    "encoder_from_config": ("amd_jax.models.vit", "encoder_from_config"),
    "resolve_variant": ("amd_jax.models.vit", "resolve_variant"),
    "token_grid": ("amd_jax.models.vit", "token_grid"),
    "VARIANTS": ("amd_jax.models.vit", "VARIANTS"),
    "MaskedTokenDecoder": ("amd_jax.models.decoders", "MaskedTokenDecoder"),
    "FeaturePredictor": ("amd_jax.models.decoders", "FeaturePredictor"),
    "unbox": ("amd_jax.models.logical", "unbox"),
    # masks, targets, losses
    "Mask": ("amd_jax.masking", "Mask"),
    "NestedMask": ("amd_jax.masking", "NestedMask"),
    "MaskSpec": ("amd_jax.masking", "MaskSpec"),
    "random_mask": ("amd_jax.masking", "random_mask"),
    "nested_mask": ("amd_jax.masking", "nested_mask"),
    "gather_tokens": ("amd_jax.masking", "gather_tokens"),
    "ungather_tokens": ("amd_jax.masking", "ungather_tokens"),
    "patchify": ("amd_jax.targets", "patchify"),
    "unpatchify": ("amd_jax.targets", "unpatchify"),
    "image_target": ("amd_jax.targets", "image_target"),
    "video_target": ("amd_jax.targets", "video_target"),
    "regression": ("amd_jax.losses", "regression"),
    # methods
    "Method": ("amd_jax.methods.base", "Method"),
    "REGISTRY": ("amd_jax.methods", "REGISTRY"),
    "get_method": ("amd_jax.methods", "get_method"),
    "get_method_class": ("amd_jax.methods", "get_method_class"),
    "MAE": ("amd_jax.methods.mae", "MAE"),
    "VideoMAE": ("amd_jax.methods.mae", "VideoMAE"),
    "AMD": ("amd_jax.methods.amd", "AMD"),
    "DMAE": ("amd_jax.methods.dmae", "DMAE"),
    "TinyMIM": ("amd_jax.methods.tinymim", "TinyMIM"),
    "G2SD": ("amd_jax.methods.g2sd", "G2SD"),
    "Finetune": ("amd_jax.methods.finetune", "Finetune"),
    "SpecificDistillation": ("amd_jax.methods.finetune", "SpecificDistillation"),
    # fine-tuning parts
    "Classifier": ("amd_jax.models.classifier", "Classifier"),
    "classifier_from_config": ("amd_jax.models.classifier", "classifier_from_config"),
    "MixupConfig": ("amd_jax.mixup", "MixupConfig"),
    "mix_batch": ("amd_jax.mixup", "mix_batch"),
    "soft_cross_entropy": ("amd_jax.losses", "soft_cross_entropy"),
    "logit_distillation": ("amd_jax.losses", "logit_distillation"),
    # configs
    "base_config": ("amd_jax.config_base", "base_config"),
    "model_config": ("amd_jax.config_base", "model_config"),
    "teacher_config": ("amd_jax.config_base", "teacher_config"),
    "parse_arg": ("amd_jax.config_base", "parse_arg"),
    "parse_floats": ("amd_jax.config_base", "parse_floats"),
    "load_config": ("amd_jax.config_files", "load"),
    "parse_ints": ("amd_jax.config_base", "parse_ints"),
    "with_method_fields": ("amd_jax.recipes", "with_method_fields"),
    "validate_config": ("amd_jax.config_validation", "validate"),
    "known_fields": ("amd_jax.methods", "known_fields"),
    "ConfigError": ("amd_jax.errors", "ConfigError"),
    # running, weights, evaluation, pictures (these import TensorFlow through clu/tfds)
    "run": ("amd_jax.train.loop", "run"),   # amd_jax.train stays the subpackage
    "load_params": ("amd_jax.weights", "load_params"),
    "load_run": ("amd_jax.evaluate", "load_run"),
    "Trainer": ("amd_jax.train.loop", "Trainer"),
    "build_trainer": ("amd_jax.train.loop", "build_trainer"),
    "load_torch_encoder": ("amd_jax.convert", "load_torch_encoder"),
    "export_torch": ("amd_jax.convert", "export_torch"),
    "reconstruction_grid": ("amd_jax.visualize", "reconstruction_grid"),
    "attention_maps": ("amd_jax.visualize", "attention_maps"),
    "evaluate_workdir": ("amd_jax.evaluate", "evaluate_workdir"),
    "classification_accuracy": ("amd_jax.evaluate", "classification_accuracy"),
}

__all__ = sorted(set(_EXPORTS) | set(_SUBMODULES) | {"__version__"})


def __getattr__(name: str):
  if name in _EXPORTS:
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
  elif name in _SUBMODULES:
    value = importlib.import_module(f"{__name__}.{name}")
  else:
    raise AttributeError(f"module 'amd_jax' has no attribute {name!r}")
  globals()[name] = value  # later look-ups skip this function
  return value


def __dir__():
  return __all__
