"""Tests for amd_jax.models: the ViT encoder (vit.py), position embeddings (posemb.py) and the
masked-token decoder (decoders.py).

Expected values come from NumPy re-implementations written here (pre-LN block with exact GELU and
LayerNorm eps 1e-6, MAE's get_2d_sincos_pos_embed, VideoMAE's get_sinusoid_encoding_table, ...) and from
transformers' ViT-MAE position table; never from the code under test.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from amd_jax import config_base
from amd_jax.models import classifier, decoders, logical, platform, posemb, vit

W, D, H = vit.VARIANTS["tiny"]  # 32 wide, 2 deep, 2 heads


# ----------------------------------------------------------------------------- NumPy references


def np_layernorm(x, scale, bias, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def np_gelu_erf(x):
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def np_gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def f64(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def np_block(p, x, heads, qkv_bias="fused", eps=1e-6, gelu=np_gelu_erf):
  """Pre-LN ViT block (timm / MAE / VideoMAE). Returns (x, dict(q, k, v, logits))."""
  b, n, d = x.shape
  hd = d // heads
  h = np_layernorm(x, p["norm1"]["scale"], p["norm1"]["bias"], eps)
  qkv = h @ p["attn"]["qkv"]["kernel"]
  if qkv_bias == "fused":
    qkv = qkv + p["attn"]["qkv"]["bias"]
  elif qkv_bias == "qv":
    qkv = qkv + np.concatenate([p["attn"]["q_bias"], np.zeros(d), p["attn"]["v_bias"]])
  q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(b, n, heads, hd).transpose(0, 2, 1, 3) for i in range(3))
  logits = (q * hd**-0.5) @ k.transpose(0, 1, 3, 2)
  o = (np_softmax(logits) @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
  x = x + o @ p["attn"]["proj"]["kernel"] + p["attn"]["proj"]["bias"]
  h = np_layernorm(x, p["norm2"]["scale"], p["norm2"]["bias"], eps)
  h = gelu(h @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"])
  x = x + h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]
  return x, dict(q=q, k=k, v=v, logits=logits)


def np_patchify(x, p, tub=0):
  """[B,H,W,C] -> [B,(h w),(p q c)]; [B,T,H,W,C] -> [B,(t h w),(p0 p1 p2 c)]."""
  if x.ndim == 5:
    b, T, Hh, Ww, c = x.shape
    x = x.reshape(b, T // tub, tub, Hh // p, p, Ww // p, p, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, (T // tub) * (Hh // p) * (Ww // p), -1)
  b, Hh, Ww, c = x.shape
  x = x.reshape(b, Hh // p, p, Ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (Hh // p) * (Ww // p), -1)


def mae_get_2d_sincos_pos_embed(embed_dim, grid_size_h, grid_size_w, cls_token=False):
  """facebookresearch/mae util/pos_embed.py (generalised to a rectangular grid), in NumPy."""
  def get_1d(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  grid_h = np.arange(grid_size_h, dtype=np.float32)
  grid_w = np.arange(grid_size_w, dtype=np.float32)
  grid = np.meshgrid(grid_w, grid_h)  # here w goes first
  grid = np.stack(grid, axis=0).reshape([2, 1, grid_size_h, grid_size_w])
  emb_h = get_1d(embed_dim // 2, grid[0])  # (H*W, D/2): the COLUMN coordinate
  emb_w = get_1d(embed_dim // 2, grid[1])  # (H*W, D/2): the row coordinate
  pos_embed = np.concatenate([emb_h, emb_w], axis=1)
  if cls_token:
    pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
  return pos_embed


def videomae_sinusoid_table(n_position, d_hid):
  """VideoMAE modeling_finetune.get_sinusoid_encoding_table, in NumPy."""
  def angle_vec(position):
    return [position / np.power(10000, 2 * (hid_j // 2) / d_hid) for hid_j in range(d_hid)]
  table = np.array([angle_vec(pos_i) for pos_i in range(n_position)])
  table[:, 0::2] = np.sin(table[:, 0::2])
  table[:, 1::2] = np.cos(table[:, 1::2])
  return table


def np_encoder(params, x, keep, *, heads, patch, tub=0, cls=True, qkv_bias="fused", pos="sincos2d",
               final_norm=True, depth=None):
  """Whole ViT encoder forward. Returns (tokens, [residual stream after each block], [internals])."""
  p = f64(params)
  x = np.asarray(x, np.float64)
  kernel = p["patch_embed"]["proj"]["kernel"]
  width = kernel.shape[-1]
  tokens = np_patchify(x, patch, tub) @ kernel.reshape(-1, width) + p["patch_embed"]["proj"]["bias"]
  if x.ndim == 5:
    grid = (x.shape[1] // tub, x.shape[2] // patch, x.shape[3] // patch)
  else:
    grid = (x.shape[1] // patch, x.shape[2] // patch)
  if pos == "sincos2d":
    table = mae_get_2d_sincos_pos_embed(width, grid[-2], grid[-1])
    table = np.tile(table, (int(np.prod(grid[:-2])), 1))
  else:
    table = videomae_sinusoid_table(int(np.prod(grid)), width)
  tokens = tokens + table[None]
  if keep is not None:
    keep = np.asarray(keep)
    tokens = tokens[np.arange(tokens.shape[0])[:, None], keep]
  if cls:
    tokens = np.concatenate([np.broadcast_to(p["cls_token"], (tokens.shape[0], 1, width)), tokens], 1)
  blocks, internals = [], []
  depth = depth if depth is not None else len([k for k in p if k.startswith("blocks_")])
  for i in range(depth):
    tokens, inter = np_block(p[f"blocks_{i}"], tokens, heads, qkv_bias)
    blocks.append(tokens)
    internals.append(inter)
  if final_norm:
    tokens = np_layernorm(tokens, p["norm"]["scale"], p["norm"]["bias"])
  return tokens, blocks, internals


# ----------------------------------------------------------------------------- helpers


def abstract_params(model, *args, **kwargs):
  """ShapeDtypeStructs of `model`'s params, unboxed from their logical axis names (no compile)."""
  return logical.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *args, **kwargs)["params"])


