"""Reading and writing checkpoints: PyTorch .pth / .safetensors state dicts, transformers save_pretrained
directories, Flax params files, and the record amd_jax keeps of what it exported.

Every path may be local or a URL (gs://...): all file access goes through amd_jax.paths, and every
file is written all or nothing with the user's umask; an existing file is replaced only with
overwrite=True.

PyTorch files are read on the CPU with torch.load(weights_only=True): a checkpoint
is never allowed to run code. The official MAE / VideoMAE / AMD training scripts
save {'model': state_dict, 'optimizer': ..., 'epoch': ..., 'args': Namespace}; the
argparse Namespace is allowed as a safe global, anything else that needs
unpickling stops with the name of the offending object.

A transformers save_pretrained directory holds config.json and model.safetensors (or
pytorch_model.bin, or shards listed in an index file); its config.json comes back in
the read info ('hf_config').

Flax params files are .npz archives with '/'-joined parameter paths and a JSON
metadata entry; they load back to the same nested dict, bit for bit.

The export record: when amd_jax writes a PyTorch file it records the naming (layout), the
architecture and the parts in a small JSON file beside it (FILE.amd_jax.json, or
DIR/amd_jax.json for a directory), and for .safetensors also in the file's own metadata
(entry 'amd_jax'), so reading it back needs no architecture flags.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, Mapping

import numpy as np

from amd_jax import paths
from amd_jax.convert import mapping

# Keys under which training scripts nest the model's state dict, tried in order.
WRAPPER_KEYS = ("model", "module", "state_dict", "model_state", "model_state_dict", "params")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
_METADATA_KEY = "__amd_jax_metadata__"

RECORD_KEY = "amd_jax"              # safetensors metadata entry holding the export record (JSON)
RECORD_SUFFIX = ".amd_jax.json"     # the record beside an exported file
DIR_RECORD = "amd_jax.json"         # the record inside an exported directory
RECORD_FORMAT = 1

HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_WEIGHTS_NAME = r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)"   # a file, or one of its shards


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading or writing PyTorch checkpoints needs torch: pip install 'amd_jax[torch]'") from e
  return torch


def _to_numpy(t) -> np.ndarray:
  torch = _torch()
  if isinstance(t, torch.Tensor):
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
      t = t.float()  # NumPy has no bfloat16; every parameter becomes float32 in Flax anyway.
    return t.numpy()
  return np.asarray(t)


def unwrap(obj: Any, path: str = "<checkpoint>") -> tuple[dict[str, Any], str]:
  """The state dict inside a training checkpoint: (state dict, wrapper key or '')."""
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a dict of tensors, found a {type(obj).__name__}")
  torch = _torch()
  is_tensor_dict = lambda d: isinstance(d, Mapping) and d and all(isinstance(v, torch.Tensor) for v in d.values())
  if is_tensor_dict(obj):
    return dict(obj), ""
  for key in WRAPPER_KEYS:
    if key in obj and isinstance(obj[key], Mapping):
      inner = obj[key]
      tensors = {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
      if tensors:
        return tensors, key
  raise ValueError(f"{path}: no state dict found; top-level keys: {', '.join(map(str, list(obj)[:10]))} "
                   f"(looked for a dict of tensors, or one under {', '.join(WRAPPER_KEYS)})")


# ------------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------------
def read_state_dict(path: str) -> tuple[dict[str, np.ndarray], dict]:
  """A .pth/.pt/.bin or .safetensors file, or a transformers save_pretrained directory ->
  ({name: float32/int numpy array}, info).

  info: {'path', 'format', 'wrapper' (the key the weights sat under, or ''), 'dtypes',
  'record' (amd_jax's export record, or None), 'hf_config' (a transformers config.json beside
  or around the weights, or None)}.
  """
  path = os.fspath(path)
  if paths.isdir(path):
    return _read_pretrained_dir(path)
  if not paths.isfile(path):
    raise FileNotFoundError(f"no checkpoint file at {path!r}")
  raw, info = _read_weights_file(path)
  if info["record"] is None:
    info["record"] = read_record(path)
  info["hf_config"] = _sibling_hf_config(path)
  if info["record"] is None and info["hf_config"] is not None:   # a weights file inside an exported directory
    info["record"] = read_record(os.path.dirname(path) or ".")
  info["dtypes"] = sorted({str(getattr(v, "dtype", "?")) for v in raw.values()})
  return {k: _to_numpy(v) for k, v in raw.items()}, info


def _read_weights_file(path: str) -> tuple[dict[str, Any], dict]:
  """(raw tensors, info) of one weights file."""
  info = {"path": paths.resolve(path), "wrapper": "", "record": None}
  if path.endswith(SAFETENSORS_SUFFIX):
    info["format"] = "safetensors"
    raw, metadata = _read_safetensors(path)
    if RECORD_KEY in metadata:
      info["record"] = _parse_record(metadata[RECORD_KEY], path)
    return raw, info
  info["format"] = "torch"
  torch = _torch()
  try:
    with paths.local_file(path) as local, torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(local, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"{path}: torch.load(weights_only=True) refused the file ({e}). amd_jax never unpickles arbitrary "
        "objects; re-save the state dict alone (torch.save(ckpt['model'], 'weights.pth')) from a trusted "
        "environment, or convert it to safetensors.") from None
  raw, info["wrapper"] = unwrap(obj, path)
  return raw, info


def _read_safetensors(path: str) -> tuple[dict[str, Any], dict[str, str]]:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  try:
    _torch()
    framework = "pt"   # bfloat16 files need torch (NumPy has no bfloat16)
  except ImportError:
    framework = "np"
  with paths.local_file(path) as local, safe_open(local, framework=framework) as f:
    return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _read_pretrained_dir(directory: str) -> tuple[dict[str, np.ndarray], dict]:
  """A transformers save_pretrained directory (one weights file or index-listed shards), or a directory
  amd_jax exported."""
  names = paths.listdir(directory)
  if "checkpoints" in names and not any(n in names for n in HF_WEIGHTS + HF_INDEXES):
    raise ValueError(f"{directory!r} is an amd_jax run's workdir, not a weights directory: give it as "
                     "--workdir (to_torch), or as the source of a teacher / init")
  files = [n for n in HF_WEIGHTS if n in names]
  if not files:
    index = next((n for n in HF_INDEXES if n in names), None)
    if index is None:
      raise FileNotFoundError(
          f"{directory!r} holds no weights: expected a transformers save_pretrained directory ({', '.join(HF_WEIGHTS)}"
          f" or a sharded index {HF_INDEXES[0]}); it holds {', '.join(names[:10]) or 'nothing'}")
    weight_map = json.loads(paths.read_text(paths.join(directory, index)))["weight_map"]
    files = sorted(set(weight_map.values()))
  raw: dict[str, Any] = {}
  info: dict = {}
  for name in files:
    part, info = _read_weights_file(paths.join(directory, name))
    raw.update(part)
  info["path"] = paths.resolve(directory)
  info["format"] += " (save_pretrained directory)"
  info["hf_config"] = json.loads(paths.read_text(paths.join(directory, HF_CONFIG))) if HF_CONFIG in names else None
  if info["record"] is None:
    info["record"] = read_record(directory)
  info["dtypes"] = sorted({str(getattr(v, "dtype", "?")) for v in raw.values()})
  return {k: _to_numpy(v) for k, v in raw.items()}, info


def _sibling_hf_config(path: str) -> dict | None:
  """The config.json of a transformers directory a weights file sits in (its model_type tells the naming)."""
  folder = os.path.dirname(path)
  if not re.fullmatch(HF_WEIGHTS_NAME, os.path.basename(path)):
    return None
  config = paths.join(folder, HF_CONFIG) if folder else HF_CONFIG
  if not paths.isfile(config):
    return None
  try:
    cfg = json.loads(paths.read_text(config))
  except ValueError:
    return None
  return cfg if isinstance(cfg, dict) and "model_type" in cfg else None


def read_arrays(path: str) -> dict[str, np.ndarray]:
  """The arrays of an .npy ({'': array}) or .npz file ({name: array})."""
  path = os.fspath(path)
  if not path.endswith((".npy", ".npz")):
    raise ValueError(f"{path!r}: expected an .npy or .npz file")
  if not paths.isfile(path):
    raise FileNotFoundError(f"no file at {path!r}")
  with paths.local_file(path) as local:
    if path.endswith(".npy"):
      return {"": np.load(local, allow_pickle=False)}
    with np.load(local, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}


# ------------------------------------------------------------------------------------------------------------
# The export record
# ------------------------------------------------------------------------------------------------------------
def record_path(path: str, is_dir: bool | None = None) -> str:
  """Where the record of an exported file (FILE.amd_jax.json) or directory (DIR/amd_jax.json) lives."""
  path = os.fspath(path)
  if is_dir is None:
    is_dir = paths.isdir(path)
  return paths.join(path, DIR_RECORD) if is_dir else path + RECORD_SUFFIX


def read_record(path: str) -> dict | None:
  """amd_jax's record of an exported file or directory, or None when there is none."""
  where = record_path(path)
  if not paths.isfile(where):
    return None
  return _parse_record(paths.read_text(where), where)


