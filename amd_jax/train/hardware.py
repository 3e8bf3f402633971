"""What the loop and amd_jax.aot know about accelerator chips: peak dense bf16 FLOP/s and memory.

Peaks are the vendors' published dense (no sparsity) bf16 matmul rates per chip; MFU is model
FLOP/s over this peak. A chip not listed here has no MFU (a CPU, an unknown accelerator).
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_bf16_flops: float    # per chip, dense
  hbm_bytes: int            # per chip


# TPU generations by the prefix of a topology name (amd_jax.aot) and their device_kind strings.
TPU_CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32 * GIB),
    "v5e": Chip("TPU v5e", 197e12, 16 * GIB),
    "v5p": Chip("TPU v5p", 459e12, 95 * GIB),
    "v6e": Chip("TPU v6e", 918e12, 32 * GIB),
}
_TPU_KINDS = (   # device.device_kind -> generation (first match)
    (re.compile(r"v6 ?lite|v6e", re.I), "v6e"),
    (re.compile(r"v5 ?lite|v5e", re.I), "v5e"),
    (re.compile(r"v5p|v5$", re.I), "v5p"),
    (re.compile(r"v4", re.I), "v4"),
)
_GPU_CHIPS = (   # device_kind substrings -> chip (dense bf16 tensor-core peak, SXM parts)
    ("H200", Chip("NVIDIA H200", 989e12, 141 * 10 ** 9)),
    ("H100", Chip("NVIDIA H100", 989e12, 80 * GIB)),
    ("A100", Chip("NVIDIA A100", 312e12, 80 * GIB)),
    ("L4", Chip("NVIDIA L4", 121e12, 24 * GIB)),
)


def tpu_generation(device_kind: str) -> str | None:
  for pattern, generation in _TPU_KINDS:
    if pattern.search(device_kind):
      return generation
  return None


def chip_of(device) -> Chip | None:
  """The Chip of a jax device, or None (CPU, unknown accelerator)."""
  kind = getattr(device, "device_kind", "") or ""
  if device.platform == "tpu":
    generation = tpu_generation(kind)
    return TPU_CHIPS.get(generation) if generation else None
  if device.platform == "gpu":
    for key, chip in _GPU_CHIPS:
      if key in kind:
        return chip
  return None


# ------------------------------------------------------------------ which accelerators this host has

_GOOGLE_PCI_VENDOR = "0x1ae0"
# Google's virtual NIC (gVNIC) shares the vendor id; it sits in ordinary GCE VMs, TPUs or not.
_GVNIC_PCI_DEVICE = "0x0042"


def on_cloud_tpu_vm() -> bool:
  """A Google TPU on this machine's PCI bus (what JAX's Cloud TPU set-up looks for too)."""
  for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(path) as f:
        vendor = f.read().strip()
      if vendor != _GOOGLE_PCI_VENDOR:
        continue
      with open(os.path.join(os.path.dirname(path), "device")) as f:
        if f.read().strip() != _GVNIC_PCI_DEVICE:
          return True
    except OSError:
      continue
  return False


def platforms_without_absent_tpu(environ=os.environ) -> str | None:
  """The JAX platforms to use when libtpu is installed (the [tpu] extra, amd_jax.aot) on a host without a TPU:
  JAX would otherwise initialise libtpu at start, which prints screens of host-probing errors before falling
  back. None: leave JAX to choose (JAX_PLATFORMS given, no libtpu, or a TPU present)."""
  if environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None or on_cloud_tpu_vm():
    return None
  nvidia = bool(glob.glob("/dev/nvidia[0-9]*")) and importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  return "cuda,cpu" if nvidia else "cpu"
