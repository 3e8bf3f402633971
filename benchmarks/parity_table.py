"""Numerical parity of amd_jax with transformers' ViTMAE / VideoMAE at the real sizes; writes docs/parity.md.

For each encoder size (Ti, S, B, L) and each family (images: ViTMAE at 224x224, patch 16,
mask 0.75, MAE's 512-wide 8-deep decoder; videos: VideoMAE at 16x224x224, tubelet 2x16x16,
tube mask 0.9, VideoMAE's 4-deep decoders) this script random-initialises the transformers
model (every bias, LayerNorm parameter and token non-trivial), converts it with
amd_jax.convert, runs both on the same input under the same mask in float32 on the CPU,
and records the largest absolute difference of:
  encoder output   the final-normed tokens of the visible patches (+ cls)
  block outputs    every block's raw output (max over blocks), and the middle block alone
  decoder output   the pixel predictions on the masked tokens
  loss             the pre-training loss (amd_jax's MAE.loss / VideoMAE.loss under the same mask)
It also renames the transformers weights to the official MAE / VideoMAE keys (fused qkv,
q_bias / v_bias) and checks that the official-naming path yields bit-identical Flax params.

The other direction: the converted params are exported as transformers save_pretrained
directories (amd_jax.convert, layouts hf_vitmae / hf_videomae), loaded back with
from_pretrained (the loading report must be clean), their weights compared with the original
model's, and their encoder run on every token against amd_jax's.

AMD students whole (--amd_sizes): the official AMD student (ViT-S / ViT-B, ViT-L teacher, 2
layer pairs, 2-block generators) in amd_jax's tree, exported in the official AMD naming: the
key set and shapes are checked against the official module's (listed here from the official
code), the round trip must be bit-identical, and the projection heads + generators are run
against transformers' VideoMAE layers loaded with the exported weights.

Usage:  python benchmarks/parity_table.py [--sizes Ti,S,B,L] [--families image,video] [--amd_sizes S,B]
                                          [--out docs/parity.md]
ViT-L runs with batch 1 (2 CPU cores); the other sizes with batch 2. A full run takes
several minutes on two cores.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from amd_jax import config_base, convert, masking, recipes  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax.convert import mapping  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax.methods.amd import AMD  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax.methods.mae import MAE, VideoMAE  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax.models import vit  # pylint: disable=g-import-not-at-top,wrong-import-position

IMAGENET_MEAN, IMAGENET_STD = "0.485,0.456,0.406", "0.229,0.224,0.225"
SIZES = {"Ti": ("vit_ti", "Ti"), "S": ("vit_s", "S"), "B": ("vit_b", "B"), "L": ("vit_l", "L")}

def pred_scale(decoder_width: int) -> float:
  """Scale for the decoder head (init std 0.02) that makes predictions O(1): the loss then responds to every
  weight instead of being dominated by the unit-variance targets."""
  return 1.0 / (0.02 * decoder_width**0.5)

OUTPUTS = ("encoder output", "block outputs (all)", "middle block", "decoder output", "loss")


def randomise(model, seed):
  g = torch.Generator().manual_seed(seed)
  rand = lambda t, s: torch.randn(t.shape, generator=g) * s
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.LayerNorm):
        m.weight.copy_(1.0 + rand(m.weight, 0.1))
        m.bias.copy_(rand(m.bias, 0.1))
    for name, p in model.named_parameters():
      if not p.requires_grad:
        continue
      leaf = name.rsplit(".", 1)[-1]
      if leaf in ("bias", "q_bias", "v_bias") and "norm" not in name:
        p.copy_(rand(p, 0.05))
      elif leaf in ("cls_token", "mask_token"):
        p.copy_(rand(p, 0.02))
  return model


def vitmae_tables(model, grid, width, dec_width):
  from transformers.models.vit_mae import modeling_vit_mae as hfm  # pylint: disable=g-import-not-at-top

  def table(dim):
    if hasattr(hfm, "build_2d_sinusoidal_position_embedding"):
      t = hfm.build_2d_sinusoidal_position_embedding(grid, grid, dim, cls_token=True)
      return torch.cat([t[..., dim // 2:], t[..., :dim // 2]], dim=-1)[None]
    return torch.from_numpy(hfm.get_2d_sincos_pos_embed(dim, grid, add_cls_token=True)).float()[None]

  with torch.no_grad():
    model.vit.embeddings.position_embeddings.copy_(table(width))
    model.decoder.decoder_pos_embed.copy_(table(dec_width))


def attn_parts(layer):
  a = layer.attention
  if hasattr(a, "q_proj"):
    return a.q_proj, a.k_proj, a.v_proj, a.o_proj
  return a.attention.query, a.attention.key, a.attention.value, a.output.dense


def mlp_parts(layer):
  return (layer.mlp.fc1, layer.mlp.fc2) if hasattr(layer, "mlp") else (layer.intermediate.dense, layer.output.dense)


def official_block(layer, prefix, bias):
  q, k, v, o = attn_parts(layer)
  fc1, fc2 = mlp_parts(layer)
  out = {f"{prefix}.norm1.weight": layer.layernorm_before.weight, f"{prefix}.norm1.bias": layer.layernorm_before.bias,
         f"{prefix}.attn.qkv.weight": torch.cat([q.weight, k.weight, v.weight]),
         f"{prefix}.attn.proj.weight": o.weight, f"{prefix}.attn.proj.bias": o.bias,
         f"{prefix}.norm2.weight": layer.layernorm_after.weight, f"{prefix}.norm2.bias": layer.layernorm_after.bias,
         f"{prefix}.mlp.fc1.weight": fc1.weight, f"{prefix}.mlp.fc1.bias": fc1.bias,
         f"{prefix}.mlp.fc2.weight": fc2.weight, f"{prefix}.mlp.fc2.bias": fc2.bias}
  if bias == "fused":
    out[f"{prefix}.attn.qkv.bias"] = torch.cat([q.bias, k.bias, v.bias])
  else:
    sa = layer.attention.attention
    out[f"{prefix}.attn.q_bias"] = q.bias if q.bias is not None else sa.q_bias
    out[f"{prefix}.attn.v_bias"] = v.bias if v.bias is not None else sa.v_bias
  return out


def official_names(model, video):
  if video:
    enc, dec = model.videomae, model.decoder
    sd = {"encoder.patch_embed.proj.weight": enc.embeddings.patch_embeddings.projection.weight,
          "encoder.patch_embed.proj.bias": enc.embeddings.patch_embeddings.projection.bias,
          "encoder.norm.weight": enc.layernorm.weight, "encoder.norm.bias": enc.layernorm.bias,
          "encoder_to_decoder.weight": model.encoder_to_decoder.weight, "mask_token": model.mask_token,
          "decoder.norm.weight": dec.norm.weight, "decoder.norm.bias": dec.norm.bias,
          "decoder.head.weight": dec.head.weight, "decoder.head.bias": dec.head.bias}
    for i, layer in enumerate(enc.encoder.layer):
      sd.update(official_block(layer, f"encoder.blocks.{i}", "qv"))
    for i, layer in enumerate(dec.decoder_layers):
      sd.update(official_block(layer, f"decoder.blocks.{i}", "qv"))
  else:
    v, dec = model.vit, model.decoder
    sd = {"cls_token": v.embeddings.cls_token, "pos_embed": v.embeddings.position_embeddings,
          "patch_embed.proj.weight": v.embeddings.patch_embeddings.projection.weight,
          "patch_embed.proj.bias": v.embeddings.patch_embeddings.projection.bias,
          "norm.weight": v.layernorm.weight, "norm.bias": v.layernorm.bias,
          "decoder_embed.weight": dec.decoder_embed.weight, "decoder_embed.bias": dec.decoder_embed.bias,
          "mask_token": dec.mask_token, "decoder_pos_embed": dec.decoder_pos_embed,
          "decoder_norm.weight": dec.decoder_norm.weight, "decoder_norm.bias": dec.decoder_norm.bias,
          "decoder_pred.weight": dec.decoder_pred.weight, "decoder_pred.bias": dec.decoder_pred.bias}
    layers = v.layers if hasattr(v, "layers") else v.encoder.layer
    for i, layer in enumerate(layers):
      sd.update(official_block(layer, f"blocks.{i}", "fused"))
    for i, layer in enumerate(dec.decoder_layers):
      sd.update(official_block(layer, f"decoder_blocks.{i}", "fused"))
  return {k: t.detach().numpy().copy() for k, t in sd.items()}


def amd_config(video, arch: mapping.Arch, image_size, frames):
  c = config_base.base_config()
  c.method = "videomae" if video else "mae"
  c.model.update(variant="tiny", width=arch.width, depth=arch.depth, num_heads=arch.num_heads, patch_size=16,
                 tubelet_size=2, cls_token=not video, qkv_bias="qv" if video else "fused",
                 pos_emb="sincos1d" if video else "sincos2d")
  c.decoder.update(width=arch.decoder.width, depth=arch.decoder.depth, num_heads=arch.decoder.num_heads)
  c.data.update(modality="video" if video else "image", image_size=image_size, channels=3, num_frames=frames,
                mean=IMAGENET_MEAN, std=IMAGENET_STD)
  c.mask.update(ratio=0.9 if video else 0.75, kind="tube" if video else "random")
  c.norm_pix_loss = True
  return c


def run_case(size: str, video: bool, image_size=224, frames=16, seed=0) -> dict:
  name, _ = SIZES[size]
  arch = mapping.named_arch(name, "videomae" if video else "mae", image_size=image_size, num_frames=frames)
  d = arch.decoder
  batch = 1 if size == "L" else 2
  common = dict(hidden_size=arch.width, num_hidden_layers=arch.depth, num_attention_heads=arch.num_heads,
                intermediate_size=arch.mlp_hidden, image_size=image_size, patch_size=16, num_channels=3,
                layer_norm_eps=1e-6, hidden_act="gelu", decoder_hidden_size=d.width,
                decoder_num_hidden_layers=d.depth, decoder_num_attention_heads=d.num_heads,
                decoder_intermediate_size=4 * d.width, norm_pix_loss=True, qkv_bias=True,
                attn_implementation="eager")
  torch.manual_seed(seed)
  g = torch.Generator().manual_seed(seed + 1)
  if video:
    model = transformers.VideoMAEForPreTraining(transformers.VideoMAEConfig(
        num_frames=frames, tubelet_size=2, use_mean_pooling=False, **common))
    randomise(model, seed).eval()
    model.decoder.norm.eps = 1e-6  # transformers uses torch's default 1e-5 here; the official model 1e-6
    with torch.no_grad():
      model.decoder.head.weight.mul_(pred_scale(d.width))
    per_frame = (image_size // 16)**2
    noise = torch.rand(batch, per_frame, generator=g).numpy()
    n_keep = per_frame - int(0.9 * per_frame)
    x = torch.randn(batch, frames, 3, image_size, image_size, generator=g)
  else:
    model = transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(mask_ratio=0.75, **common))
    randomise(model, seed).eval()
    vitmae_tables(model, image_size // 16, arch.width, d.width)
    with torch.no_grad():
      model.decoder.decoder_pred.weight.mul_(pred_scale(d.width))
    per_frame = (image_size // 16)**2
    noise_t = torch.rand(batch, per_frame, generator=g)
    noise = noise_t.numpy()
    n_keep = int(per_frame * 0.25)
    x = torch.randn(batch, 3, image_size, image_size, generator=g)

  # The same mask: argsort of the noise, first n_keep kept, each group ascending (tubes repeated over time).
  perm = np.argsort(noise, axis=1, kind="stable")
  keep, masked = np.sort(perm[:, :n_keep], 1), np.sort(perm[:, n_keep:], 1)
  if video:
    t_slices = frames // 2
    keep = np.concatenate([keep + t * per_frame for t in range(t_slices)], 1)
    masked = np.concatenate([masked + t * per_frame for t in range(t_slices)], 1)
  mask = masking.Mask(keep=jnp.asarray(keep, jnp.int32), masked=jnp.asarray(masked, jnp.int32))

  t0 = time.time()
  with torch.no_grad():
    if video:
      bool_masked = np.ones((batch, keep.shape[1] + masked.shape[1]), bool)
      np.put_along_axis(bool_masked, keep, False, axis=1)
      bmp = torch.from_numpy(bool_masked)
      out = model(pixel_values=x, bool_masked_pos=bmp)
      enc_out = model.videomae(pixel_values=x, bool_masked_pos=bmp, output_hidden_states=True)
    else:
      out = model(pixel_values=x, noise=noise_t)
      enc_out = model.vit(pixel_values=x, noise=noise_t, output_hidden_states=True)
  torch_s = time.time() - t0

  # The float32 noise floor: the same PyTorch model in float64 against itself in float32.
  model64 = copy.deepcopy(model).double()
  with torch.no_grad():
    if video:
      out64 = model64(pixel_values=x.double(), bool_masked_pos=bmp)
      enc64 = model64.videomae(pixel_values=x.double(), bool_masked_pos=bmp, output_hidden_states=True)
    else:
      out64 = model64(pixel_values=x.double(), noise=noise_t)
      enc64 = model64.vit(pixel_values=x.double(), noise=noise_t, output_hidden_states=True)
  del model64

  sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  original = {k: v.detach().clone() for k, v in model.state_dict().items()}
  layout = "hf_videomae" if video else "hf_vitmae"
  params, report = mapping.torch_to_flax(sd, arch, layout, strict=True)
  official, _ = mapping.torch_to_flax(official_names(model, video), arch, "videomae" if video else "mae",
                                      strict=True)
  same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(official))) and \
      jax.tree.structure(params) == jax.tree.structure(official)
  del model, sd, official

  cfg = amd_config(video, arch, image_size, frames)
  method = (VideoMAE if video else MAE)(cfg)
  enc = vit.encoder_from_config(cfg.model, block_layers=tuple(range(1, arch.depth + 1)))
  x_flax = jnp.asarray(x.numpy().transpose(0, 1, 3, 4, 2) if video else x.numpy().transpose(0, 2, 3, 1))
  rng = jax.random.PRNGKey(0)

  def loss_fn(p, xx, k, m):
    original = masking.random_mask
    masking.random_mask = lambda *a, **kw: masking.Mask(keep=k, masked=m)
    try:
      return method.loss(p, None, {method.input_key(): xx}, rng)[0]
    finally:
      masking.random_mask = original

  t0 = time.time()
  tokens, inter = jax.jit(lambda p, xx, k: enc.apply({"params": p["encoder"]}, xx, k))(params, x_flax, mask.keep)
  pred = jax.jit(lambda p, xx, k, m: method.reconstruction(p, xx, masking.Mask(keep=k, masked=m), rng,
                                                           train=False)[0])(params, x_flax, mask.keep, mask.masked)
  loss = float(jax.jit(loss_fn)(params, x_flax, mask.keep, mask.masked))
  jax_s = time.time() - t0

  diff = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
  if video:
    reorder = lambda h: h
    hf_pred = out.logits.numpy()
  else:
    order = np.argsort(perm[:, :n_keep], axis=1)   # transformers keeps visible tokens in noise order
    reorder = lambda h: np.concatenate([h[:, :1], np.take_along_axis(h[:, 1:], order[..., None], 1)], 1)
    hf_pred = np.take_along_axis(out.logits.numpy(), masked[..., None], axis=1)
  blocks = [diff(inter[f"block_{l}"], reorder(enc_out.hidden_states[l].numpy())) for l in range(1, arch.depth + 1)]
  floor_blocks = [diff(enc64.hidden_states[l].numpy(), enc_out.hidden_states[l].numpy())
                  for l in range(1, arch.depth + 1)]
  mid = arch.depth // 2
  floor = {"encoder output": diff(enc64.last_hidden_state.numpy(), enc_out.last_hidden_state.numpy()),
           "block outputs (all)": max(floor_blocks), "middle block": floor_blocks[mid - 1],
           "decoder output": diff(out64.logits.numpy(), out.logits.numpy()),
           "loss": abs(float(out64.loss) - float(out.loss))}
  result = {
      "size": size, "family": "video" if video else "image", "batch": batch, "depth": arch.depth,
      "width": arch.width, "heads": arch.num_heads, "decoder": f"{d.width}/{d.depth}/{d.num_heads}",
      "tokens": f"{keep.shape[1]} of {keep.shape[1] + masked.shape[1]}",
      "encoder output": diff(tokens, reorder(enc_out.last_hidden_state.numpy())),
      "block outputs (all)": max(blocks), "middle block": blocks[mid - 1], "mid": mid,
      "decoder output": diff(pred, hf_pred), "loss": abs(loss - float(out.loss)), "loss value": float(out.loss),
      "block scale": max(float(np.abs(h.numpy()).max()) for h in enc_out.hidden_states[1:]),
      "pred scale": float(np.abs(hf_pred).max()),
      "official naming bit-identical": same, "pos table": max(report.pos_table_max_abs_diff.values(), default=0.0),
      "seconds": torch_s + jax_s, "floor": floor,
  }
  result.update(hf_export_check(params, arch, video, x, x_flax, cfg, original))
  return result


def hf_export_check(params, arch, video, x, x_flax, cfg, original: dict) -> dict:
  """Export the converted params as save_pretrained directories, load them, compare with the original model."""
  layout = "hf_videomae" if video else "hf_vitmae"
  base_cls, pre_cls = ((transformers.VideoMAEModel, transformers.VideoMAEForPreTraining) if video
                       else (transformers.ViTMAEModel, transformers.ViTMAEForPreTraining))
  with tempfile.TemporaryDirectory() as tmp:
    enc_dir, full_dir = os.path.join(tmp, "encoder"), os.path.join(tmp, "full")
    convert.export_torch(params, enc_dir, arch, layout, parts=("encoder",))
    convert.export_torch(params, full_dir, arch, layout, parts=("encoder", "decoder"))
    # ViTMAE masks inside its embeddings: ratio 0 and increasing noise keep every token, in order.
    base, info_base = base_cls.from_pretrained(enc_dir, output_loading_info=True,
                                               **({} if video else {"mask_ratio": 0.0}))
    pre, info_pre = pre_cls.from_pretrained(full_dir, output_loading_info=True)
  problems = sum(len(info[k]) for info in (info_base, info_pre)
                 for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  reloaded = pre.state_dict()
  tables = [k for k in original if k.endswith(("position_embeddings", "pos_embed"))]
  same = sorted(reloaded) == sorted(original) and all(
      torch.equal(reloaded[k], original[k]) for k in original if k not in tables)
  # ViTMAE keeps its fixed tables as parameters; VideoMAE computes them and saves none.
  table_diff = max((float((reloaded[k] - original[k]).abs().max()) for k in tables), default=None)
  del pre
  base = base.eval()
  kwargs = {}
  if not video:
    n = (arch.image_size // arch.patch_size)**2
    kwargs["noise"] = torch.arange(n, dtype=torch.float32).expand(x.shape[0], -1)
  with torch.no_grad():
    theirs = base(pixel_values=x, **kwargs).last_hidden_state.numpy()
    theirs64 = base.double()(pixel_values=x.double(), **kwargs).last_hidden_state.numpy()
  enc = vit.encoder_from_config(cfg.model)
  ours = jax.jit(lambda p, xx: enc.apply({"params": p}, xx)[0])(params["encoder"], x_flax)
  diff = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
  return {"hf loading problems": problems, "hf weights identical": same, "hf table diff": table_diff,
          "hf encoder all tokens": diff(ours, theirs), "hf floor": diff(theirs64, theirs),
          "hf tokens": int(np.prod(theirs.shape[1:2]))}


# ------------------------------------------------------------------------------------------------------------
# AMD students, whole
# ------------------------------------------------------------------------------------------------------------
AMD_TEACHER = "L"          # the official scripts distil from a VideoMAE ViT-L (teacher_dim 1024)


def official_block_shapes(prefix: str, dim: int) -> dict:
  """The official (VideoMAE / AMD) Block's parameters: q_bias / v_bias, no k bias, mlp ratio 4."""
  return {f"{prefix}.norm1.weight": (dim,), f"{prefix}.norm1.bias": (dim,),
          f"{prefix}.attn.qkv.weight": (3 * dim, dim), f"{prefix}.attn.q_bias": (dim,), f"{prefix}.attn.v_bias": (dim,),
          f"{prefix}.attn.proj.weight": (dim, dim), f"{prefix}.attn.proj.bias": (dim,),
          f"{prefix}.norm2.weight": (dim,), f"{prefix}.norm2.bias": (dim,),
          f"{prefix}.mlp.fc1.weight": (4 * dim, dim), f"{prefix}.mlp.fc1.bias": (4 * dim,),
          f"{prefix}.mlp.fc2.weight": (dim, 4 * dim), f"{prefix}.mlp.fc2.bias": (dim,)}


