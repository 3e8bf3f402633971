"""The interface every pre-training method implements, and what the loop may ask of it.

The loop knows a method only through this interface:
  init(rng, example_batch) -> params                     (a pytree of float32 arrays)
  loss(params, teacher_params, batch, rng) -> (scalar, metrics dict of scalars)
  teacher_init(rng, example_batch) -> teacher params      (only methods with a teacher; gives the
                                                          architecture the loaded weights must fit)
  features(params, batch) -> [B, D] frozen features      (linear probe / kNN)
  reconstruct(params, batch, rng) -> dict of images      (pictures; optional)
  predict(params, batch) -> logits [B, C]                (classifiers only: is_classifier = True)
  layer_scales(params), load_pretrained(params)          (fine-tuning: layer decay, pre-trained init)
"""
from __future__ import annotations

import abc
from typing import Any

import jax
import ml_collections

Params = Any
Metrics = dict[str, jax.Array]


class Method(abc.ABC):
  """Base class; subclasses are registered in amd_jax.methods.REGISTRY."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  @abc.abstractmethod
  def init(self, rng: jax.Array, example_batch: dict) -> Params:
    ...

  @abc.abstractmethod
  def loss(self, params: Params, teacher_params: Params | None, batch: dict, rng: jax.Array
           ) -> tuple[jax.Array, Metrics]:
    ...

  has_teacher: bool = False
  # Which parts of a teacher run's params the loader brings: ("encoder",) gives the bare encoder
  # params; more (G2SD: ("encoder", "decoder")) give {part: params}.
  teacher_parts: tuple[str, ...] = ("encoder",)

  def teacher_init(self, rng: jax.Array, example_batch: dict) -> Params:
    """Randomly initialised teacher params: their structure is what a loaded teacher must match.

    The loop loads the real weights (train.checkpoint.load_teacher); the teacher is
    frozen, never in the optimizer state and never written into the student's checkpoints.
    """
    raise NotImplementedError(f"{type(self).__name__} has no teacher")

  @abc.abstractmethod
  def features(self, params: Params, batch: dict) -> jax.Array:
    ...

  def input_key(self) -> str:
    return "video" if self.config.data.modality == "video" else "image"

  # Classifiers (fine-tuning) answer `predict(params, batch) -> logits [B, C]`; the loop then
  # evaluates top-1/top-5 on config.data.eval_split.
  is_classifier: bool = False

  def predict(self, params: Params, batch: dict) -> jax.Array:
    raise NotImplementedError(f"{type(self).__name__} is not a classifier")

  def layer_scales(self, params: Params):
    """Per-parameter lr multipliers (layer-wise lr decay) for the optimizer, or None."""
    del params
    return None

  def load_pretrained(self, params: Params):
    """Freshly initialised `params` with pre-trained weights put in (host arrays), or None."""
    del params
    return None

  def flops_per_example(self, example_batch: dict) -> dict[str, float]:
    """Analytic matmul FLOPs per example: {'student': fwd, 'teacher': fwd}. Used for MFU."""
    return {"student": 0.0, "teacher": 0.0}
