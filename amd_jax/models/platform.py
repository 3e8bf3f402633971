"""Which backend a model is being traced for.

A few layers pick a formulation per backend (vit.Dense and vit.Attention take a faster path on
XLA:CPU). They ask `target()` rather than jax.default_backend(): ahead-of-time compilation for a
TPU topology (amd_jax.aot) runs on a CPU host, where the default backend is 'cpu' although the
program is built for TPU chips, and must trace the TPU formulation.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("amd_jax_compile_target", default=None)


def target() -> str:
  """The platform being traced for: the one set by `compiling_for`, else JAX's default backend."""
  return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
  """Trace models inside this block for `platform` ('cpu', 'gpu', 'tpu') whatever the host's backend."""
  token = _TARGET.set(platform)
  try:
    yield
  finally:
    _TARGET.reset(token)