def official_amd_shapes(width, depth, teacher_dim, pairs, gen_depth, dec_width, dec_depth) -> dict:
  """The state dict of the official PretrainAMD (MCG-NJU/AMD models/modeling_pretrain.py), 16x224x224 input."""
  shapes = {"encoder.patch_embed.proj.weight": (width, 3, 2, 16, 16), "encoder.patch_embed.proj.bias": (width,),
            "encoder.norm.weight": (width,), "encoder.norm.bias": (width,),
            "encoder_to_decoder.weight": (dec_width, width), "mask_token": (1, 1, dec_width),
            "decoder.norm.weight": (dec_width,), "decoder.norm.bias": (dec_width,),
            "decoder.head.weight": (3 * 2 * 16 * 16, dec_width), "decoder.head.bias": (3 * 2 * 16 * 16,)}
  for i in range(depth):
    shapes.update(official_block_shapes(f"encoder.blocks.{i}", width))
  for i in range(dec_depth):
    shapes.update(official_block_shapes(f"decoder.blocks.{i}", dec_width))
  for i in range(pairs):
    shapes[f"encoder.projection_heads.{i}.weight"] = (teacher_dim, width)
    shapes[f"generators.{i}.norm.weight"] = shapes[f"generators.{i}.norm.bias"] = (teacher_dim,)
    for j in range(gen_depth):
      shapes.update(official_block_shapes(f"generators.{i}.blocks.{j}", teacher_dim))
  return shapes


