"""Optimizer: weight-decay mask, warmup + cosine schedule, gradient clipping, layer-wise lr decay."""
from __future__ import annotations

import math
import os
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amd_jax import config_base, config_validation
from amd_jax.errors import ConfigError
from amd_jax.methods import get_method, layer_decay
from amd_jax.train import loop, optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(arg=None):
  spec = importlib.util.spec_from_file_location("_test_tiny_cfg", os.path.join(REPO, "configs", "test_tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _paths(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def _init_params(config):
  method = get_method(config)
  key = "video" if config.data.modality == "video" else "image"
  d = config.data
  shape = (2, d.num_frames, d.image_size, d.image_size, d.channels) if key == "video" else \
      (2, d.image_size, d.image_size, d.channels)
  return jax.eval_shape(lambda: method.init(jax.random.PRNGKey(0), {key: jnp.zeros(shape)}))


@pytest.fixture(scope="module")
def mae_params():
  return _init_params(tiny())


@pytest.fixture(scope="module")
def videomae_params():
  return _init_params(tiny("video"))


def optim_cfg(**overrides):
  c = config_base.optim_config()
  c.update(overrides)
  return c


# ------------------------------------------------------------------ decay mask


def test_decay_mask_only_kernels(mae_params, videomae_params):
  for params in (mae_params, videomae_params):
    mask = _paths(optim.decay_mask(params))
    assert set(mask) == set(_paths(params))
    for path, decayed in mask.items():
      assert decayed == path.endswith("/kernel"), path
    assert any(mask.values()) and not all(mask.values())


def test_decay_mask_named_leaves(mae_params, videomae_params):
  mae = _paths(optim.decay_mask(mae_params))
  vid = _paths(optim.decay_mask(videomae_params))
  expected = {
      "encoder/cls_token": False,
      "decoder/mask_token": False,
      "encoder/norm/scale": False,
      "encoder/norm/bias": False,
      "encoder/blocks_0/norm1/scale": False,
      "encoder/blocks_0/attn/qkv/bias": False,
      "encoder/blocks_0/attn/qkv/kernel": True,
      "encoder/blocks_0/attn/proj/bias": False,
      "encoder/blocks_0/mlp/fc1/kernel": True,
      "encoder/patch_embed/proj/kernel": True,
      "encoder/patch_embed/proj/bias": False,
      "decoder/head/kernel": True,
      "decoder/head/bias": False,
  }
  for path, want in expected.items():
    assert mae[path] is want, path
  for path in ("encoder/blocks_0/attn/q_bias", "encoder/blocks_0/attn/v_bias", "decoder/blocks_0/attn/q_bias"):
    assert vid[path] is False, path
  assert vid["encoder/blocks_1/attn/qkv/kernel"] is True


def test_weight_decay_applies_only_where_masked():
  """Zero gradients: AdamW moves kernels by -lr*wd*p and nothing else."""
  params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
            "norm": {"scale": jnp.ones((4,))}, "cls_token": jnp.ones((1, 1, 4))}
  cfg = optim_cfg(lr=0.1, weight_decay=0.5, min_lr=0.1)
  tx, _ = optim.make_optimizer(cfg, batch_size=256, total_steps=10, warmup_steps=0)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * np.ones((3, 4)), rtol=1e-6)
  for leaf in (updates["dense"]["bias"], updates["norm"]["scale"], updates["cls_token"]):
    np.testing.assert_array_equal(leaf, 0.0)


# -------------------------------------------------------------------- schedule


