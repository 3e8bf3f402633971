"""Losses shared by the methods. Pure jnp; they know no model and no loop.

All return scalars (means) in float32 whatever the input dtype, so bf16
activations never accumulate a reduction in bf16.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

REGRESSIONS = ("l2", "l1", "smooth_l1")


def regression(pred: jax.Array, target: jax.Array, kind: str = "l2", beta: float = 1.0) -> jax.Array:
  """Mean element-wise regression loss.

  l2: squared error (torch MSELoss); l1: absolute error; smooth_l1: torch's
  SmoothL1Loss with `beta` (quadratic below beta, linear above).
  """
  diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
  if kind == "l2":
    return jnp.mean(jnp.square(diff))
  if kind == "l1":
    return jnp.mean(jnp.abs(diff))
  if kind == "smooth_l1":
    a = jnp.abs(diff)
    return jnp.mean(jnp.where(a < beta, 0.5 * jnp.square(a) / beta, a - 0.5 * beta))
  raise ValueError(f"unknown regression loss {kind!r}; allowed: {', '.join(REGRESSIONS)}")


def relation_kl(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """KL(softmax(teacher) || softmax(student)) summed over the last axis, mean over the rest."""
  t_logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
  s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
  return jnp.mean(kl)


def relation_logits(a: jax.Array, b: jax.Array) -> jax.Array:
  """Token-relation logits a b^T / sqrt(d) per head: [B, H, N, d] x [B, H, M, d] -> [B, H, N, M] (float32).

  TinyMIM's relations: softmax(relation_logits(q, k)) (= the attention map) and
  softmax(relation_logits(v, v)); d is each model's own head_dim.
  """
  d = a.shape[-1]
  return jnp.einsum("bhnd,bhmd->bhnm", a.astype(jnp.float32), b.astype(jnp.float32)) * (d**-0.5)


def attention_logit_mse(student_logits: jax.Array, teacher_logits: jax.Array,
                        head_mix: jax.Array | None = None) -> jax.Array:
  """MAE-lite's attention distillation: mean squared error of (head-mixed) pre-softmax attention logits.

  student_logits [B, Hs, N, N], teacher_logits [B, Ht, N, N]; head_mix [Hs, Ht] is the
  learned adapter (a 1x1 convolution over heads without bias):
    mixed[b, g, i, j] = sum_h head_mix[h, g] * student_logits[b, h, i, j].
  Mean over B * Ht * N * N. Without head_mix the head counts must match.
  """
  s = student_logits.astype(jnp.float32)
  if head_mix is not None:
    s = jnp.einsum("bhij,hg->bgij", s, head_mix.astype(jnp.float32))
  if s.shape != teacher_logits.shape:
    raise ValueError(f"attention logits of shape {s.shape} (student, after the head adapter) and "
                     f"{teacher_logits.shape} (teacher) differ; a head adapter maps student heads to teacher heads")
  return jnp.mean(jnp.square(s - teacher_logits.astype(jnp.float32)))


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Cross-entropy against soft targets (mixup / label smoothing), mean over the batch."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(targets * logp, axis=-1))


def logit_distillation(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0,
                       hard: bool = True) -> jax.Array:
  """Hard: CE to the teacher's argmax (DeiT / G2SD). Soft: T^2-scaled KL at temperature T."""
  if hard:
    labels = jax.nn.one_hot(jnp.argmax(teacher_logits, axis=-1), student_logits.shape[-1])
    return soft_cross_entropy(student_logits, labels)
  t = temperature
  return relation_kl(student_logits / t, teacher_logits / t) * t * t