def amd_student_config(size: str):
  c = recipes.with_method_fields(config_base.base_config(), "amd")
  recipes.video_model(c.model, size)
  recipes.video_model(c.teacher.model, AMD_TEACHER)
  c.model.update(dtype="float32", init_scheme="videomae")
  dw, dd, dh = mapping.VIDEOMAE_DECODERS[size]
  c.decoder.update(width=dw, depth=dd, num_heads=dh)
  c.data.update(modality="video", image_size=224, num_frames=16, channels=3)
  c.mask.update(ratio=0.9, kind="tube")
  c.teacher.mask_ratio = 0.75
  c.amd.update(student_layers="6,12", teacher_layers="12,24", generator_depth=2, shared_heads=True)
  return c


def random_like(abstract, seed):
  """Non-trivial values of the usual magnitudes: LayerNorm scales near 1, biases small, kernels and tokens 0.02."""
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    n = rng.standard_normal(a.shape).astype(np.float32)
    if name == "scale":
      return 1.0 + 0.1 * n
    if name in ("bias", "q_bias", "v_bias"):
      return 0.05 * n
    return 0.02 * n

  return jax.tree_util.tree_map_with_path(draw, abstract)


def videomae_layer(dim, sd, prefix):
  """transformers' VideoMAE layer (an independent PyTorch block) holding the official block `prefix`'s weights."""
  cfg = transformers.VideoMAEConfig(hidden_size=dim, num_attention_heads=dim // 64, intermediate_size=4 * dim,
                                    layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True,
                                    attn_implementation="eager")
  from transformers.models.videomae import modeling_videomae  # pylint: disable=g-import-not-at-top
  layer = modeling_videomae.VideoMAELayer(cfg).eval()
  t = lambda k: torch.from_numpy(np.asarray(sd[f"{prefix}.{k}"]))
  q, k, v = t("attn.qkv.weight").split(dim)
  sa = layer.attention.attention
  with torch.no_grad():
    sa.query.weight.copy_(q), sa.key.weight.copy_(k), sa.value.weight.copy_(v)
    if getattr(sa, "q_bias", None) is not None:   # transformers 4.x
      sa.q_bias.copy_(t("attn.q_bias")), sa.v_bias.copy_(t("attn.v_bias"))
    else:
      sa.query.bias.copy_(t("attn.q_bias")), sa.value.bias.copy_(t("attn.v_bias"))
    for module, name in ((layer.attention.output.dense, "attn.proj"), (layer.intermediate.dense, "mlp.fc1"),
                         (layer.output.dense, "mlp.fc2"), (layer.layernorm_before, "norm1"),
                         (layer.layernorm_after, "norm2")):
      module.weight.copy_(t(f"{name}.weight")), module.bias.copy_(t(f"{name}.bias"))
  return layer