@pytest.mark.parametrize("batch", [256, 1024])
def test_schedule_warmup_then_cosine(batch):
  cfg = optim_cfg(base_lr=1.5e-4, lr=-1.0, min_lr=1e-6)
  total, warmup = 100, 10
  s = optim.make_schedule(cfg, batch_size=batch, total_steps=total, warmup_steps=warmup)
  peak = 1.5e-4 * batch / 256
  assert optim.learning_rate(cfg, batch) == pytest.approx(peak)
  assert float(s(0)) == pytest.approx(0.0, abs=1e-12)
  assert float(s(5)) == pytest.approx(peak / 2, rel=1e-5)        # linear warmup
  assert float(s(warmup)) == pytest.approx(peak, rel=1e-5)
  for step in (10, 30, 55, 80, 100):
    frac = (step - warmup) / (total - warmup)
    want = 1e-6 + (peak - 1e-6) * 0.5 * (1 + math.cos(math.pi * frac))
    assert float(s(step)) == pytest.approx(want, rel=1e-4), step
  assert float(s(total)) == pytest.approx(1e-6, rel=1e-4)
  values = np.array([float(s(i)) for i in range(total + 1)])
  assert np.all(np.diff(values[:warmup + 1]) > 0)
  assert np.all(np.diff(values[warmup:]) <= 1e-12)


def test_schedule_explicit_lr_overrides_base_lr():
  cfg = optim_cfg(base_lr=1.5e-4, lr=3e-3, min_lr=0.0)
  assert optim.learning_rate(cfg, 4096) == 3e-3
  s = optim.make_schedule(cfg, batch_size=4096, total_steps=20, warmup_steps=5)
  assert float(s(5)) == pytest.approx(3e-3, rel=1e-6)
  assert float(s(20)) == pytest.approx(0.0, abs=1e-9)


def test_schedule_warmup_longer_than_run_still_reaches_peak():
  cfg = optim_cfg(lr=1e-3)
  s = optim.make_schedule(cfg, batch_size=8, total_steps=4, warmup_steps=50)
  values = [float(s(i)) for i in range(5)]
  assert all(np.isfinite(values))
  assert max(values) == pytest.approx(1e-3, rel=1e-6)


def _schedule_config(**optim):
  c = config_base.base_config()
  c.batch_size, c.total_steps, c.num_epochs = 8, -1, 2.5
  c.optim.update(optim)
  return c


def test_schedule_steps_from_epochs():
  c = _schedule_config(warmup_epochs=0.5)
  s = loop.schedule_for(c, num_train_examples=80)   # 10 steps per epoch
  assert (s.steps_per_epoch, s.total_steps, s.warmup_steps) == (10, 25, 5)
  c.total_steps, c.num_epochs, c.optim.warmup_steps, c.optim.warmup_epochs = 7, -1.0, 3, -1.0
  s = loop.schedule_for(c, num_train_examples=80)
  assert (s.total_steps, s.warmup_steps) == (7, 3)


def test_warmup_fraction_transfers_across_data_set_sizes():
  """The same fraction is the same share of the run on a small and a large data set; epochs are not."""
  by_fraction = _schedule_config(warmup_fraction=0.1)
  by_epochs = _schedule_config(warmup_epochs=0.3)
  for examples in (400, 40_000):   # 50 and 5,000 steps per epoch
    s = loop.schedule_for(by_fraction, num_train_examples=examples)
    assert s.warmup_steps == round(0.1 * s.total_steps)
  small, large = (loop.schedule_for(by_epochs, num_train_examples=n) for n in (400, 40_000))
  assert small.warmup_steps / small.total_steps == pytest.approx(large.warmup_steps / large.total_steps, abs=0.01)
  assert small.warmup_steps == 15 and large.warmup_steps == 1500


def test_warmup_longer_than_the_run_is_cut_with_a_warning(library_log):
  c = _schedule_config(warmup_steps=160)
  c.total_steps, c.num_epochs = 3, -1.0
  s = loop.schedule_for(c, num_train_examples=80)
  assert s.warmup_steps < s.total_steps == 3
  assert "as long as the run" in library_log.text


def test_only_one_warmup_form_is_accepted():
  c = tiny()
  c.optim.update(warmup_steps=2, warmup_fraction=0.1)
  with pytest.raises(ConfigError, match="at most one of config.optim.warmup_steps"):
    config_validation.validate(c)