def random_params(model, *args, seed=0, **kwargs):
  """Generic float32 parameters of `model` in its own tree layout, made in NumPy from jax.eval_shape
  (which traces but compiles nothing): kernels ~ N(0, 1/fan_in), LN scales ~ 1 + N(0, .1^2), other
  leaves (biases, q/v biases, cls / mask tokens) ~ N(0, .1^2)."""
  shapes = abstract_params(model, *args, **kwargs)
  r = np.random.default_rng(seed)

  def make(path, leaf):
    name = path[-1].key
    noise = r.standard_normal(leaf.shape)
    if name == "kernel":
      value = noise / np.sqrt(np.prod(leaf.shape[:-1]))
    elif name == "scale":
      value = 1.0 + 0.1 * noise
    else:
      value = 0.1 * noise
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(make, shapes)


def images(b=2, size=16, c=3, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, size, size, c)), jnp.float32)


def videos(b=2, t=4, size=8, c=3, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, t, size, size, c)), jnp.float32)


def random_keep(b, n, k, seed=0):
  r = np.random.default_rng(seed)
  return jnp.asarray(np.stack([np.sort(r.choice(n, k, replace=False)) for _ in range(b)]), jnp.int32)


def init_params(model, x, keep=None, seed=0):
  return random_params(model, x, keep, seed=seed)


def tree_max_abs_diff(a, b):
  return max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda u, v: float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)))), a, b)))


# ----------------------------------------------------------------------------- variants


def test_variants_table():
  assert vit.VARIANTS["Ti"] == (192, 12, 3)
  assert vit.VARIANTS["S"] == (384, 12, 6)
  assert vit.VARIANTS["B"] == (768, 12, 12)
  assert vit.VARIANTS["L"] == (1024, 24, 16)
  assert vit.VARIANTS["H"] == (1280, 32, 16)
  for name, (w, _, h) in vit.VARIANTS.items():
    assert w % h == 0, name


def test_resolve_variant_overrides():
  assert vit.resolve_variant("S") == (384, 12, 6)
  assert vit.resolve_variant("Ti", num_heads=12) == (192, 12, 12)  # MAE-lite's ViT-Ti
  assert vit.resolve_variant("B", width=512) == (512, 12, 12)
  assert vit.resolve_variant("L", depth=18) == (1024, 18, 16)
  assert vit.resolve_variant("S", 256, 4, 8) == (256, 4, 8)
  with pytest.raises(ValueError, match="'XL'"):
    vit.resolve_variant("XL")


def test_encoder_from_config_uses_variant_and_overrides():
  from amd_jax.config_base import model_config
  cfg = model_config("Ti")
  cfg.num_heads = 12
  cfg.qkv_bias = "qv"
  enc = vit.encoder_from_config(cfg, cls_token=False)
  assert (enc.width, enc.depth, enc.num_heads) == (192, 12, 12)
  assert enc.qkv_bias == "qv" and enc.cls_token is False


# ----------------------------------------------------------------------------- encoder vs NumPy


ENCODER_CASES = {
    # name: (input kind, cls, qkv_bias, pos_emb, keep count or None)
    "image_cls_keep": ("image", True, "fused", "sincos2d", 6),
    "image_nocls_all": ("image", False, "fused", "sincos2d", None),
    "video_qv_keep": ("video", False, "qv", "sincos1d", 6),      # VideoMAE / AMD layout
    "video_cls_2d_all": ("video", True, "fused", "sincos2d", None),
}


@pytest.mark.parametrize("case", list(ENCODER_CASES))
def test_encoder_matches_numpy_reference(case):
  kind, cls, qkv_bias, pos, k = ENCODER_CASES[case]
  if kind == "image":
    x, patch, tub, n = images(size=16), 4, 0, 16      # 4x4 grid
  else:
    x, patch, tub, n = videos(t=4, size=8), 4, 2, 8   # 2x2x2 grid
  keep = None if k is None else random_keep(2, n, k, seed=3)
  model = vit.Encoder(W, D, H, patch_size=patch, tubelet_size=2, cls_token=cls, qkv_bias=qkv_bias,
                      pos_emb=pos, block_layers=(1, 2))
  params = init_params(model, x, keep)
  y, out = model.apply({"params": params}, x, keep)
  tokens = (k if k is not None else n) + int(cls)
  assert y.shape == (2, tokens, W) and y.dtype == jnp.float32
  assert set(out) == {"block_1", "block_2"}
  want, blocks, _ = np_encoder(params, x, keep, heads=H, patch=patch, tub=tub, cls=cls, qkv_bias=qkv_bias,
                               pos=pos)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)
  for l in (1, 2):
    assert out[f"block_{l}"].shape == (2, tokens, W)
    np.testing.assert_allclose(np.asarray(out[f"block_{l}"]), blocks[l - 1], rtol=1e-4, atol=1e-4)


def test_patch_embedding_and_position_embedding_only():
  """depth 0, no final norm: the encoder returns patch_embed(x) + pos[keep] exactly (with cls first)."""
  x = images(seed=4)
  keep = random_keep(2, 16, 6, seed=4)
  model = vit.Encoder(W, 0, H, patch_size=4, cls_token=True, final_norm=False)
  params = init_params(model, x, keep)
  y, _ = model.apply({"params": params}, x, keep)
  want, _, _ = np_encoder(params, x, keep, heads=H, patch=4, final_norm=False, depth=0)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(y[:, 0]), np.broadcast_to(np.asarray(params["cls_token"])[0], (2, W)),
                             rtol=0, atol=0)


