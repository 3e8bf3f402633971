"""Initialisation schemes: MAE's (the default; ImageMAE) and the official video code's (model.init_scheme=
'videomae', set by the official VideoMAE / AMD video recipes), compared with the statistics PyTorch gives the
official modules: Conv3d and Linear at PyTorch's default init, and timm's trunc_normal_(std=.02, a=-std, b=std).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from amd_jax.methods import get_method
from amd_jax.models import decoders, logical, vit

VIDEO = jnp.zeros((1, 2, 16, 16, 3))        # one 2x16x16 RGB tubelet
FAN_IN = 2 * 16 * 16 * 3
WIDTH = 384                                 # ViT-S


@functools.lru_cache(maxsize=None)
def patch_embedding(init_scheme: str):
  enc = vit.Encoder(width=WIDTH, depth=1, num_heads=6, patch_size=16, tubelet_size=2, cls_token=False,
                    init_scheme=init_scheme)
  params = logical.unbox(jax.jit(enc.init)(jax.random.PRNGKey(0), VIDEO))["params"]
  proj = params["patch_embed"]["proj"]
  return np.asarray(proj["kernel"]), np.asarray(proj["bias"])


def torch_conv3d():
  torch.manual_seed(0)
  conv = torch.nn.Conv3d(3, WIDTH, kernel_size=(2, 16, 16), stride=(2, 16, 16))   # as the official PatchEmbed
  return conv.weight.detach().numpy(), conv.bias.detach().numpy()


def test_official_video_patch_embedding_is_pytorch_conv3d_default():
  kernel, bias = patch_embedding("videomae")
  t_kernel, t_bias = torch_conv3d()
  assert kernel.shape == (2, 16, 16, 3, WIDTH) and t_kernel.size == kernel.size
  bound = 1.0 / math.sqrt(FAN_IN)   # kaiming_uniform(a=sqrt(5)) and the bias rule both give U(+-1/sqrt(fan_in))
  for ours, theirs in ((kernel, t_kernel), (bias, t_bias)):
    assert np.abs(ours).max() <= bound and np.abs(theirs).max() <= bound
    assert np.abs(ours).max() > 0.95 * bound and np.abs(theirs).max() > 0.95 * bound
  # 590k kernel values: the standard deviations agree to well under 1% (uniform: bound / sqrt(3)).
  assert kernel.std() == pytest.approx(t_kernel.std(), rel=0.01)
  assert kernel.std() == pytest.approx(bound / math.sqrt(3), rel=0.01)
  assert abs(kernel.mean()) < 0.01 * bound
  # 384 bias values: non-zero, the same spread within sampling error.
  assert bias.std() == pytest.approx(bound / math.sqrt(3), rel=0.15)
  assert t_bias.std() == pytest.approx(bound / math.sqrt(3), rel=0.15)


def test_mae_patch_embedding_is_xavier_with_zero_bias():
  kernel, bias = patch_embedding("mae")
  xavier = math.sqrt(6.0 / (FAN_IN + WIDTH))
  assert np.all(bias == 0)
  assert np.abs(kernel).max() <= xavier and np.abs(kernel).max() > 0.95 * xavier
  assert kernel.std() == pytest.approx(xavier / math.sqrt(3), rel=0.01)
  # The gap the official scheme closes: MAE's init is about 2.2x wider at this shape.
  official, _ = patch_embedding("videomae")
  assert kernel.std() / official.std() == pytest.approx(xavier * math.sqrt(FAN_IN), rel=0.02)
  assert 2.1 < kernel.std() / official.std() < 2.3


def test_official_mask_token_rule_matches_timm_trunc_normal():
  n = 1_000_000
  ours = np.asarray(decoders.truncated_normal_one_std(0.02)(jax.random.PRNGKey(0), (n,)))
  theirs = torch.empty(n)
  torch.manual_seed(0)
  torch.nn.init.trunc_normal_(theirs, std=0.02, a=-0.02, b=0.02)   # what the official wrapper passes
  theirs = theirs.numpy()
  for values in (ours, theirs):
    assert np.abs(values).max() <= 0.02        # nothing beyond the cut at one std
    assert np.abs(values).max() > 0.0199
  # N(0, 0.02^2) cut at +-1 std, not rescaled: std = 0.02 * sqrt(1 - 2 phi(1) / (2 Phi(1) - 1)) = 0.0108.
  expected = 0.02 * math.sqrt(1 - 2 * math.exp(-0.5) / math.sqrt(2 * math.pi) / math.erf(1 / math.sqrt(2)))
  assert ours.std() == pytest.approx(expected, rel=0.005)
  assert ours.std() == pytest.approx(theirs.std(), rel=0.01)
  assert abs(ours.mean()) < 1e-4


def decoder_params(init_scheme: str, width: int = 512, enc_width: int = WIDTH):
  dec = decoders.MaskedTokenDecoder(width=width, depth=1, num_heads=8, grid=(4, 4), out_dim=16, embed="nobias",
                                    pos_emb="sincos1d", init_scheme=init_scheme)
  keep, target = jnp.arange(4)[None], jnp.arange(4, 16)[None]
  params = jax.jit(dec.init)(jax.random.PRNGKey(1), jnp.zeros((1, 4, enc_width)), keep, target)
  return logical.unbox(params)["params"]


def test_official_decoder_mask_token_and_input_projection():
  params = decoder_params("videomae")
  token = np.asarray(params["mask_token"]).ravel()
  assert np.abs(token).max() <= 0.02
  assert token.std() == pytest.approx(0.0108, rel=0.2)
  # encoder_to_decoder: an nn.Linear the official code never re-initialises -> PyTorch's default.
  kernel = np.asarray(params["embed"]["kernel"])
  torch.manual_seed(0)
  t_kernel = torch.nn.Linear(WIDTH, 512, bias=False).weight.detach().numpy()
  bound = 1.0 / math.sqrt(WIDTH)
  assert np.abs(kernel).max() <= bound and np.abs(t_kernel).max() <= bound
  assert kernel.std() == pytest.approx(t_kernel.std(), rel=0.02)


def test_mae_decoder_mask_token_is_normal():
  params = decoder_params("mae", width=1024)
  token = np.asarray(params["mask_token"]).ravel()
  assert token.std() == pytest.approx(0.02, rel=0.08)
  assert np.mean(np.abs(token) > 0.02) == pytest.approx(0.3173, abs=0.05)   # an uncut normal: 32% beyond 1 std
  kernel = np.asarray(params["embed"]["kernel"])
  xavier = math.sqrt(6.0 / (WIDTH + 1024))
  assert np.abs(kernel).max() <= xavier and kernel.std() == pytest.approx(xavier / math.sqrt(3), rel=0.01)


def test_unknown_scheme_is_refused():
  enc = vit.Encoder(width=32, depth=1, num_heads=2, patch_size=4, init_scheme="xavier")
  with pytest.raises(ValueError, match="init_scheme='xavier'.*mae, videomae"):
    jax.eval_shape(enc.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))


# ------------------------------------------------------------------ through the recipes and methods


@pytest.mark.parametrize("name,scheme", [("videomae_vit_s_ssv2", "videomae"), ("videomae_vit_b_k400", "videomae"),
                                         ("amd_vit_s_ssv2", "videomae"), ("amd_vit_b_k400", "videomae"),
                                         ("finetune_vit_s_ssv2", "videomae"), ("mae_vit_b_in1k", "mae"),
                                         ("amd_vit_s_in1k", "mae"), ("finetune_vit_b_in1k", "mae")])
def test_official_video_recipes_select_the_video_init(shipped_config, name, scheme):
  for arg in (None, "runlocal"):
    assert shipped_config(name, arg).model.init_scheme == scheme, (name, arg)


def method_params(config):
  method = get_method(config)
  d = config.data
  shape = (2, d.image_size, d.image_size, d.channels)
  batch = {"video": jnp.zeros((2, d.num_frames) + shape[1:])} if d.modality == "video" else {"image": jnp.zeros(shape)}
  return jax.jit(method.init)(jax.random.PRNGKey(0), batch)


def test_amd_video_recipe_initialises_like_the_official_code(shipped_config):
  config = shipped_config("amd_vit_s_ssv2", "runlocal")
  params = method_params(config)
  m = config.model
  proj = params["encoder"]["patch_embed"]["proj"]
  fan_in = m.tubelet_size * m.patch_size**2 * config.data.channels
  assert np.abs(np.asarray(proj["kernel"])).max() <= 1 / math.sqrt(fan_in)
  assert np.any(np.asarray(proj["bias"]) != 0)
  assert np.abs(np.asarray(params["decoder"]["mask_token"])).max() <= 0.02
  enc_width = proj["bias"].shape[0]
  assert np.abs(np.asarray(params["decoder"]["embed"]["kernel"])).max() <= 1 / math.sqrt(enc_width)
  for gen in params["generators"].values():   # the generators' mask tokens: the same truncated rule
    assert np.abs(np.asarray(gen["mask_token"])).max() <= 0.02


def test_image_mae_keeps_mae_init(shipped_config):
  config = shipped_config("mae_vit_b_in1k", "runlocal")
  params = method_params(config)
  assert np.all(np.asarray(params["encoder"]["patch_embed"]["proj"]["bias"]) == 0)
  token = np.asarray(params["decoder"]["mask_token"])
  assert np.abs(token).max() > 0.02   # an uncut normal(0.02) over the decoder width
