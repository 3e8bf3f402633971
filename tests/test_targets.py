"""Tests for amd_jax.targets: patchify / unpatchify and the MAE / VideoMAE pixel targets.

Expected values come from small NumPy re-implementations of the official code
(MAE's models_mae.patchify on NCHW, VideoMAE's einops rearrange and
engine_for_pretraining normalisation), never from the code under test.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amd_jax import targets


def _rng(seed=0):
  return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- NumPy references


def np_mae_patchify_nchw(imgs, p):
  """facebookresearch/mae models_mae.MaskedAutoencoderViT.patchify, verbatim in NumPy (NCHW input)."""
  assert imgs.shape[2] == imgs.shape[3] and imgs.shape[2] % p == 0
  h = w = imgs.shape[2] // p
  c = imgs.shape[1]
  x = imgs.reshape(imgs.shape[0], c, h, p, w, p)
  x = np.einsum("nchpwq->nhwpqc", x)
  return x.reshape(imgs.shape[0], h * w, p * p * c)


def np_videomae_tokens(videos_btHWc, p, tub):
  """VideoMAE: rearrange(videos, 'b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c') on a
  channel-first clip, written with reshape/transpose. Input given channel-last, converted to NCTHW."""
  v = np.moveaxis(videos_btHWc, -1, 1)  # b c T H W
  b, c, T, H, W = v.shape
  t, h, w = T // tub, H // p, W // p
  x = v.reshape(b, c, t, tub, h, p, w, p)
  x = x.transpose(0, 2, 4, 6, 3, 5, 7, 1)  # b t h w p0 p1 p2 c
  return x.reshape(b, t * h * w, tub * p * p, c)


def np_image_target(imgs_nhwc, p):
  """MAE norm_pix_loss: per patch over all values, (v - mean) / sqrt(var_unbiased + 1e-6)."""
  x = np_mae_patchify_nchw(np.moveaxis(imgs_nhwc, -1, 1).astype(np.float64), p)
  mean = x.mean(-1, keepdims=True)
  var = x.var(-1, keepdims=True, ddof=1)
  return (x - mean) / np.sqrt(var + 1e-6)


def np_video_target(videos, p, tub):
  """VideoMAE: per patch per channel, (v - mean) / (std_unbiased + 1e-6), channel innermost."""
  x = np_videomae_tokens(videos.astype(np.float64), p, tub)
  mean = x.mean(-2, keepdims=True)
  std = x.std(-2, keepdims=True, ddof=1)
  x = (x - mean) / (std + 1e-6)
  return x.reshape(x.shape[0], x.shape[1], -1)


# ----------------------------------------------------------------------------- patchify


@pytest.mark.parametrize("channels", [1, 3])
def test_image_patchify_matches_mae_order(channels):
  x = _rng(1).normal(size=(2, 12, 12, channels)).astype(np.float32)
  got = np.asarray(targets.patchify(jnp.asarray(x), 4))
  want = np_mae_patchify_nchw(np.moveaxis(x, -1, 1), 4)
  assert got.shape == (2, 9, 4 * 4 * channels)
  np.testing.assert_array_equal(got, want)


def test_video_patchify_matches_videomae_order():
  x = _rng(2).normal(size=(2, 4, 8, 12, 3)).astype(np.float32)  # T=4, H=8, W=12
  got = np.asarray(targets.patchify(jnp.asarray(x), 4, tubelet_size=2))
  want = np_videomae_tokens(x, 4, 2).reshape(2, 2 * 2 * 3, -1)  # (p0 p1 p2 c), channel innermost
  assert got.shape == (2, 12, 2 * 4 * 4 * 3)
  np.testing.assert_array_equal(got, want)


def test_patch_token_order_is_row_major():
  """Token (t, i, j) holds the pixels of frame block t, patch row i, patch column j."""
  T, H, W, p, tub = 4, 8, 12, 4, 2
  x = np.zeros((1, T, H, W, 1), np.float32)
  for t in range(T // tub):
    for i in range(H // p):
      for j in range(W // p):
        x[0, t * tub:(t + 1) * tub, i * p:(i + 1) * p, j * p:(j + 1) * p] = 100 * t + 10 * i + j
  tok = np.asarray(targets.patchify(jnp.asarray(x), p, tub))[0]
  expected_ids = [100 * t + 10 * i + j for t in range(2) for i in range(2) for j in range(3)]
  np.testing.assert_array_equal(tok[:, 0], expected_ids)
  assert np.all(tok == tok[:, :1])  # each token is constant: it holds exactly one tubelet


def test_image_unpatchify_round_trip():
  x = jnp.asarray(_rng(3).normal(size=(2, 8, 12, 3)).astype(np.float32))
  tok = targets.patchify(x, 4)
  back = targets.unpatchify(tok, (2, 3), 4, 3)
  np.testing.assert_array_equal(np.asarray(back), np.asarray(x))


def test_video_unpatchify_round_trip():
  x = jnp.asarray(_rng(4).normal(size=(2, 4, 8, 12, 3)).astype(np.float32))
  tok = targets.patchify(x, 4, 2)
  back = targets.unpatchify(tok, (2, 2, 3), 4, 3, tubelet_size=2)
  np.testing.assert_array_equal(np.asarray(back), np.asarray(x))


def test_unpatchify_inverts_reference_patchify():
  """unpatchify is the inverse of the REFERENCE layout, not merely of the library's own patchify."""
  x = _rng(5).normal(size=(2, 8, 8, 3)).astype(np.float32)
  ref_tokens = np_mae_patchify_nchw(np.moveaxis(x, -1, 1), 4)
  back = targets.unpatchify(jnp.asarray(ref_tokens), (2, 2), 4, 3)
  np.testing.assert_array_equal(np.asarray(back), x)


