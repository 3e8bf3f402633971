"""PyTorch interop: official MAE / VideoMAE / AMD and transformers checkpoints <-> amd_jax Flax params.

Entry points:
  load_torch_encoder(path, model_cfg)   encoder params for a config.model (teachers): strict
                                        shapes, missing encoder keys raise, report logged.
  load_torch_checkpoint(path, arch)     every part a checkpoint holds (encoder, decoder,
                                        classifier fc_norm/head, AMD projection heads and
                                        generators) + a Report.
  export_torch(params, path, arch, layout)   Flax params -> official naming (.pth/.safetensors)
                                        or a transformers save_pretrained directory.
  read_export(path)                     what amd_jax recorded when it exported a file (layout,
                                        architecture, parts), or None.
  python -m amd_jax.convert             the command line, both directions.

Every path may be a gs:// URL (amd_jax.paths). Naming tables and the Arch description:
amd_jax.convert.mapping; transformers configs and directories: amd_jax.convert.hf; file IO:
amd_jax.convert.torch_io. torch (and transformers) are imported only when their files are
read or written.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Mapping

import flax
from absl import logging

from amd_jax import paths
from amd_jax.convert import hf, mapping, torch_io
from amd_jax.convert.hf import arch_from_hf_config
from amd_jax.convert.mapping import (HF_LAYOUTS, LAYOUTS, OFFICIAL_LAYOUTS, PARTS, AMDArch, Arch, ConversionError,
                                     DecoderArch, Report, ShapeMismatchError, arch_from_config, arch_from_run_config,
                                     detect_layout, flax_to_torch, named_arch, stack_blocks, torch_to_flax,
                                     unstack_blocks)
from amd_jax.convert.torch_io import (load_flax_params, read_arrays, read_record, read_state_dict, save_flax_params,
                                      write_state_dict)

__all__ = [
    "Arch", "DecoderArch", "AMDArch", "Report", "ConversionError", "ShapeMismatchError", "LAYOUTS",
    "OFFICIAL_LAYOUTS", "HF_LAYOUTS", "PARTS", "load_torch_encoder", "load_torch_checkpoint", "export_torch",
    "read_export", "named_arch", "arch_from_config", "arch_from_run_config", "arch_from_hf_config", "detect_layout",
    "torch_to_flax", "flax_to_torch", "stack_blocks", "unstack_blocks", "read_state_dict", "write_state_dict",
    "save_flax_params", "load_flax_params", "read_generator_mask_tokens", "MASK_TOKENS_SUFFIX", "convert_state_dict",
    "recorded_arch",
]

# The AMD generators' mask tokens of an export (the official state dict has no place for them): FILE + this.
MASK_TOKENS_SUFFIX = ".generator_mask_tokens.npy"


def read_export(path: str) -> dict | None:
  """amd_jax's record of an exported file or directory (layout, arch, parts, ...), or None."""
  if os.fspath(path).endswith(torch_io.SAFETENSORS_SUFFIX) and paths.isfile(path):
    return read_state_dict(path)[1]["record"]
  return read_record(path)


def recorded_arch(info: Mapping) -> tuple[Arch | None, str]:
  """(the architecture a checkpoint's own description gives, what gave it): amd_jax's export record, else a
  transformers config.json; (None, '') when it has neither."""
  record = info.get("record")
  if record and record.get("arch"):
    return Arch.from_dict(record["arch"]), "amd_jax's export record"
  if info.get("hf_config"):
    return arch_from_hf_config(info["hf_config"])[0], "config.json"
  return None, ""


def _check_heads(arch: Arch, info: Mapping, path: str):
  """Head counts are in no tensor's shape: when the file says how many it has, they must agree."""
  try:
    recorded, where = recorded_arch(info)
  except (ConversionError, TypeError, ValueError):
    return   # a description this version cannot read: the shapes are still checked key by key
  if recorded is not None and recorded.width == arch.width and recorded.num_heads != arch.num_heads:
    raise ConversionError(f"{path}: its {where} gives {recorded.num_heads} attention heads, the architecture "
                          f"asked for has {arch.num_heads} (width {arch.width}); fix the head count")


def read_generator_mask_tokens(source, num_pairs: int | None = None):
  """AMD generator mask tokens from an .npy ([num_pairs, ...]) or .npz file (arrays gen_0, gen_1, ..., an
  amd_jax params file holding generators/gen_i/mask_token, or one array)."""
  arrays = read_arrays(source)
  from_params = {k.split("/")[1]: v for k, v in arrays.items()
                 if k.startswith("generators/") and k.endswith("/mask_token")}
  if from_params:
    return from_params
  named = {k: v for k, v in arrays.items() if k.startswith("gen_")}
  if named:
    return named
  if len(arrays) == 1:
    return next(iter(arrays.values()))
  raise ConversionError(f"{source}: no generator mask tokens (expected arrays gen_0..gen_{(num_pairs or 2) - 1}, "
                        f"an amd_jax params file, or one array); it holds {', '.join(sorted(arrays))}")


