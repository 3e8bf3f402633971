"""transformers ViTMAE / VideoMAE: their config.json <-> amd_jax's Arch, and export as a save_pretrained directory.

An exported directory holds what transformers' own `save_pretrained` writes (config.json,
model.safetensors) and amd_jax's export record (amd_jax.json). Without the decoder it is the base model
(ViTMAEModel / VideoMAEModel loads it with no missing or unexpected keys); with the decoder it
is the pre-training model (ViTMAEForPreTraining / VideoMAEForPreTraining; the base class then
loads the encoder from it and reports the decoder's keys as unused, as transformers does for
any checkpoint with a head). The weights are matched to the installed transformers' own module
(its state-dict names, loaded strictly), and that module writes the files, so the names are
whatever that version writes and reads.

What transformers cannot express is refused with the reason: an image model without a cls
token or with another position table, a ViTMAE encoder without its final LayerNorm. ViTMAE
keeps its fixed position tables as parameters: amd_jax's tables are written, so the loaded
model uses exactly them. transformers builds VideoMAE's decoder `norm` with eps 1e-5 (amd_jax
and the official code: 1e-6); the encoder is unaffected.

transformers is imported only when a directory is written.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterable, Mapping

import numpy as np

from amd_jax import paths
from amd_jax.convert import mapping, torch_io
from amd_jax.models import vit

CLASSES = {("hf_vitmae", False): "ViTMAEModel", ("hf_vitmae", True): "ViTMAEForPreTraining",
           ("hf_videomae", False): "VideoMAEModel", ("hf_videomae", True): "VideoMAEForPreTraining"}
WEIGHTS = "model.safetensors"


def _size(value, field: str) -> int:
  """An int from transformers' int-or-pair size fields (amd_jax's inputs are square)."""
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise mapping.ConversionError(f"config.json {field}={value}: amd_jax takes square inputs and patches")
    value = value[0]
  return int(value)


def arch_from_hf_config(cfg: Mapping) -> tuple[mapping.Arch, str, list[str]]:
  """(Arch, layout, notes) of a transformers ViTMAE / VideoMAE config.json (a dict)."""
  model_type = cfg.get("model_type")
  if model_type not in mapping.HF_MODEL_TYPES:
    raise mapping.ConversionError(f"config.json has model_type={model_type!r}; amd_jax converts "
                                  f"{', '.join(mapping.HF_MODEL_TYPES)}")
  layout = mapping.HF_MODEL_TYPES[model_type]
  notes = []
  if cfg.get("hidden_act", "gelu") != "gelu":
    notes.append(f"WARNING: config.json hidden_act={cfg['hidden_act']!r}; amd_jax's blocks use exact GELU")
  eps = float(cfg.get("layer_norm_eps", 1e-12))
  if eps != vit.LN_EPS:
    notes.append(f"WARNING: config.json layer_norm_eps={eps:g}; amd_jax's LayerNorms use {vit.LN_EPS:g}, so "
                 "outputs will differ slightly")
  width = int(cfg.get("hidden_size", 768))
  common = dict(
      width=width, depth=int(cfg.get("num_hidden_layers", 12)), num_heads=int(cfg.get("num_attention_heads", 12)),
      patch_size=_size(cfg.get("patch_size", 16), "patch_size"), in_chans=int(cfg.get("num_channels", 3)),
      mlp_ratio=int(cfg.get("intermediate_size", 4 * width)) / width,
      image_size=_size(cfg.get("image_size", 224), "image_size"))
  dec_width = int(cfg.get("decoder_hidden_size", 512 if layout == "hf_vitmae" else 384))
  decoder = mapping.DecoderArch(
      dec_width, int(cfg.get("decoder_num_hidden_layers", 8 if layout == "hf_vitmae" else 4)),
      int(cfg.get("decoder_num_attention_heads", 16 if layout == "hf_vitmae" else 6)),
      int(cfg.get("decoder_intermediate_size", 4 * dec_width)) / dec_width)
  if layout == "hf_vitmae":
    arch = mapping.Arch(tubelet_size=0, cls_token=True, qkv_bias="fused" if cfg.get("qkv_bias", True) else "none",
                        pos_emb="sincos2d", final_norm=True, decoder=decoder, **common)
  else:
    qv = cfg.get("qv_bias", cfg.get("qkv_bias", True))
    mean_pooling = cfg.get("use_mean_pooling", True)
    arch = mapping.Arch(tubelet_size=int(cfg.get("tubelet_size", 2)), num_frames=int(cfg.get("num_frames", 16)),
                        cls_token=False, qkv_bias="qv" if qv else "none", pos_emb="sincos1d",
                        final_norm=None if mean_pooling else True, decoder=decoder, **common)
  return arch, layout, notes


def _transformers():
  try:
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("writing a transformers directory needs transformers: pip install transformers") from e
  return transformers


def _check_expressible(arch: mapping.Arch, layout: str, has_norm: bool):
  problems = []
  if layout == "hf_vitmae":
    if arch.is_video or not arch.cls_token or arch.pos_emb != "sincos2d":
      problems.append("ViTMAE is an image model with a cls token and the 2-D sine-cosine table (this model: "
                      f"{'video' if arch.is_video else 'image'}, cls_token={arch.cls_token}, pos_emb={arch.pos_emb})")
    if not has_norm:
      problems.append("transformers' ViTMAEModel always applies a final LayerNorm; these encoder params have none")
  elif not arch.is_video or arch.cls_token or arch.pos_emb != "sincos1d":
    problems.append("VideoMAE is a video model without a cls token, with the 1-D sine-cosine table (this model: "
                    f"{'video' if arch.is_video else 'image'}, cls_token={arch.cls_token}, pos_emb={arch.pos_emb})")
  if arch.image_size % arch.patch_size:
    problems.append(f"image size {arch.image_size} is not a multiple of the patch size {arch.patch_size}")
  if problems:
    raise mapping.ConversionError(f"cannot export as {layout}: " + "; ".join(problems))


def hf_config(arch: mapping.Arch, layout: str, *, decoder: bool, has_norm: bool = True,
              mask_ratio: float | None = None, norm_pix_loss: bool | None = None):
  """The transformers config of `arch` (ViTMAEConfig / VideoMAEConfig), naming the class it is for."""
  transformers = _transformers()
  _check_expressible(arch, layout, has_norm)
  kw = dict(hidden_size=arch.width, num_hidden_layers=arch.depth, num_attention_heads=arch.num_heads,
            intermediate_size=arch.mlp_hidden, hidden_act="gelu", layer_norm_eps=vit.LN_EPS,
            image_size=arch.image_size, patch_size=arch.patch_size, num_channels=arch.in_chans,
            qkv_bias=arch.qkv_bias != "none")
  if arch.decoder is not None:
    d = arch.decoder
    kw.update(decoder_hidden_size=d.width, decoder_num_hidden_layers=d.depth, decoder_num_attention_heads=d.num_heads,
              decoder_intermediate_size=int(d.width * d.mlp_ratio))
  if norm_pix_loss is not None:
    kw["norm_pix_loss"] = bool(norm_pix_loss)
  if layout == "hf_vitmae":
    if mask_ratio is not None:
      kw["mask_ratio"] = float(mask_ratio)
    config = transformers.ViTMAEConfig(**kw)
  else:
    config = transformers.VideoMAEConfig(num_frames=arch.num_frames, tubelet_size=arch.tubelet_size,
                                         use_mean_pooling=not has_norm, **kw)
  config.architectures = [CLASSES[(layout, decoder)]]
  return config


@contextlib.contextmanager
def _quiet(transformers):
  """transformers' per-file progress bars, off for the few files an export writes (and restored after)."""
  hf_logging = transformers.utils.logging
  was_enabled = hf_logging.is_progress_bar_enabled()
  hf_logging.disable_progress_bar()
  try:
    yield
  finally:
    if was_enabled:
      hf_logging.enable_progress_bar()