def test_keep_selects_tokens_before_attention():
  """keep = every token in order is the same as keep=None (the subset is taken before the blocks)."""
  x = images(seed=5)
  model = vit.Encoder(W, D, H, patch_size=4, cls_token=False)
  params = init_params(model, x)
  y_none, _ = model.apply({"params": params}, x)
  y_all, _ = model.apply({"params": params}, x, jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16)))
  np.testing.assert_allclose(np.asarray(y_none), np.asarray(y_all), rtol=1e-6, atol=1e-6)


def test_block_depth_is_raw_residual_stream():
  x = images(seed=6)
  keep = random_keep(2, 16, 6, seed=6)
  model = vit.Encoder(W, D, H, patch_size=4, block_layers=(D,))
  params = init_params(model, x, keep)
  y, out = model.apply({"params": params}, x, keep)
  last = np.asarray(out[f"block_{D}"], np.float64)
  # Not normed: the raw stream differs from the output...
  assert np.abs(last - np.asarray(y)).max() > 1e-2
  # ... and the params' final LayerNorm (eps 1e-6) applied to it reproduces the output.
  normed = np_layernorm(last, np.asarray(params["norm"]["scale"]), np.asarray(params["norm"]["bias"]))
  np.testing.assert_allclose(np.asarray(y), normed, rtol=1e-5, atol=1e-5)


def test_final_norm_false_returns_last_block():
  x = images(seed=7)
  keep = random_keep(2, 16, 6, seed=7)
  model = vit.Encoder(W, D, H, patch_size=4, final_norm=False, block_layers=(D,))
  params = init_params(model, x, keep)
  y, out = model.apply({"params": params}, x, keep)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(out[f"block_{D}"]))
  assert "norm" not in params


def test_max_depth_stops_early():
  x = images(seed=8)
  keep = random_keep(2, 16, 6, seed=8)
  full = vit.Encoder(W, 3, H, patch_size=4, block_layers=(1,))
  params = init_params(full, x, keep)
  y_full, out_full = full.apply({"params": params}, x, keep)
  early = vit.Encoder(W, 3, H, patch_size=4, block_layers=(1,), max_depth=1)
  p_early = {k: v for k, v in params.items() if k not in ("blocks_1", "blocks_2")}
  y, out = early.apply({"params": p_early}, x, keep)
  np.testing.assert_allclose(np.asarray(out["block_1"]), np.asarray(out_full["block_1"]), rtol=1e-6, atol=1e-6)
  normed = np_layernorm(np.asarray(out["block_1"], np.float64), np.asarray(params["norm"]["scale"]),
                        np.asarray(params["norm"]["bias"]))
  np.testing.assert_allclose(np.asarray(y), normed, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(y) - np.asarray(y_full)).max() > 1e-2  # blocks 2 and 3 really did not run


# ----------------------------------------------------------------------------- attention internals


@pytest.mark.parametrize("qkv_bias", ["fused", "qv"])
def test_attention_internals(qkv_bias):
  x = images(seed=9)
  keep = random_keep(2, 16, 6, seed=9)
  model = vit.Encoder(W, D, H, patch_size=4, qkv_bias=qkv_bias, attn_layers=(1, 2), block_layers=(1,))
  params = init_params(model, x, keep)
  y, out = model.apply({"params": params}, x, keep)
  n, hd = 6 + 1, W // H
  for l in (1, 2):
    q, k, v, logits = (np.asarray(out[f"{name}_{l}"], np.float64) for name in ("q", "k", "v", "attn_logits"))
    assert q.shape == k.shape == v.shape == (2, H, n, hd)
    assert logits.shape == (2, H, n, n)
    np.testing.assert_allclose(logits, np.einsum("bhqd,bhkd->bhqk", q, k) * hd**-0.5, rtol=1e-4, atol=1e-5)
  # The returned q/k/v/logits are those of the NumPy reference block.
  _, _, inter = np_encoder(params, x, keep, heads=H, patch=4, qkv_bias=qkv_bias)
  for l in (1, 2):
    for name, ref in (("q", "q"), ("k", "k"), ("v", "v"), ("attn_logits", "logits")):
      np.testing.assert_allclose(np.asarray(out[f"{name}_{l}"]), inter[l - 1][ref], rtol=1e-4, atol=1e-4)
  # Asking for internals (explicit softmax path) does not change the output (fused attention path).
  plain = vit.Encoder(W, D, H, patch_size=4, qkv_bias=qkv_bias)
  y_plain, out_plain = plain.apply({"params": params}, x, keep)
  assert out_plain == {}
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_plain), rtol=1e-5, atol=1e-5)


def test_qv_bias_params_and_zero_k_bias():
  x = images(seed=10)
  keep = random_keep(2, 16, 6, seed=10)
  model = vit.Encoder(W, D, H, patch_size=4, qkv_bias="qv", block_layers=(1,), attn_layers=(2,))
  params = random_params(model, x, keep)
  attn = params["blocks_1"]["attn"]
  assert set(attn) == {"qkv", "q_bias", "v_bias", "proj"}
  assert set(attn["qkv"]) == {"kernel"}  # the fused projection has no bias of its own
  assert attn["q_bias"].shape == attn["v_bias"].shape == (W,)
  r = np.random.default_rng(0)
  params["blocks_1"]["attn"]["q_bias"] = jnp.asarray(r.normal(size=W) + 1.0, jnp.float32)
  params["blocks_1"]["attn"]["v_bias"] = jnp.asarray(r.normal(size=W) - 1.0, jnp.float32)
  _, out = model.apply({"params": params}, x, keep)
  # Block 2's input is the residual stream after block 1.
  p2 = f64(params["blocks_1"])
  h = np_layernorm(np.asarray(out["block_1"], np.float64), p2["norm1"]["scale"], p2["norm1"]["bias"])
  w = p2["attn"]["qkv"]["kernel"]
  heads = lambda a: a.reshape(2, 6 + 1, H, W // H).transpose(0, 2, 1, 3)
  np.testing.assert_allclose(np.asarray(out["k_2"]), heads(h @ w[:, W:2 * W]), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out["q_2"]), heads(h @ w[:, :W] + p2["attn"]["q_bias"]),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out["v_2"]), heads(h @ w[:, 2 * W:] + p2["attn"]["v_bias"]),
                             rtol=1e-4, atol=1e-5)


