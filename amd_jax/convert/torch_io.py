"""Reading and writing checkpoints: PyTorch .pth / .safetensors state dicts and Flax params files.

PyTorch files are read on the CPU with torch.load(weights_only=True): a checkpoint
is never allowed to run code. The official MAE / VideoMAE / AMD training scripts
save {'model': state_dict, 'optimizer': ..., 'epoch': ..., 'args': Namespace}; the
argparse Namespace is allowed as a safe global, anything else that needs
unpickling stops with the name of the offending object.

Flax params files are .npz archives with '/'-joined parameter paths and a JSON
metadata entry; they load back to the same nested dict, bit for bit.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any, Mapping

import numpy as np

from amd_jax.convert import mapping

# Keys under which training scripts nest the model's state dict, tried in order.
WRAPPER_KEYS = ("model", "module", "state_dict", "model_state", "model_state_dict", "params")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
_METADATA_KEY = "__amd_jax_metadata__"


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


def read_state_dict(path: str) -> tuple[dict[str, np.ndarray], dict]:
  """A .pth/.pt/.bin or .safetensors file -> ({name: float32/int numpy array}, info).

  info: {'path', 'format', 'wrapper' (the key the weights sat under, or ''), 'dtypes'}.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no checkpoint file at {path!r}")
  info = {"path": os.path.abspath(path), "wrapper": ""}
  if path.endswith(SAFETENSORS_SUFFIX):
    info["format"] = "safetensors"
    try:
      from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
      raw = load_file(path, device="cpu")
    except ImportError:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      raw = load_file(path)
  else:
    info["format"] = "torch"
    torch = _torch()
    try:
      with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          f"{path}: torch.load(weights_only=True) refused the file ({e}). amd_jax never unpickles arbitrary "
          "objects; re-save the state dict alone (torch.save(ckpt['model'], 'weights.pth')) from a trusted "
          "environment, or convert it to safetensors.") from None
    raw, info["wrapper"] = unwrap(obj, path)
  dtypes = sorted({str(getattr(v, "dtype", "?")) for v in raw.values()})
  info["dtypes"] = dtypes
  return {k: _to_numpy(v) for k, v in raw.items()}, info


def _atomic_target(path: str, overwrite: bool) -> str:
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path!r} exists; nothing was written (pass overwrite=True / --overwrite to replace it)")
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=os.path.basename(path))
  os.close(fd)
  return tmp


def write_state_dict(state_dict: Mapping[str, np.ndarray], path: str, *, wrap: str = "model",
                     overwrite: bool = False, metadata: Mapping[str, str] | None = None) -> str:
  """Write a state dict as .pth (torch.save, nested under `wrap` unless wrap='') or .safetensors (flat).

  Written to a temporary file and renamed, so a failed write never leaves half a file;
  an existing file is only replaced with overwrite=True.
  """
  torch = _torch()
  tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
  tmp = _atomic_target(path, overwrite)
  try:
    if path.endswith(SAFETENSORS_SUFFIX):
      from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
      save_file(tensors, tmp, metadata={"format": "pt", **dict(metadata or {})})
    elif path.endswith(TORCH_SUFFIXES):
      torch.save({wrap: tensors} if wrap else tensors, tmp)
    else:
      raise ValueError(f"{path!r}: use a .pth/.pt/.bin or .safetensors file name")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def save_flax_params(params: Mapping, path: str, *, metadata: Mapping | None = None,
                     overwrite: bool = False) -> str:
  """Nested Flax params -> .npz ('/'-joined paths) with JSON metadata."""
  if not path.endswith(".npz"):
    raise ValueError(f"{path!r}: Flax params files are .npz")
  flat = {"/".join(p): np.asarray(v) for p, v in mapping.flatten(params).items()}
  if _METADATA_KEY in flat:
    raise ValueError(f"a parameter is named {_METADATA_KEY}")
  flat[_METADATA_KEY] = np.frombuffer(json.dumps(dict(metadata or {}), default=str).encode(), np.uint8)
  tmp = _atomic_target(path, overwrite)
  try:
    with open(tmp, "wb") as f:
      np.savez(f, **flat)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def load_flax_params(path: str) -> tuple[dict, dict]:
  """.npz written by save_flax_params -> (nested params of numpy arrays, metadata)."""
  with np.load(path, allow_pickle=False) as data:
    flat = {k: data[k] for k in data.files}
  meta_raw = flat.pop(_METADATA_KEY, None)
  metadata = json.loads(meta_raw.tobytes().decode()) if meta_raw is not None else {}
  return mapping.unflatten({tuple(k.split("/")): v for k, v in flat.items()}), metadata