def _expected_keys(config, class_name: str) -> dict[str, tuple[int, ...]]:
  """Every state-dict key (and shape) of the transformers class, from a model built without memory."""
  transformers = _transformers()
  import torch  # pylint: disable=g-import-not-at-top
  with torch.device("meta"):
    model = getattr(transformers, class_name)(config)
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def to_hf_state_dict(params: Mapping, arch: mapping.Arch, layout: str, *, parts: Iterable[str] | None = None,
                     mask_ratio: float | None = None, norm_pix_loss: bool | None = None):
  """Flax params -> (transformers state dict, config, notes): the encoder, and the decoder when asked for."""
  params = mapping.split_params(params)
  wanted = set(parts) if parts is not None else {"encoder"}
  if not wanted <= {"encoder", "decoder"}:
    raise mapping.ConversionError(f"a transformers {layout} directory holds the encoder and the pixel decoder; "
                                  f"not {', '.join(sorted(wanted - {'encoder', 'decoder'}))}")
  wanted.add("encoder")
  decoder = "decoder" in wanted
  official_layout = "mae" if layout == "hf_vitmae" else "videomae"
  # VideoMAE's renaming rules map transformers' names onto the pre-training layout (`encoder.` prefix).
  prefix = "encoder." if official_layout == "videomae" else ""
  has_norm = "norm" in params["encoder"]
  _check_expressible(arch, layout, has_norm)
  official = mapping.flax_to_torch(params, arch, official_layout, parts=sorted(wanted), encoder_prefix=prefix)
  config = hf_config(arch, layout, decoder=decoder, has_norm=has_norm, mask_ratio=mask_ratio,
                     norm_pix_loss=norm_pix_loss)
  expected = _expected_keys(config, config.architectures[0])
  out, consumed, problems = {}, set(), []
  for key, shape in expected.items():
    name = mapping.hf_key_to_official(key, layout)
    value, sources = (None, ()) if name is None else mapping.official_to_hf_value(official, name)
    if value is None:
      problems.append(f"{key} (official name {name})")
      continue
    if tuple(value.shape) != shape:
      problems.append(f"{key}: amd_jax gives shape {tuple(value.shape)}, transformers expects {shape}")
      continue
    out[key] = np.ascontiguousarray(value, np.float32)
    consumed.update(sources)
  left = sorted(set(official) - consumed)
  if problems or left:
    raise mapping.ConversionError(
        f"the params do not map onto transformers' {config.architectures[0]}: "
        + "; ".join(problems[:6] + ([f"no place for {', '.join(left[:6])}"] if left else [])))
  notes = []
  if layout == "hf_videomae" and arch.qkv_bias == "fused":
    notes.append("the fused qkv bias's key part is not written (transformers' VideoMAE has no key bias): adding "
                 "one vector to every key shifts all of a query's scores equally, which softmax ignores")
  if layout == "hf_videomae" and decoder:
    notes.append("transformers builds VideoMAE's decoder norm with eps 1e-5 (amd_jax: 1e-6): decoder outputs "
                 "differ slightly; the encoder is unaffected")
  return out, config, notes


