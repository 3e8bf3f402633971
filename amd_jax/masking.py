"""Token masks from a PRNG key, with STATIC counts (jit/TPU friendly).

A mask is a set of int32 index arrays [B, k], each in ASCENDING token order (the
order the official code's x[~mask] produces, so tensors compare one-to-one with
the reference). Masks are drawn by argsort of uniform noise: the first k entries
of the permutation are kept, the rest masked, and each group is then sorted.

Kinds:
- random: one permutation over all tokens per sample (ImageMAE).
- tube: one permutation over the spatial positions of a frame per sample,
  repeated over every time slice (VideoMAE, AMD's 't_consist' generator).
- nested (asymmetric): one permutation split three ways, student-visible <
  diff < masked, so the student's visible set lies strictly inside the
  teacher's (AMD). Random or tube.

Counts follow each source: ImageMAE keeps int(N * (1 - r)); VideoMAE / AMD mask
int(r * S) positions per frame of S and keep the rest (196 -> 20 at r=0.9).
"""
from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp



@chex.dataclass(frozen=True)
class Mask:
  keep: jax.Array     # [B, K] visible tokens, ascending
  masked: jax.Array   # [B, M] hidden tokens, ascending


@chex.dataclass(frozen=True)
class NestedMask:
  student: jax.Array  # [B, Ks] seen by student and teacher
  diff: jax.Array     # [B, Kd] seen by the teacher only
  masked: jax.Array   # [B, M] seen by neither

  @property
  def teacher(self) -> jax.Array:
    """The teacher's tokens as the official code feeds them: cat([student, diff])."""
    return jnp.concatenate([self.student, self.diff], axis=1)

  def student_mask(self) -> Mask:
    """The student's own view: visible = student, masked = diff + masked (ascending)."""
    return Mask(keep=self.student, masked=jnp.sort(jnp.concatenate([self.diff, self.masked], axis=1), axis=1))


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """Static description of a mask: what jit needs to know at trace time."""
  num_tokens: int        # tokens per sample
  tokens_per_frame: int  # == num_tokens for images
  kind: str              # random | tube

  @property
  def num_frames(self) -> int:
    return self.num_tokens // self.tokens_per_frame


def num_visible(spec: MaskSpec, ratio: float) -> int:
  """Visible tokens per sample under `ratio`, using each source's rounding."""
  if spec.kind == "tube":
    s = spec.tokens_per_frame
    return (s - int(ratio * s)) * spec.num_frames
  if spec.kind == "random":
    return int(spec.num_tokens * (1 - ratio))
  raise ValueError(f"unknown mask kind {spec.kind!r}; allowed: random, tube")


def _permutation(key, batch: int, spec: MaskSpec) -> jax.Array:
  """[B, P] random permutation of the P positions a mask draws over."""
  positions = spec.tokens_per_frame if spec.kind == "tube" else spec.num_tokens
  noise = jax.random.uniform(key, (batch, positions))
  return jnp.argsort(noise, axis=1).astype(jnp.int32)


def _expand_tube(spatial_idx: jax.Array, spec: MaskSpec) -> jax.Array:
  """Spatial indices [B, k] (ascending) -> the same positions in every frame [B, T*k], ascending."""
  if spec.kind != "tube":
    return spatial_idx
  offsets = jnp.arange(spec.num_frames, dtype=jnp.int32)[:, None] * spec.tokens_per_frame
  full = spatial_idx[:, None, :] + offsets[None]
  return full.reshape(spatial_idx.shape[0], -1)


def _split(perm: jax.Array, bounds: list[int], spec: MaskSpec) -> list[jax.Array]:
  edges = [0] + bounds + [perm.shape[1]]
  return [_expand_tube(jnp.sort(perm[:, a:b], axis=1), spec) for a, b in zip(edges[:-1], edges[1:])]


def _per_frame(count: int, spec: MaskSpec) -> int:
  return count // spec.num_frames if spec.kind == "tube" else count


def random_mask(key, batch: int, spec: MaskSpec, ratio: float) -> Mask:
  """MAE random mask (kind='random') or VideoMAE tube mask (kind='tube')."""
  k = _per_frame(num_visible(spec, ratio), spec)
  keep, masked = _split(_permutation(key, batch, spec), [k], spec)
  return Mask(keep=keep, masked=masked)


def nested_mask(key, batch: int, spec: MaskSpec, student_ratio: float, teacher_ratio: float) -> NestedMask:
  """AMD's asymmetric mask: the student's visible tokens are a strict subset of the teacher's."""
  ks = _per_frame(num_visible(spec, student_ratio), spec)
  kt = _per_frame(num_visible(spec, teacher_ratio), spec)
  if not ks < kt:
    raise ValueError(f"nested mask needs fewer student-visible tokens ({ks} per frame at ratio {student_ratio}) "
                     f"than teacher-visible ({kt} at ratio {teacher_ratio}): lower the teacher's mask ratio")
  student, diff, masked = _split(_permutation(key, batch, spec), [ks, kt], spec)
  return NestedMask(student=student, diff=diff, masked=masked)


def gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [B, N, ...], idx [B, K] -> [B, K, ...] with take_along_axis (static shapes, no boolean indexing)."""
  idx = idx.astype(jnp.int32).reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def ungather_tokens(parts: list[jax.Array], indices: list[jax.Array]) -> jax.Array:
  """Inverse of gathering: tokens of disjoint index groups covering 0..N-1 -> [B, N, D] in grid order.

  Uses the inverse permutation (argsort) and a gather, never a scatter into a
  zeros array, so the result keeps the parts' dtype and shards like them.
  """
  x = jnp.concatenate(parts, axis=1)
  order = jnp.concatenate(indices, axis=1)
  inverse = jnp.argsort(order, axis=1)
  return gather_tokens(x, inverse)


__all__ = ["Mask", "NestedMask", "MaskSpec", "num_visible", "random_mask", "nested_mask",
           "gather_tokens", "ungather_tokens"]
