"""PyTorch interop: official MAE / VideoMAE / AMD (and transformers) checkpoints <-> amd_jax Flax params.

Entry points:
  load_torch_encoder(path, model_cfg)   encoder params for a config.model (teachers): strict
                                        shapes, missing encoder keys raise, report logged.
  load_torch_checkpoint(path, arch)     every part a checkpoint holds (encoder, decoder,
                                        classifier fc_norm/head) + a Report.
  export_torch(params, path, arch)      Flax params -> official state dict (.pth/.safetensors).
  python -m amd_jax.convert             the command line, both directions.

Naming tables and the Arch description: amd_jax.convert.mapping. File IO:
amd_jax.convert.torch_io. torch is imported only when a PyTorch file is read or written.
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping

from absl import logging

from amd_jax.convert import mapping, torch_io
from amd_jax.convert.mapping import (LAYOUTS, Arch, ConversionError, DecoderArch, Report, ShapeMismatchError,
                                     arch_from_config, flax_to_torch, named_arch, stack_blocks, torch_to_flax,
                                     unstack_blocks)
from amd_jax.convert.torch_io import load_flax_params, read_state_dict, save_flax_params, write_state_dict

__all__ = [
    "Arch", "DecoderArch", "Report", "ConversionError", "ShapeMismatchError", "LAYOUTS",
    "load_torch_encoder", "load_torch_checkpoint", "export_torch", "named_arch", "arch_from_config",
    "torch_to_flax", "flax_to_torch", "stack_blocks", "unstack_blocks",
    "read_state_dict", "write_state_dict", "save_flax_params", "load_flax_params",
]


def load_torch_checkpoint(path: str, arch: Arch, layout: str = "auto", *, parts: Iterable[str] | None = None,
                          scan: bool = False, max_depth: int = 0, strict: bool = False,
                          log: bool = True) -> tuple[dict, Report]:
  """A .pth/.safetensors checkpoint -> (Flax params dict, Report). See mapping.torch_to_flax."""
  state_dict, info = read_state_dict(path)
  params, report = torch_to_flax(state_dict, arch, layout, parts=parts, scan=scan, max_depth=max_depth,
                                 strict=strict)
  if info["wrapper"]:
    report.notes.insert(0, f"weights read from the {info['wrapper']!r} entry of the checkpoint")
  if info["dtypes"] != ["torch.float32"] and info["dtypes"] != ["float32"]:
    report.notes.append(f"checkpoint dtypes {', '.join(info['dtypes'])} were converted to float32")
  if log:
    logging.info("converted %s:\n%s", path, report.summary())
    for note in report.notes:
      if note.startswith("WARNING"):
        logging.warning("%s: %s", path, note)
  return params, report


def load_torch_encoder(path: str, model_cfg, *, layout: str = "auto", modality: str | None = None,
                       final_norm: bool | None = None, image_size: int = 224, num_frames: int = 16,
                       in_chans: int = 3, max_depth: int = 0, return_report: bool = False):
  """Encoder params for `model_cfg` (an amd_jax config.model) from a PyTorch checkpoint or a converted .npz.

  What training code calls for a teacher given as a file. The architecture (width,
  depth, heads, patch/tubelet, bias layout, cls token) comes from model_cfg; every
  tensor's shape is checked against it (a mismatch names the key and both shapes) and a
  missing encoder key raises: a teacher is never silently random. The block layout
  (scan or not) follows model_cfg.scan.

  Args:
    path: .pth/.pt/.bin/.safetensors (official MAE, VideoMAE, AMD, transformers naming;
      prefixes `encoder.`, `backbone.`, `module.` and wrappers such as {'model': ...}
      handled), or an .npz written by `python -m amd_jax.convert to_flax`.
    model_cfg: config.model-like ConfigDict (variant/width/depth/num_heads, patch_size,
      tubelet_size, cls_token, qkv_bias, pos_emb, mlp_ratio, scan).
    layout: a naming family (mapping.LAYOUTS) or 'auto' (from the key names).
    modality: 'image' or 'video'; None: the layout's family (mae/hf_vitmae are images).
    final_norm: True requires the final `norm`; False skips it; None converts it when present
      (fine-tuned checkpoints with mean pooling have none).
    image_size, num_frames: the input the checkpoint's fixed tables were made for; only
      used to check them (a mismatch is reported, never fatal).
    max_depth: > 0 loads only the first blocks (teachers aligned at early layers).
    return_report: also return the mapping.Report.
  """
  if path.endswith(".npz"):
    flax_params, _ = load_flax_params(path)
    enc = flax_params.get("encoder", flax_params)
    if modality is None:
      modality = "image" if model_cfg.cls_token else "video"
    layout = "mae" if modality == "image" else "videomae"
    arch = arch_from_config(model_cfg, image_size=image_size, num_frames=num_frames, in_chans=in_chans,
                            video=modality == "video", final_norm="norm" in enc if final_norm is None else final_norm)
    # Validate by a round trip through the official naming (shapes, leftovers, bias layout).
    state_dict = flax_to_torch({"encoder": enc}, arch, layout, parts=("encoder",))
    source = f"the Flax params file {path}"
  else:
    state_dict, info = read_state_dict(path)
    if layout == "auto":
      layout = mapping.detect_layout(state_dict)
    if modality is None:
      modality = mapping.family(layout)
    arch = arch_from_config(model_cfg, image_size=image_size, num_frames=num_frames, in_chans=in_chans,
                            video=modality == "video", final_norm=final_norm)
    source = f"{path}" + (f" (entry {info['wrapper']!r})" if info["wrapper"] else "")
  params, report = torch_to_flax(state_dict, arch, layout, parts=("encoder",), scan=bool(model_cfg.scan),
                                 max_depth=max_depth)
  report.notes.insert(0, f"read from {source}")
  logging.info("encoder weights from %s (heads %d from the config):\n%s", path, arch.num_heads, report.summary())
  for note in report.notes:
    if note.startswith("WARNING"):
      logging.warning("%s: %s", path, note)
  return (params["encoder"], report) if return_report else params["encoder"]


def export_torch(params: Mapping, path: str, arch: Arch, layout: str, *, parts: Iterable[str] | None = None,
                 wrap: str = "model", encoder_prefix: str | None = None, overwrite: bool = False) -> dict:
  """Flax params -> official-naming state dict written to `path` (.pth or .safetensors); returns it."""
  state_dict = flax_to_torch(params, arch, layout, parts=parts, encoder_prefix=encoder_prefix)
  write_state_dict(state_dict, path, wrap=wrap, overwrite=overwrite,
                   metadata={"source": "amd_jax", "layout": layout, "num_heads": str(arch.num_heads)})
  logging.info("wrote %d tensors (%s naming) to %s", len(state_dict), layout, os.path.abspath(path))
  return state_dict
