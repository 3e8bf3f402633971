"""Tests for amd_jax.masking: static-count random / tube / nested masks and gather helpers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amd_jax import masking
from amd_jax.masking import MaskSpec

KEY = jax.random.PRNGKey(0)


def image_spec(n=196):
  return MaskSpec(num_tokens=n, tokens_per_frame=n, kind="random")


def tube_spec(frames=8, per_frame=196):
  return MaskSpec(num_tokens=frames * per_frame, tokens_per_frame=per_frame, kind="tube")


def assert_ascending(a):
  a = np.asarray(a)
  assert np.all(np.diff(a, axis=1) > 0), "indices are not strictly ascending"


def assert_partition(groups, n):
  """Per sample, the groups are disjoint and together cover 0..n-1 exactly once."""
  cat = np.concatenate([np.asarray(g) for g in groups], axis=1)
  assert cat.shape[1] == n
  np.testing.assert_array_equal(np.sort(cat, axis=1), np.broadcast_to(np.arange(n), cat.shape))


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize("n,ratio,kept", [(196, 0.75, 49), (196, 0.9, 19), (16, 0.75, 4), (10, 0.75, 2),
                                          (49, 0.5, 24)])
def test_num_visible_random_uses_mae_rounding(n, ratio, kept):
  # ImageMAE: len_keep = int(L * (1 - mask_ratio)).
  assert kept == int(n * (1 - ratio))
  assert masking.num_visible(image_spec(n), ratio) == kept


@pytest.mark.parametrize("per_frame,ratio,kept_per_frame", [(196, 0.9, 20), (196, 0.75, 49), (16, 0.9, 2),
                                                            (10, 0.75, 3)])
def test_num_visible_tube_uses_videomae_rounding(per_frame, ratio, kept_per_frame):
  # VideoMAE / AMD: num_masks_per_frame = int(mask_ratio * S); keep S - that, in every frame.
  assert kept_per_frame == per_frame - int(ratio * per_frame)
  assert masking.num_visible(tube_spec(8, per_frame), ratio) == 8 * kept_per_frame


def test_num_visible_unknown_kind_raises():
  with pytest.raises(ValueError, match="blocky"):
    masking.num_visible(MaskSpec(16, 16, "blocky"), 0.5)


# ----------------------------------------------------------------------------- random / tube masks


def test_random_mask_counts_order_partition():
  spec = image_spec(196)
  m = masking.random_mask(KEY, 4, spec, 0.75)
  assert m.keep.shape == (4, 49) and m.masked.shape == (4, 147)
  assert m.keep.dtype == jnp.int32 and m.masked.dtype == jnp.int32
  assert_ascending(m.keep)
  assert_ascending(m.masked)
  assert_partition([m.keep, m.masked], 196)
  # Samples in a batch get different masks.
  assert not np.array_equal(np.asarray(m.keep[0]), np.asarray(m.keep[1]))


def test_tube_mask_counts_order_partition_and_constancy():
  spec = tube_spec(8, 196)
  m = masking.random_mask(KEY, 3, spec, 0.9)
  assert m.keep.shape == (3, 8 * 20) and m.masked.shape == (3, 8 * 176)
  assert_ascending(m.keep)
  assert_ascending(m.masked)
  assert_partition([m.keep, m.masked], 8 * 196)
  keep = np.asarray(m.keep).reshape(3, 8, 20)
  # Frame t holds exactly the tokens t*196 .. t*196+195, and the same spatial pattern in every frame.
  frame_of = keep // 196
  np.testing.assert_array_equal(frame_of, np.broadcast_to(np.arange(8)[None, :, None], frame_of.shape))
  spatial = keep % 196
  np.testing.assert_array_equal(spatial, np.broadcast_to(spatial[:, :1], spatial.shape))
  masked_spatial = np.asarray(m.masked).reshape(3, 8, 176) % 196
  np.testing.assert_array_equal(masked_spatial, np.broadcast_to(masked_spatial[:, :1], masked_spatial.shape))


def test_tube_mask_as_boolean_grid_is_constant_over_time():
  spec = tube_spec(4, 16)
  m = masking.random_mask(jax.random.PRNGKey(7), 5, spec, 0.75)
  vis = np.zeros((5, 64), bool)
  np.put_along_axis(vis, np.asarray(m.keep), True, axis=1)
  vis = vis.reshape(5, 4, 16)
  assert np.all(vis == vis[:, :1]) and np.all(vis.sum(-1) == 4)


def test_same_key_same_mask_different_key_different_mask():
  spec = image_spec(64)
  a = masking.random_mask(jax.random.PRNGKey(1), 4, spec, 0.75)
  b = masking.random_mask(jax.random.PRNGKey(1), 4, spec, 0.75)
  c = masking.random_mask(jax.random.PRNGKey(2), 4, spec, 0.75)
  np.testing.assert_array_equal(np.asarray(a.keep), np.asarray(b.keep))
  np.testing.assert_array_equal(np.asarray(a.masked), np.asarray(b.masked))
  assert not np.array_equal(np.asarray(a.keep), np.asarray(c.keep))
  na = masking.nested_mask(jax.random.PRNGKey(1), 4, spec, 0.9, 0.75)
  nb = masking.nested_mask(jax.random.PRNGKey(1), 4, spec, 0.9, 0.75)
  nc = masking.nested_mask(jax.random.PRNGKey(2), 4, spec, 0.9, 0.75)
  np.testing.assert_array_equal(np.asarray(na.teacher), np.asarray(nb.teacher))
  assert not np.array_equal(np.asarray(na.teacher), np.asarray(nc.teacher))


@pytest.mark.parametrize("kind", ["random", "tube"])
def test_every_position_reachable_and_roughly_uniform(kind):
  spec = image_spec(16) if kind == "random" else tube_spec(2, 16)
  batch = 256
  counts = np.zeros(spec.num_tokens)
  for seed in range(4):  # several keys, a batch of samples each
    m = masking.random_mask(jax.random.PRNGKey(seed), batch, spec, 0.75)
    np.add.at(counts, np.asarray(m.keep).reshape(-1), 1)
  assert np.all(counts > 0), f"never kept: {np.flatnonzero(counts == 0)}"
  expected = 4 * batch * 4 / 16  # 4 of 16 kept per (frame of a) sample
  assert np.all(np.abs(counts - expected) < 0.25 * expected), counts


# ----------------------------------------------------------------------------- nested masks


@pytest.mark.parametrize("spec,ks,kt", [(tube_spec(8, 196), 20, 49), (image_spec(196), 19, 49)])
def test_nested_mask_structure(spec, ks, kt):
  b = 3
  m = masking.nested_mask(jax.random.PRNGKey(3), b, spec, 0.9, 0.75)
  frames = spec.num_frames
  assert m.student.shape == (b, ks * frames)
  assert m.diff.shape == (b, (kt - ks) * frames)
  assert m.masked.shape == (b, spec.num_tokens - kt * frames)
  for g in (m.student, m.diff, m.masked):
    assert_ascending(g)
  assert_partition([m.student, m.diff, m.masked], spec.num_tokens)
  # Teacher = cat(student, diff) in that order; the student's set is a strict subset of the teacher's.
  teacher = np.asarray(m.teacher)
  np.testing.assert_array_equal(teacher, np.concatenate([np.asarray(m.student), np.asarray(m.diff)], 1))
  for i in range(b):
    s, t, d = set(np.asarray(m.student[i])), set(teacher[i]), set(np.asarray(m.diff[i]))
    assert s < t
    assert d == t - s


def test_nested_tube_mask_teacher_and_diff_constant_over_time():
  spec = tube_spec(8, 196)
  m = masking.nested_mask(jax.random.PRNGKey(4), 2, spec, 0.9, 0.75)
  assert m.teacher.shape == (2, 392) and m.diff.shape == (2, 232) and m.masked.shape == (2, 1176)
  for g, k in ((m.student, 20), (m.diff, 29), (m.masked, 147)):
    sp = np.asarray(g).reshape(2, 8, k) % 196
    np.testing.assert_array_equal(sp, np.broadcast_to(sp[:, :1], sp.shape))


def test_student_mask_view():
  spec = tube_spec(8, 196)
  m = masking.nested_mask(jax.random.PRNGKey(5), 2, spec, 0.9, 0.75)
  sm = m.student_mask()
  np.testing.assert_array_equal(np.asarray(sm.keep), np.asarray(m.student))
  assert sm.masked.shape == (2, 1568 - 160)  # the student reconstructs 1408 tokens
  assert_ascending(sm.masked)
  assert_partition([sm.keep, sm.masked], 1568)
  want = np.sort(np.concatenate([np.asarray(m.diff), np.asarray(m.masked)], 1), 1)
  np.testing.assert_array_equal(np.asarray(sm.masked), want)


def test_nested_student_count_equals_random_mask_count():
  """The student's group has the size the student ratio alone would give (nesting does not change it)."""
  spec = image_spec(196)
  nm = masking.nested_mask(KEY, 2, spec, 0.9, 0.75)
  rm = masking.random_mask(KEY, 2, spec, 0.9)
  assert nm.student.shape == rm.keep.shape