def test_fused_and_none_bias_layouts():
  x = images(seed=11)
  shapes = lambda bias: abstract_params(vit.Encoder(W, 1, H, patch_size=4, qkv_bias=bias), x)
  p_fused = shapes("fused")
  assert set(p_fused["blocks_0"]["attn"]) == {"qkv", "proj"}
  assert p_fused["blocks_0"]["attn"]["qkv"]["bias"].shape == (3 * W,)
  p_none = shapes("none")
  assert set(p_none["blocks_0"]["attn"]) == {"qkv", "proj"}
  assert set(p_none["blocks_0"]["attn"]["qkv"]) == {"kernel"}


# ----------------------------------------------------------------------------- GELU / LayerNorm


def test_mlp_uses_exact_erf_gelu():
  """Mlp with identity fc1/fc2 and zero biases computes GELU itself: it must be the erf form."""
  x = jnp.asarray(np.linspace(-5, 5, 2 * 7 * 16).reshape(2, 7, 16), jnp.float32)
  mlp = vit.Mlp(hidden=16)
  eye = jnp.eye(16, dtype=jnp.float32)
  params = {"fc1": {"kernel": eye, "bias": jnp.zeros(16)}, "fc2": {"kernel": eye, "bias": jnp.zeros(16)}}
  y = np.asarray(mlp.apply({"params": params}, x), np.float64)
  xs = np.asarray(x, np.float64)
  np.testing.assert_allclose(y, np_gelu_erf(xs), rtol=1e-6, atol=1e-6)
  assert np.abs(y - np_gelu_tanh(xs)).max() > 1e-4  # the test can tell the two apart


def test_mlp_matches_numpy_with_random_params():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, W)), jnp.float32)
  mlp = vit.Mlp(hidden=4 * W)
  params = random_params(mlp, x, seed=1)
  p = f64(params)
  want = np_gelu_erf(np.asarray(x, np.float64) @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["fc2"]["kernel"] \
      + p["fc2"]["bias"]
  np.testing.assert_allclose(np.asarray(mlp.apply({"params": params}, x)), want, rtol=1e-4, atol=1e-5)


def test_block_layernorm_eps_is_1e6():
  """On a residual stream with variance ~1e-6 the LayerNorm epsilon dominates the result.

  Zeroing the attention output projection makes norm2 see the same tiny-variance stream as norm1."""
  assert vit.LN_EPS == 1e-6
  x = jnp.asarray(1e-3 * np.random.default_rng(2).normal(size=(2, 7, W)), jnp.float32)
  block = vit.Block(W, H)
  params = random_params(block, x)
  params["attn"]["proj"] = {"kernel": jnp.zeros((W, W)), "bias": jnp.zeros(W)}
  y = np.asarray(block.apply({"params": params}, x)[0], np.float64)
  xs = np.asarray(x, np.float64)
  want, _ = np_block(f64(params), xs, H, eps=1e-6)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
  for other in (1e-5, 1e-12):  # torch's / a raw default would be detectably different
    wrong, _ = np_block(f64(params), xs, H, eps=other)
    assert np.abs(y - wrong).max() > 1e-3


def test_block_matches_numpy_reference_normal_scale():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 7, W)), jnp.float32)
  block = vit.Block(W, H, mlp_ratio=2.0)
  params = random_params(block, x, seed=5)
  y, internals = block.apply({"params": params}, x)
  assert internals == {}
  want, _ = np_block(f64(params), np.asarray(x, np.float64), H)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)
  assert params["mlp"]["fc1"]["kernel"].shape == (W, 2 * W)


# ----------------------------------------------------------------------------- scan / remat


def restack(unscanned, depth):
  """Unscanned params (blocks_i) -> the scanned layout (blocks/block with a leading layer axis)."""
  blocks = [unscanned[f"blocks_{i}"] for i in range(depth)]
  out = {k: v for k, v in unscanned.items() if not k.startswith("blocks_")}
  out["blocks"] = {"block": jax.tree_util.tree_map(lambda *a: jnp.stack(a), *blocks)}
  return out


def test_stack_unstack_blocks_layout_helpers():
  x = images(seed=17)
  plain = vit.Encoder(W, 3, H, patch_size=4)
  params = random_params(plain, x)
  stacked = vit.stack_blocks(params, 3)
  ref = restack(params, 3)
  assert jax.tree_util.tree_structure(stacked) == jax.tree_util.tree_structure(ref)
  assert tree_max_abs_diff(stacked, ref) == 0
  back = vit.unstack_blocks(stacked)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
  assert tree_max_abs_diff(back, params) == 0
  assert vit.match_layout(params, scan=True, depth=3) is not params
  assert tree_max_abs_diff(vit.match_layout(params, scan=True, depth=3), ref) == 0
  assert tree_max_abs_diff(vit.match_layout(stacked, scan=False, depth=3), params) == 0
  assert vit.match_layout(params, scan=False, depth=3) is params


def _loss_and_grad(model, params, x, keep, train, block=1):
  """value_and_grad of sum(y^2) + sum(block_l^3), returning (loss, (y, out)) and the gradient."""
  def loss(p):
    y, out = model.apply({"params": p}, x, keep, train=train, rngs={"dropout": jax.random.PRNGKey(4)})
    return jnp.sum(y**2) + jnp.sum(out[f"block_{block}"] ** 3), (y, out)
  return jax.value_and_grad(loss, has_aux=True)(params)


