"""Tests for amd_jax.losses against NumPy and torch.nn.functional references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from amd_jax import losses


def _pair(shape=(3, 5, 7), seed=0, scale=2.0):
  r = np.random.default_rng(seed)
  return (r.normal(scale=scale, size=shape).astype(np.float32),
          r.normal(scale=scale, size=shape).astype(np.float32))


def np_log_softmax(x, axis=-1):
  x = x.astype(np.float64)
  m = x.max(axis=axis, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def np_kl(student, teacher):
  """KL(softmax(t) || softmax(s)) summed over the last axis, mean over the rest."""
  lt, ls = np_log_softmax(teacher), np_log_softmax(student)
  return np.mean(np.sum(np.exp(lt) * (lt - ls), axis=-1))


# ----------------------------------------------------------------------------- regression


def test_l2_matches_numpy_and_torch():
  p, t = _pair()
  got = float(losses.regression(jnp.asarray(p), jnp.asarray(t), "l2"))
  np.testing.assert_allclose(got, np.mean((p.astype(np.float64) - t) ** 2), rtol=1e-5)
  np.testing.assert_allclose(got, F.mse_loss(torch.from_numpy(p), torch.from_numpy(t)).item(), rtol=1e-5)


def test_default_kind_is_l2():
  p, t = _pair(seed=1)
  assert float(losses.regression(jnp.asarray(p), jnp.asarray(t))) == pytest.approx(
      float(losses.regression(jnp.asarray(p), jnp.asarray(t), "l2")))


def test_l1_matches_numpy_and_torch():
  p, t = _pair(seed=2)
  got = float(losses.regression(jnp.asarray(p), jnp.asarray(t), "l1"))
  np.testing.assert_allclose(got, np.mean(np.abs(p.astype(np.float64) - t)), rtol=1e-5)
  np.testing.assert_allclose(got, F.l1_loss(torch.from_numpy(p), torch.from_numpy(t)).item(), rtol=1e-5)


@pytest.mark.parametrize("beta", [1.0, 2.0, 0.5])
def test_smooth_l1_matches_torch(beta):
  p, t = _pair(seed=3, scale=2.0)  # differences on both sides of beta
  d = np.abs(p.astype(np.float64) - t)
  assert (d < beta).any() and (d > beta).any()
  got = float(losses.regression(jnp.asarray(p), jnp.asarray(t), "smooth_l1", beta=beta))
  want_np = np.mean(np.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta))
  want_torch = F.smooth_l1_loss(torch.from_numpy(p), torch.from_numpy(t), beta=beta).item()
  np.testing.assert_allclose(got, want_np, rtol=1e-5)
  np.testing.assert_allclose(got, want_torch, rtol=1e-5)


def test_smooth_l1_beta_changes_value():
  p, t = _pair(seed=4)
  a = float(losses.regression(jnp.asarray(p), jnp.asarray(t), "smooth_l1", beta=1.0))
  b = float(losses.regression(jnp.asarray(p), jnp.asarray(t), "smooth_l1", beta=2.0))
  assert abs(a - b) > 1e-3


def test_regression_bf16_inputs_reduce_in_float32():
  p, t = _pair(shape=(4, 64, 96), seed=5)
  pb, tb = jnp.asarray(p, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  for kind in ("l2", "l1", "smooth_l1"):
    got = losses.regression(pb, tb, kind)
    assert got.dtype == jnp.float32 and got.shape == ()
  # The value equals the float64 mean of the bf16-rounded inputs.
  pr, tr = np.asarray(pb.astype(jnp.float32), np.float64), np.asarray(tb.astype(jnp.float32), np.float64)
  np.testing.assert_allclose(float(losses.regression(pb, tb, "l2")), np.mean((pr - tr) ** 2), rtol=1e-5)


def test_regression_unknown_kind_raises():
  p, t = _pair(seed=6)
  with pytest.raises(ValueError, match="huber"):
    losses.regression(jnp.asarray(p), jnp.asarray(t), "huber")


def test_regression_gradient_l2():
  p, t = _pair(shape=(2, 3), seed=7)
  g = jax.grad(lambda a: losses.regression(a, jnp.asarray(t), "l2"))(jnp.asarray(p))
  np.testing.assert_allclose(np.asarray(g), 2 * (p - t) / p.size, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- relation KL / CE


def test_relation_kl_matches_numpy():
  s, t = _pair(shape=(2, 3, 5, 5), seed=8, scale=3.0)
  got = float(losses.relation_kl(jnp.asarray(s), jnp.asarray(t)))
  np.testing.assert_allclose(got, np_kl(s, t), rtol=1e-5, atol=1e-7)


def test_relation_kl_direction_and_torch():
  """torch.nn.functional.kl_div(log q_s, p_t, reduction='sum') / rows is KL(teacher || student)."""
  s, t = _pair(shape=(4, 6, 9), seed=9, scale=2.0)
  got = float(losses.relation_kl(jnp.asarray(s), jnp.asarray(t)))
  ls = torch.log_softmax(torch.from_numpy(s).double(), -1)
  pt = torch.softmax(torch.from_numpy(t).double(), -1)
  want = (F.kl_div(ls, pt, reduction="sum") / (4 * 6)).item()
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Swapping the arguments gives a different value (KL is not symmetric).
  assert abs(got - np_kl(t, s)) > 1e-3


def test_relation_kl_zero_for_equal_and_shift_invariant():
  s, _ = _pair(shape=(2, 4, 8), seed=10)
  assert abs(float(losses.relation_kl(jnp.asarray(s), jnp.asarray(s)))) < 1e-6
  assert abs(float(losses.relation_kl(jnp.asarray(s), jnp.asarray(s + 5.0)))) < 1e-5


def test_relation_kl_large_logits_stable():
  s, t = _pair(shape=(2, 8), seed=11, scale=200.0)
  got = float(losses.relation_kl(jnp.asarray(s), jnp.asarray(t)))
  assert np.isfinite(got)
  np.testing.assert_allclose(got, np_kl(s, t), rtol=1e-4)


def test_soft_cross_entropy_matches_numpy_and_torch():
  r = np.random.default_rng(12)
  logits = r.normal(size=(6, 10)).astype(np.float32)
  tgt = r.uniform(size=(6, 10)).astype(np.float32)
  tgt /= tgt.sum(-1, keepdims=True)
  got = float(losses.soft_cross_entropy(jnp.asarray(logits), jnp.asarray(tgt)))
  want = -np.mean(np.sum(tgt * np_log_softmax(logits), -1))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got, F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(tgt)).item(),
                             rtol=1e-5)


def test_soft_cross_entropy_one_hot_equals_hard_ce():
  r = np.random.default_rng(13)
  logits = r.normal(size=(5, 7)).astype(np.float32)
  labels = r.integers(0, 7, size=5)
  got = float(losses.soft_cross_entropy(jnp.asarray(logits), jax.nn.one_hot(labels, 7)))
  want = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
  np.testing.assert_allclose(got, want, rtol=1e-5)


# ----------------------------------------------------------------------------- logit distillation


def test_logit_distillation_hard_is_ce_to_teacher_argmax():
  r = np.random.default_rng(14)
  s = r.normal(size=(8, 10)).astype(np.float32)
  t = r.normal(size=(8, 10)).astype(np.float32)
  got = float(losses.logit_distillation(jnp.asarray(s), jnp.asarray(t), hard=True))
  labels = t.argmax(-1)
  want = -np.mean(np_log_softmax(s)[np.arange(8), labels])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # hard is the default, and the temperature does not enter the hard loss.
  assert float(losses.logit_distillation(jnp.asarray(s), jnp.asarray(t))) == pytest.approx(got, rel=1e-6)
  assert float(losses.logit_distillation(jnp.asarray(s), jnp.asarray(t), temperature=4.0)) == pytest.approx(
      got, rel=1e-6)


def test_logit_distillation_hard_no_gradient_to_teacher():
  r = np.random.default_rng(15)
  s = jnp.asarray(r.normal(size=(4, 6)), jnp.float32)
  t = jnp.asarray(r.normal(size=(4, 6)), jnp.float32)
  g = jax.grad(lambda tt: losses.logit_distillation(s, tt, hard=True))(t)
  assert np.all(np.asarray(g) == 0)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_logit_distillation_soft_matches_reference(temperature):
  r = np.random.default_rng(16)
  s = r.normal(scale=3, size=(8, 10)).astype(np.float32)
  t = r.normal(scale=3, size=(8, 10)).astype(np.float32)
  got = float(losses.logit_distillation(jnp.asarray(s), jnp.asarray(t), temperature=temperature, hard=False))
  want = np_kl(s / temperature, t / temperature) * temperature**2
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Hinton / DeiT soft distillation in torch: kl_div(log_softmax(s/T), log_softmax(t/T), log_target) * T^2 / B.
  ls = torch.log_softmax(torch.from_numpy(s).double() / temperature, -1)
  lt = torch.log_softmax(torch.from_numpy(t).double() / temperature, -1)
  want_torch = (F.kl_div(ls, lt, reduction="sum", log_target=True) * temperature**2 / 8).item()
  np.testing.assert_allclose(got, want_torch, rtol=1e-5)
