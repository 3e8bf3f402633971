"""Forward-mode differentiation (jax.jvp, jax.linearize, forward-over-reverse) through the encoder.

On CPU the encoder's attention runs per head with `vit.softmax_last`, whose custom JVP gives both modes;
these tests compare it with the explicit attention path (jax.nn.softmax, taken when a block returns its
attention internals) and with central finite differences.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from amd_jax.models import logical, vit

W, D, H = 32, 2, 4


def encoders(**kw):
  """(the encoder as configured, the same encoder on the explicit attention path)."""
  fast = vit.Encoder(W, D, H, patch_size=4, **kw)
  explicit = vit.Encoder(W, D, H, patch_size=4, attn_layers=tuple(range(1, D + 1)), **kw)
  return fast, explicit


def inputs(seed=0, shape=(2, 8, 8, 3)):
  keys = jax.random.split(jax.random.PRNGKey(seed), 2)
  return jax.random.normal(keys[0], shape), jax.random.normal(keys[1], shape)


def params_of(model, x):
  return logical.unbox(model.init(jax.random.PRNGKey(7), x))


def max_err(a, b):
  return float(jnp.max(jnp.abs(a - b)))


def test_cpu_path_uses_the_custom_jvp_softmax():
  fast, explicit = encoders()
  x, _ = inputs()
  p = params_of(fast, x)
  text = str(jax.make_jaxpr(lambda x: fast.apply(p, x)[0])(x))
  if jax.default_backend() == "cpu":
    assert "custom_jvp_call" in text   # the per-head attention with softmax_last is what is tested below
  assert "custom_vjp_call" not in text


@pytest.mark.parametrize("keep", [False, True])
def test_jvp_and_linearize_through_the_encoder(keep):
  fast, explicit = encoders()
  x, t = inputs(shape=(2, 16, 16, 3))   # 16 tokens; `keep` encodes 7 of them
  idx = jnp.asarray([[0, 2, 5, 7, 9, 11, 14], [1, 3, 4, 8, 10, 12, 15]]) if keep else None
  p = params_of(fast, x)
  f = jax.jit(lambda x: fast.apply(p, x, idx)[0])
  g = lambda x: explicit.apply(p, x, idx)[0]
  jvp = jax.jit(jax.jvp, static_argnums=0)
  y, dy = jvp(f, (x,), (t,))
  y_ref, dy_ref = jvp(g, (x,), (t,))
  assert max_err(y, y_ref) < 1e-5
  assert max_err(dy, dy_ref) < 1e-4 and float(jnp.max(jnp.abs(dy))) > 0.1
  y_lin, lin = jax.linearize(f, x)
  lin = jax.jit(lin)
  assert max_err(y_lin, y) < 1e-6 and max_err(lin(t), dy) < 1e-5
  assert max_err(lin(2.0 * t), 2.0 * dy) < 1e-5   # a linear map
  # Central differences in float32: agreement to about 1e-3 of the tangent's scale.
  eps = 1e-2
  fd = (f(x + eps * t) - f(x - eps * t)) / (2 * eps)
  assert max_err(fd, dy) < 2e-3 * float(jnp.max(jnp.abs(dy)))


def test_jvp_with_respect_to_parameters():
  fast, explicit = encoders()
  x, _ = inputs(1)
  p = params_of(fast, x)
  tangent = jax.tree.map(lambda a: jax.random.normal(jax.random.PRNGKey(a.size), a.shape) * 0.1, p)
  jvp = jax.jit(jax.jvp, static_argnums=0)
  _, dy = jvp(lambda q: fast.apply(q, x)[0], (p,), (tangent,))
  _, dy_ref = jvp(lambda q: explicit.apply(q, x)[0], (p,), (tangent,))
  assert max_err(dy, dy_ref) < 1e-4 and float(jnp.max(jnp.abs(dy))) > 0.01


def test_reverse_and_forward_over_reverse_match_the_explicit_path():
  fast, explicit = encoders()
  x, t = inputs(2)
  p = params_of(fast, x)
  loss = lambda model: (lambda x: jnp.sum(jnp.sin(model.apply(p, x)[0])))
  grad, grad_ref = jax.jit(jax.grad(loss(fast)))(x), jax.jit(jax.grad(loss(explicit)))(x)
  assert max_err(grad, grad_ref) < 1e-4
  # Hessian-vector product: the JVP of the backward pass (which runs softmax_last's transposed rule).
  jvp = jax.jit(jax.jvp, static_argnums=0)
  _, hvp = jvp(jax.grad(loss(fast)), (x,), (t,))
  _, hvp_ref = jvp(jax.grad(loss(explicit)), (x,), (t,))
  assert max_err(hvp, hvp_ref) < 1e-3 * max(1.0, float(jnp.max(jnp.abs(hvp_ref))))


def test_linearize_through_a_scanned_rematerialised_video_encoder():
  plain = vit.Encoder(W, D, H, patch_size=4, tubelet_size=2, cls_token=False, qkv_bias="qv", pos_emb="sincos1d")
  scanned = vit.Encoder(W, D, H, patch_size=4, tubelet_size=2, cls_token=False, qkv_bias="qv", pos_emb="sincos1d",
                        scan=True, remat="full")
  x, t = inputs(3, shape=(2, 4, 8, 8, 3))
  p = params_of(plain, x)
  sp = {"params": vit.stack_blocks(p["params"], D)}
  _, dy = jax.jit(jax.jvp, static_argnums=0)(lambda x: plain.apply(p, x)[0], (x,), (t,))
  _, lin = jax.linearize(lambda x: scanned.apply(sp, x)[0], x)
  assert max_err(jax.jit(lin)(t), dy) < 1e-4 and float(jnp.max(jnp.abs(dy))) > 0.1