def _mask_tokens(option, path: str, info: Mapping, arch: Arch):
  """(tokens or None, where they came from) for torch_to_flax, from the generator_mask_tokens option."""
  if arch.amd is None or option is None or (isinstance(option, str) and option == "init"):
    return None, ""
  if isinstance(option, str) and option == "auto":
    name = (info.get("record") or {}).get("generator_mask_tokens")
    if not name:
      return None, ""
    option = paths.join(os.path.dirname(os.fspath(path)), name) if os.path.dirname(os.fspath(path)) else name
    if not paths.isfile(option):
      raise FileNotFoundError(f"{path}: its export record names the generator mask tokens file {option!r}, which "
                              "is missing; pass generator_mask_tokens= a file, or 'init' to draw new ones")
  if isinstance(option, (str, os.PathLike)):
    return read_generator_mask_tokens(option, arch.amd.num_pairs), os.fspath(option)
  return option, ""


def load_torch_checkpoint(path: str, arch: Arch, layout: str = "auto", *, parts: Iterable[str] | None = None,
                          scan: bool = False, max_depth: int = 0, strict: bool = False, log: bool = True,
                          generator_mask_tokens="auto", seed: int = 0) -> tuple[dict, Report]:
  """A .pth/.safetensors checkpoint or a transformers directory -> (Flax params dict, Report).

  See mapping.torch_to_flax. With parts including 'amd' (and arch.amd set, e.g. from
  arch_from_run_config of an AMD config), an official AMD student checkpoint gives the whole
  tree AMD.init makes. generator_mask_tokens: 'auto' (the file amd_jax wrote beside its own
  export, else amd_jax's init), 'init' (amd_jax's init, PRNG `seed`), a .npy/.npz path, or
  arrays ([num_pairs, ...] or {'gen_i': array}); the report says which was used.
  """
  state_dict, info = read_state_dict(path)
  return convert_state_dict(state_dict, info, arch, layout, parts=parts, scan=scan, max_depth=max_depth,
                            strict=strict, log=log, generator_mask_tokens=generator_mask_tokens, seed=seed)


def convert_state_dict(state_dict: Mapping, info: Mapping, arch: Arch, layout: str = "auto", *,
                       parts: Iterable[str] | None = None, scan: bool = False, max_depth: int = 0,
                       strict: bool = False, log: bool = True, generator_mask_tokens="auto",
                       seed: int = 0) -> tuple[dict, Report]:
  """load_torch_checkpoint for what read_state_dict returned (state dict and its info)."""
  path = info["path"]
  if layout == "auto":
    layout = detect_layout(state_dict, info["record"], info["hf_config"])
  _check_heads(arch, info, path)
  tokens, tokens_from = _mask_tokens(generator_mask_tokens, path, info, arch)
  params, report = torch_to_flax(state_dict, arch, layout, parts=parts, scan=scan, max_depth=max_depth,
                                 strict=strict, generator_mask_tokens=tokens, mask_tokens_source=tokens_from,
                                 seed=seed)
  _add_read_notes(report, info)
  if log:
    logging.info("converted %s:\n%s", path, report.summary())
    for note in report.notes:
      if note.startswith("WARNING"):
        logging.warning("%s: %s", path, note)
  return params, report


def _add_read_notes(report: Report, info: Mapping):
  if info["wrapper"]:
    report.notes.insert(0, f"weights read from the {info['wrapper']!r} entry of the checkpoint")
  if info["dtypes"] != ["torch.float32"] and info["dtypes"] != ["float32"]:
    report.notes.append(f"checkpoint dtypes {', '.join(info['dtypes'])} were converted to float32")
  if info.get("hf_config"):
    report.notes.extend(arch_from_hf_config(info["hf_config"])[2])