@pytest.mark.parametrize("student,teacher", [(0.75, 0.9), (0.75, 0.75), (0.9, 0.91)])
def test_nested_mask_raises_when_not_nested(student, teacher):
  # (0.9, 0.91) on 196/frame: 20 vs 196 - int(178.36) = 18 -> not nested.
  with pytest.raises(ValueError, match="teacher"):
    masking.nested_mask(KEY, 2, tube_spec(2, 196), student, teacher)


# ----------------------------------------------------------------------------- jit


def test_masks_under_jit_static_shapes():
  spec = tube_spec(2, 16)
  f = jax.jit(masking.random_mask, static_argnums=(1, 2, 3))
  g = jax.jit(masking.nested_mask, static_argnums=(1, 2, 3, 4))
  key = jax.random.PRNGKey(9)
  mj, me = f(key, 3, spec, 0.75), masking.random_mask(key, 3, spec, 0.75)
  np.testing.assert_array_equal(np.asarray(mj.keep), np.asarray(me.keep))
  np.testing.assert_array_equal(np.asarray(mj.masked), np.asarray(me.masked))
  nj, ne = g(key, 3, spec, 0.9, 0.75), masking.nested_mask(key, 3, spec, 0.9, 0.75)
  np.testing.assert_array_equal(np.asarray(nj.teacher), np.asarray(ne.teacher))
  # One compiled program serves every key: the shapes do not depend on the key.
  traces = []

  @jax.jit
  def step(k):
    traces.append(1)
    return masking.random_mask(k, 3, spec, 0.75).keep

  for s in range(3):
    assert step(jax.random.PRNGKey(s)).shape == (3, 8)
  assert len(traces) == 1