def test_schedule_drives_the_optimizer():
  """The update of a parameter with a constant gradient follows the schedule (Adam: |u| ~ lr)."""
  cfg = optim_cfg(lr=1e-2, min_lr=0.0, weight_decay=0.0)
  tx, s = optim.make_optimizer(cfg, batch_size=8, total_steps=20, warmup_steps=4)
  p = {"w": jnp.ones((3,))}
  state = tx.init(p)
  for step in range(8):
    u, state = tx.update({"w": jnp.full((3,), 0.3)}, state, p)
    np.testing.assert_allclose(u["w"], -float(s(step)), rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------- clipping


def _updates(tx, grads_seq, params):
  state = tx.init(params)
  out = []
  for g in grads_seq:
    u, state = tx.update(g, state, params)
    out.append(u)
  return out


def test_grad_clip_acts_on_raw_gradients_before_adam():
  params = {"a": {"kernel": jnp.zeros((2, 2))}, "b": {"bias": jnp.zeros((3,))}}
  rng = np.random.default_rng(0)
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * scale, jnp.float32), params)
           for scale in (0.1, 100.0, 0.01, 30.0)]
  clip = 1.0

  def clipped(g):
    norm = float(np.sqrt(sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(g))))
    return jax.tree.map(lambda x: x * min(1.0, clip / norm), g)

  base = dict(lr=1e-2, min_lr=1e-2, weight_decay=0.0)
  tx_clip, _ = optim.make_optimizer(optim_cfg(grad_clip=clip, **base), batch_size=8, total_steps=10,
                                    warmup_steps=0)
  tx_plain, _ = optim.make_optimizer(optim_cfg(grad_clip=0.0, **base), batch_size=8, total_steps=10,
                                     warmup_steps=0)
  got = _updates(tx_clip, grads, params)
  want = _updates(tx_plain, [clipped(g) for g in grads], params)
  unclipped = _updates(tx_plain, grads, params)
  for g_u, w_u in zip(got, want):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), g_u, w_u)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got[1]),
                                                            jax.tree.leaves(unclipped[1])))
  assert diff > 1e-4  # clipping changed the update of the large-gradient step


def test_grad_clip_bounds_the_update():
  """With a huge Adam eps the update is ~ -lr*g/eps, so its norm is bounded by lr*clip/eps."""
  params = {"w": {"kernel": jnp.zeros((16,))}}
  g = {"w": {"kernel": jnp.full((16,), 1e3)}}  # norm 4000
  common = dict(lr=1.0, min_lr=1.0, weight_decay=0.0, eps=1e6, b1=0.0, b2=0.0)
  for clip, bound in ((0.5, 0.5e-6), (0.0, 4000e-6)):
    tx, _ = optim.make_optimizer(optim_cfg(grad_clip=clip, **common), batch_size=8, total_steps=10,
                                 warmup_steps=0)
    u, _ = tx.update(g, tx.init(params), params)
    norm = float(jnp.linalg.norm(u["w"]["kernel"]))
    assert norm == pytest.approx(bound, rel=1e-3), clip


def test_frozen_mask_keeps_params_still():
  params = {"student": {"kernel": jnp.ones((2, 2))}, "teacher": {"kernel": jnp.ones((2, 2))}}
  tx, _ = optim.make_optimizer(optim_cfg(lr=0.1, min_lr=0.1), batch_size=8, total_steps=10, warmup_steps=0,
                               frozen_mask={"student": {"kernel": False}, "teacher": {"kernel": True}})
  grads = jax.tree.map(jnp.ones_like, params)
  u, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(u["teacher"]["kernel"], 0.0)
  assert float(jnp.min(jnp.abs(u["student"]["kernel"]))) > 0.05


# --------------------------------------------------------------- layer decay