def test_scan_matches_unscanned():
  """Scanned (+ remat) stack on the restacked params: same output and same block outputs."""
  depth, layers = 3, (1, 2, 3)
  x = images(seed=12)
  keep = random_keep(2, 16, 6, seed=12)
  plain = vit.Encoder(W, depth, H, patch_size=4, block_layers=layers)
  scanned = vit.Encoder(W, depth, H, patch_size=4, block_layers=layers, scan=True, remat="full")
  params = init_params(plain, x, keep)
  sparams = restack(params, depth)
  # The restacked tree has exactly the scanned model's structure and shapes.
  ref = abstract_params(scanned, x, keep)
  assert jax.tree_util.tree_map(lambda a: a.shape, sparams) == jax.tree_util.tree_map(lambda a: a.shape, ref)
  y, out = plain.apply({"params": params}, x, keep)
  ys, outs = jax.jit(scanned.apply)({"params": sparams}, x, keep)
  np.testing.assert_allclose(np.asarray(ys), np.asarray(y), rtol=1e-5, atol=1e-5)
  assert set(outs) == {f"block_{l}" for l in layers}
  for layer in layers:
    np.testing.assert_allclose(np.asarray(outs[f"block_{layer}"]), np.asarray(out[f"block_{layer}"]),
                               rtol=1e-5, atol=1e-5)
  # Layers are not interchangeable: the block outputs really differ from one layer to the next.
  assert np.abs(np.asarray(out["block_2"]) - np.asarray(out["block_1"])).max() > 1e-2


def test_remat_policies_same_outputs_and_gradients():
  """Training mode with drop path on: remat none/full/dots changes neither the forward nor the gradient,
  and the static `deterministic` flag survives nn.remat. (Scanned + remat: test_scan_matches_unscanned.)"""
  x = images(seed=13)
  keep = random_keep(2, 16, 6, seed=13)
  kw = dict(patch_size=4, drop_path=0.3, block_layers=(1,))
  base = vit.Encoder(W, D, H, **kw)
  params = init_params(base, x, keep)
  (l0, (y0, _)), g0 = _loss_and_grad(base, params, x, keep, True)
  gmax = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree_util.tree_leaves(g0))
  for remat in ("full", "dots"):
    (l1, (y1, _)), g1 = _loss_and_grad(vit.Encoder(W, D, H, remat=remat, **kw), params, x, keep, True)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    assert tree_max_abs_diff(g0, g1) < 1e-5 * gmax, remat
  # Eval through rematerialised blocks equals plain eval; train with drop path differs from it.
  y_eval = base.apply({"params": params}, x, keep)[0]
  y_eval_remat = vit.Encoder(W, D, H, remat="full", **kw).apply({"params": params}, x, keep)[0]
  np.testing.assert_allclose(np.asarray(y_eval_remat), np.asarray(y_eval), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(y0) - np.asarray(y_eval)).max() > 1e-3


# ----------------------------------------------------------------------------- dtype


def test_bfloat16_compute_keeps_float32_params():
  x = images(seed=14)
  keep = random_keep(2, 16, 6, seed=14)
  f32 = vit.Encoder(W, D, H, patch_size=4, attn_layers=(1,))
  bf16 = vit.Encoder(W, D, H, patch_size=4, attn_layers=(1,), dtype=jnp.bfloat16)
  shapes = abstract_params(bf16, x, keep)
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(shapes))
  params = random_params(bf16, x, keep)
  y16, out16 = bf16.apply({"params": params}, x, keep)
  y32, _ = f32.apply({"params": params}, x, keep)
  assert out16["q_1"].dtype == jnp.bfloat16  # matmuls really ran in bf16
  assert y16.dtype == jnp.float32            # the final LayerNorm computes in f32
  diff = np.abs(np.asarray(y16, np.float64) - np.asarray(y32, np.float64))
  assert diff.max() < 0.15 and diff.mean() < 0.03
  assert diff.max() > 0  # and it is not secretly computing in f32


# ----------------------------------------------------------------------------- drop path


@pytest.mark.parametrize("scan", [False, True])
def test_drop_path_train_vs_eval(scan):
  x = images(seed=15)
  keep = random_keep(2, 16, 6, seed=15)
  model = vit.Encoder(W, 3, H, patch_size=4, drop_path=0.5, scan=scan)
  params = init_params(model, x, keep)
  # Scanned stacks are traced anew on every eager call: compile once instead.
  apply = jax.jit(model.apply, static_argnames="train") if scan else model.apply
  eval_a, _ = apply({"params": params}, x, keep, train=False, rngs={"dropout": jax.random.PRNGKey(1)})
  eval_b, _ = apply({"params": params}, x, keep, train=False, rngs={"dropout": jax.random.PRNGKey(2)})
  eval_c, _ = apply({"params": params}, x, keep, train=False)  # no rng needed at eval
  np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
  np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_c))
  outs = [apply({"params": params}, x, keep, train=True, rngs={"dropout": jax.random.PRNGKey(s)})[0]
          for s in (1, 1, 2, 3)]
  np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[1]))  # same rng, same draw
  assert not np.allclose(np.asarray(outs[0]), np.asarray(outs[2])) or \
      not np.allclose(np.asarray(outs[0]), np.asarray(outs[3]))  # different rngs, different draws
  assert any(not np.allclose(np.asarray(o), np.asarray(eval_a)) for o in outs)


