"""Methods behind one interface (amd_jax.methods.base.Method), and the registry that names them.

`get_method(config)` maps config.method to its class; a new method is one module here plus one
line in REGISTRY. Imports are lazy so a method's dependencies load only when it is used.
"""
from __future__ import annotations

import importlib

import ml_collections

from amd_jax import config_base

# name -> (module, class)
REGISTRY: dict[str, tuple[str, str]] = {
    "mae": ("amd_jax.methods.mae", "MAE"),
    "videomae": ("amd_jax.methods.mae", "VideoMAE"),
    "amd": ("amd_jax.methods.amd", "AMD"),
    "dmae": ("amd_jax.methods.dmae", "DMAE"),
    "tinymim": ("amd_jax.methods.tinymim", "TinyMIM"),
    "g2sd": ("amd_jax.methods.g2sd", "G2SD"),
    "finetune": ("amd_jax.methods.finetune", "Finetune"),
    "g2sd_sd": ("amd_jax.methods.finetune", "SpecificDistillation"),
}


def get_method_class(name: str):
  if name not in REGISTRY:
    raise ValueError(f"config.method={name!r} is not a known method; allowed: {', '.join(sorted(REGISTRY))}")
  module, cls = REGISTRY[name]
  return getattr(importlib.import_module(module), cls)


def get_method(config):
  return get_method_class(config.method)(config)


def known_fields(method_name: str) -> ml_collections.ConfigDict:
  """The base config plus the fields the method adds (Method.extra_config), at their defaults."""
  known = config_base.base_config()
  for key, value in get_method_class(method_name).extra_config().items():
    known[key] = value
  return known


def method_field_names(method_name: str) -> tuple[str, ...]:
  """Top-level config fields the method adds (e.g. 'amd', 'teacher')."""
  return tuple(get_method_class(method_name).extra_config().keys())