# ----------------------------------------------------------------------------- targets


def test_image_target_norm_pix_matches_reference():
  x = _rng(6).normal(loc=0.3, scale=2.0, size=(3, 8, 8, 3)).astype(np.float32)
  got = np.asarray(targets.image_target(jnp.asarray(x), 4, norm_pix=True))
  want = np_image_target(x, 4)
  assert got.shape == (3, 4, 48) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # The unbiased variance matters: a biased (ddof=0) normalisation gives a different target.
  biased = np_mae_patchify_nchw(np.moveaxis(x, -1, 1).astype(np.float64), 4)
  biased = (biased - biased.mean(-1, keepdims=True)) / np.sqrt(biased.var(-1, keepdims=True) + 1e-6)
  assert np.abs(got - biased).max() > 1e-3


def test_image_target_eps_inside_sqrt():
  """A constant patch has var 0: the target is 0 / sqrt(1e-6) = 0, finite; a near-constant one is scaled
  by 1/sqrt(var + 1e-6), which distinguishes eps inside the sqrt from eps added to the std."""
  x = np.zeros((1, 4, 4, 1), np.float32)
  x[0, :, :, 0] = 1e-4 * np.arange(16).reshape(4, 4)  # var ~2.3e-7, below eps
  got = np.asarray(targets.image_target(jnp.asarray(x), 4))
  want = np_image_target(x, 4)
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
  tok = np_mae_patchify_nchw(np.moveaxis(x, -1, 1).astype(np.float64), 4)
  other = (tok - tok.mean(-1, keepdims=True)) / (tok.std(-1, keepdims=True, ddof=1) + 1e-6)
  assert np.abs(got - other).max() > 1e-1
  const = np.asarray(targets.image_target(jnp.ones((1, 4, 4, 1)), 4))
  assert np.all(np.isfinite(const)) and np.all(const == 0)


def test_image_target_raw_when_norm_pix_false():
  x = _rng(7).normal(size=(2, 8, 8, 3)).astype(np.float32)
  got = np.asarray(targets.image_target(jnp.asarray(x), 4, norm_pix=False))
  np.testing.assert_array_equal(got, np_mae_patchify_nchw(np.moveaxis(x, -1, 1), 4))


def test_image_target_bf16_input_gives_float32():
  x = jnp.asarray(_rng(8).normal(size=(1, 8, 8, 3)), jnp.bfloat16)
  assert targets.image_target(x, 4).dtype == jnp.float32