def test_drop_path_zero_is_identity_in_train():
  x = images(seed=16)
  keep = random_keep(2, 16, 6, seed=16)
  model = vit.Encoder(W, D, H, patch_size=4, drop_path=0.0)
  params = init_params(model, x, keep)
  y_train, _ = model.apply({"params": params}, x, keep, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
  y_eval, _ = model.apply({"params": params}, x, keep)
  np.testing.assert_array_equal(np.asarray(y_train), np.asarray(y_eval))


def test_drop_path_function_is_per_sample_and_rescales():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 5, 4)) + 3.0, jnp.float32)
  key = jax.random.PRNGKey(0)
  y = np.asarray(vit.drop_path(x, 0.25, False, lambda: key))
  xs = np.asarray(x)
  dropped = np.all(y == 0, axis=(1, 2))
  kept = np.all(np.isclose(y, xs / 0.75, rtol=1e-6), axis=(1, 2))
  assert np.all(dropped ^ kept)            # each sample is either dropped entirely or kept and rescaled
  assert 0 < dropped.sum() < 64
  np.testing.assert_array_equal(np.asarray(vit.drop_path(x, 0.25, True, lambda: key)), xs)
  np.testing.assert_array_equal(np.asarray(vit.drop_path(x, 0.0, False, lambda: key)), xs)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,needle", [
    (dict(block_layers=(3,)), "block 3"),
    (dict(block_layers=(0,)), "block 0"),
    (dict(block_layers=(1, 7)), "block 7"),
    (dict(attn_layers=(5,)), "block 5"),
])
def test_invalid_layers_raise(kwargs, needle):
  model = vit.Encoder(W, D, H, patch_size=4, **kwargs)
  with pytest.raises(ValueError, match=needle):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), images(size=8))


def test_invalid_layers_message_names_the_field():
  for field in ("attn_layers", "block_layers"):
    model = vit.Encoder(W, D, H, patch_size=4, **{field: (9,)})
    with pytest.raises(ValueError, match=field):
      jax.eval_shape(model.init, jax.random.PRNGKey(0), images(size=8))


@pytest.mark.parametrize("shape,needles", [
    ((2, 28, 28, 1), ("28x28", "patch_size=16")),          # docs' Fashion-MNIST images into a /16 ViT
    ((2, 32, 28, 3), ("32x28", "patch_size=16")),
    ((2, 5, 32, 32, 3), ("5 frames", "tubelet_size=2")),
    ((2, 4, 30, 32, 3), ("30x32", "patch_size=16")),
    ((32, 32, 3), ("[batch, height, width, channels]", "(32, 3)")),
])
def test_input_the_patches_do_not_tile_is_refused(shape, needles):
  model = vit.Encoder(W, 1, H, patch_size=16, tubelet_size=2)
  with pytest.raises(ValueError) as info:
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape))
  for needle in needles:
    assert needle in str(info.value), str(info.value)


def test_token_grid_checks_what_it_is_given():
  assert vit.token_grid((32, 48, 3), 16).shape == (2, 3)
  assert vit.token_grid((4, 32, 32, 3), 16, 2).shape == (2, 2, 2)
  with pytest.raises(ValueError, match="tubelet_size=0"):
    vit.token_grid((4, 32, 32, 3), 16, 0)
  with pytest.raises(ValueError, match="patch_size=0"):
    vit.token_grid((32, 32, 3), 0)


def test_classifier_refuses_images_its_patches_do_not_tile():
  model_cfg = config_base.model_config("tiny")   # patch_size 16, as docs/api.md's first try used
  clf = classifier.classifier_from_config(model_cfg, num_classes=10, pool="mean")
  with pytest.raises(ValueError, match="28x28 is not divisible by patch_size=16"):
    jax.eval_shape(clf.init, jax.random.PRNGKey(0), jnp.zeros((8, 28, 28, 1)))


def test_scan_with_attention_internals_raises():
  with pytest.raises(ValueError, match="scan"):
    model = vit.Encoder(W, D, H, patch_size=4, scan=True, attn_layers=(1,))
    jax.eval_shape(model.init, jax.random.PRNGKey(0), images(size=8))


# ----------------------------------------------------------------------------- position embeddings


@pytest.mark.parametrize("dim,gh,gw", [(32, 4, 4), (64, 3, 5), (16, 2, 7), (768, 14, 14)])
def test_sincos2d_matches_mae_reference(dim, gh, gw):
  got = posemb.sincos_2d(dim, gh, gw, cls_token=True)
  want = mae_get_2d_sincos_pos_embed(dim, gh, gw, cls_token=True)
  assert got.shape == (1 + gh * gw, dim) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  assert np.all(got[0] == 0)
  np.testing.assert_allclose(posemb.sincos_2d(dim, gh, gw), want[1:], atol=1e-6)


def test_sincos2d_first_half_encodes_column():
  t = posemb.sincos_2d(16, 3, 4)
  grid = t.reshape(3, 4, 16)
  # First half: constant down a column (same w), varies along a row; second half the opposite.
  assert np.allclose(grid[:, :, :8], grid[:1, :, :8]) and not np.allclose(grid[:, :, :8], grid[:, :1, :8])
  assert np.allclose(grid[:, :, 8:], grid[:, :1, 8:]) and not np.allclose(grid[:, :, 8:], grid[:1, :, 8:])
  # [sin | cos] halves: at column 0 the sines are 0 and the cosines 1.
  np.testing.assert_allclose(grid[:, 0, :4], 0, atol=1e-7)
  np.testing.assert_allclose(grid[:, 0, 4:8], 1, atol=1e-7)
  # omega_i = 1/10000^(i/(D/4)): channel i of the first quarter at column w is sin(w * omega_i).
  omega = 1.0 / 10000 ** (np.arange(4) / 4.0)
  np.testing.assert_allclose(grid[0, 3, :4], np.sin(3 * omega), atol=1e-6)
  np.testing.assert_allclose(grid[2, 0, 8:12], np.sin(2 * omega), atol=1e-6)


