"""The CPU train step of two checkouts side by side: is a change no slower, and does it compute the same loss?

  git worktree add /tmp/before <commit>
  python benchmarks/step_ab.py --before /tmp/before \\
      --configs 'configs/quickstart_video.py:stage=amd;configs/quickstart.py:stage=amd' --rounds 3

Each round runs benchmarks/step.py (the loop's own step, synthetic batch, `--out ''`) of every config in
the --before checkout and then in this one, alternating, so that both see the same machine load; the
ratio is the median of all timed steps of this checkout over the median of the --before checkout's.
step.py's reported loss (same seed, same synthetic batch) must agree between the two: a change meant
only for speed that moves it is reported as a mismatch.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_TIMES = re.compile(r"round step times: ([\d., ]+);.*loss ([-\d.naif]+)")


def one_run(checkout: str, config: str) -> tuple[list[float], str]:
  """step.py in `checkout`: (its timed step seconds, its loss as printed)."""
  proc = subprocess.run([sys.executable, "benchmarks/step.py", f"--config={config}", "--out="], cwd=checkout,
                        capture_output=True, text=True, check=False)
  match = STEP_TIMES.search(proc.stdout)
  if proc.returncode or not match:
    raise RuntimeError(f"benchmarks/step.py --config={config} failed in {checkout}:\n{proc.stderr[-2000:]}")
  return [float(t) for t in match.group(1).split(",")], match.group(2)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--before", required=True, help="a checkout of the commit to compare against")
  parser.add_argument("--configs", default="configs/quickstart_video.py:stage=amd;configs/quickstart.py:stage=amd",
                      help="';'-separated config arguments as step.py takes them")
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  if not os.path.isfile(os.path.join(args.before, "benchmarks", "step.py")):
    sys.exit(f"--before {args.before!r} is not an amd_jax checkout (no benchmarks/step.py)")
  configs = [c.strip() for c in args.configs.split(";") if c.strip()]
  times = {(c, side): [] for c in configs for side in ("before", "this")}
  losses = {(c, side): set() for c in configs for side in ("before", "this")}
  for round_index in range(args.rounds):
    for config in configs:
      for side, checkout in (("before", args.before), ("this", REPO)):
        step_seconds, loss = one_run(checkout, config)
        times[config, side] += step_seconds
        losses[config, side].add(loss)
        print(f"round {round_index + 1} {side:6s} {config}: {step_seconds} loss {loss}", flush=True)
  print("\n| config | step s before (median) | step s this (median) | this / before | loss before | loss this |")
  print("|---|---|---|---|---|---|")
  mismatch = False
  for config in configs:
    before, this = statistics.median(times[config, "before"]), statistics.median(times[config, "this"])
    lb, lt = ",".join(sorted(losses[config, "before"])), ",".join(sorted(losses[config, "this"]))
    mismatch |= lb != lt
    print(f"| {config} | {before:.4f} | {this:.4f} | {this / before:.3f} | {lb} | {lt} |")
  if mismatch:
    sys.exit("the loss differs between the checkouts")


if __name__ == "__main__":
  main()
