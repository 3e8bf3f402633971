"""Input pipeline against the train step: can the grain pipeline feed the step? Appends docs/benchmarks.md.

  python benchmarks/input.py                                   # the quickstart's MAE student
  python benchmarks/input.py --config configs/quickstart.py:stage=amd,teacher=random

Three figures, on the same machine in one run:
1. pipeline images/s: batches drawn from amd_jax.data.pipeline.make_train_dataset (the
   config's own data settings, prefetch included) with nothing else running;
2. step images/s: the loop's compiled train step (benchmarks/step.StepBench) on a batch
   of the same shape;
   (1) and (2) are measured in alternating rounds and their ratio taken per round
   (median reported): the goal is a pipeline at least 2x faster than the step;
3. the data-wait fraction of a real short run of amd_jax.train.loop.run (real data,
   checkpointing off, no probe): the time the loop spent blocked in next(data_iter)
   over the wall time of the last logging window (`data_wait_fraction` in its
   metrics). Because steps are dispatched asynchronously, a value near 1 means the
   run is input-bound; well below 1 it is roughly the pipeline's time per batch over
   the step's, with the pipeline sharing the CPU with the step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import step as step_bench  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax.train import loop  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def pipeline_rate(it, batches: int) -> float:
  """Images/s of `batches` batches drawn from a running iterator."""
  t0 = time.perf_counter()
  n = 0
  for _ in range(batches):
    batch = next(it)
    n += len(batch["label"])
  return n / (time.perf_counter() - t0)


def short_run(config, steps: int, log_every: int) -> dict:
  """A real run of the loop (fresh workdir, no checkpoints in between, no probe): its final metrics."""
  c = config.copy_and_resolve_references()
  c.total_steps, c.num_epochs = steps, -1.0
  c.log_every_steps = log_every
  c.checkpoint_every_steps = steps + 1
  c.eval.probe = False
  with tempfile.TemporaryDirectory() as workdir:
    return loop.run(c, workdir)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/quickstart.py:stage=mae")
  parser.add_argument("--override", action="append", default=[], help="a.b=v, repeatable")
  parser.add_argument("--batches", type=int, default=10, help="batches (and steps) per round")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--run_steps", type=int, default=60, help="steps of the real short run (0: skip it)")
  parser.add_argument("--out", default=step_bench.DOCS)
  args = parser.parse_args()
  config = step_bench.load_config(os.path.join(ROOT, args.config), args.override)
  load_before = step_bench.load_average()

  bench = step_bench.StepBench(config)
  dataset = pipeline.make_train_dataset(config.data, global_batch_size=config.batch_size, seed=config.seed)
  it = iter(dataset)
  pipeline_rate(it, 3)   # warm up: first batches pay for thread start and source loading
  for _ in range(2):
    bench.step()
  rounds = []
  for _ in range(args.repeats):
    p = pipeline_rate(it, args.batches)
    s = config.batch_size / statistics.median(bench.step() for _ in range(args.batches))
    rounds.append((p, s))
  loop._close(it)  # pylint: disable=protected-access
  pipe = statistics.median(p for p, _ in rounds)
  stp = statistics.median(s for _, s in rounds)
  ratio = statistics.median(p / s for p, s in rounds)

  run = {}
  if args.run_steps:
    log_every = max(args.run_steps // 3, 1)
    run = short_run(config, args.run_steps, log_every)
  load_after = step_bench.load_average()

  head = ["config", "batch", "pipeline images/s", "step images/s", "ratio pipeline / step (goal >= 2)"]
  cells = [args.config, str(config.batch_size), f"{pipe:.0f}", f"{stp:.0f}", f"**{ratio:.2f}**"]
  if run:
    head += ["real run: images/s (last window)", "real run: data_wait_fraction (last window)"]
    cells += [f"{run.get('examples_per_sec', float('nan')):.0f}", f"{run.get('data_wait_fraction', float('nan')):.3f}"]
  head += ["load before -> after"]
  cells += [f"{load_before} -> {load_after}"]
  text = "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(cells) + " |"])
  print(text)
  notes = ("Per-round (pipeline, step) images/s: "
           + ", ".join(f"({p:.0f}, {s:.0f})" for p, s in rounds) + ".")
  if run:
    notes += (f" Real run: {args.run_steps} steps, logged every {max(args.run_steps // 3, 1)}; "
              "data_wait_fraction = time in next(data_iter) / wall time of the window.")
  print(notes)
  step_bench.append_markdown(f"Input pipeline vs step: {args.config}", text, "python " + " ".join(sys.argv), args.out,
                             notes)


if __name__ == "__main__":
  main()