def _parse_record(text: str, where: str) -> dict:
  try:
    record = json.loads(text)
  except ValueError as e:
    raise ValueError(f"{where}: the amd_jax export record is not valid JSON ({e})") from None
  if not isinstance(record, dict) or "layout" not in record:
    raise ValueError(f"{where}: not an amd_jax export record (no 'layout')")
  return record


def write_record(path: str, record: Mapping, *, is_dir: bool = False, overwrite: bool = False) -> str:
  """Write the record of the exported file (or directory, is_dir=True) `path`."""
  where = record_path(path, is_dir)
  _check_target(where, overwrite)
  paths.write_text(where, json.dumps(dict(record), indent=2, default=str) + "\n")
  return where


# ------------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------------
def _check_target(path: str, overwrite: bool):
  if paths.exists(path) and not overwrite:
    raise FileExistsError(f"{path!r} exists; nothing was written (pass overwrite=True / --overwrite to replace it)")


def write_state_dict(state_dict: Mapping[str, np.ndarray], path: str, *, wrap: str = "model",
                     overwrite: bool = False, metadata: Mapping[str, str] | None = None) -> str:
  """Write a state dict as .pth (torch.save, nested under `wrap` unless wrap='') or .safetensors (flat,
  with `metadata`), all or nothing; an existing file is only replaced with overwrite=True."""
  path = os.fspath(path)
  if not path.endswith(TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,)):
    raise ValueError(f"{path!r}: use a .pth/.pt/.bin or .safetensors file name")
  _check_target(path, overwrite)
  torch = _torch()
  tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
  with paths.writing(path) as tmp:
    if path.endswith(SAFETENSORS_SUFFIX):
      from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
      save_file(tensors, tmp, metadata={"format": "pt", **dict(metadata or {})})
    else:
      torch.save({wrap: tensors} if wrap else tensors, tmp)
  return path


