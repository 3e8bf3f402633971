"""PyTorch interop: parity with transformers' ViTMAE / VideoMAE, official naming (MAE, VideoMAE, whole AMD
students), round trips, the layout detected for every naming, the CLI, errors.

transformers' ViTMAE and VideoMAE are independent PyTorch implementations of the
MAE / VideoMAE architectures. Each parity test random-initialises one (every bias,
LayerNorm and token made non-trivial), converts its weights, and compares in float32
the encoder output, every block output and the pre-training loss under the same mask
(plus the decoder's predictions and a fine-tuned classifier's logits). The official
naming path renames the transformers weights to the official keys by hand (below,
independently of amd_jax.convert) and must give the same Flax params bit for bit; the
exported state dicts load strictly into small PyTorch modules with the official module
names (written here, independently of the official repositories; for AMD: the student's
projection heads and generators, whose mask tokens the official model never registers).
Small shapes keep the whole file to seconds on two CPU cores.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from amd_jax import config_base, convert, masking
from amd_jax.convert import __main__ as cli
from amd_jax.convert import mapping, torch_io
from amd_jax.methods.mae import MAE, VideoMAE
from amd_jax.models import vit

TOL = 1e-5
IMAGENET_MEAN = "0.485,0.456,0.406"
IMAGENET_STD = "0.229,0.224,0.225"

# Small shapes: images 32x32 / patch 8 (16 tokens); videos 4 frames 32x32, tubelet 2 (32 tokens).
W, DEPTH, HEADS, DEC_W, DEC_DEPTH, DEC_HEADS = 64, 2, 4, 32, 1, 2
IMG, PATCH, FRAMES, TUBELET = 32, 8, 4, 2
BATCH = 2
PRED_SCALE = 20.0  # decoder heads scaled up from the 0.02-std init


# ------------------------------------------------------------------------------------------------------------
# transformers models, randomised
# ------------------------------------------------------------------------------------------------------------
def _randomise(model: torch.nn.Module, seed: int):
  """Non-trivial values everywhere: transformers' init leaves biases, LN affine and tokens at 0/1."""
  g = torch.Generator().manual_seed(seed)
  rand = lambda t, s: torch.randn(t.shape, generator=g) * s
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.LayerNorm):
        module.weight.copy_(1.0 + rand(module.weight, 0.1))
        module.bias.copy_(rand(module.bias, 0.1))
    for name, p in model.named_parameters():
      if not p.requires_grad:
        continue  # fixed position tables
      leaf = name.rsplit(".", 1)[-1]
      if leaf in ("bias", "q_bias", "v_bias") and "norm" not in name:
        p.copy_(rand(p, 0.05))
      elif leaf in ("cls_token", "mask_token"):
        p.copy_(rand(p, 0.02))
  return model