def export_dir(params: Mapping, directory: str, arch: mapping.Arch, layout: str, *,
               parts: Iterable[str] | None = None, record: Mapping | None = None, overwrite: bool = False,
               mask_ratio: float | None = None, norm_pix_loss: bool | None = None) -> tuple[dict, list[str]]:
  """Write `directory` with transformers' own save_pretrained (config.json, model.safetensors) plus amd_jax's
  record; returns (the transformers state dict, notes). Existing files are replaced only with overwrite."""
  directory = str(directory)
  if directory.endswith(torch_io.TORCH_SUFFIXES + (torch_io.SAFETENSORS_SUFFIX,)):
    raise mapping.ConversionError(f"{layout} output is a directory (config.json + {WEIGHTS}), not the file "
                                  f"{directory!r}")
  state_dict, config, notes = to_hf_state_dict(params, arch, layout, parts=parts, mask_ratio=mask_ratio,
                                               norm_pix_loss=norm_pix_loss)
  transformers = _transformers()
  import torch  # pylint: disable=g-import-not-at-top
  with torch.device("meta"):   # no init: every tensor is assigned from the state dict
    model = getattr(transformers, config.architectures[0])(config)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True, assign=True)
  record = dict(record or {}, hf_class=config.architectures[0])
  with tempfile.TemporaryDirectory(prefix="amd_jax_hf_") as tmp:
    # transformers writes the names every version it supports reads (5.x saves its 4.x names).
    with _quiet(transformers):
      model.save_pretrained(tmp, safe_serialization=True)
    names = sorted(os.listdir(tmp), key=lambda n: n.endswith((".safetensors", ".bin")))   # the weights last
    targets = [paths.join(directory, n) for n in names] + [paths.join(directory, torch_io.DIR_RECORD)]
    existing = [t for t in targets if paths.exists(t)]
    if existing and not overwrite:
      raise FileExistsError(f"{', '.join(existing)} exist; nothing was written (use --overwrite or another --output)")
    torch_io.write_record(directory, record, is_dir=True, overwrite=True)
    for name, target in zip(names, targets):
      with open(os.path.join(tmp, name), "rb") as f:
        paths.write_bytes(target, f.read())
  return state_dict, notes