def test_masks_with_fold_in_keys_under_vmap():
  spec = image_spec(16)
  keys = jax.vmap(lambda i: jax.random.fold_in(KEY, i))(jnp.arange(3))
  keeps = jax.vmap(lambda k: masking.random_mask(k, 2, spec, 0.75).keep)(keys)
  assert keeps.shape == (3, 2, 4)
  assert not np.array_equal(np.asarray(keeps[0]), np.asarray(keeps[1]))


# ----------------------------------------------------------------------------- gather / ungather


def test_gather_tokens_matches_numpy_indexing():
  r = np.random.default_rng(0)
  x = r.normal(size=(2, 10, 3)).astype(np.float32)
  idx = np.array([[0, 3, 9], [1, 2, 5]])
  got = np.asarray(masking.gather_tokens(jnp.asarray(x), jnp.asarray(idx)))
  np.testing.assert_array_equal(got, x[np.arange(2)[:, None], idx])
  # More than one trailing axis (e.g. [B, N, P, C]).
  x4 = r.normal(size=(2, 10, 4, 3)).astype(np.float32)
  got4 = np.asarray(masking.gather_tokens(jnp.asarray(x4), jnp.asarray(idx)))
  np.testing.assert_array_equal(got4, x4[np.arange(2)[:, None], idx])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ungather_round_trip_and_dtype(dtype):
  spec = tube_spec(2, 16)
  m = masking.nested_mask(jax.random.PRNGKey(11), 3, spec, 0.75, 0.5)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 32, 5)), dtype)
  parts = [masking.gather_tokens(x, g) for g in (m.student, m.diff, m.masked)]
  assert all(p.dtype == dtype for p in parts)
  back = masking.ungather_tokens(parts, [m.student, m.diff, m.masked])
  assert back.dtype == dtype and back.shape == x.shape
  np.testing.assert_array_equal(np.asarray(back.astype(jnp.float32)), np.asarray(x.astype(jnp.float32)))


def test_ungather_places_tokens_at_their_indices():
  x_vis = jnp.asarray([[[10.], [30.]]])
  x_mask = jnp.asarray([[[0.], [20.], [40.]]])
  out = masking.ungather_tokens([x_vis, x_mask], [jnp.asarray([[1, 3]]), jnp.asarray([[0, 2, 4]])])
  np.testing.assert_array_equal(np.asarray(out)[0, :, 0], [0., 10., 20., 30., 40.])


def test_ungather_under_jit():
  spec = image_spec(16)
  m = masking.random_mask(KEY, 2, spec, 0.75)
  x = jnp.arange(2 * 16 * 2, dtype=jnp.float32).reshape(2, 16, 2)
  f = jax.jit(lambda x, k, mm: masking.ungather_tokens([masking.gather_tokens(x, k),
                                                         masking.gather_tokens(x, mm)], [k, mm]))
  np.testing.assert_array_equal(np.asarray(f(x, m.keep, m.masked)), np.asarray(x))