def load_torch_encoder(path: str, model_cfg, *, layout: str = "auto", modality: str | None = None,
                       final_norm: bool | None = None, image_size: int = 224, num_frames: int = 16,
                       in_chans: int = 3, max_depth: int = 0, return_report: bool = False):
  """Encoder params for `model_cfg` (an amd_jax config.model) from a PyTorch checkpoint or a converted .npz.

  What training code calls for a teacher given as a file. The architecture (width,
  depth, heads, patch/tubelet, bias layout, cls token) comes from model_cfg; every
  tensor's shape is checked against it (a mismatch names the key and both shapes) and a
  missing encoder key raises: a teacher is never silently random. A head count that
  disagrees with what the file records (amd_jax's export record, a transformers
  config.json) raises too. The block layout (scan or not) follows model_cfg.scan.

  Args:
    path: .pth/.pt/.bin/.safetensors (official MAE, VideoMAE, AMD, transformers naming;
      prefixes `encoder.`, `backbone.`, `module.` and wrappers such as {'model': ...}
      handled), a transformers save_pretrained directory, or an .npz written by
      `python -m amd_jax.convert to_flax`. Local or gs://.
    model_cfg: config.model-like ConfigDict (variant/width/depth/num_heads, patch_size,
      tubelet_size, cls_token, qkv_bias, pos_emb, mlp_ratio, scan).
    layout: a naming family (mapping.LAYOUTS) or 'auto' (what the file records, else the key names).
    modality: 'image' or 'video'; None: the layout's family (mae/hf_vitmae are images).
    final_norm: True requires the final `norm`; False skips it; None converts it when present
      (fine-tuned checkpoints with mean pooling have none).
    image_size, num_frames: the input the checkpoint's fixed tables were made for; only
      used to check them (a mismatch is reported, never fatal).
    max_depth: > 0 loads only the first blocks (teachers aligned at early layers).
    return_report: also return the mapping.Report.
  """
  path = os.fspath(path)
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
    info = None
  else:
    state_dict, info = read_state_dict(path)
    if layout == "auto":
      layout = detect_layout(state_dict, info["record"], info["hf_config"])
    if modality is None:
      modality = mapping.family(layout)
    arch = arch_from_config(model_cfg, image_size=image_size, num_frames=num_frames, in_chans=in_chans,
                            video=modality == "video", final_norm=final_norm)
    _check_heads(arch, info, path)
    source = f"{path}" + (f" (entry {info['wrapper']!r})" if info["wrapper"] else "")
  params, report = torch_to_flax(state_dict, arch, layout, parts=("encoder",), scan=bool(model_cfg.scan),
                                 max_depth=max_depth)
  report.notes.insert(0, f"read from {source}")
  if info is not None and info.get("hf_config"):
    report.notes.extend(arch_from_hf_config(info["hf_config"])[2])
  logging.info("encoder weights from %s (heads %d from the config):\n%s", path, arch.num_heads, report.summary())
  for note in report.notes:
    if note.startswith("WARNING"):
      logging.warning("%s: %s", path, note)
  return (params["encoder"], report) if return_report else params["encoder"]


def export_torch(params: Mapping, path: str, arch: Arch, layout: str, *, parts: Iterable[str] | None = None,
                 wrap: str = "model", encoder_prefix: str | None = None, overwrite: bool = False,
                 record: Mapping | None = None, hf_options: Mapping | None = None) -> dict:
  """Flax params -> `path` in the naming of `layout`; returns the state dict written.

  Official layouts (mae, videomae, amd) write one .pth or .safetensors file; the transformers
  layouts (hf_vitmae, hf_videomae) write a save_pretrained directory (see amd_jax.convert.hf;
  hf_options: mask_ratio, norm_pix_loss for its config). Beside the weights goes the export
  record (layout, architecture, parts, plus `record`'s entries: what a later to_flax reads, so
  it needs no architecture flags), in .safetensors metadata too; with the AMD parts, also the
  generators' mask tokens (FILE.generator_mask_tokens.npy), which the official naming cannot
  hold. Every file is written all or nothing; existing ones only with overwrite.
  """
  path = os.fspath(path)
  params = flax.core.meta.unbox(params)   # a module's own init keeps logical-axis metadata on each leaf
  wanted = mapping.export_parts(params, arch, parts)
  encoder = mapping.split_params(params)["encoder"]
  full = {"format": torch_io.RECORD_FORMAT, "writer": "amd_jax.convert", "layout": layout,
          "arch": dataclasses.replace(arch, final_norm="norm" in encoder).describe(),
          "parts": [p for p in PARTS if p in wanted], **dict(record or {})}
  if layout in HF_LAYOUTS:
    state_dict, notes = hf.export_dir(params, path, arch, layout, parts=wanted, record=full, overwrite=overwrite,
                                      **dict(hf_options or {}))
    for note in notes:
      logging.info("%s: %s", path, note)
    logging.info("wrote %d tensors (%s, transformers %s) to %s", len(state_dict), layout, full["parts"],
                 paths.resolve(path))
    return state_dict
  state_dict = flax_to_torch(params, arch, layout, parts=wanted, encoder_prefix=encoder_prefix)
  targets = [path, torch_io.record_path(path, is_dir=False)]
  if "amd" in wanted:
    targets.append(path + MASK_TOKENS_SUFFIX)
    full["generator_mask_tokens"] = os.path.basename(targets[-1])
  existing = [t for t in targets if paths.exists(t)]
  if existing and not overwrite:
    raise FileExistsError(f"{', '.join(map(repr, existing))} exist; nothing was written (pass overwrite=True / "
                          "--overwrite to replace them)")
  # The weights land last: once they exist, so does what describes them.
  torch_io.write_record(path, full, overwrite=True)
  if "amd" in wanted:
    torch_io.write_arrays(mapping.generator_mask_tokens(params), targets[2], overwrite=True)
  metadata = {"source": "amd_jax", "layout": layout, "num_heads": str(arch.num_heads),
              torch_io.RECORD_KEY: json.dumps(full, default=str)}
  write_state_dict(state_dict, path, wrap=wrap, overwrite=True, metadata=metadata)
  logging.info("wrote %d tensors (%s naming) to %s", len(state_dict), layout, paths.resolve(path))
  return state_dict