def _classifier_tree(depth):
  leaf = jnp.zeros((2, 2))
  tree = {"encoder": {"patch_embed": {"proj": {"kernel": leaf, "bias": leaf}}, "cls_token": leaf,
                      "pos_embed": leaf, "norm": {"scale": leaf}},
          "fc_norm": {"scale": leaf, "bias": leaf}, "head": {"kernel": leaf, "bias": leaf},
          "decoder": {"blocks_0": {"mlp": {"fc1": {"kernel": leaf}}}}}
  for i in range(depth):
    tree["encoder"][f"blocks_{i}"] = {"attn": {"qkv": {"kernel": leaf}}, "norm1": {"scale": leaf}}
  return tree


@pytest.mark.parametrize("depth,decay", [(2, 0.5), (12, 0.75)])
def test_layer_decay_scales_exact(depth, decay):
  scales = _paths(layer_decay.layer_decay_scales(_classifier_tree(depth), depth, decay))
  top = depth + 1
  expect = {"encoder/patch_embed/proj/kernel": decay**top, "encoder/patch_embed/proj/bias": decay**top,
            "encoder/cls_token": decay**top, "encoder/pos_embed": decay**top,
            "encoder/norm/scale": 1.0, "fc_norm/scale": 1.0, "fc_norm/bias": 1.0, "head/kernel": 1.0,
            "head/bias": 1.0, "decoder/blocks_0/mlp/fc1/kernel": 1.0}
  for i in range(depth):
    expect[f"encoder/blocks_{i}/attn/qkv/kernel"] = decay**(top - (i + 1))
    expect[f"encoder/blocks_{i}/norm1/scale"] = decay**(top - (i + 1))
  assert set(scales) == set(expect)
  for path, want in expect.items():
    assert scales[path] == pytest.approx(want, rel=1e-12), path
  assert layer_decay.layer_id("encoder/blocks_10/mlp/fc2/kernel", depth=12) == 11


def test_layer_decay_scales_on_real_encoder(mae_params):
  enc = {"encoder": mae_params["encoder"]}
  scales = _paths(layer_decay.layer_decay_scales(enc, 2, 0.5))
  assert scales["encoder/patch_embed/proj/kernel"] == 0.125
  assert scales["encoder/cls_token"] == 0.125
  assert scales["encoder/blocks_0/attn/qkv/kernel"] == 0.25
  assert scales["encoder/blocks_1/mlp/fc2/bias"] == 0.5
  assert scales["encoder/norm/scale"] == 1.0


def test_layer_decay_scales_scanned_encoder():
  """A scanned encoder stacks its blocks on a leading axis: layer i of the stack must get decay**(depth-i)."""
  c = tiny()
  c.model.scan = True
  params = _init_params(c)
  enc = {"encoder": params["encoder"]}
  depth, decay = 2, 0.5
  scales = _paths(layer_decay.layer_decay_scales(enc, depth, decay))
  leaves = _paths(enc)
  path = next(p for p in leaves if "attn/qkv/kernel" in p)
  assert leaves[path].shape[0] == depth  # the stacked layer axis
  per_layer = np.broadcast_to(np.asarray(scales[path]), leaves[path].shape)
  for i in range(depth):
    np.testing.assert_allclose(per_layer[i], decay**(depth - i), err_msg=f"{path} layer {i}")


def test_layer_scales_enter_the_update():
  params = {"encoder": {"patch_embed": {"proj": {"kernel": jnp.zeros((2,))}},
                        "blocks_0": {"fc": {"kernel": jnp.zeros((2,))}}},
            "head": {"kernel": jnp.zeros((2,))}}
  scales = layer_decay.layer_decay_scales(params, depth=1, decay=0.5)
  tx, _ = optim.make_optimizer(optim_cfg(lr=1.0, min_lr=1.0, weight_decay=0.0), batch_size=8, total_steps=10,
                               warmup_steps=0, layer_scales=scales)
  u, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  np.testing.assert_allclose(u["encoder"]["patch_embed"]["proj"]["kernel"], -0.25, rtol=1e-5)
  np.testing.assert_allclose(u["encoder"]["blocks_0"]["fc"]["kernel"], -0.5, rtol=1e-5)
  np.testing.assert_allclose(u["head"]["kernel"], -1.0, rtol=1e-5)
