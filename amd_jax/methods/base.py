"""The interface every method implements, and everything the loop, the evaluation and the pictures may
ask of it. Every hook is declared here with its default; a method overrides what it has.

  extra_config() -> ConfigDict        config fields the method adds (e.g. config.amd); they define the run,
                                      so resuming a workdir with other values is refused
  validate_config(config)              raise amd_jax.errors.ConfigError on a bad value of the method's fields
  init(rng, example_batch) -> params   the trained parameters (a pytree of float32 arrays)
  init_with_axes(rng, example_batch)   the same, each leaf boxed with its logical axis names (what a
                                      method implements; the loop lays the state out from them)
  loss(params, teacher_params, batch, rng) -> (scalar, metrics dict of scalars)
  has_teacher / teacher_parts / teacher_init(rng, example_batch) (and teacher_init_with_axes)
                                      a frozen teacher: which parts of a teacher source it needs, and the
                                      architecture the loaded weights must fit
  features(params, batch) -> [B, D]   frozen features (linear probe, kNN)
  is_classifier / predict(params, batch) -> logits [B, C]
                                      classifiers (fine-tuning): evaluated top-1/top-5
  can_reconstruct / reconstruct(params, batch, rng) -> dict of images
                                      pictures of masked views and reconstructions
  encoder_for_transfer(params)         the encoder another run fine-tunes from (host arrays)
  layer_scales(params), load_pretrained(params)
                                      fine-tuning: per-parameter lr factors, a pre-trained start
  flops_per_example(example_batch)     analytic matmul FLOPs, for throughput and MFU
"""
from __future__ import annotations

import abc
from typing import Any

import jax
import ml_collections

from amd_jax.models import logical

Params = Any
Metrics = dict[str, jax.Array]


class Method(abc.ABC):
  """Base class; subclasses are registered in amd_jax.methods.REGISTRY."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  # --- configuration -----------------------------------------------------------------------
  @staticmethod
  def extra_config() -> ml_collections.ConfigDict:
    """Fields this method adds to the base config (their defaults)."""
    return ml_collections.ConfigDict()

  @staticmethod
  def validate_config(config) -> None:
    """Check the method's own fields (config.model is checked for every method before this);
    raise errors.ConfigError."""
    del config

  # --- training ------------------------------------------------------------------------------
  @abc.abstractmethod
  def init_with_axes(self, rng: jax.Array, example_batch: dict) -> Params:
    """The parameters as the models create them: every leaf boxed with the logical names of its axes
    (amd_jax.models.logical). jax.eval_shape of it gives the loop the names its shardings come from."""

  def init(self, rng: jax.Array, example_batch: dict) -> Params:
    """The trained parameters as plain float32 arrays (what loss, features and checkpoints hold)."""
    return logical.unbox(self.init_with_axes(rng, example_batch))

  @abc.abstractmethod
  def loss(self, params: Params, teacher_params: Params | None, batch: dict, rng: jax.Array
           ) -> tuple[jax.Array, Metrics]:
    ...

  has_teacher: bool = False
  # Which parts of a teacher run's params the loader brings: ("encoder",) gives the bare encoder
  # params; more (G2SD: ("encoder", "decoder")) give {part: params}.
  teacher_parts: tuple[str, ...] = ("encoder",)

  def teacher_init_with_axes(self, rng: jax.Array, example_batch: dict) -> Params:
    """teacher_init's params boxed with their logical axis names (how the loop lays the teacher out)."""
    raise NotImplementedError(f"{type(self).__name__} has no teacher")

  def teacher_init(self, rng: jax.Array, example_batch: dict) -> Params:
    """Randomly initialised teacher params: their structure is what a loaded teacher must match.

    The loop loads the real weights (amd_jax.weights.load_teacher); the teacher is frozen,
    never in the optimizer state and never written into the student's checkpoints.
    """
    return logical.unbox(self.teacher_init_with_axes(rng, example_batch))

  def flops_per_example(self, example_batch: dict) -> dict[str, float]:
    """Analytic matmul FLOPs per example: {'student': fwd, 'teacher': fwd}. Used for MFU."""
    del example_batch
    return {"student": 0.0, "teacher": 0.0}

  # --- evaluation and pictures ---------------------------------------------------------------
  @abc.abstractmethod
  def features(self, params: Params, batch: dict) -> jax.Array:
    ...

  def input_key(self) -> str:
    return "video" if self.config.data.modality == "video" else "image"

  is_classifier: bool = False

  def predict(self, params: Params, batch: dict) -> jax.Array:
    """Logits [B, C] (classifiers only)."""
    raise NotImplementedError(f"{type(self).__name__} is not a classifier")

  can_reconstruct: bool = False
  encoder = None   # the student's models.vit.Encoder, where there is one (pictures draw its attention)

  def reconstruct(self, params: Params, batch: dict, rng: jax.Array) -> dict:
    """{'visible', 'visible_mask', 'reconstruction'[, 'teacher_visible', 'teacher_visible_mask']} images."""
    raise NotImplementedError(f"{type(self).__name__} draws no reconstructions")

  # --- handing weights on ----------------------------------------------------------------------
  def encoder_for_transfer(self, params: Params) -> Params:
    """The encoder params a fine-tuning run (or a teacher) takes from this method's run (host arrays)."""
    return params["encoder"]

  def layer_scales(self, params: Params):
    """Per-parameter lr multipliers (layer-wise lr decay) for the optimizer, or None."""
    del params
    return None

  def load_pretrained(self, params: Params):
    """Freshly initialised `params` with pre-trained weights put in (host arrays), or None."""
    del params
    return None