def run_amd_case(size: str, seed: int = 0) -> dict:
  c = amd_student_config(size)
  method = AMD(c)
  x = jnp.zeros((1, 16, 224, 224, 3), jnp.float32)
  params = random_like(jax.eval_shape(method.init, jax.random.PRNGKey(0), {"video": x}), seed)
  arch = convert.arch_from_run_config(c)
  parts = ("encoder", "decoder", "amd")
  sd = convert.flax_to_torch(params, arch, "amd", parts=parts)
  a = arch.amd
  expected = official_amd_shapes(arch.width, arch.depth, a.teacher_width, a.num_pairs, a.generator_depth,
                                 arch.decoder.width, arch.decoder.depth)
  keys_match = {k: tuple(v.shape) for k, v in sd.items()} == expected
  back, _ = convert.torch_to_flax(sd, arch, "amd", parts=parts, scan=bool(c.model.scan), strict=True,
                                  generator_mask_tokens=mapping.generator_mask_tokens(params))
  same = jax.tree.structure(back) == jax.tree.structure(params) and all(
      np.array_equal(u, v) for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
  # Projection heads + generators on one nested mask, against transformers' VideoMAE layers (float32 and 64).
  nm = method.nested_mask(jax.random.PRNGKey(seed + 1), x)
  vis, diff_idx = np.array(nm.student), np.array(nm.diff)
  z = np.random.default_rng(seed + 2).standard_normal((1, vis.shape[1], arch.width)).astype(np.float32)
  gen = method.generator(method.grid(x))
  table = torch.from_numpy(mapping.fixed_table(arch, a.teacher_width))[0]
  worst, floor = 0.0, 0.0
  for i in range(a.num_pairs):
    proj = z @ params["projections"][f"proj_{i}"]["kernel"]
    ours = jax.jit(gen.apply)({"params": params["generators"][f"gen_{i}"]}, jnp.asarray(proj), nm.student, nm.diff)
    layers = [videomae_layer(a.teacher_width, sd, f"generators.{i}.blocks.{j}") for j in range(a.generator_depth)]
    token = torch.from_numpy(np.asarray(params["generators"][f"gen_{i}"]["mask_token"]))
    outs = []
    for dtype in (torch.float32, torch.float64):
      with torch.no_grad():
        feat = torch.from_numpy(z).to(dtype) @ torch.from_numpy(sd[f"encoder.projection_heads.{i}.weight"]).to(dtype).T
        h = torch.cat([feat + table[vis].to(dtype), token.to(dtype) + table[diff_idx].to(dtype)], dim=1)
        for layer in layers:
          out = layer.to(dtype)(h)
          h = out[0] if isinstance(out, tuple) else out
        outs.append(h[:, -diff_idx.shape[1]:].numpy())
    d = lambda u, v: float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
    worst = max(worst, d(ours, outs[0]))
    floor = max(floor, d(outs[1], outs[0]))
  return {"size": size, "width": arch.width, "depth": arch.depth, "teacher": a.teacher_width, "pairs": a.num_pairs,
          "gen depth": a.generator_depth, "gen heads": a.heads, "tensors": len(sd), "keys match": keys_match,
          "round trip": same, "generator": worst, "generator floor": floor,
          "tokens": f"{vis.shape[1]} visible + {diff_idx.shape[1]} generated"}


def render(results: list[dict], amd_results: list[dict] = ()) -> str:
  lines = [
      "# Numerical parity with PyTorch (transformers ViTMAE / VideoMAE)",
      "",
      "Generated by `python benchmarks/parity_table.py` "
      f"({datetime.date.today().isoformat()}; {platform.machine()} CPU, float32; torch {torch.__version__}, "
      f"transformers {transformers.__version__}, jax {jax.__version__}).",
      "",
      "Each row random-initialises a transformers model at the real size (every bias, LayerNorm parameter and token",
      "non-trivial; decoder head scaled so predictions are O(1) and the loss responds to every weight), converts it",
      "with `amd_jax.convert` (layout `hf_vitmae` / `hf_videomae`), runs both on the same input under the same mask",
      "and reports the largest absolute difference. Images: 224x224, patch 16, random mask 0.75, MAE's decoder",
      "(512 wide, 8 deep, 16 heads). Videos: 16x224x224, tubelet 2x16x16, tube mask 0.9, VideoMAE's decoders",
      "(width/depth/heads in the table; ViT-Ti has no official VideoMAE decoder, 96/4/3 is ours). Batch 2, except",
      "ViT-L: batch 1 (two CPU cores). `block outputs` is the max over every block's raw output; `middle block`",
      "is block depth/2 alone (the layer AMD aligns for a 12-deep student / 24-deep teacher: 6 and 12). The loss is",
      "amd_jax's own `MAE.loss` / `VideoMAE.loss` with the mask replaced by the reference's; the decoder output is",
      "compared at the masked tokens.",
      "",
      "Each cell: max |amd_jax - transformers| [in brackets: max |transformers float32 - transformers float64| on the",
      "same input, the float32 rounding floor of the reference itself]. Differences of the floor's size are float32",
      "rounding (different summation order: XLA vs PyTorch kernels, and the decoder's token order, see below), not a",
      "mapping error; a mapping error shows up as 1e-2 or more (tests/test_convert.py checks that swapping two bias",
      "vectors is caught). Absolute differences grow with depth and with the magnitude of the values (column",
      "`largest abs block output`: float32 spacing at 4 is 4.8e-7, at 16 it is 1.9e-6).",      "`official naming` renames the transformers weights to the official MAE / VideoMAE keys (fused qkv;",
      "q_bias / v_bias) and converts them with the official layout: the Flax params must be bit-identical.",
      "The unit tests (tests/test_convert.py) check the same outputs at a small size with a 1e-5 bound.",
      "",
  ]
  for fam, title in (("image", "Images: ViTMAE (MAE naming)"), ("video", "Videos: VideoMAE (VideoMAE / AMD naming)")):
    rows = [r for r in results if r["family"] == fam]
    if not rows:
      continue
    lines += [f"## {title}", "",
              "| size | width/depth/heads | decoder | batch | visible tokens | encoder output | block outputs (all) "
              "| middle block | decoder output | loss (value) | largest abs block output | official naming |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
      f = r["floor"]
      cell = lambda o: f"{r[o]:.1e} [{f[o]:.1e}]"
      lines.append(
          f"| {r['size']} | {r['width']}/{r['depth']}/{r['heads']} | {r['decoder']} | {r['batch']} | {r['tokens']} | "
          f"{cell('encoder output')} | {cell('block outputs (all)')} | {cell('middle block')} (block {r['mid']}) | "
          f"{cell('decoder output')} | {cell('loss')} ({r['loss value']:.3f}) | {r['block scale']:.1f} | "
          f"{'bit-identical' if r['official naming bit-identical'] else 'DIFFERS'} |")
    lines.append("")
  worst = max((max(r[o] for o in OUTPUTS) for r in results), default=0.0)
  lines += [f"Largest difference over every row and output: {worst:.2e}.", ""]
  if results:
    lines += [
        "## Exported to transformers",
        "",
        "The converted params of each row above, written back by `amd_jax.convert.export_torch` (layout `hf_vitmae` /",
        "`hf_videomae`) as two save_pretrained directories: the encoder alone, loaded with `ViTMAEModel` /",
        "`VideoMAEModel.from_pretrained`, and encoder + decoder, loaded with the `ForPreTraining` class (`loading",
        "report`: missing + unexpected + mis-shaped keys over both, with `output_loading_info=True`). `weights` compares",
        "the reloaded pre-training model's state dict with the original transformers model's (position tables: amd_jax's",
        "own, max difference in the next column). `encoder, all tokens` runs the reloaded base model on every token",
        "(ViTMAE: `mask_ratio=0` and increasing `noise`, so the tokens stay in grid order) against amd_jax's encoder",
        "[float32 floor in brackets].",
        "",
        "| family | size | loading report | weights | position tables | tokens | encoder, all tokens |",
        "|---|---|---|---|---|---|---|"]
    for r in results:
      lines.append(
          f"| {r['family']} | {r['size']} | {'clean' if r['hf loading problems'] == 0 else r['hf loading problems']} | "
          f"{'bit-identical' if r['hf weights identical'] else 'DIFFER'} | "
          f"{'none saved' if r['hf table diff'] is None else format(r['hf table diff'], '.1e')} | {r['hf tokens']} | "
          f"{r['hf encoder all tokens']:.1e} [{r['hf floor']:.1e}] |")
    lines.append("")
  if amd_results:
    lines += [
        "## AMD students, whole (official AMD naming)",
        "",
        "amd_jax's AMD parameter tree (`AMD.init`: encoder, pixel decoder, one projection head and one 2-block generator",
        f"per aligned layer pair; ViT-{AMD_TEACHER} teacher, pairs 6/12 -> 12/24, 16x224x224, tube mask 0.9, teacher 0.75)",
        "with random values, exported with `layout='amd'` and parts encoder, decoder, amd. `official keys` compares the",
        "exported names and shapes with the official `PretrainAMD` state dict (listed in the script from the official",
        "code); `round trip` converts the export back (scanned encoder, mask tokens given) and compares bit for bit.",
        "`generators` runs every projection head and generator on the same nested mask in amd_jax and in PyTorch",
        "(transformers' VideoMAE layers loaded with the exported block weights, the official forward's token layout:",
        "`[projected visible + pos, mask token + pos]`, output at the generated positions) [float32 floor].",
        "",
        "| student | width/depth | teacher width | pairs | generator depth/heads | tensors | official keys | round trip "
        "| tokens | generators |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in amd_results:
      lines.append(
          f"| {r['size']} | {r['width']}/{r['depth']} | {r['teacher']} | {r['pairs']} | {r['gen depth']}/{r['gen heads']} | "
          f"{r['tensors']} | {'match' if r['keys match'] else 'DIFFER'} | "
          f"{'bit-identical' if r['round trip'] else 'DIFFERS'} | {r['tokens']} | "
          f"{r['generator']:.1e} [{r['generator floor']:.1e}] |")
    lines += [
        "",
        "The official model keeps the generators' mask tokens in a plain Python list: they are never registered, so",
        "never trained or saved (they stay at their random init). Converting an official checkpoint whole therefore",
        "takes them from a file (`generator_mask_tokens=` / `--generator_mask_tokens`, .npy or .npz) or draws them with",
        "amd_jax's generator init (the report says which); amd_jax's own exports write them beside the weights",
        "(`FILE.generator_mask_tokens.npy`) and read them back from there. Each official generator also registers a",
        "final `norm` that its forward never applies: amd_jax's generator has no such layer, so the converter reports",
        "it as not converted and exports it as the identity (weight 1, bias 0), which is what the official init",
        "gives. With `amd.shared_heads=False` amd_jax trains separate generator projections: converted from an",
        "official checkpoint they start as copies of the shared heads (the same function); exporting distinct ones",
        "is refused (the official model has no place for them).",
        ""]
  lines += [
      "## Where transformers differs from the official code (and what the comparison does about it)",
      "",
      "- **Fused vs separate projections.** transformers has separate query/key/value Linear layers; the official",
      "  MAE (timm) fuses them into `attn.qkv` with one bias; VideoMAE/AMD fuse them with `q_bias`/`v_bias` and a",
      "  constant-zero k bias (transformers VideoMAE: `query.bias`, `value.bias`, no `key.bias`; 4.x: `q_bias`/`v_bias`).",
      "  `hf_*` layouts fuse them; rows q, k, v in that order in both frameworks (head count never enters the layout).",
      "- **Position tables of a model built from a config.** transformers 5.x (5.24) leaves ViTMAE's `position_embeddings`",
      "  and `decoder_pos_embed` at zero when a model is built without weights (its weight init skips them;",
      "  `from_pretrained` loads them from the checkpoint). The harness fills them with transformers' own table",
      "  function; `amd_jax.convert` compares every fixed table it reads with amd_jax's and reports the difference",
      "  (max |diff| here: "
      + f"{max((r['pos table'] for r in results if r['family'] == 'image'), default=0.0):.1e}), which is how a "
        "zero or learned table shows up.",
      "- **2-D table layout.** transformers 5.x builds `[sin_h | cos_h | sin_w | cos_w]` and rotates the halves to",
      "  the official MAE layout (column coordinate first); equal to amd_jax's `sincos2d`.",
      "- **Token order.** transformers ViTMAE (like the official MAE) keeps the visible tokens in noise order and",
      "  un-shuffles in the decoder; amd_jax keeps every group in ascending token order and feeds the decoder",
      "  `[cls, visible, masked]` with each token's own position embedding. Attention is permutation-equivariant, so",
      "  encoder outputs are compared after reordering and predictions at the masked indices; the loss is a mean.",
      "- **LayerNorm eps.** transformers configs default to `layer_norm_eps=1e-12` (set to 1e-6 here, as official).",
      "  transformers VideoMAE builds its decoder `norm` and the classifier's `fc_norm` with torch's default eps",
      "  1e-5 whatever the config says; the official models use 1e-6 (the harness and tests set 1e-6).",
      "- **VideoMAE final norm.** transformers' `use_mean_pooling=True` (its default) drops the encoder's final",
      "  LayerNorm; the official pre-training encoder has it, so parity runs use `use_mean_pooling=False`.",
      "  Fine-tuned checkpoints (mean pooling) have no `norm` but `fc_norm`: convert them with `final_norm` auto/False.",
      "- **VideoMAE target.** transformers un-normalises the clip with the ImageNet mean/std before the",
      "  per-patch-per-channel normalisation (unbiased std + 1e-6), as the official code does; amd_jax un-normalises",
      "  with `config.data.mean/std`, so parity needs the ImageNet values there (set in this comparison).",
      "- **MAE target.** Both normalise each patch over all p*p*3 values with the unbiased variance (torch's",
      "  `.var()` default): `(v - mean) / sqrt(var + 1e-6)`; amd_jax uses ddof=1 to match.",
      "- **GELU.** `hidden_act='gelu'` is the exact (erf) form in transformers, as in timm and amd_jax.",
      "",
      "## Converting checkpoints",
      "",
      "PyTorch is needed only to read or write PyTorch files; its CPU wheel is enough:",
      "`pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu` (or `pip install 'amd_jax[torch]'`).",
      "The transformers layouts also need `pip install transformers`.",
      "",
      "```",
      "# official VideoMAE ViT-L (pre-training checkpoint, `encoder.` prefix) -> DIR/params.npz + DIR/conversion.json",
      "python -m amd_jax.convert to_flax --arch vit_l --layout videomae --input vit_l_k400.pth --output DIR",
      "# official MAE ViT-B; MAE-lite's ViT-Ti needs --arch vit_ti --num_heads 12 (heads are never read from shapes)",
      "python -m amd_jax.convert to_flax --arch vit_b --layout mae --input mae_pretrain_vit_base.pth --output DIR",
      "# an official AMD ViT-S student, whole (projection heads and generators: name the teacher)",
      "python -m amd_jax.convert to_flax --arch vit_s --layout amd --teacher_arch vit_l --input checkpoint-799.pth --output DIR",
      "# a transformers save_pretrained directory (or its model.safetensors): layout and architecture from config.json",
      "python -m amd_jax.convert to_flax --input vit-mae-base/ --output DIR",
      "# an amd_jax run (architecture from its config.json): the student encoder in the official naming",
      "python -m amd_jax.convert to_torch --workdir RUN_DIR --output student.pth          # or .safetensors",
      "python -m amd_jax.convert to_torch --workdir RUN_DIR --output full.pth --include_decoder",
      "python -m amd_jax.convert to_torch --workdir AMD_RUN --parts all --output whole.pth   # + projection heads, generators",
      "# ... or as a transformers directory: ViTMAEModel / VideoMAEModel.from_pretrained(DIR) (ForPreTraining with",
      "# --include_decoder)",
      "python -m amd_jax.convert to_torch --workdir RUN_DIR --layout hf_vitmae --output DIR",
      "# a file amd_jax exported converts back with no architecture flags",
      "python -m amd_jax.convert to_flax --input student.pth --output DIR",
      "```",
      "",
      "Every input and output may be a `gs://` URL; outputs are written all or nothing, with the user's umask (0644",
      "typically), and an existing one is replaced only with `--overwrite`. Beside each exported file amd_jax writes",
      "a record of what it wrote (`FILE.amd_jax.json`, for `.safetensors` also in the file's own metadata; in a",
      "transformers directory `amd_jax.json`): layout, architecture, parts, the run it came from. `to_flax` and the",
      "Python loaders read it, so a file amd_jax wrote needs neither `--layout` nor `--arch` (and a model config whose",
      "head count disagrees with it is refused). Layout detection uses that record, then a transformers",
      "`config.json`, then the key names (`mae`, `videomae`, `amd`, `hf_vitmae`, `hf_videomae`). An AMD export of",
      "the encoder (and decoder) alone has VideoMAE's key names; only its record says `amd`.",
      "",
      "A transformers directory from `to_torch` holds the base model (`ViTMAEModel` / `VideoMAEModel` load it",
      "with no missing or unexpected keys) or, with the decoder, the pre-training model (`ForPreTraining` loads it",
      "cleanly; the base class then reports the decoder's keys as unused, as transformers does for any checkpoint",
      "with a head). Its config.json carries the run's mask ratio; for features of every token pass",
      "`mask_ratio=0.0` to `ViTMAEModel.from_pretrained` and an increasing `noise` to the forward (ViTMAE masks",
      "and shuffles inside its embeddings). transformers builds VideoMAE's decoder `norm` with eps 1e-5 (amd_jax and",
      "the official code: 1e-6), so exported VideoMAE decoders differ from amd_jax's by float32-small amounts; the",
      "encoder is unaffected. What transformers cannot express is refused with the reason (an image model without",
      "a cls token, a ViTMAE encoder without its final LayerNorm, a classifier head).",
      "",
      "From Python: `amd_jax.convert.load_torch_encoder(path, config.model)` gives a teacher's encoder params",
      "(shapes checked against the config, missing encoder keys raise, the report is logged);",
      "`load_torch_checkpoint(path, arch, parts=...)` every part (`encoder`, `decoder`, `classifier`, `amd`; for a",
      "whole AMD student `arch = convert.arch_from_run_config(config)` and `parts=('encoder', 'decoder', 'amd')`",
      "give exactly `AMD.init`'s tree); `export_torch(params, path, arch, layout)` the other way. Prefixes",
      "`encoder.` / `backbone.` / `module.` and wrappers `{'model': ...}` / `{'module': ...}` are handled; files are",
      "read with `torch.load(weights_only=True)`.",
      "",
  ]
  return "\n".join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--sizes", default="Ti,S,B,L")
  ap.add_argument("--families", default="image,video")
  ap.add_argument("--amd_sizes", default="S,B", help="AMD students converted whole ('' for none)")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs",
                                                "parity.md"))
  args = ap.parse_args()
  torch.set_num_threads(max(1, os.cpu_count() or 1))
  results = []
  for fam in args.families.split(","):
    for size in args.sizes.split(","):
      t0 = time.time()
      r = run_case(size, fam == "video")
      results.append(r)
      print(f"{fam:5s} {size:2s}: " + ", ".join(f"{o} {r[o]:.2e}" for o in OUTPUTS)
            + f", official naming {'bit-identical' if r['official naming bit-identical'] else 'DIFFERS'}"
            + f"; exported to transformers: {r['hf loading problems']} loading problems, weights "
            + f"{'bit-identical' if r['hf weights identical'] else 'DIFFER'}, encoder {r['hf encoder all tokens']:.2e}"
            + f" ({time.time() - t0:.0f}s)", flush=True)
  amd_results = []
  for size in filter(None, args.amd_sizes.split(",")):
    t0 = time.time()
    r = run_amd_case(size)
    amd_results.append(r)
    print(f"amd   {size:2s}: official keys {'match' if r['keys match'] else 'DIFFER'}, round trip "
          f"{'bit-identical' if r['round trip'] else 'DIFFERS'}, generators {r['generator']:.2e} "
          f"[{r['generator floor']:.2e}] ({time.time() - t0:.0f}s)", flush=True)
  text = render(results, amd_results)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(text)
  print(f"wrote {os.path.abspath(args.out)}")


if __name__ == "__main__":
  main()
