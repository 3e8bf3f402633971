"""Per-device memory of the AMD video train step under several mesh layouts, from the compiled step.

  python benchmarks/memory_table.py [--config configs/amd_vit_s_ssv2.py] [--per_device_batch 8] \
      [--layouts 'data=8;fsdp=8;data=2,fsdp=2,tensor=2;data=4,fsdp=2'] [--rules 'heads='] [--out rows.json]

The step is the loop's (amd_jax.train.loop.make_train_step over the loop's optimizer, state
shardings from sharding.tree_shardings, activation rules from config.mesh, state donated),
lowered from abstract values and compiled ahead of time: nothing is allocated or run, so a ViT-L
teacher at 16x224x224 fits on any machine. Each layout is compiled twice: teacher sharded like the
student's parameters (config.shard_teacher='sharded') and replicated ('replicated').

Without --devices_from_env the script simulates 8 CPU devices (XLA_FLAGS, set before JAX starts).
The figures are XLA's memory_analysis() of the compiled step for ONE device: arguments (state,
batch shard, teacher), outputs (new state, metrics), temporaries (activations kept for the
backward pass, gradients, collectives' buffers), and the part of the outputs that reuses donated
arguments (alias). XLA:CPU's buffer assignment is not a TPU's or a GPU's (other fusion decisions,
no rematerialisation for memory pressure): read the table for how layouts compare, and check the
absolute numbers on the target with the memory analysis the loop logs at start-up.
"""
from __future__ import annotations

import os
import sys

if "--devices_from_env" not in sys.argv:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import importlib.util  # pylint: disable=g-import-not-at-top,wrong-import-position
import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from amd_jax.train import loop, sharding  # pylint: disable=g-import-not-at-top,wrong-import-position

GIB = 2**30
DEFAULT_LAYOUTS = "data=8;fsdp=8;data=2,fsdp=2,tensor=2;data=4,fsdp=2"


def load_config(text: str):
  """'configs/x.py[:arg]' -> the file's get_config(arg)."""
  path, _, arg = text.partition(":")
  spec = importlib.util.spec_from_file_location("memory_table_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def parse_layout(text: str) -> dict[str, int]:
  """'data=2,fsdp=2,tensor=2' -> mesh sizes; unnamed axes are 1."""
  sizes = dict(data=1, fsdp=1, tensor=1)
  for item in text.split(","):
    name, _, value = item.partition("=")
    if name not in sizes:
      raise ValueError(f"layout {text!r}: unknown axis {name!r} (allowed: data, fsdp, tensor)")
    sizes[name] = int(value)
  return sizes


def abstract_with(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def compile_step(config, layout: dict[str, int], teacher_sharded: bool, constrain: bool = True) -> dict:
  """Lower and compile the loop's step (loop.build_trainer) for `layout`; return its per-device memory analysis."""
  config = config.copy_and_resolve_references()
  config.mesh.update(**layout)
  config.shard_teacher = "sharded" if teacher_sharded else "replicated"
  mesh = sharding.make_mesh(config.mesh)
  schedule = loop.Schedule(examples_per_epoch=config.batch_size, steps_per_epoch=1, total_steps=1000,
                           warmup_steps=10)
  trainer = loop.build_trainer(config, mesh, schedule)
  t0 = time.perf_counter()
  if constrain:
    lowered = trainer.lower()
  else:   # the same step without the logical activation constraints
    lowered = trainer.step_fn().lower(trainer.abstract_state, trainer.batch, trainer.teacher)
  compiled = lowered.compile()
  seconds = time.perf_counter() - t0
  m = compiled.memory_analysis()
  out = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes, temp=m.temp_size_in_bytes,
             alias=m.alias_size_in_bytes, compile_seconds=seconds)
  out["total"] = out["argument"] + out["output"] + out["temp"]
  params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.abstract_state.params))
  out["student_state_bytes"] = params * 3   # params + two Adam moments (f32), whole
  out["teacher_bytes"] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.teacher))
  return out


def markdown(rows: list[dict], per_device_batch: int, devices: int) -> str:
  head = ["mesh", "teacher", "arguments GiB", "outputs GiB", "temporaries GiB", "sum GiB",
          "of which donated (alias) GiB", "compile s"]
  lines = [f"Per-device batch {per_device_batch} (global {per_device_batch * devices}), {devices} devices.", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["layout"], r["teacher"]] + [f"{r[k] / GIB:.2f}" for k in ("argument", "output", "temp", "total",
                                                                           "alias")]
    cells.append(f"{r['compile_seconds']:.0f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/amd_vit_s_ssv2.py")
  parser.add_argument("--per_device_batch", type=int, default=8)
  parser.add_argument("--layouts", default=DEFAULT_LAYOUTS, help="';'-separated meshes, e.g. 'data=8;fsdp=8'")
  parser.add_argument("--teacher", default="sharded,replicated", help="'sharded', 'replicated' or both")
  parser.add_argument("--rules", default="", help="config.mesh.rules: activation rule overrides, e.g. 'heads=';"
                      " 'off': trace without activation constraints (GSPMD propagation alone)")
  parser.add_argument("--out", default="", help="also write the rows as JSON here")
  parser.add_argument("--devices_from_env", action="store_true", help="use the devices JAX finds (no simulation)")
  args = parser.parse_args()

  config = load_config(args.config)
  devices = jax.device_count()
  config.batch_size = args.per_device_batch * devices
  config.mesh.rules = "" if args.rules == "off" else args.rules
  rows = []
  for text in args.layouts.split(";"):
    layout = parse_layout(text)
    for teacher in args.teacher.split(","):
      r = compile_step(config, layout, teacher_sharded=teacher == "sharded", constrain=args.rules != "off")
      r.update(layout=text, teacher=teacher)
      rows.append(r)
      print(f"{text:>24} teacher {teacher:>10}: sum {r['total'] / GIB:6.2f} GiB (arguments {r['argument'] / GIB:.2f},"
            f" outputs {r['output'] / GIB:.2f}, temporaries {r['temp'] / GIB:.2f}); compiled in "
            f"{r['compile_seconds']:.0f}s", flush=True)
  print()
  print(markdown(rows, args.per_device_batch, devices))
  first = rows[0]
  print(f"\nWhole (unsharded) sizes: student params + Adam moments {first['student_state_bytes'] / GIB:.2f} GiB, "
        f"teacher params {first['teacher_bytes'] / GIB:.2f} GiB.")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(config=args.config, per_device_batch=args.per_device_batch, devices=devices,
                     device_kind=jax.devices()[0].device_kind, rows=rows), f, indent=2)


if __name__ == "__main__":
  main()