def write_arrays(arrays: np.ndarray, path: str, *, overwrite: bool = False) -> str:
  """One array as an .npy file, all or nothing."""
  _check_target(path, overwrite)
  with paths.writing(path) as tmp:
    with open(tmp, "wb") as f:
      np.save(f, np.asarray(arrays), allow_pickle=False)
  return path


def save_flax_params(params: Mapping, path: str, *, metadata: Mapping | None = None,
                     overwrite: bool = False) -> str:
  """Nested Flax params -> .npz ('/'-joined paths) with JSON metadata."""
  path = os.fspath(path)
  if not path.endswith(".npz"):
    raise ValueError(f"{path!r}: Flax params files are .npz")
  flat = {"/".join(p): np.asarray(v) for p, v in mapping.flatten(params).items()}
  if _METADATA_KEY in flat:
    raise ValueError(f"a parameter is named {_METADATA_KEY}")
  flat[_METADATA_KEY] = np.frombuffer(json.dumps(dict(metadata or {}), default=str).encode(), np.uint8)
  _check_target(path, overwrite)
  with paths.writing(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **flat)
  return path


def load_flax_params(path: str) -> tuple[dict, dict]:
  """.npz written by save_flax_params -> (nested params of numpy arrays, metadata)."""
  flat = read_arrays(path)
  meta_raw = flat.pop(_METADATA_KEY, None)
  metadata = json.loads(meta_raw.tobytes().decode()) if meta_raw is not None else {}
  return mapping.unflatten({tuple(k.split("/")): v for k, v in flat.items()}), metadata