def _fill_vitmae_tables(model):
  """transformers' own 2-D tables: 5.x leaves them at zero when a model is built without weights."""
  from transformers.models.vit_mae import modeling_vit_mae as hfm  # pylint: disable=g-import-not-at-top
  grid = IMG // PATCH

  def table(dim):
    if hasattr(hfm, "build_2d_sinusoidal_position_embedding"):  # 5.x: [h | w] rotated to MAE's [w | h]
      t = hfm.build_2d_sinusoidal_position_embedding(grid, grid, dim, cls_token=True)
      return torch.cat([t[..., dim // 2:], t[..., :dim // 2]], dim=-1)[None]
    return torch.from_numpy(hfm.get_2d_sincos_pos_embed(dim, grid, add_cls_token=True)).float()[None]

  with torch.no_grad():
    model.vit.embeddings.position_embeddings.copy_(table(W))
    model.decoder.decoder_pos_embed.copy_(table(DEC_W))


def make_vitmae(seed=0):
  cfg = transformers.ViTMAEConfig(
      hidden_size=W, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * W,
      image_size=IMG, patch_size=PATCH, num_channels=3, qkv_bias=True, layer_norm_eps=1e-6, hidden_act="gelu",
      decoder_hidden_size=DEC_W, decoder_num_hidden_layers=DEC_DEPTH, decoder_num_attention_heads=DEC_HEADS,
      decoder_intermediate_size=4 * DEC_W, mask_ratio=0.75, norm_pix_loss=True, attn_implementation="eager")
  torch.manual_seed(seed)
  model = _randomise(transformers.ViTMAEForPreTraining(cfg), seed).eval()
  _fill_vitmae_tables(model)
  with torch.no_grad():  # O(1) predictions, so the loss responds to every weight (not just the targets)
    model.decoder.decoder_pred.weight.mul_(PRED_SCALE)
  return model


def make_videomae(seed=0, classifier=False):
  cfg = transformers.VideoMAEConfig(
      hidden_size=W, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * W,
      image_size=IMG, patch_size=PATCH, num_channels=3, num_frames=FRAMES, tubelet_size=TUBELET, qkv_bias=True,
      layer_norm_eps=1e-6, hidden_act="gelu", use_mean_pooling=classifier, decoder_hidden_size=DEC_W,
      decoder_num_hidden_layers=DEC_DEPTH, decoder_num_attention_heads=DEC_HEADS,
      decoder_intermediate_size=4 * DEC_W, norm_pix_loss=True, num_labels=5, attn_implementation="eager")
  torch.manual_seed(seed)
  cls = transformers.VideoMAEForVideoClassification if classifier else transformers.VideoMAEForPreTraining
  model = _randomise(cls(cfg), seed).eval()
  # transformers builds these two LayerNorms with torch's default eps 1e-5; the official models use 1e-6.
  if classifier:
    model.fc_norm.eps = 1e-6
  else:
    model.decoder.norm.eps = 1e-6
    with torch.no_grad():
      model.decoder.head.weight.mul_(PRED_SCALE)
  return model


def state_dict_np(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------------------
# transformers -> official names, written out by hand (independent of amd_jax.convert.mapping)
# ------------------------------------------------------------------------------------------------------------
def _attn_parts(layer):
  """(q, k, v, out) Linear modules of a transformers layer, 4.x or 5.x."""
  a = layer.attention
  if hasattr(a, "q_proj"):
    return a.q_proj, a.k_proj, a.v_proj, a.o_proj
  return a.attention.query, a.attention.key, a.attention.value, a.output.dense


def _mlp_parts(layer):
  if hasattr(layer, "mlp"):
    return layer.mlp.fc1, layer.mlp.fc2
  return layer.intermediate.dense, layer.output.dense


def _official_block(layer, prefix: str, bias: str) -> dict[str, torch.Tensor]:
  q, k, v, o = _attn_parts(layer)
  fc1, fc2 = _mlp_parts(layer)
  out = {
      f"{prefix}.norm1.weight": layer.layernorm_before.weight, f"{prefix}.norm1.bias": layer.layernorm_before.bias,
      f"{prefix}.attn.qkv.weight": torch.cat([q.weight, k.weight, v.weight], 0),
      f"{prefix}.attn.proj.weight": o.weight, f"{prefix}.attn.proj.bias": o.bias,
      f"{prefix}.norm2.weight": layer.layernorm_after.weight, f"{prefix}.norm2.bias": layer.layernorm_after.bias,
      f"{prefix}.mlp.fc1.weight": fc1.weight, f"{prefix}.mlp.fc1.bias": fc1.bias,
      f"{prefix}.mlp.fc2.weight": fc2.weight, f"{prefix}.mlp.fc2.bias": fc2.bias,
  }
  if bias == "fused":
    out[f"{prefix}.attn.qkv.bias"] = torch.cat([q.bias, k.bias, v.bias], 0)
  else:  # VideoMAE: q and v biases, the k bias is a constant zero
    sa = layer.attention.attention
    out[f"{prefix}.attn.q_bias"] = q.bias if q.bias is not None else sa.q_bias
    out[f"{prefix}.attn.v_bias"] = v.bias if v.bias is not None else sa.v_bias
  return out


def _layers(module):
  return module.layers if hasattr(module, "layers") else module.encoder.layer


def official_mae_state_dict(model) -> dict[str, np.ndarray]:
  """facebookresearch/mae MaskedAutoencoderViT keys."""
  vitm, dec = model.vit, model.decoder
  sd = {"cls_token": vitm.embeddings.cls_token, "pos_embed": vitm.embeddings.position_embeddings,
        "patch_embed.proj.weight": vitm.embeddings.patch_embeddings.projection.weight,
        "patch_embed.proj.bias": vitm.embeddings.patch_embeddings.projection.bias,
        "norm.weight": vitm.layernorm.weight, "norm.bias": vitm.layernorm.bias,
        "decoder_embed.weight": dec.decoder_embed.weight, "decoder_embed.bias": dec.decoder_embed.bias,
        "mask_token": dec.mask_token, "decoder_pos_embed": dec.decoder_pos_embed,
        "decoder_norm.weight": dec.decoder_norm.weight, "decoder_norm.bias": dec.decoder_norm.bias,
        "decoder_pred.weight": dec.decoder_pred.weight, "decoder_pred.bias": dec.decoder_pred.bias}
  for i, layer in enumerate(_layers(vitm)):
    sd.update(_official_block(layer, f"blocks.{i}", "fused"))
  for i, layer in enumerate(dec.decoder_layers):
    sd.update(_official_block(layer, f"decoder_blocks.{i}", "fused"))
  return {k: v.detach().numpy().copy() for k, v in sd.items()}


def official_videomae_state_dict(model) -> dict[str, np.ndarray]:
  """MCG-NJU/VideoMAE PretrainVisionTransformer keys (encoder under `encoder.`)."""
  enc, dec = model.videomae, model.decoder
  sd = {"encoder.patch_embed.proj.weight": enc.embeddings.patch_embeddings.projection.weight,
        "encoder.patch_embed.proj.bias": enc.embeddings.patch_embeddings.projection.bias,
        "encoder.norm.weight": enc.layernorm.weight, "encoder.norm.bias": enc.layernorm.bias,
        "encoder_to_decoder.weight": model.encoder_to_decoder.weight, "mask_token": model.mask_token,
        "decoder.norm.weight": dec.norm.weight, "decoder.norm.bias": dec.norm.bias,
        "decoder.head.weight": dec.head.weight, "decoder.head.bias": dec.head.bias}
  for i, layer in enumerate(enc.encoder.layer):
    sd.update(_official_block(layer, f"encoder.blocks.{i}", "qv"))
  for i, layer in enumerate(dec.decoder_layers):
    sd.update(_official_block(layer, f"decoder.blocks.{i}", "qv"))
  return {k: v.detach().numpy().copy() for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------------------
# Small PyTorch modules with the official module names (strict loading + a forward of the exported weights)
# ------------------------------------------------------------------------------------------------------------
class OfficialAttention(torch.nn.Module):
  def __init__(self, dim, heads, bias):
    super().__init__()
    self.heads, self.bias = heads, bias
    self.qkv = torch.nn.Linear(dim, 3 * dim, bias=bias == "fused")
    if bias == "qv":
      self.q_bias = torch.nn.Parameter(torch.zeros(dim))
      self.v_bias = torch.nn.Parameter(torch.zeros(dim))
    self.proj = torch.nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    bias = self.qkv.bias
    if self.bias == "qv":
      bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
    qkv = torch.nn.functional.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = ((q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class OfficialBlock(torch.nn.Module):
  def __init__(self, dim, heads, bias):
    super().__init__()
    self.norm1 = torch.nn.LayerNorm(dim, eps=1e-6)
    self.attn = OfficialAttention(dim, heads, bias)
    self.norm2 = torch.nn.LayerNorm(dim, eps=1e-6)
    self.mlp = torch.nn.Module()
    self.mlp.fc1 = torch.nn.Linear(dim, 4 * dim)
    self.mlp.fc2 = torch.nn.Linear(4 * dim, dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class OfficialViT(torch.nn.Module):
  """timm/MAE VisionTransformer (video=False) or VideoMAE VisionTransformer (video=True) module names."""

  def __init__(self, video: bool, final_norm=True, num_classes=0):
    super().__init__()
    self.video = video
    self.patch_embed = torch.nn.Module()
    if video:
      self.patch_embed.proj = torch.nn.Conv3d(3, W, (TUBELET, PATCH, PATCH), (TUBELET, PATCH, PATCH))
    else:
      self.patch_embed.proj = torch.nn.Conv2d(3, W, PATCH, PATCH)
      self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, W))
      self.pos_embed = torch.nn.Parameter(torch.zeros(1, (IMG // PATCH)**2 + 1, W), requires_grad=False)
    self.blocks = torch.nn.ModuleList([OfficialBlock(W, HEADS, "qv" if video else "fused") for _ in range(DEPTH)])
    self.norm = torch.nn.LayerNorm(W, eps=1e-6) if final_norm else None
    if num_classes:
      self.fc_norm = torch.nn.LayerNorm(W, eps=1e-6)
      self.head = torch.nn.Linear(W, num_classes)
    self.num_classes = num_classes

  def forward(self, x, table):
    x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
    if self.video:
      x = x + table
    else:
      x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
    for blk in self.blocks:
      x = blk(x)
    if self.norm is not None:
      x = self.norm(x)
    if self.num_classes:
      return self.head(self.fc_norm(x[:, int(not self.video):].mean(1)))
    return x


# ------------------------------------------------------------------------------------------------------------
# amd_jax side
# ------------------------------------------------------------------------------------------------------------
def amd_config(video: bool, scan: bool = False):
  c = config_base.base_config()
  c.method = "videomae" if video else "mae"
  c.model.update(variant="tiny", width=W, depth=DEPTH, num_heads=HEADS, patch_size=PATCH, tubelet_size=TUBELET,
                 cls_token=not video, qkv_bias="qv" if video else "fused",
                 pos_emb="sincos1d" if video else "sincos2d", scan=scan)
  c.decoder.update(width=DEC_W, depth=DEC_DEPTH, num_heads=DEC_HEADS)
  c.data.update(modality="video" if video else "image", image_size=IMG, channels=3, num_frames=FRAMES,
                mean=IMAGENET_MEAN, std=IMAGENET_STD)
  c.mask.update(ratio=0.75, kind="tube" if video else "random")
  c.norm_pix_loss = True
  return c


def amd_arch(video: bool, decoder=True, final_norm=True) -> mapping.Arch:
  c = amd_config(video)
  return mapping.arch_from_config(c.model, decoder_cfg=c.decoder if decoder else None, image_size=IMG,
                                  num_frames=FRAMES, video=video, final_norm=final_norm)


@functools.lru_cache(maxsize=None)
def _init_params(video: bool, scan: bool):
  """Random values in the exact tree nn.scan / the unscanned encoder and the decoder create (eval_shape:
  no compile). Every bias and LayerNorm parameter is non-trivial, so a swapped mapping cannot hide."""
  cfg = amd_config(video, scan)
  method = (VideoMAE if video else MAE)(cfg)
  shape = (1, FRAMES, IMG, IMG, 3) if video else (1, IMG, IMG, 3)
  abstract = jax.eval_shape(method.init, jax.random.PRNGKey(0),
                            {method.input_key(): jax.ShapeDtypeStruct(shape, jnp.float32)})
  rng = np.random.default_rng(int(video) * 2 + int(scan))
  return jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(a.dtype), abstract)


def init_params(video: bool, scan: bool = False) -> dict:
  """A method's params (MAE or VideoMAE at the small test size), as fresh numpy copies."""
  return jax.tree.map(np.array, _init_params(video, scan))


def mask_from_noise(noise: np.ndarray, keep_per: int, frames: int = 1):
  """amd_jax's mask semantics from a noise array [B, S]: first keep_per of argsort kept, groups ascending."""
  perm = np.argsort(noise, axis=1, kind="stable")
  keep, masked = np.sort(perm[:, :keep_per], 1), np.sort(perm[:, keep_per:], 1)
  s = noise.shape[1]
  tube = lambda idx: np.concatenate([idx + t * s for t in range(frames)], axis=1)
  return masking.Mask(keep=jnp.asarray(tube(keep), jnp.int32), masked=jnp.asarray(tube(masked), jnp.int32))


def maxdiff(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.max(np.abs(a - b)))


def assert_trees_bit_equal(a, b):
  fa, fb = mapping.flatten(a), mapping.flatten(b)
  assert sorted(fa) == sorted(fb)
  for path in fa:
    x, y = np.asarray(fa[path]), np.asarray(fb[path])
    assert x.dtype == y.dtype and x.shape == y.shape, path
    assert np.array_equal(x.view(np.uint32), y.view(np.uint32)), f"{'/'.join(path)} differs"


@functools.lru_cache(maxsize=None)
def compiled(video: bool):
  """Jitted (encoder with every block output, decoder prediction, the method's own loss) for one modality.

  The loss is MAE.loss / VideoMAE.loss itself, with its mask draw replaced (at trace time) by
  the mask passed in, so the comparison runs the real loss code under the reference's mask.
  """
  cfg = amd_config(video)
  method = (VideoMAE if video else MAE)(cfg)
  enc = vit.encoder_from_config(cfg.model, block_layers=tuple(range(1, DEPTH + 1)))
  rng = jax.random.PRNGKey(0)

  def encode(params, x, keep):
    return enc.apply({"params": params["encoder"]}, x, keep)

  def predict(params, x, keep, masked):
    return method.reconstruction(params, x, masking.Mask(keep=keep, masked=masked), rng, train=False)[0]

  def loss(params, x, keep, masked):
    original = masking.random_mask
    masking.random_mask = lambda *a, **k: masking.Mask(keep=keep, masked=masked)
    try:
      return method.loss(params, None, {method.input_key(): x}, rng)[0]
    finally:
      masking.random_mask = original

  return jax.jit(encode), jax.jit(predict), jax.jit(loss)


# ------------------------------------------------------------------------------------------------------------
# Parity: ViTMAE (images)
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vitmae_case():
  model = make_vitmae()
  g = torch.Generator().manual_seed(1)
  x = torch.randn(BATCH, 3, IMG, IMG, generator=g)
  noise = torch.rand(BATCH, (IMG // PATCH)**2, generator=g)
  with torch.no_grad():
    out = model(pixel_values=x, noise=noise)
    enc = model.vit(pixel_values=x, noise=noise, output_hidden_states=True)
  return model, x, noise, (out, enc)


def _vitmae_compare(params, vitmae_case):
  _, x, noise, (out, enc_out) = vitmae_case
  encode, predict, loss = compiled(False)
  x_nhwc = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
  n_keep = int((IMG // PATCH)**2 * 0.25)
  mask = mask_from_noise(noise.numpy(), n_keep)
  tokens, inter = encode(params, x_nhwc, mask.keep)
  # transformers keeps the visible tokens in noise order; amd_jax in ascending order.
  ids_keep = np.argsort(noise.numpy(), axis=1, kind="stable")[:, :n_keep]
  order = np.argsort(ids_keep, axis=1)
  reorder = lambda h: np.concatenate(
      [h[:, :1], np.take_along_axis(h[:, 1:], order[..., None], axis=1)], axis=1)
  assert len(enc_out.hidden_states) == DEPTH + 1   # embeddings, then each block's output
  diffs = {"encoder_output": maxdiff(tokens, reorder(enc_out.last_hidden_state.numpy()))}
  for l in range(1, DEPTH + 1):
    diffs[f"block_{l}"] = maxdiff(inter[f"block_{l}"], reorder(enc_out.hidden_states[l].numpy()))
  pred = predict(params, x_nhwc, mask.keep, mask.masked)
  hf_pred = np.take_along_axis(out.logits.numpy(), np.asarray(mask.masked)[..., None], axis=1)
  diffs["decoder_prediction"] = maxdiff(pred, hf_pred)
  diffs["loss"] = abs(float(loss(params, x_nhwc, mask.keep, mask.masked)) - float(out.loss))
  return diffs


def test_vitmae_parity(vitmae_case):
  model = vitmae_case[0]
  params, report = convert.torch_to_flax(state_dict_np(model), amd_arch(False), "hf_vitmae", strict=True)
  assert report.parts == ["encoder", "decoder"]
  assert not report.unexpected and not report.missing
  # transformers' tables (filled by its own code) equal amd_jax's fixed 2-D layout.
  assert max(report.pos_table_max_abs_diff.values()) < 1e-6
  diffs = _vitmae_compare(params, vitmae_case)
  assert max(diffs.values()) < TOL, diffs


def test_vitmae_official_naming_path(vitmae_case):
  model = vitmae_case[0]
  via_hf, _ = convert.torch_to_flax(state_dict_np(model), amd_arch(False), "hf_vitmae")
  official = official_mae_state_dict(model)
  assert mapping.detect_layout(official) == "mae"
  params, report = convert.torch_to_flax({"module." + k: v for k, v in official.items()}, amd_arch(False), "mae",
                                         strict=True)
  assert not report.unexpected and set(report.unused) == set()
  assert_trees_bit_equal(params, via_hf)
  diffs = _vitmae_compare(params, vitmae_case)
  assert max(diffs.values()) < TOL, diffs
  # The export is exactly the official key set, shapes and values.
  exported = convert.flax_to_torch(params, amd_arch(False), "mae")
  assert sorted(exported) == sorted(official)
  for k in official:
    assert exported[k].shape == official[k].shape, k
    if k.endswith("pos_embed"):
      assert maxdiff(exported[k], official[k]) < 1e-6
    else:
      assert np.array_equal(exported[k], official[k]), k


# ------------------------------------------------------------------------------------------------------------
# Parity: VideoMAE (videos)
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def videomae_case():
  model = make_videomae()
  g = torch.Generator().manual_seed(2)
  x = torch.randn(BATCH, FRAMES, 3, IMG, IMG, generator=g)   # transformers: (B, T, C, H, W)
  per_frame = (IMG // PATCH)**2
  noise = torch.rand(BATCH, per_frame, generator=g).numpy()
  mask = mask_from_noise(noise, per_frame - int(0.75 * per_frame), FRAMES // TUBELET)
  bool_masked = np.ones((BATCH, per_frame * FRAMES // TUBELET), bool)
  np.put_along_axis(bool_masked, np.asarray(mask.keep), False, axis=1)
  with torch.no_grad():
    out = model(pixel_values=x, bool_masked_pos=torch.from_numpy(bool_masked))
    enc = model.videomae(pixel_values=x, bool_masked_pos=torch.from_numpy(bool_masked), output_hidden_states=True)
  return model, x, mask, (out, enc)


def _videomae_compare(params, videomae_case):
  _, x, mask, (out, enc_out) = videomae_case
  encode, predict, loss = compiled(True)
  x_flax = jnp.asarray(x.numpy().transpose(0, 1, 3, 4, 2))  # (B, T, H, W, C)
  tokens, inter = encode(params, x_flax, mask.keep)
  assert len(enc_out.hidden_states) == DEPTH + 1
  diffs = {"encoder_output": maxdiff(tokens, enc_out.last_hidden_state.numpy())}
  for l in range(1, DEPTH + 1):
    diffs[f"block_{l}"] = maxdiff(inter[f"block_{l}"], enc_out.hidden_states[l].numpy())
  pred = predict(params, x_flax, mask.keep, mask.masked)
  diffs["decoder_prediction"] = maxdiff(pred, out.logits.numpy())   # both: masked tokens, ascending
  diffs["loss"] = abs(float(loss(params, x_flax, mask.keep, mask.masked)) - float(out.loss))
  return diffs


def test_videomae_parity(videomae_case):
  model = videomae_case[0]
  params, report = convert.torch_to_flax(state_dict_np(model), amd_arch(True), "hf_videomae", strict=True)
  assert report.parts == ["encoder", "decoder"] and report.prefix == "encoder."
  assert not report.unexpected and not report.missing
  diffs = _videomae_compare(params, videomae_case)
  assert max(diffs.values()) < TOL, diffs


def test_videomae_official_naming_path(videomae_case, tmp_path):
  model = videomae_case[0]
  via_hf, _ = convert.torch_to_flax(state_dict_np(model), amd_arch(True), "hf_videomae")
  official = official_videomae_state_dict(model)
  assert mapping.detect_layout(official) == "videomae"
  # Through a file, wrapped as the official scripts save it (with an argparse Namespace beside it).
  path = str(tmp_path / "videomae.pth")
  torch.save({"model": {k: torch.from_numpy(v) for k, v in official.items()}, "epoch": 3,
              "args": argparse.Namespace(model="pretrain_videomae_small_patch16_224")}, path)
  params, report = convert.load_torch_checkpoint(path, amd_arch(True), "videomae", strict=True)
  assert not report.unexpected
  assert_trees_bit_equal(params, via_hf)
  diffs = _videomae_compare(params, videomae_case)
  assert max(diffs.values()) < TOL, diffs
  exported = convert.flax_to_torch(params, amd_arch(True), "videomae")
  assert sorted(exported) == sorted(official)
  for k in official:
    assert np.array_equal(exported[k], official[k]), k


def _as_transformers_4x(sd: dict, video: bool) -> dict:
  """transformers 4.x parameter names, from the 5.x ones (CI may install either)."""
  out = {}
  for k, v in sd.items():
    k = k.replace("vit.layers.", "vit.encoder.layer.")
    for a, b in (("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
                 ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense"),
                 ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
      k = k.replace(a, b)
    if video:  # 4.x VideoMAE: Linear layers without bias plus q_bias / v_bias parameters
      k = k.replace("attention.attention.query.bias", "attention.attention.q_bias")
      k = k.replace("attention.attention.value.bias", "attention.attention.v_bias")
    out[k] = v
  return out


@pytest.mark.parametrize("video", [False, True])
def test_transformers_4x_names(video, vitmae_case, videomae_case):
  model = (videomae_case if video else vitmae_case)[0]
  layout = "hf_videomae" if video else "hf_vitmae"
  new, _ = convert.torch_to_flax(state_dict_np(model), amd_arch(video), layout, strict=True)
  old_names = _as_transformers_4x(state_dict_np(model), video)
  assert old_names.keys() != state_dict_np(model).keys()
  old, report = convert.torch_to_flax(old_names, amd_arch(video), "auto", strict=True)
  assert report.layout == layout
  assert_trees_bit_equal(old, new)


def test_videomae_classifier_parity():
  """Fine-tuned model: no final norm, mean pooling, fc_norm, head (transformers: classifier)."""
  model = make_videomae(seed=3, classifier=True)
  g = torch.Generator().manual_seed(4)
  x = torch.randn(BATCH, FRAMES, 3, IMG, IMG, generator=g)
  with torch.no_grad():
    logits = model(pixel_values=x).logits.numpy()
  arch = amd_arch(True, decoder=False, final_norm=None)
  params, report = convert.torch_to_flax(state_dict_np(model), arch, "hf_videomae", strict=True)
  assert report.parts == ["encoder", "classifier"] and "norm" not in params["encoder"]
  cfg = amd_config(video=True)
  enc = vit.encoder_from_config(cfg.model, final_norm=False)
  tokens, _ = jax.jit(enc.apply)({"params": params["encoder"]}, jnp.asarray(x.numpy().transpose(0, 1, 3, 4, 2)))
  pooled = nn.LayerNorm(epsilon=1e-6).apply({"params": params["fc_norm"]}, tokens.mean(1))
  ours = nn.Dense(5).apply({"params": params["head"]}, pooled)
  assert maxdiff(ours, logits) < TOL
  # Export -> the official fine-tuning model (no prefix, no norm, fc_norm + head) loads strictly.
  sd = convert.flax_to_torch(params, arch, "videomae")
  official = OfficialViT(video=True, final_norm=False, num_classes=5)
  official.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  table = torch.from_numpy(mapping.fixed_table(arch, W))
  with torch.no_grad():
    assert maxdiff(official(x.permute(0, 2, 1, 3, 4), table), logits) < TOL


# ------------------------------------------------------------------------------------------------------------
# Export: strict loading into official module names, numerics of the exported weights
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("video", [False, True])
def test_export_loads_strictly_into_official_modules(video, tmp_path):
  cfg = amd_config(video)
  shape = (BATCH, FRAMES, IMG, IMG, 3) if video else (BATCH, IMG, IMG, 3)
  x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
  params = init_params(video)
  arch = amd_arch(video)
  path = str(tmp_path / ("enc.safetensors" if video else "enc.pth"))
  convert.export_torch(params, path, arch, "videomae" if video else "mae", parts=("encoder",))
  sd, _ = torch_io.read_state_dict(path)
  official = OfficialViT(video=video)
  official.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  tokens, _ = jax.jit(vit.encoder_from_config(cfg.model).apply)({"params": params["encoder"]}, x)
  xt = torch.from_numpy(np.array(x))
  xt = xt.permute(0, 4, 1, 2, 3) if video else xt.permute(0, 3, 1, 2)
  with torch.no_grad():
    theirs = official(xt, torch.from_numpy(mapping.fixed_table(arch, W))).numpy()
  assert maxdiff(tokens, theirs) < TOL


# ------------------------------------------------------------------------------------------------------------
# Round trips flax -> torch -> flax, bit-exact
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("video", [False, True])
@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_round_trip_bit_exact(video, scan, suffix, tmp_path):
  params = init_params(video, scan)
  assert mapping.is_scanned(params["encoder"]) == scan
  arch = amd_arch(video)
  layout = "videomae" if video else "mae"
  path = str(tmp_path / f"ckpt{suffix}")
  convert.export_torch(params, path, arch, layout, parts=("encoder", "decoder"))
  back, report = convert.load_torch_checkpoint(path, arch, layout, scan=scan, strict=True)
  assert not report.unexpected and not report.unused
  assert_trees_bit_equal(back, params)
  with pytest.raises(FileExistsError):
    convert.export_torch(params, path, arch, layout)


def test_classifier_round_trip_bit_exact(tmp_path):
  """MAE fine-tuned naming (global pool): encoder without norm, fc_norm and head at the top level."""
  encoder = init_params(False)["encoder"]
  del encoder["norm"]
  rng = np.random.default_rng(9)
  params = {"encoder": encoder,
            "fc_norm": {"scale": 1 + rng.standard_normal(W).astype(np.float32), "bias": np.zeros(W, np.float32)},
            "head": {"kernel": rng.standard_normal((W, 7)).astype(np.float32), "bias": np.ones(7, np.float32)}}
  arch = amd_arch(False, decoder=False, final_norm=None)
  sd = convert.flax_to_torch(params, arch, "mae")
  assert {"fc_norm.weight", "head.weight", "head.bias", "cls_token", "pos_embed"} <= set(sd)
  assert "norm.weight" not in sd
  official = OfficialViT(video=False, final_norm=False, num_classes=7)
  official.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  back, report = convert.torch_to_flax(sd, arch, "mae", strict=True)
  assert report.parts == ["encoder", "classifier"]
  assert_trees_bit_equal(back, params)
  # A fine-tuned timm model learns pos_embed's cls row: it is folded into cls_token.
  sd2 = dict(sd, pos_embed=sd["pos_embed"].copy())
  sd2["pos_embed"][0, 0] = 0.5
  back2, report2 = convert.torch_to_flax(sd2, arch, "mae")
  np.testing.assert_array_equal(back2["encoder"]["cls_token"], params["encoder"]["cls_token"] + 0.5)
  assert any("cls_token" in n for n in report2.notes)


# ------------------------------------------------------------------------------------------------------------
# Teachers: load_torch_encoder
# ------------------------------------------------------------------------------------------------------------
def _amd_student_checkpoint(params, arch) -> dict[str, np.ndarray]:
  """An AMD-style pre-training checkpoint: videomae naming plus projection heads and generators."""
  sd = convert.flax_to_torch(params, arch, "amd", parts=("encoder", "decoder"))
  sd["encoder.projection_heads.0.weight"] = np.zeros((1024, W), np.float32)
  sd["generators.0.blocks.0.norm1.weight"] = np.ones((1024,), np.float32)
  return sd


def test_load_torch_encoder_teacher(tmp_path):
  cfg = amd_config(True, scan=True)
  params = init_params(True, scan=True)
  sd = _amd_student_checkpoint(params, amd_arch(True))
  path = str(tmp_path / "amd.pth")
  torch.save({"module": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
  enc, report = convert.load_torch_encoder(path, cfg.model, num_frames=FRAMES, image_size=IMG,
                                           return_report=True)
  assert report.layout == "amd" and report.prefix == "encoder."
  assert_trees_bit_equal(enc, params["encoder"])          # scan layout follows model_cfg.scan
  assert not report.unexpected
  assert any("projection heads" in why for why in report.unused.values())
  assert any("decoder" in why for why in report.unused.values())
  # Only the first block (teachers aligned at early layers); nn.scan then expects one stacked block.
  enc1, report1 = convert.load_torch_encoder(path, cfg.model, max_depth=1, return_report=True)
  assert enc1["blocks"]["block"]["mlp"]["fc1"]["kernel"].shape[0] == 1
  assert any("max_depth" in why for why in report1.unused.values())
  # Fine-tuning scripts' `backbone.` prefix, as safetensors.
  st = str(tmp_path / "backbone.safetensors")
  torch_io.write_state_dict({k.replace("encoder.", "backbone.", 1): v for k, v in sd.items()
                             if k.startswith("encoder.") and "projection_heads" not in k}, st)
  enc2, report2 = convert.load_torch_encoder(st, cfg.model, return_report=True)
  assert report2.prefix == "backbone." and not report2.unexpected
  assert_trees_bit_equal(enc2, params["encoder"])
  # The same encoder through a converted .npz.
  npz = str(tmp_path / "p.npz")
  torch_io.save_flax_params(params, npz)
  assert_trees_bit_equal(convert.load_torch_encoder(npz, cfg.model), params["encoder"])


def test_missing_encoder_keys_raise(tmp_path):
  cfg = amd_config(True)
  params = init_params(True)
  sd = convert.flax_to_torch(params, amd_arch(True), "videomae", parts=("encoder",))
  del sd["blocks.1.mlp.fc2.weight"]
  path = str(tmp_path / "broken.safetensors")
  torch_io.write_state_dict(sd, path)
  with pytest.raises(mapping.ConversionError, match=r"blocks\.1\.mlp\.fc2\.weight"):
    convert.load_torch_encoder(path, cfg.model)
  # A decoder-only file is no teacher.
  only_dec = {k: v for k, v in convert.flax_to_torch(params, amd_arch(True), "videomae").items()
              if not k.startswith("encoder.")}
  with pytest.raises(mapping.ConversionError, match="lacks keys"):
    convert.torch_to_flax(only_dec, amd_arch(True), "videomae")


def test_shape_mismatch_names_key_and_shapes():
  model = make_vitmae()
  sd = state_dict_np(model)
  wider = mapping.Arch(width=2 * W, depth=DEPTH, num_heads=HEADS, patch_size=PATCH, image_size=IMG)
  with pytest.raises(mapping.ShapeMismatchError) as e:
    convert.torch_to_flax(sd, wider, "hf_vitmae")
  msg = str(e.value)
  assert "patch_embed.proj.weight" in msg and "(64, 3, 8, 8)" in msg and "(128, 3, 8, 8)" in msg
  deeper = mapping.Arch(width=W, depth=DEPTH + 1, num_heads=HEADS, patch_size=PATCH, image_size=IMG)
  with pytest.raises(mapping.ConversionError, match=r"blocks\.2\."):
    convert.torch_to_flax(sd, deeper, "hf_vitmae")
  # Export checks the Flax side the same way.
  params, _ = convert.torch_to_flax(sd, amd_arch(False), "hf_vitmae")
  with pytest.raises(mapping.ConversionError, match="blocks_1"):
    convert.flax_to_torch(params, mapping.Arch(width=W, depth=1, num_heads=HEADS, patch_size=PATCH,
                                               image_size=IMG), "mae", parts=("encoder",))


def test_heads_come_from_the_architecture():
  """ViT-Ti has 3 heads in MAE/DeiT and 12 in MAE-lite; identical weights, so only the name decides."""
  assert mapping.named_arch("vit_ti", "mae").num_heads == 3
  assert mapping.named_arch("vit_ti", "mae", num_heads=12).num_heads == 12
  assert mapping.named_arch("vit_l", "videomae").num_heads == 16
  sd_keys_3 = {e.torch_key: e.torch_shape for e in mapping.encoder_entries(mapping.named_arch("vit_ti", "mae"), "mae")}
  sd_keys_12 = {e.torch_key: e.torch_shape
                for e in mapping.encoder_entries(mapping.named_arch("vit_ti", "mae", num_heads=12), "mae")}
  assert sd_keys_3 == sd_keys_12


def test_layer_scale_is_refused():
  params = init_params(True)
  sd = convert.flax_to_torch(params, amd_arch(True), "videomae", parts=("encoder",))
  sd["blocks.0.gamma_1"] = np.ones((W,), np.float32)
  with pytest.raises(mapping.ConversionError, match="gamma_1"):
    convert.torch_to_flax(sd, amd_arch(True, decoder=False), "videomae")


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------
def test_cli_both_directions(tmp_path, capsys):
  model = make_vitmae(seed=5)
  official = official_mae_state_dict(model)
  pth = str(tmp_path / "mae.pth")
  torch.save({"model": {k: torch.from_numpy(v) for k, v in official.items()}}, pth)
  size = ["--arch", "vit_tiny", "--width", str(W), "--depth", str(DEPTH), "--num_heads", str(HEADS),
          "--patch_size", str(PATCH), "--image_size", str(IMG), "--decoder_width", str(DEC_W),
          "--decoder_depth", str(DEC_DEPTH), "--decoder_heads", str(DEC_HEADS)]
  out = str(tmp_path / "flax")
  assert cli.main(["to_flax", "--layout", "mae", "--input", pth, "--output", out, "--strict"] + size) == 0
  params, meta = torch_io.load_flax_params(os.path.join(out, "params.npz"))
  assert meta["arch"]["num_heads"] == HEADS and meta["parts"] == ["encoder", "decoder"]
  assert_trees_bit_equal(params, convert.torch_to_flax(official, amd_arch(False), "mae")[0])
  report = json.load(open(os.path.join(out, "conversion.json")))
  assert report["report"]["unexpected"] == []
  # Refuses to overwrite.
  assert cli.main(["to_flax", "--layout", "mae", "--input", pth, "--output", out] + size) == 2
  assert "exists" in capsys.readouterr().err
  # Back to torch (encoder + decoder), bit-exact against the original file.
  st = str(tmp_path / "back.safetensors")
  assert cli.main(["to_torch", "--params", os.path.join(out, "params.npz"), "--layout", "mae", "--output", st,
                   "--include_decoder"] + size) == 0
  back, _ = torch_io.read_state_dict(st)
  assert sorted(back) == sorted(official)
  for k in official:
    if "pos_embed" in k:
      assert maxdiff(back[k], official[k]) < 1e-6
    else:
      assert np.array_equal(back[k], official[k]), k


def test_cli_to_torch_from_workdir(tmp_path, capsys):
  from amd_jax.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  cfg = amd_config(True, scan=True)
  params = init_params(True, scan=True)
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(cfg.to_json_best_effort())
  ckpt = Checkpointer(workdir, every_steps=1, keep=1, async_save=False)
  ckpt.save(1, {"step": jnp.asarray(1), "params": params}, force=True)
  ckpt.close()
  out = str(tmp_path / "student.pth")
  assert cli.main(["to_torch", "--workdir", workdir, "--output", out]) == 0   # architecture from config.json
  sd, info = torch_io.read_state_dict(out)
  assert info["wrapper"] == "model" and "blocks.1.attn.q_bias" in sd and "norm.weight" in sd
  official = OfficialViT(video=True)
  official.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  back = convert.load_torch_encoder(out, cfg.model)
  assert_trees_bit_equal(back, params["encoder"])
  # A named architecture that contradicts the run is refused.
  assert cli.main(["to_torch", "--workdir", workdir, "--output", str(tmp_path / "x.pth"), "--arch", "vit_tiny",
                   "--width", str(W), "--depth", str(DEPTH), "--num_heads", "2", "--patch_size", str(PATCH)]) == 2
  assert "num_heads" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# Official AMD students, whole: projection heads and generators (MCG-NJU/AMD module names)
# ------------------------------------------------------------------------------------------------------------
TEACHER_W, PAIRS, GEN_DEPTH = 128, 2, 2   # the generators work at the teacher width; heads = width / 64


class OfficialGenerator(torch.nn.Module):
  """AMD's Generator: blocks at the teacher width and a final norm its forward never applies."""

  def __init__(self, dim, depth):
    super().__init__()
    self.blocks = torch.nn.ModuleList([OfficialBlock(dim, dim // 64, "qv") for _ in range(depth)])
    self.norm = torch.nn.LayerNorm(dim, eps=1e-6)

  def forward(self, x, num_targets):
    for blk in self.blocks:
      x = blk(x)
    return x[:, -num_targets:]


class OfficialAMDStudent(torch.nn.Module):
  """AMD's PretrainAMD module names: encoder (+ projection_heads), generators, decoder, encoder_to_decoder,
  mask_token. Like the official model it keeps the generator mask tokens in a plain list (never registered)."""

  def __init__(self):
    super().__init__()
    self.encoder = OfficialViT(video=True)
    self.encoder.projection_heads = torch.nn.ModuleList(
        [torch.nn.Linear(W, TEACHER_W, bias=False) for _ in range(PAIRS)])
    self.generators = torch.nn.ModuleList([OfficialGenerator(TEACHER_W, GEN_DEPTH) for _ in range(PAIRS)])
    self.generator_mask_tokens = [torch.nn.Parameter(torch.randn(1, 1, TEACHER_W) * 0.02) for _ in range(PAIRS)]
    self.decoder = torch.nn.Module()
    self.decoder.blocks = torch.nn.ModuleList([OfficialBlock(DEC_W, DEC_HEADS, "qv") for _ in range(DEC_DEPTH)])
    self.decoder.norm = torch.nn.LayerNorm(DEC_W, eps=1e-6)
    self.decoder.head = torch.nn.Linear(DEC_W, 3 * TUBELET * PATCH**2)
    self.encoder_to_decoder = torch.nn.Linear(W, DEC_W, bias=False)
    self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, DEC_W))

  def generate(self, i, student_feature, vis_idx, diff_idx, table):
    """The generation path of the official forward: project, add positions, append mask tokens, generate."""
    feat = self.encoder.projection_heads[i](student_feature)
    pos = lambda idx: table[0][idx]
    x = torch.cat([feat + pos(vis_idx), self.generator_mask_tokens[i] + pos(diff_idx)], dim=1)
    return feat, self.generators[i](x, diff_idx.shape[1])


def amd_method_config(shared_heads=True):
  from amd_jax import recipes  # pylint: disable=g-import-not-at-top
  c = recipes.with_method_fields(amd_config(video=True), "amd")
  c.model.init_scheme = "videomae"   # the official video initialisation (mask tokens cut at +-0.02)
  c.teacher.model.update(variant="tiny", width=TEACHER_W, depth=2, num_heads=2, patch_size=PATCH,
                         tubelet_size=TUBELET, cls_token=False, qkv_bias="qv", pos_emb="sincos1d")
  c.amd.update(student_layers="1,2", teacher_layers="1,2", generator_depth=GEN_DEPTH, generator_heads=0,
               shared_heads=shared_heads)
  c.teacher.mask_ratio, c.teacher.checkpoint = 0.5, "random"
  return c


def amd_example():
  return {"video": jnp.asarray(np.random.default_rng(11).standard_normal((BATCH, FRAMES, IMG, IMG, 3)),
                               jnp.float32)}


@functools.lru_cache(maxsize=None)
def _amd_abstract(shared_heads: bool):
  from amd_jax.methods.amd import AMD  # pylint: disable=g-import-not-at-top
  return jax.eval_shape(AMD(amd_method_config(shared_heads)).init, jax.random.PRNGKey(0), amd_example())


def amd_params(shared_heads=True, seed=21) -> dict:
  """AMD.init's tree (video student at the small test size) with non-trivial random values."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32),
                      _amd_abstract(shared_heads))


def _shapes(tree):
  return {"/".join(p): tuple(np.shape(v)) for p, v in mapping.flatten(tree).items()}


def test_amd_student_exports_strictly_and_computes_as_official(tmp_path):
  from amd_jax.methods.amd import AMD  # pylint: disable=g-import-not-at-top
  c = amd_method_config()
  params = amd_params()
  arch = convert.arch_from_run_config(c)
  assert arch.amd == mapping.AMDArch(teacher_width=TEACHER_W, num_pairs=PAIRS, generator_depth=GEN_DEPTH)
  sd = convert.flax_to_torch(params, arch, "amd", parts=("encoder", "decoder", "amd"))
  official = OfficialAMDStudent()
  official.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  assert {"encoder.projection_heads.1.weight", "generators.1.blocks.1.attn.q_bias", "generators.0.norm.weight"} <= set(sd)
  # The generators' norm is exported as the identity (the official forward never applies it).
  np.testing.assert_array_equal(sd["generators.0.norm.weight"], np.ones(TEACHER_W, np.float32))
  np.testing.assert_array_equal(sd["generators.0.norm.bias"], np.zeros(TEACHER_W, np.float32))
  # Same numbers on both sides: projection heads and generators on one nested mask.
  method = AMD(c)
  x = amd_example()["video"]
  nm = method.nested_mask(jax.random.PRNGKey(3), x)
  z = np.random.default_rng(4).standard_normal((BATCH, nm.student.shape[1], W)).astype(np.float32)
  gen = method.generator(method.grid(x))
  table = torch.from_numpy(mapping.fixed_table(arch, TEACHER_W))
  for i in range(PAIRS):
    ours_proj = z @ params["projections"][f"proj_{i}"]["kernel"]
    ours = gen.apply({"params": params["generators"][f"gen_{i}"]}, jnp.asarray(ours_proj), nm.student, nm.diff)
    with torch.no_grad():
      official.generator_mask_tokens[i].copy_(torch.from_numpy(params["generators"][f"gen_{i}"]["mask_token"]))
      proj, theirs = official.generate(i, torch.from_numpy(z), torch.from_numpy(np.array(nm.student)).long(),
                                       torch.from_numpy(np.array(nm.diff)).long(), table)
    assert maxdiff(ours_proj, proj.numpy()) < TOL
    assert maxdiff(ours, theirs.numpy()) < TOL


def test_official_amd_checkpoint_converts_whole(tmp_path):
  """The official trainer's file (no generator mask tokens) -> AMD.init's exact tree; tokens from a file or init."""
  from amd_jax.methods.amd import AMD  # pylint: disable=g-import-not-at-top
  c = amd_method_config()
  params = amd_params(seed=22)
  arch = convert.arch_from_run_config(c)
  official = OfficialAMDStudent()
  sd = convert.flax_to_torch(params, arch, "amd", parts=("encoder", "decoder", "amd"))
  official.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  with torch.no_grad():
    official.generators[1].norm.weight.add_(1.0)   # an unused norm that is not the identity
  path = str(tmp_path / "checkpoint-199.pth")
  torch.save({"model": official.state_dict(), "epoch": 199, "args": argparse.Namespace(model="pretrain_amd")}, path)
  assert not any("mask_tokens" in k for k in official.state_dict())   # never registered, never saved
  tokens = np.stack([t.detach().numpy() for t in official.generator_mask_tokens])
  tokens_file = str(tmp_path / "tokens.npy")
  np.save(tokens_file, tokens)

  back, report = convert.load_torch_checkpoint(path, arch, parts=("encoder", "decoder", "amd"), strict=True,
                                               generator_mask_tokens=tokens_file)
  assert report.layout == "amd" and report.parts == ["encoder", "decoder", "amd"]
  assert _shapes(back) == _shapes(_amd_abstract(True))          # exactly AMD.init's tree
  expected = jax.tree.map(np.array, params)
  for i in range(PAIRS):
    expected["generators"][f"gen_{i}"]["mask_token"] = tokens[i]
  assert_trees_bit_equal(back, expected)
  assert any(why == mapping.IDLE_REASON for why in report.unused.values())
  assert sorted(k for k, why in report.unused.items() if why == mapping.IDLE_REASON) == [
      f"generators.{i}.norm.{n}" for i in range(PAIRS) for n in ("bias", "weight")]
  assert any(f"from {tokens_file}" in n for n in report.notes)
  # Without a tokens file: amd_jax's init draws them (the report says so); everything else is unchanged.
  drawn, report2 = convert.load_torch_checkpoint(path, arch, parts=("encoder", "decoder", "amd"))
  assert any("drawn with amd_jax's generator init" in n for n in report2.notes)
  token0 = drawn["generators"]["gen_0"]["mask_token"]
  assert token0.shape == (1, 1, TEACHER_W) and np.abs(token0).max() <= 0.02 and 0.005 < token0.std() < 0.02
  assert not np.array_equal(token0, drawn["generators"]["gen_1"]["mask_token"])
  assert_trees_bit_equal(drawn["encoder"], params["encoder"])
  # The converted tree trains as an AMD student: its loss equals the original params' loss.
  method = AMD(c)
  teacher = method.teacher_init(jax.random.PRNGKey(5), amd_example())
  loss = jax.jit(lambda p: method.loss(p, teacher, amd_example(), jax.random.PRNGKey(6))[0])
  assert float(loss(back)) == float(loss(expected))
  # Asked for the AMD parts without naming them: a clear error.
  with pytest.raises(mapping.ConversionError, match="AMD parts were asked for"):
    convert.load_torch_checkpoint(path, dataclasses.replace(arch, amd=None), parts=("encoder", "amd"))
  # As a teacher, the same file gives the encoder and reports the rest.
  enc, report3 = convert.load_torch_encoder(path, c.model, num_frames=FRAMES, image_size=IMG, return_report=True)
  assert_trees_bit_equal(enc, params["encoder"])
  assert any("projection heads" in why for why in report3.unused.values())


def test_amd_export_file_round_trip_keeps_mask_tokens(tmp_path):
  """export_torch writes the mask tokens beside the file; reading it back needs no option."""
  c = amd_method_config()
  params = amd_params(seed=23)
  arch = convert.arch_from_run_config(c)
  path = str(tmp_path / "whole.safetensors")
  convert.export_torch(params, path, arch, "amd", parts=("encoder", "decoder", "amd"))
  assert os.path.exists(path + convert.MASK_TOKENS_SUFFIX)
  back, report = convert.load_torch_checkpoint(path, arch, parts=("encoder", "decoder", "amd"), strict=True)
  assert_trees_bit_equal(back, params)
  assert any(convert.MASK_TOKENS_SUFFIX in n for n in report.notes)
  os.remove(path + convert.MASK_TOKENS_SUFFIX)
  with pytest.raises(FileNotFoundError, match="generator mask tokens"):
    convert.load_torch_checkpoint(path, arch, parts=("encoder", "decoder", "amd"))
  back2, _ = convert.load_torch_checkpoint(path, arch, parts=("encoder", "decoder", "amd"),
                                           generator_mask_tokens="init")
  assert_trees_bit_equal(back2["projections"], params["projections"])


def test_amd_separate_generator_projections():
  """amd.shared_heads=False: imported as copies of the (shared) official heads; export refuses distinct ones."""
  c = amd_method_config(shared_heads=False)
  params = amd_params(shared_heads=False, seed=24)
  arch = convert.arch_from_run_config(c)
  assert not arch.amd.shared_heads
  with pytest.raises(mapping.ConversionError, match="separate generator projections"):
    convert.flax_to_torch(params, arch, "amd", parts=("encoder", "decoder", "amd"))
  params["generator_projections"] = jax.tree.map(np.array, params["projections"])
  sd = convert.flax_to_torch(params, arch, "amd", parts=("encoder", "decoder", "amd"))
  OfficialAMDStudent().load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  back, report = convert.torch_to_flax(sd, arch, "amd", parts=("encoder", "decoder", "amd"),
                                       generator_mask_tokens=mapping.generator_mask_tokens(params))
  assert _shapes(back) == _shapes(_amd_abstract(False))
  assert_trees_bit_equal(back, params)
  assert any("copies of the projection heads" in n for n in report.notes)


def test_amd_part_errors():
  c = amd_method_config()
  params = amd_params(seed=25)
  arch = convert.arch_from_run_config(c)
  with pytest.raises(mapping.ConversionError, match="only in the 'amd' layout"):
    convert.flax_to_torch(params, arch, "videomae", parts=("encoder", "amd"))
  with pytest.raises(mapping.ConversionError, match="under 'encoder.'"):
    convert.flax_to_torch(params, arch, "amd", parts=("encoder", "amd"), encoder_prefix="")
  # One generator block too many in the file: the architecture decides, the extra keys are unexpected.
  sd = convert.flax_to_torch(params, arch, "amd", parts=("encoder", "decoder", "amd"))
  sd["generators.0.blocks.2.norm1.weight"] = np.ones(TEACHER_W, np.float32)
  with pytest.raises(mapping.ConversionError, match="unexpected keys"):
    convert.torch_to_flax(sd, arch, "amd", parts=("encoder", "decoder", "amd"), strict=True)
  # Wrong teacher width: the projection head's shape names both.
  wrong = dataclasses.replace(arch, amd=mapping.AMDArch(teacher_width=2 * TEACHER_W, num_pairs=PAIRS))
  with pytest.raises(mapping.ShapeMismatchError, match="projection_heads.0.weight"):
    convert.torch_to_flax(sd, wrong, "amd", parts=("encoder", "amd"))


# ------------------------------------------------------------------------------------------------------------
# Conversion remembers: the detected layout of every naming, round trips without architecture flags
# ------------------------------------------------------------------------------------------------------------
def classifier_params(video: bool, num_classes: int = 5) -> dict:
  """A fine-tuned classifier's tree: encoder without its final norm, fc_norm, head."""
  encoder = {k: v for k, v in init_params(video)["encoder"].items() if k != "norm"}
  rng = np.random.default_rng(31)
  return {"encoder": encoder, "fc_norm": {"scale": 1 + 0.1 * rng.standard_normal(W).astype(np.float32),
                                          "bias": 0.1 * rng.standard_normal(W).astype(np.float32)},
          "head": {"kernel": rng.standard_normal((W, num_classes)).astype(np.float32),
                   "bias": rng.standard_normal(num_classes).astype(np.float32)}}


def torch_state_dict(module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def test_detected_layout_of_every_official_naming(vitmae_case, videomae_case):
  vitmae, videomae = vitmae_case[0], videomae_case[0]
  video_encoder = torch_state_dict(OfficialViT(video=True))
  namings = {
      "mae": [official_mae_state_dict(vitmae),                                       # MAE pre-training
              torch_state_dict(OfficialViT(video=False, final_norm=False, num_classes=7))],   # MAE fine-tuned
      "videomae": [official_videomae_state_dict(videomae),                           # VideoMAE pre-training
                   torch_state_dict(OfficialViT(video=True, final_norm=False, num_classes=5)),  # fine-tuned
                   {"backbone." + k: v for k, v in video_encoder.items()},           # fine-tuning scripts
                   {"module." + k: v for k, v in video_encoder.items()}],            # DistributedDataParallel
      "amd": [torch_state_dict(OfficialAMDStudent())],                               # AMD student, whole
      "hf_vitmae": [state_dict_np(vitmae), _as_transformers_4x(state_dict_np(vitmae), False),
                    state_dict_np(vitmae.vit)],                                      # a base model alone
      "hf_videomae": [state_dict_np(videomae), _as_transformers_4x(state_dict_np(videomae), True),
                      state_dict_np(videomae.videomae), state_dict_np(make_videomae(classifier=True))],
  }
  for layout, state_dicts in namings.items():
    for i, sd in enumerate(state_dicts):
      assert mapping.detect_layout(sd) == layout, (layout, i, list(sd)[:4])


def _export_cases():
  """(name, params, arch, layout, parts) for every export to_torch writes."""
  amd_cfg = amd_method_config()
  amd = amd_params(seed=26)
  amd_arch_ = convert.arch_from_run_config(amd_cfg)
  cases = []
  for video in (False, True):
    official = "videomae" if video else "mae"
    cases += [(f"{official} encoder", init_params(video), amd_arch(video), official, ("encoder",)),
              (f"{official} encoder+decoder", init_params(video), amd_arch(video), official, ("encoder", "decoder")),
              (f"{official} classifier", classifier_params(video), amd_arch(video, decoder=False, final_norm=None),
               official, ("encoder", "classifier"))]
    hf = "hf_videomae" if video else "hf_vitmae"
    cases += [(f"{hf} encoder", init_params(video), amd_arch(video), hf, ("encoder",)),
              (f"{hf} encoder+decoder", init_params(video), amd_arch(video), hf, ("encoder", "decoder"))]
  cases += [("amd encoder", amd, amd_arch_, "amd", ("encoder",)),
            ("amd encoder+decoder", amd, amd_arch_, "amd", ("encoder", "decoder")),
            ("amd whole", amd, amd_arch_, "amd", ("encoder", "decoder", "amd"))]
  return cases


def test_detected_layout_of_every_export(tmp_path):
  """What to_torch writes is detected as the layout it was written in, from the file alone, and converts back
  with the recorded architecture (no arch given) to the same params."""
  for name, params, arch, layout, parts in _export_cases():
    suffix = "" if layout in mapping.HF_LAYOUTS else (".pth" if "encoder+decoder" in name else ".safetensors")
    path = str(tmp_path / (name.replace(" ", "_").replace("+", "_") + suffix))
    convert.export_torch(params, path, arch, layout, parts=parts)
    sd, info = torch_io.read_state_dict(path)
    assert convert.detect_layout(sd, info["record"], info["hf_config"]) == layout, name
    assert info["record"]["parts"] == list(parts), name
    assert convert.read_export(path)["layout"] == layout, name
    recorded, _ = convert.recorded_arch(info)
    back, report = convert.load_torch_checkpoint(path, recorded, strict=True)
    assert report.layout == layout and report.parts == list(parts), name
    assert_trees_bit_equal(back, {k: v for k, v in params.items() if k in sum(
        (mapping.PART_TOPS[p] for p in parts), ())})
    # From the keys alone (a copy without amd_jax's record): the official family; an AMD student's encoder
    # and decoder carry VideoMAE's names, so only its projection heads and generators say 'amd'.
    keys_only = mapping.detect_layout(sd)
    assert keys_only == ("videomae" if name in ("amd encoder", "amd encoder+decoder") else layout), name


def _write_run(workdir, config, params):
  from amd_jax.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  ckpt = Checkpointer(workdir, every_steps=1, keep=1, async_save=False)
  ckpt.save(1, {"step": jnp.asarray(1), "params": params}, force=True)
  ckpt.close()


def test_cli_round_trip_of_an_amd_run_without_arch(tmp_path, capsys):
  """to_torch of a whole AMD run, to_flax of the file with no architecture flags, to_torch again: bit-exact."""
  params = amd_params(seed=27)
  workdir = str(tmp_path / "run")
  _write_run(workdir, amd_method_config(), params)
  first = str(tmp_path / "whole.safetensors")
  assert cli.main(["to_torch", "--workdir", workdir, "--parts", "all", "--output", first]) == 0
  assert "layout amd" in capsys.readouterr().out
  sd_first, info = torch_io.read_state_dict(first)
  OfficialAMDStudent().load_state_dict({k: torch.from_numpy(v) for k, v in sd_first.items()}, strict=True)
  assert info["record"]["source"] == workdir and info["record"]["method"] == "amd"

  out = str(tmp_path / "flax")
  assert cli.main(["to_flax", "--input", first, "--output", out, "--strict"]) == 0
  printed = capsys.readouterr().out
  assert "layout: amd (from amd_jax's export record)" in printed
  assert f"generator mask tokens: from {first}{convert.MASK_TOKENS_SUFFIX}" in printed
  back, meta = torch_io.load_flax_params(os.path.join(out, "params.npz"))
  assert meta["layout"] == "amd" and meta["parts"] == ["encoder", "decoder", "amd"]
  assert_trees_bit_equal(back, params)

  second = str(tmp_path / "again.pth")
  assert cli.main(["to_torch", "--params", os.path.join(out, "params.npz"), "--parts", "all", "--output",
                   second]) == 0
  sd_second, _ = torch_io.read_state_dict(second)
  assert sorted(sd_second) == sorted(sd_first)
  for k in sd_first:
    assert np.array_equal(sd_first[k], sd_second[k]), k
  np.testing.assert_array_equal(np.load(second + convert.MASK_TOKENS_SUFFIX),
                                np.load(first + convert.MASK_TOKENS_SUFFIX))

  # A .safetensors file carries its record inside: the sidecar is not needed.
  os.remove(first + torch_io.RECORD_SUFFIX)
  assert cli.main(["to_flax", "--input", first, "--output", str(tmp_path / "flax2")]) == 0
  assert "from amd_jax's export record" in capsys.readouterr().out
  # A .pth without its record is an official-looking file: the architecture must be named.
  os.remove(second + torch_io.RECORD_SUFFIX)
  assert cli.main(["to_flax", "--input", second, "--output", str(tmp_path / "flax3")]) == 2
  assert "--arch" in capsys.readouterr().err
  # Named, the AMD parts need the teacher; the report says how to convert them.
  size = ["--arch", "vit_tiny", "--width", str(W), "--depth", str(DEPTH), "--num_heads", str(HEADS), "--patch_size",
          str(PATCH), "--image_size", str(IMG), "--num_frames", str(FRAMES), "--decoder_width", str(DEC_W),
          "--decoder_depth", str(DEC_DEPTH), "--decoder_heads", str(DEC_HEADS)]
  assert cli.main(["to_flax", "--input", second, "--output", str(tmp_path / "flax4")] + size) == 0
  assert "name the teacher with --teacher_arch" in capsys.readouterr().out
  assert cli.main(["to_flax", "--input", second, "--output", str(tmp_path / "flax5"), "--teacher_width",
                   str(TEACHER_W), "--generator_mask_tokens", second + convert.MASK_TOKENS_SUFFIX] + size) == 0
  back5, _ = torch_io.load_flax_params(str(tmp_path / "flax5" / "params.npz"))
  assert_trees_bit_equal(back5, params)


def test_recorded_heads_are_checked(tmp_path):
  """A file amd_jax wrote says how many heads it has; a model config that disagrees is refused."""
  params = init_params(True)
  path = str(tmp_path / "enc.pth")
  convert.export_torch(params, path, amd_arch(True), "videomae", parts=("encoder",))
  cfg = amd_config(True)
  cfg.model.num_heads = 2
  with pytest.raises(mapping.ConversionError, match=f"{HEADS} attention heads"):
    convert.load_torch_encoder(path, cfg.model)