def test_sincos2d_matches_transformers_vitmae():
  """transformers' ViT-MAE builds its fixed table independently; after its documented h/w rotation
  (for compatibility with MAE checkpoints) it must equal ours."""
  from transformers import ViTMAEConfig, ViTMAEModel
  cfg = ViTMAEConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     image_size=20, patch_size=4, num_channels=3)
  model = ViTMAEModel(cfg)
  emb = model.embeddings
  # Weight init is skipped for modules marked initialised; force the real initialiser to run.
  emb.patch_embeddings.projection._is_hf_initialized = False
  emb.initialize_weights()
  hf = emb.position_embeddings.detach().numpy()[0]
  assert np.abs(hf).max() > 0.5  # the table was really built
  np.testing.assert_allclose(posemb.sincos_2d(64, 5, 5, cls_token=True), hf, rtol=0, atol=1e-6)
  np.testing.assert_allclose(posemb.make_table("sincos2d", 64, (5, 5), cls_token=True), hf, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n,dim", [(10, 32), (1568, 64), (7, 6)])
def test_sincos1d_interleaved_matches_videomae_reference(n, dim):
  got = posemb.sincos_1d_interleaved(n, dim)
  want = videomae_sinusoid_table(n, dim)
  assert got.shape == (n, dim) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
  np.testing.assert_allclose(posemb.make_table("sincos1d", dim, (n,), cls_token=False), want, atol=2e-6)


def test_sincos1d_interleaved_layout():
  t = posemb.sincos_1d_interleaved(5, 8)
  np.testing.assert_allclose(t[0, 0::2], 0, atol=1e-7)  # sin(0) on even channels
  np.testing.assert_allclose(t[0, 1::2], 1, atol=1e-7)  # cos(0) on odd channels
  j = np.arange(8)
  np.testing.assert_allclose(t[3, 2], np.sin(3 / 10000 ** (2 / 8)), atol=1e-6)
  np.testing.assert_allclose(t[3, 3], np.cos(3 / 10000 ** (2 / 8)), atol=1e-6)
  angles = 4 / np.power(10000.0, 2 * (j // 2) / 8)
  np.testing.assert_allclose(t[4], np.where(j % 2 == 0, np.sin(angles), np.cos(angles)), atol=1e-6)


def test_make_table_layouts_and_errors():
  # Video grid with the 1-D table: flattened (t, h, w) index.
  np.testing.assert_allclose(posemb.make_table("sincos1d", 16, (2, 3, 4), cls_token=False),
                             videomae_sinusoid_table(24, 16), atol=2e-6)
  # cls row first and zero.
  t = posemb.make_table("sincos1d", 16, (2, 3, 4), cls_token=True)
  assert t.shape == (25, 16) and np.all(t[0] == 0)
  # Video grid with the 2-D table: the spatial table repeated for every time slice.
  v = posemb.make_table("sincos2d", 16, (3, 2, 4), cls_token=False)
  spatial = mae_get_2d_sincos_pos_embed(16, 2, 4)
  np.testing.assert_allclose(v, np.tile(spatial, (3, 1)), atol=1e-6)
  with pytest.raises(ValueError, match="learned"):
    posemb.make_table("learned", 16, (2, 2), cls_token=False)
  with pytest.raises(ValueError, match="divisible by 4"):
    posemb.sincos_2d(18, 2, 2)


# ----------------------------------------------------------------------------- decoder


def np_decoder(params, x, keep, target, *, heads, grid, has_cls, embed, pos, out_dim, final_norm=True,
               qkv_bias="fused"):
  p = f64(params)
  x = np.asarray(x, np.float64)
  keep, target = np.asarray(keep), np.asarray(target)
  if embed != "none":
    x = x @ p["embed"]["kernel"] + (p["embed"]["bias"] if embed == "bias" else 0)
  width = x.shape[-1]
  if pos == "sincos2d":
    table = np.tile(mae_get_2d_sincos_pos_embed(width, grid[-2], grid[-1]), (int(np.prod(grid[:-2])), 1))
  else:
    table = videomae_sinusoid_table(int(np.prod(grid)), width)
  b = x.shape[0]
  parts = []
  if has_cls:
    parts.append(x[:, :1])
    x = x[:, 1:]
  parts.append(x + table[keep])
  parts.append(np.broadcast_to(p["mask_token"], (b, target.shape[1], width)) + table[target])
  h = np.concatenate(parts, 1)
  i = 0
  while f"blocks_{i}" in p:
    h, _ = np_block(p[f"blocks_{i}"], h, heads, qkv_bias)
    i += 1
  h = h[:, -target.shape[1]:]
  if final_norm:
    h = np_layernorm(h, p["norm"]["scale"], p["norm"]["bias"])
  if out_dim:
    h = h @ p["head"]["kernel"] + p["head"]["bias"]
  return h


DEC_CASES = {
    # name: (grid, has_cls, embed, pos_emb, qkv_bias, out_dim, in_width)
    "mae_image": ((2, 4), True, "bias", "sincos2d", "fused", 48, 40),
    "videomae": ((2, 2, 4), False, "nobias", "sincos1d", "qv", 96, 40),
    "amd_generator": ((2, 2, 4), False, "none", "sincos1d", "fused", 0, 32),
}


def _decoder_inputs(grid, has_cls, in_width, nkeep, seed):
  n = int(np.prod(grid))
  r = np.random.default_rng(seed)
  perms = np.stack([r.permutation(n) for _ in range(2)])
  keep = jnp.asarray(np.sort(perms[:, :nkeep], 1), jnp.int32)
  target = jnp.asarray(np.sort(perms[:, nkeep:], 1), jnp.int32)
  x = jnp.asarray(r.normal(size=(2, nkeep + int(has_cls), in_width)), jnp.float32)
  return x, keep, target


@pytest.mark.parametrize("case", list(DEC_CASES))
def test_decoder_shape_and_numpy_reference(case):
  grid, has_cls, embed, pos, qkv_bias, out_dim, in_width = DEC_CASES[case]
  dec = decoders.MaskedTokenDecoder(width=32, depth=2, num_heads=2, grid=grid, out_dim=out_dim, qkv_bias=qkv_bias,
                                    pos_emb=pos, has_cls=has_cls, embed=embed, final_norm=out_dim > 0)
  x, keep, target = _decoder_inputs(grid, has_cls, in_width, 3, seed=0)
  params = random_params(dec, x, keep, target)
  y = dec.apply({"params": params}, x, keep, target)
  m = int(np.prod(grid)) - 3
  assert y.shape == (2, m, out_dim or 32) and y.dtype == jnp.float32
  assert ("embed" in params) == (embed != "none")
  if embed != "none":
    assert ("bias" in params["embed"]) == (embed == "bias")
  assert ("head" in params) == bool(out_dim)
  want = np_decoder(params, x, keep, target, heads=2, grid=grid, has_cls=has_cls, embed=embed, pos=pos,
                    out_dim=out_dim, final_norm=out_dim > 0, qkv_bias=qkv_bias)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("has_cls", [False, True])
def test_decoder_invariant_to_visible_token_order(has_cls):
  grid, nkeep = ((2, 3), 3) if has_cls else ((4, 4), 6)
  dec = decoders.MaskedTokenDecoder(width=32, depth=2, num_heads=2, grid=grid, out_dim=8, has_cls=has_cls)
  x, keep, target = _decoder_inputs(grid, has_cls, 24, nkeep, seed=1)
  params = random_params(dec, x, keep, target)
  apply = dec.apply
  y = np.asarray(apply({"params": params}, x, keep, target))
  # Permute the visible tokens and their indices consistently (cls stays first).
  perm = np.array([2, 0, 1]) if has_cls else np.array([3, 0, 5, 1, 4, 2])
  off = int(has_cls)
  x_perm = jnp.concatenate([x[:, :off], x[:, off:][:, perm]], axis=1)
  y_perm = np.asarray(apply({"params": params}, x_perm, keep[:, perm], target))
  np.testing.assert_allclose(y_perm, y, rtol=1e-5, atol=1e-5)
  # Permuting the targets permutes the outputs the same way.
  tperm = np.random.default_rng(0).permutation(target.shape[1])
  y_t = np.asarray(apply({"params": params}, x, keep, target[:, tperm]))
  np.testing.assert_allclose(y_t, y[:, tperm], rtol=1e-5, atol=1e-5)
  # ... while permuting only the indices (not the tokens) changes the result: positions matter.
  y_bad = np.asarray(apply({"params": params}, x, keep[:, perm], target))
  assert np.abs(y_bad - y).max() > 1e-3


def test_decoder_cls_token_participates_but_is_not_output():
  grid = (2, 3)
  dec = decoders.MaskedTokenDecoder(width=32, depth=1, num_heads=2, grid=grid, out_dim=8, has_cls=True)
  x, keep, target = _decoder_inputs(grid, True, 24, 2, seed=2)
  params = random_params(dec, x, keep, target)
  y = np.asarray(dec.apply({"params": params}, x, keep, target))
  assert y.shape == (2, 4, 8)  # targets only: the cls and the visible tokens are dropped at the end
  y2 = np.asarray(dec.apply({"params": params}, x.at[:, 0].add(1.0), keep, target))
  assert np.abs(y2 - y).max() > 1e-4  # cls attends with the rest


@pytest.mark.parametrize("train_mask_token", [True, False])
def test_decoder_mask_token_gradient(train_mask_token):
  grid = (2, 3)
  dec = decoders.MaskedTokenDecoder(width=32, depth=1, num_heads=2, grid=grid, embed="none", final_norm=False,
                                    has_cls=True, train_mask_token=train_mask_token)
  x, keep, target = _decoder_inputs(grid, True, 32, 2, seed=3)
  params = random_params(dec, x, keep, target)
  grads = jax.grad(lambda p: jnp.sum(dec.apply({"params": p}, x, keep, target) ** 2))(params)
  g = np.abs(np.asarray(grads["mask_token"])).max()
  if train_mask_token:
    assert g > 0
  else:
    assert g == 0
    # Other parameters still learn.
    assert np.abs(np.asarray(grads["blocks_0"]["mlp"]["fc1"]["kernel"])).max() > 0


@pytest.mark.parametrize("qkv_bias", ["fused", "qv", "none"])
def test_the_tpu_attention_has_the_cpu_ones_parameters_outputs_and_gradients(qkv_bias):
  """Attention traces a head-major formulation for TPU (amd_jax.aot compiles it on this CPU host under
  platform.compiling_for('tpu')): same parameter tree and values from init, same outputs and gradients."""
  attn = vit.Attention(64, 4, qkv_bias, jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 10, 64))
  params = attn.init(jax.random.PRNGKey(1), x)
  with platform.compiling_for("tpu"):
    tpu_params = attn.init(jax.random.PRNGKey(1), x)
  assert jax.tree.structure(tpu_params) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(tpu_params)):
    np.testing.assert_array_equal(a, b)

  def loss(p):
    return jnp.sum(attn.apply(p, x)[0] ** 2)

  def matmuls():
    return str(jax.make_jaxpr(lambda p: attn.apply(p, x))(params)).count("dot_general")

  want_out, want_grad, cpu_matmuls = attn.apply(params, x)[0], jax.grad(loss)(params), matmuls()
  with platform.compiling_for("tpu"):
    got_out, got_grad, tpu_matmuls = attn.apply(params, x)[0], jax.grad(loss)(params), matmuls()
  assert (cpu_matmuls, tpu_matmuls) == (2 + 2 * 4, 4)   # per head on CPU; all heads at once for TPU
  np.testing.assert_allclose(got_out, want_out, atol=2e-6, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(want_grad), jax.tree.leaves(got_grad)):
    np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4)
