"""Attention formulations priced by XLA's TPU cost model: forward + backward at one ViT shape, per chip.

  python benchmarks/aot_attention.py [--topology v5e:2x2] [--tokens 1568] [--heads 6] [--head_dim 64] \\
      [--per_chip_batch 8] [--forward_only]

Compiles, for the devices of a TPU topology (on this CPU host, with libtpu: see amd_jax.aot), the
gradient of sum(attention(q, k, v)) with respect to q, k and v in bfloat16 for:
  xla          jax.nn.dot_product_attention's XLA path (float32 logits), inputs [B, N, H, Dh]
  per_head     amd_jax.models.vit.attention_per_head (the XLA:CPU path), inputs [B, N, H, Dh]
  heads_major  amd_jax.models.vit.attention_heads_major (the TPU path), inputs [B, H, N, Dh], the
               layout amd_jax's TPU projections produce directly
and prints the cost model's step time, bytes and FLOPs per chip. The defaults are the pixel decoder of
the official AMD / VideoMAE ViT-B video recipes at their per-chip batch on 256 chips (16 x 224 x 224
clips, 2 x 16 x 16 tubelets: 1568 tokens; decoder width 384, 6 heads). All figures are modeled (XLA
TPU cost model), not measured.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"   # as amd_jax.aot does when run as a program (see its top)
for _name, _value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                      ("TPU_ACCELERATOR_TYPE", "v5litepod-4"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                      ("TF_CPP_MIN_LOG_LEVEL", "2")):
  os.environ.setdefault(_name, _value)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from amd_jax import aot  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position

from amd_jax.models import vit  # pylint: disable=g-import-not-at-top,wrong-import-position

FORMULATIONS = {
    "xla": (lambda q, k, v: jax.nn.dot_product_attention(q, k, v), "bnhd"),
    "per_head": (vit.attention_per_head, "bnhd"),
    "heads_major": (vit.attention_heads_major, "bhnd"),
}


def price(name: str, topology: aot.Topology, batch: int, tokens: int, heads: int, head_dim: int,
          forward_only: bool) -> aot.Speed:
  attend, layout = FORMULATIONS[name]
  devices = aot.topology_devices(topology)
  mesh = Mesh(devices, ("data",))
  shape = (batch * len(devices), tokens, heads, head_dim) if layout == "bnhd" else (
      batch * len(devices), heads, tokens, head_dim)
  spec = jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))

  def step(q, k, v):
    if forward_only:
      return attend(q, k, v)
    return jax.grad(lambda *a: attend(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

  compiled = jax.jit(step).lower(spec, spec, spec).compile()
  return aot.cost_figures(compiled, "this compile")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--tokens", type=int, default=1568)
  parser.add_argument("--heads", type=int, default=6)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--per_chip_batch", type=int, default=8)
  parser.add_argument("--forward_only", action="store_true")
  args = parser.parse_args()
  if not aot.has_libtpu():
    sys.exit(f"amd_jax: {aot.INSTALL_HINT}")
  topology = aot.parse_topology(args.topology)
  what = "forward" if args.forward_only else "forward + backward"
  print(f"attention {what}, per chip: {args.per_chip_batch} x {args.tokens} tokens, {args.heads} heads of "
        f"{args.head_dim}, bfloat16, on {topology.describe()} [modeled (XLA TPU cost model), not measured]")
  print(f"{'formulation':<12} {'step ms':>8} {'GB accessed':>12} {'GFLOP':>8}")
  for name in FORMULATIONS:
    s = price(name, topology, args.per_chip_batch, args.tokens, args.heads, args.head_dim, args.forward_only)
    print(f"{name:<12} {s.step_seconds * 1e3:8.3f} {s.bytes_accessed_per_chip / 1e9:12.2f} "
          f"{s.flops_per_chip / 1e9:8.1f}")


if __name__ == "__main__":
  main()
