"""Every shipped recipe compiled for TPU pods by amd_jax.aot: fit, per-chip memory and modeled speed.

  python benchmarks/aot_table.py [--configs all|name,name] [--topologies 'v5e:16x16;v4:4x4x4;v5p:4x4x4;2xv5e:16x16'] \\
      [--max_compiles 3] [--cache benchmarks/results/aot] [--markdown benchmarks/results/aot_table.md] [--jobs 1] \\
      [--no_compile]

One row = one recipe on one topology: `python -m amd_jax.aot --search` in a subprocess (its own
libtpu and memory; a row that fails leaves the others alone), its JSON kept in --cache. A rerun
compiles only the rows not cached yet (--retry_failed reruns the failed ones too), so the table,
many compiles long, can be built over several sittings. The markdown table is written from the
cache at the end of every run.

Rows: every config in configs/ except the tests' and the quickstarts' (test_*, quickstart*), at
the recipe's global batch. Where that batch does not divide the chips (the loop splits a batch
evenly over every chip), the next multiple of the chip count is used and the table says so.
'2xv5e:16x16' is two v5e:16x16 slices joined over the data-centre network (mesh.dcn_data=2).

All speed figures are modeled (XLA TPU cost model), not measured.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from amd_jax import aot  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_TOPOLOGIES = "v5e:16x16;v4:4x4x4;v5p:4x4x4;2xv5e:16x16"
SKIPPED_PREFIXES = ("_", "test_", "quickstart")   # "_": configs/__init__.py is a package file, not a recipe
GIB = 2**30


def recipe_names() -> list[str]:
  names = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py"))
  return [n for n in names if not n.startswith(SKIPPED_PREFIXES)]


def parse_topology_spec(text: str) -> aot.Topology:
  """'v5e:16x16' or '2xv5e:16x16' (slices x slice)."""
  slices, sep, rest = text.partition("xv")
  if sep and slices.isdigit():
    return aot.parse_topology("v" + rest, int(slices))
  return aot.parse_topology(text)


def topology_label(t: aot.Topology) -> str:
  return f"{t.num_slices}x {t.name}" if t.num_slices > 1 else t.name


def row_batch(name: str, t: aot.Topology) -> tuple[int, int]:
  """(the recipe's global batch, the batch compiled: the next multiple of the chip count when it does not divide)."""
  config = aot.load_config(os.path.join(REPO, "configs", f"{name}.py"))
  batch = int(config.batch_size)
  n = t.num_chips
  return batch, batch if batch % n == 0 else (batch // n + 1) * n


def cache_path(cache: str, name: str, t: aot.Topology) -> str:
  return os.path.join(cache, f"{name}__{t.num_slices}x{t.name.replace(':', '_')}.json")


def cached_row(cache: str, name: str, t: aot.Topology) -> dict | None:
  """The cached JSON of one row (compiled or failed), or None when it was never compiled."""
  path = cache_path(cache, name, t)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def run_row(name: str, t: aot.Topology, cache: str, max_compiles: int, timeout: int) -> dict:
  """One recipe on one topology through the command line; the JSON it writes (or the failure) is cached."""
  recipe_batch, batch = row_batch(name, t)
  path = cache_path(cache, name, t)
  cmd = [sys.executable, "-m", "amd_jax.aot", f"--config=configs/{name}.py", f"--topology={t.name}",
         f"--num_slices={t.num_slices}", "--search", f"--max_compiles={max_compiles}", f"--json={path}.tmp"]
  if batch != recipe_batch:
    cmd.append(f"--config.batch_size={batch}")
  if t.num_slices > 1:
    cmd.append(f"--config.mesh.dcn_data={t.num_slices}")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
  except subprocess.TimeoutExpired as e:
    returncode, stdout, stderr = -1, str(e.stdout or ""), f"timed out after {timeout} s"
  row = {"recipe": name, "topology": t.name, "num_slices": t.num_slices, "recipe_batch": recipe_batch,
         "batch": batch, "command": " ".join(cmd[1:]).replace(f"--json={path}.tmp", ""),
         "wall_seconds": time.perf_counter() - t0, "returncode": returncode}
  if returncode == 0 and os.path.exists(path + ".tmp"):
    with open(path + ".tmp", encoding="utf-8") as f:
      row["result"] = json.load(f)
    os.remove(path + ".tmp")
  else:
    row["error"] = (stderr.strip().splitlines() or ["(no output)"])[-1][-500:]
    row["stdout_tail"] = stdout[-2000:]
  with open(path, "w", encoding="utf-8") as f:
    json.dump(row, f, indent=2, sort_keys=True)
  return row


def not_compiled(name: str, t: aot.Topology) -> dict:
  recipe_batch, batch = row_batch(name, t)
  return {"recipe": name, "topology": t.name, "num_slices": t.num_slices, "batch": batch,
          "recipe_batch": recipe_batch, "not_compiled": True}


def _cell_layout(r: dict) -> str:
  flags_text = r["overrides_flags"].replace("--config.", "")
  return flags_text or "as the recipe"


def markdown(rows: list[dict]) -> str:
  head = ["recipe", "topology", "global batch", "fits", "GiB/chip", "step ms", "examples/s", "MFU",
          "layout chosen (overrides)", "compiles, s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in rows:
    batch = str(row["batch"]) if row["batch"] == row["recipe_batch"] else f"{row['batch']} (recipe {row['recipe_batch']})"
    topo = f"2x {row['topology']}" if row["num_slices"] == 2 else (
        f"{row['num_slices']}x {row['topology']}" if row["num_slices"] > 1 else row["topology"])
    if row.get("not_compiled"):
      lines.append(f"| {row['recipe']} | {topo} | {batch} | not compiled yet | | | | | | |")
      continue
    if "result" not in row:
      lines.append(f"| {row['recipe']} | {topo} | {batch} | error | | | | | {row.get('error', '')[:120]} | |")
      continue
    res = row["result"]
    best = res.get("recommended")
    searched = res["search"]
    compile_s = sum(r["compile_seconds"] + r["lower_seconds"] for r in searched)
    if best is None:   # nothing fits: show the smallest
      smallest = searched[0]
      gib = smallest["memory_per_chip"]["total_bytes"] / GIB
      lines.append(f"| {row['recipe']} | {topo} | {batch} | no | {gib:.1f} | | | | {_cell_layout(smallest)} | "
                   f"{len(searched)}, {compile_s:.0f} |")
      continue
    m = best["modeled"]
    speed = (f"{m['step_seconds'] * 1e3:.4g} | {m['examples_per_second']:,.0f} | {m['mfu']:.1%}" if m["step_seconds"]
             else "n/a | n/a | n/a")   # the cost model gave no usable estimate (docs/scaling.md)
    lines.append(f"| {row['recipe']} | {topo} | {batch} | yes | {best['memory_per_chip']['total_bytes'] / GIB:.2f} | "
                 f"{speed} | {_cell_layout(best)} | {len(searched)}, {compile_s:.0f} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="all", help="'all' or comma-separated config names (configs/NAME.py)")
  parser.add_argument("--topologies", default=DEFAULT_TOPOLOGIES, help="';'-separated; '2xv5e:16x16' = 2 slices")
  parser.add_argument("--max_compiles", type=int, default=3, help="layouts compiled per row (amd_jax.aot --search)")
  parser.add_argument("--cache", default=os.path.join(REPO, "benchmarks", "results", "aot"))
  parser.add_argument("--markdown", default=os.path.join(REPO, "benchmarks", "results", "aot_table.md"))
  parser.add_argument("--jobs", type=int, default=1, help="rows compiled at once (each uses a CPU core or more)")
  parser.add_argument("--retry_failed", action="store_true", help="rerun rows whose cached run failed")
  parser.add_argument("--timeout", type=int, default=7200, help="seconds per row")
  parser.add_argument("--no_compile", action="store_true",
                      help="compile nothing: write the table from the cache, rows not compiled yet marked so")
  args = parser.parse_args()

  names = recipe_names() if args.configs == "all" else [n.strip() for n in args.configs.split(",") if n.strip()]
  tops = [parse_topology_spec(s.strip()) for s in args.topologies.split(";") if s.strip()]
  os.makedirs(args.cache, exist_ok=True)
  todo = []
  for name in names:
    for t in tops:
      cached = cached_row(args.cache, name, t)
      if args.no_compile or cached is not None and ("result" in cached or not args.retry_failed):
        continue
      todo.append((name, t))
  print(f"{len(names) * len(tops)} rows, {len(todo)} to compile (cache {args.cache})", flush=True)
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
    futures = {pool.submit(run_row, name, t, args.cache, args.max_compiles, args.timeout): (name, t)
               for name, t in todo}
    for future in concurrent.futures.as_completed(futures):
      row = future.result()
      status = "ok" if "result" in row else f"FAILED: {row.get('error', '')}"
      print(f"{row['recipe']} on {topology_label(futures[future][1])}: {status} ({row['wall_seconds']:.0f} s)",
            flush=True)
  rows = [cached_row(args.cache, name, t) or not_compiled(name, t) for name in names for t in tops]
  text = markdown(rows)
  command = "python benchmarks/aot_table.py " + " ".join(a for a in sys.argv[1:] if not a.startswith("--jobs"))
  with open(args.markdown, "w", encoding="utf-8") as f:
    f.write(f"Produced by: `{command.strip()}`\n\n{text}\n")
  print(text)


if __name__ == "__main__":
  main()
