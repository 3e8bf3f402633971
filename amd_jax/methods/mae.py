"""ImageMAE and VideoMAE pre-training: masked pixel reconstruction.

MAE (images): random mask, cls token, decoder_embed with bias, target normalised
per patch over all values (from the normalised image, as the official code).
VideoMAE (videos): tube mask, no cls token, encoder_to_decoder without bias,
target normalised per patch and per channel from the un-normalised clip.
Which of the two a run is follows config.method; both share this code.
"""
from __future__ import annotations

import einops
import jax
import jax.numpy as jnp

from amd_jax import losses, masking, targets
from amd_jax.config_base import parse_floats
from amd_jax.methods.base import Method
from amd_jax.models import flops, vit
from amd_jax.models.decoders import MaskedTokenDecoder


class MAE(Method):
  decoder_embed = "bias"   # MAE's decoder_embed Linear has a bias
  can_reconstruct = True

  def __init__(self, config):
    super().__init__(config)
    self.encoder = vit.encoder_from_config(config.model)
    self._decoders = {}

  # --- shapes -------------------------------------------------------------
  def grid(self, x) -> vit.TokenGrid:
    m = self.config.model
    return vit.token_grid(x.shape[1:], m.patch_size, m.tubelet_size if x.ndim == 5 else 0)

  def mask_spec(self, x) -> masking.MaskSpec:
    g = self.grid(x)
    return masking.MaskSpec(num_tokens=g.num_tokens, tokens_per_frame=g.tokens_per_frame,
                            kind=self.config.mask.kind)

  def decoder(self, grid: vit.TokenGrid, channels: int) -> MaskedTokenDecoder:
    m, d = self.config.model, self.config.decoder
    patch_dim = m.patch_size**2 * channels * (m.tubelet_size if len(grid.shape) == 3 else 1)
    return MaskedTokenDecoder(
        width=d.width, depth=d.depth, num_heads=d.num_heads, grid=grid.shape, out_dim=patch_dim,
        mlp_ratio=d.mlp_ratio, qkv_bias=m.qkv_bias, pos_emb=m.pos_emb, has_cls=m.cls_token,
        embed=self.decoder_embed, dtype=jnp.dtype(m.dtype), init_scheme=m.init_scheme)

  # --- interface ----------------------------------------------------------
  def init_with_axes(self, rng, example_batch):
    x = example_batch[self.input_key()]
    spec = self.mask_spec(x)
    mask = masking.random_mask(jax.random.PRNGKey(0), x.shape[0], spec, self.config.mask.ratio)
    k_enc, k_dec = jax.random.split(rng)
    enc_params = self.encoder.init(k_enc, x, mask.keep)["params"]
    latent, _ = self.encoder.apply({"params": enc_params}, x, mask.keep)
    dec = self.decoder(self.grid(x), x.shape[-1])
    dec_params = dec.init(k_dec, latent, mask.keep, mask.masked)["params"]
    return {"encoder": enc_params, "decoder": dec_params}

  def pixel_target(self, x):
    m = self.config.model
    if x.ndim == 5:
      mean = jnp.asarray(parse_floats(self.config.data.mean), jnp.float32)
      std = jnp.asarray(parse_floats(self.config.data.std), jnp.float32)
      return targets.video_target(x * std + mean, m.patch_size, m.tubelet_size, self.config.norm_pix_loss)
    return targets.image_target(x, m.patch_size, self.config.norm_pix_loss)

  def reconstruction(self, params, x, mask: masking.Mask, rng, train: bool = True):
    """Encoder on the visible tokens, decoder on the masked ones -> (pred [B,M,P], latent, out)."""
    latent, out = self.encoder.apply({"params": params["encoder"]}, x, mask.keep, train=train,
                                     rngs={"dropout": rng} if train else {})
    pred = self.decoder(self.grid(x), x.shape[-1]).apply({"params": params["decoder"]}, latent, mask.keep,
                                                         mask.masked)
    return pred, latent, out

  def loss(self, params, teacher_params, batch, rng):
    del teacher_params
    x = batch[self.input_key()]
    k_mask, k_drop = jax.random.split(rng)
    mask = masking.random_mask(k_mask, x.shape[0], self.mask_spec(x), self.config.mask.ratio)
    pred, _, _ = self.reconstruction(params, x, mask, k_drop)
    target = masking.gather_tokens(self.pixel_target(x), mask.masked)
    rec = losses.regression(pred, target, "l2")
    return rec, {"loss_rec": rec}

  def features(self, params, batch):
    """Mean of the final-normed patch tokens over the whole (unmasked) input."""
    x = batch[self.input_key()]
    tokens, _ = self.encoder.apply({"params": params["encoder"]}, x)
    if self.config.model.cls_token:
      tokens = tokens[:, 1:]
    return tokens.mean(axis=1)

  def reconstruct(self, params, batch, rng):
    """Pictures for humans: input, the visible patches, and the reconstruction (visible pasted back)."""
    x = batch[self.input_key()]
    mask = masking.random_mask(rng, x.shape[0], self.mask_spec(x), self.config.mask.ratio)
    return self.pictures(params, x, mask, rng)

  def pictures(self, params, x, mask: masking.Mask, rng):
    """reconstruct() under a given mask: {'input', 'visible', 'visible_mask', 'reconstruction'}, each shaped
    like x ('visible_mask' is 1 on visible pixels, 0 on hidden ones, for greying out the hidden patches)."""
    g = self.grid(x)
    pred, _, _ = self.reconstruction(params, x, mask, rng, train=False)
    m = self.config.model
    tub = m.tubelet_size if x.ndim == 5 else 0
    patches = targets.patchify(x, m.patch_size, tub)
    if self.config.norm_pix_loss:  # undo the target's normalisation with the true patch statistics
      pred = self._denormalize(pred, x, mask)
    visible = masking.gather_tokens(patches, mask.keep)
    recon = masking.ungather_tokens([visible, pred], [mask.keep, mask.masked])
    unpatch = lambda t: targets.unpatchify(t, g.shape, m.patch_size, x.shape[-1], tub)
    masked_view, shown = self.masked_view(patches, mask.keep)
    return {"input": x, "visible": unpatch(masked_view), "visible_mask": unpatch(shown),
            "reconstruction": unpatch(recon)}

  @staticmethod
  def masked_view(patches, keep):
    """(patches with zeros outside `keep`, 1/0 indicator of the kept patches), both [B, N, P]."""
    tokens = jnp.arange(patches.shape[1])
    shown = jnp.any(tokens[None, :, None] == keep[:, None, :], axis=-1).astype(patches.dtype)  # [B, N]
    shown = jnp.broadcast_to(shown[..., None], patches.shape)
    return patches * shown, shown

  def _denormalize(self, pred, x, mask: masking.Mask):
    """Predicted normalised patches -> patches in the input's (normalised) pixel space."""
    m = self.config.model
    if x.ndim == 5:  # VideoMAE: per patch and channel, on the un-normalised clip
      mean = jnp.asarray(parse_floats(self.config.data.mean), jnp.float32)
      std = jnp.asarray(parse_floats(self.config.data.std), jnp.float32)
      raw = masking.gather_tokens(targets.patchify(x * std + mean, m.patch_size, m.tubelet_size), mask.masked)
      split = lambda t: einops.rearrange(t, "b n (p c) -> b n p c", c=x.shape[-1])
      raw, p = split(raw), split(pred)
      p = p * (raw.std(-2, keepdims=True, ddof=1) + targets.NORM_EPS) + raw.mean(-2, keepdims=True)
      return einops.rearrange((p - mean) / std, "b n p c -> b n (p c)")
    true = masking.gather_tokens(targets.patchify(x, m.patch_size), mask.masked)
    return pred * jnp.sqrt(true.var(-1, keepdims=True, ddof=1) + targets.NORM_EPS) + true.mean(-1, keepdims=True)

  def flops_per_example(self, example_batch):
    x = example_batch[self.input_key()]
    g = self.grid(x)
    enc = self.encoder
    keep = masking.num_visible(self.mask_spec(x), self.config.mask.ratio)
    n_enc = keep + int(enc.cls_token)
    d = self.config.decoder
    patch_dim = targets.patchify(jnp.zeros((1,) + x.shape[1:]), enc.patch_size,
                                 enc.tubelet_size if x.ndim == 5 else 0).shape[-1]
    linear_flops = flops.linear_flops
    total = linear_flops(keep, patch_dim, enc.width)   # only the visible patches are embedded
    total += flops.stack_flops(n_enc, enc.width, enc.depth, enc.mlp_ratio)
    total += linear_flops(n_enc, enc.width, d.width)
    total += flops.stack_flops(g.num_tokens + int(enc.cls_token), d.width, d.depth, d.mlp_ratio)
    total += linear_flops(g.num_tokens - keep, d.width, patch_dim)
    return {"student": total, "teacher": 0.0}


class VideoMAE(MAE):
  decoder_embed = "nobias"  # VideoMAE's encoder_to_decoder Linear has no bias
