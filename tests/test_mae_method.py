"""Tests for amd_jax.methods.mae (ImageMAE and VideoMAE pre-training) on tiny configs.

Pixel targets are checked against NumPy references (MAE's per-patch norm on the normalised image;
VideoMAE's per-patch-per-channel norm on the un-normalised clip) by handing the method a "perfect"
decoder output: the loss must then be zero and the reconstruction must be the input.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from amd_jax import masking
from amd_jax.config_base import base_config
from amd_jax.methods import get_method

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tiny_config(method):
  c = base_config()
  c.method = method
  c.model.update(variant="tiny", patch_size=4)
  c.decoder.update(width=32, depth=1, num_heads=2)
  c.norm_pix_loss = True
  if method == "mae":
    c.data.update(modality="image", channels=1, image_size=16, mean="0.2860", std="0.3530")
    c.model.update(cls_token=True, qkv_bias="fused", pos_emb="sincos2d")
    c.mask.update(ratio=0.75, kind="random")
  else:
    c.data.update(modality="video", channels=3, image_size=16, num_frames=4,
                  mean=",".join(map(str, MEAN)), std=",".join(map(str, STD)))
    c.model.update(cls_token=False, qkv_bias="qv", pos_emb="sincos1d", tubelet_size=2)
    c.mask.update(ratio=0.9, kind="tube")  # 16 tokens per frame -> 2 kept per frame
  return c


def batch_for(method, seed=0):
  r = np.random.default_rng(seed)
  if method == "mae":
    return {"image": jnp.asarray(r.normal(size=(4, 16, 16, 1)), jnp.float32)}
  return {"video": jnp.asarray(r.normal(size=(2, 4, 16, 16, 3)), jnp.float32)}


# ----------------------------------------------------------------------------- NumPy references


def np_patchify(x, p, tub=0):
  if x.ndim == 5:
    b, T, H, W, c = x.shape
    x = x.reshape(b, T // tub, tub, H // p, p, W // p, p, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, (T // tub) * (H // p) * (W // p), tub * p * p, c)
  b, H, W, c = x.shape
  x = x.reshape(b, H // p, p, W // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (H // p) * (W // p), p * p * c)


def np_pixel_target(method, x):
  x = np.asarray(x, np.float64)
  if method == "mae":  # per patch over all values, on the normalised image
    t = np_patchify(x, 4)
    return (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True, ddof=1) + 1e-6)
  raw = x * np.asarray(STD) + np.asarray(MEAN)  # un-normalise to [0, 1] first
  t = np_patchify(raw, 4, 2)
  t = (t - t.mean(-2, keepdims=True)) / (t.std(-2, keepdims=True, ddof=1) + 1e-6)
  return t.reshape(t.shape[0], t.shape[1], -1)


def np_gather(x, idx):
  return x[np.arange(x.shape[0])[:, None], np.asarray(idx)]


# ----------------------------------------------------------------------------- fixtures


def _train(method_name, steps=30, lr=2e-3):
  method = get_method(tiny_config(method_name))
  batch = batch_for(method_name)
  params = jax.jit(method.init)(jax.random.PRNGKey(0), batch)  # jit: cheaper than many eager random ops
  opt = optax.adam(lr)
  rng = jax.random.PRNGKey(1)  # fixed: the same masks every step, so the objective is fixed

  @jax.jit
  def step(params, opt_state):
    (loss, metrics), grads = jax.value_and_grad(lambda p: method.loss(p, None, batch, rng), has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, metrics, grads

  state = opt.init(params)
  losses, first_grads, first_metrics = [], None, None
  p = params
  for _ in range(steps):
    p, state, loss, metrics, grads = step(p, state)
    losses.append(float(loss))
    if first_grads is None:
      first_grads, first_metrics = grads, metrics
  return dict(method=method, params=params, losses=np.asarray(losses), grads=first_grads, metrics=first_metrics)


@pytest.fixture(scope="module", params=["mae", "videomae"])
def trained(request):
  return request.param, _train(request.param)


# ----------------------------------------------------------------------------- init / training


def test_init_param_tree(trained):
  name, run = trained
  params = run["params"]
  assert set(params) == {"encoder", "decoder"}
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(params))
  enc, dec = params["encoder"], params["decoder"]
  assert enc["patch_embed"]["proj"]["kernel"].shape[-1] == 32  # tiny: 32 wide, 2 deep, 2 heads
  assert {k for k in enc if k.startswith("blocks_")} == {"blocks_0", "blocks_1"}
  assert ("cls_token" in enc) == (name == "mae")
  if name == "mae":
    assert enc["patch_embed"]["proj"]["kernel"].shape == (4, 4, 1, 32)
    assert "bias" in dec["embed"] and "bias" in enc["blocks_0"]["attn"]["qkv"]       # decoder_embed has bias
    assert dec["head"]["kernel"].shape == (32, 4 * 4 * 1)
  else:
    assert enc["patch_embed"]["proj"]["kernel"].shape == (2, 4, 4, 3, 32)
    assert "bias" not in dec["embed"]                                             # encoder_to_decoder: no bias
    assert "q_bias" in enc["blocks_0"]["attn"] and "bias" not in enc["blocks_0"]["attn"]["qkv"]
    assert dec["head"]["kernel"].shape == (32, 2 * 4 * 4 * 3)
  assert {k for k in dec if k.startswith("blocks_")} == {"blocks_0"}


def test_init_follows_mae_recipe(trained):
  """Linear / patch-embed kernels xavier-uniform (patch embed as a flattened Linear), biases 0 (q/v biases
  included), LayerNorm 1/0, cls and mask tokens small normal (std .02)."""
  _, run = trained
  flat = jax.tree_util.tree_flatten_with_path(run["params"])[0]
  for path, leaf in flat:
    name, v = jax.tree_util.keystr(path), np.asarray(leaf, np.float64)
    last = path[-1].key
    if last == "kernel":
      fan_in, fan_out = int(np.prod(v.shape[:-1])), v.shape[-1]
      bound = np.sqrt(6.0 / (fan_in + fan_out))
      assert np.abs(v).max() <= bound * (1 + 1e-6), name
      assert np.abs(v).max() > 0.8 * bound, name
      assert abs(v.std() / (bound / np.sqrt(3)) - 1) < 0.15, name
    elif last in ("bias", "q_bias", "v_bias"):
      assert np.all(v == 0), name
    elif last == "scale":
      assert np.all(v == 1), name
    elif last in ("cls_token", "mask_token"):
      assert 0 < v.std() < 0.04 and np.abs(v).max() < 0.1, name
    else:
      raise AssertionError(f"unexpected parameter {name}")


def test_loss_finite_and_reported(trained):
  _, run = trained
  assert np.all(np.isfinite(run["losses"]))
  assert float(run["metrics"]["loss_rec"]) == pytest.approx(run["losses"][0], rel=1e-6)
  # A norm-pix target has unit variance per patch: an untrained decoder starts near 1, not near 0.
  assert 0.3 < run["losses"][0] < 5.0


def test_loss_decreases_with_adam(trained):
  _, run = trained
  losses = run["losses"]
  assert losses[-1] < 0.75 * losses[0], losses
  assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_gradients_reach_encoder_and_decoder(trained):
  _, run = trained
  grads = run["grads"]
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  dead = [jax.tree_util.keystr(path) for path, g in flat if not np.any(np.asarray(g) != 0)]
  assert not dead, f"parameters without gradient: {dead}"
  for part in ("encoder", "decoder"):
    norm = np.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree_util.tree_leaves(grads[part])))
    assert np.isfinite(norm) and norm > 0


# ----------------------------------------------------------------------------- targets through the method


def _perfect_reconstruction(name, x):
  """A stand-in for MAE.reconstruction whose prediction is the NumPy reference target at mask.masked."""
  target = np_pixel_target(name, x)

  def reconstruction(params, x_, mask, rng, train=True):
    pred = jnp.asarray(np_gather(target, mask.masked), jnp.float32)
    return pred, None, {}

  return reconstruction


@pytest.mark.parametrize("name", ["mae", "videomae"])
def test_pixel_target_matches_reference(name):
  method = get_method(tiny_config(name))
  x = batch_for(name)[method.input_key()]
  np.testing.assert_allclose(np.asarray(method.pixel_target(x)), np_pixel_target(name, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["mae", "videomae"])
def test_loss_is_zero_for_perfect_prediction(name):
  method = get_method(tiny_config(name))
  batch = batch_for(name)
  x = batch[method.input_key()]
  method.reconstruction = _perfect_reconstruction(name, x)
  loss, _ = method.loss(None, None, batch, jax.random.PRNGKey(3))
  assert abs(float(loss)) < 1e-8


@pytest.mark.parametrize("name", ["mae", "videomae"])
def test_loss_is_masked_mean_square_error(name):
  """A zero prediction gives mean(target^2) over the MASKED tokens (the mask the loss handed to the model)."""
  method = get_method(tiny_config(name))
  batch = batch_for(name)
  x = batch[method.input_key()]
  seen = {}

  def reconstruction(params, x_, mask, rng, train=True):
    seen["mask"] = mask
    return jnp.zeros(mask.masked.shape + (np_pixel_target(name, x).shape[-1],), jnp.float32), None, {}

  method.reconstruction = reconstruction
  loss, _ = method.loss(None, None, batch, jax.random.PRNGKey(4))
  mask = seen["mask"]
  n = np_pixel_target(name, x).shape[1]
  kept = {"mae": int(16 * 0.25), "videomae": 2 * (16 - int(0.9 * 16))}[name]
  assert mask.keep.shape[1] == kept and mask.masked.shape[1] == n - kept
  want = np.mean(np_gather(np_pixel_target(name, x), mask.masked) ** 2)
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)


@pytest.mark.parametrize("name", ["mae", "videomae"])
def test_reconstruct_perfect_prediction_gives_input(name):
  """reconstruct() un-normalises the prediction with the true patch statistics and pastes the visible
  patches back: for a perfect prediction the reconstruction is the input itself."""
  method = get_method(tiny_config(name))
  batch = batch_for(name)
  x = batch[method.input_key()]
  method.reconstruction = _perfect_reconstruction(name, x)
  out = method.reconstruct(None, batch, jax.random.PRNGKey(5))
  assert out["reconstruction"].shape == x.shape and out["visible"].shape == x.shape
  np.testing.assert_array_equal(np.asarray(out["input"]), np.asarray(x))
  # The visible view holds the input on visible patches and zeros on masked ones.
  mask = masking.random_mask(jax.random.PRNGKey(5), x.shape[0], method.mask_spec(x), method.config.mask.ratio)
  tub = 2 if x.ndim == 5 else 0
  vis_tokens = np_patchify(np.asarray(out["visible"]), 4, tub).reshape(x.shape[0], 16 * (1 + int(tub > 0)), -1)
  x_tokens = np_patchify(np.asarray(x), 4, tub).reshape(vis_tokens.shape)
  np.testing.assert_array_equal(np_gather(vis_tokens, mask.keep), np_gather(x_tokens, mask.keep))
  assert np.all(np_gather(vis_tokens, mask.masked) == 0)
  np.testing.assert_allclose(np.asarray(out["reconstruction"]), np.asarray(x), rtol=1e-3, atol=1e-3)


def test_features_are_mean_of_patch_tokens(trained):
  name, run = trained
  method, params = run["method"], run["params"]
  batch = batch_for(name)
  feats = method.features(params, batch)
  x = batch[method.input_key()]
  assert feats.shape == (x.shape[0], 32)
  tokens, _ = method.encoder.apply({"params": params["encoder"]}, x)
  if name == "mae":
    tokens = tokens[:, 1:]  # the cls token is not a patch
  np.testing.assert_allclose(np.asarray(feats), np.asarray(tokens).mean(1), rtol=1e-5, atol=1e-6)