def test_video_target_matches_reference():
  x = _rng(9).uniform(size=(2, 4, 8, 8, 3)).astype(np.float32)
  x[..., 1] *= 0.1  # channels with different spreads: per-channel stats differ from per-patch stats
  got = np.asarray(targets.video_target(jnp.asarray(x), 4, 2, norm_pix=True))
  want = np_video_target(x, 4, 2)
  assert got.shape == (2, 8, 2 * 4 * 4 * 3)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # Each (token, channel) slice is standardised: mean 0, unbiased std ~1.
  per_channel = got.reshape(2, 8, 32, 3)
  np.testing.assert_allclose(per_channel.mean(axis=2), 0, atol=1e-5)
  np.testing.assert_allclose(per_channel.std(axis=2, ddof=1), 1, atol=1e-3)


def test_video_target_channel_innermost():
  """The value for pixel (p0, p1, p2) of channel c sits at index ((p0*P + p1)*P + p2)*C + c."""
  x = _rng(10).uniform(size=(1, 2, 4, 4, 3)).astype(np.float32)
  raw = np.asarray(targets.video_target(jnp.asarray(x), 4, 2, norm_pix=False))[0, 0]
  for (p0, p1, p2, c) in [(0, 0, 0, 0), (0, 0, 0, 2), (1, 2, 3, 1), (0, 3, 1, 2)]:
    assert raw[((p0 * 4 + p1) * 4 + p2) * 3 + c] == x[0, p0, p1, p2, c]


def test_video_target_raw_when_norm_pix_false():
  x = _rng(11).uniform(size=(2, 4, 8, 8, 3)).astype(np.float32)
  got = np.asarray(targets.video_target(jnp.asarray(x), 4, 2, norm_pix=False))
  np.testing.assert_array_equal(got, np_videomae_tokens(x, 4, 2).reshape(2, 8, -1))
  # ... and it is the same layout as patchify.
  np.testing.assert_array_equal(got, np.asarray(targets.patchify(jnp.asarray(x), 4, 2)))


def test_video_target_eps_added_to_std():
  """VideoMAE divides by (std + 1e-6), not sqrt(var + 1e-6): visible on a near-constant patch."""
  x = np.zeros((1, 2, 4, 4, 1), np.float32)
  x[0, :, :, :, 0] = 1e-4 * np.arange(32).reshape(2, 4, 4)
  got = np.asarray(targets.video_target(jnp.asarray(x), 4, 2))
  want = np_video_target(x, 4, 2)
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
  tok = np_videomae_tokens(x.astype(np.float64), 4, 2)
  other = (tok - tok.mean(-2, keepdims=True)) / np.sqrt(tok.var(-2, keepdims=True, ddof=1) + 1e-6)
  assert np.abs(got - other.reshape(1, 1, -1)).max() > 1e-2


def test_targets_under_jit():
  x = jnp.asarray(_rng(12).uniform(size=(2, 4, 8, 8, 3)).astype(np.float32))
  f = jax.jit(targets.video_target, static_argnums=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(f(x, 4, 2, True)), np_video_target(np.asarray(x), 4, 2),
                             rtol=1e-4, atol=1e-4)


def test_image_target_matches_transformers_vitmae_loss():
  """transformers' ViTMAEForPreTraining with norm_pix_loss: its loss equals the masked MSE between its
  logits and our image_target (NHWC version of its NCHW input)."""
  import torch
  from transformers import ViTMAEConfig, ViTMAEForPreTraining
  torch.manual_seed(0)
  cfg = ViTMAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     image_size=16, patch_size=4, num_channels=3, decoder_hidden_size=16,
                     decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=32,
                     mask_ratio=0.75, norm_pix_loss=True)
  model = ViTMAEForPreTraining(cfg).eval()
  pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 1.5 + 0.2
  noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    out = model(pixel_values=pixels, noise=noise)
  logits = out.logits.numpy().astype(np.float64)
  mask = out.mask.numpy().astype(np.float64)  # 1 = removed (reconstructed)
  tgt = np.asarray(targets.image_target(jnp.asarray(pixels.permute(0, 2, 3, 1).numpy()), 4)).astype(np.float64)
  ours = (((logits - tgt) ** 2).mean(-1) * mask).sum() / mask.sum()
  np.testing.assert_allclose(ours, out.loss.item(), rtol=1e-4)
