"""Soak test of resuming: interrupt a training process at random times until it finishes, then check that
its final weights equal an uninterrupted run's bit for bit.

  python benchmarks/soak.py --workdir /tmp/amd_jax_soak
  python benchmarks/soak.py --workdir /tmp/amd_jax_soak --kills 10 --sigterms 3 --corruptions 2 \
      --write_docs docs/reliability.md

1. The uninterrupted run: `python -m amd_jax.main --config CONFIG --workdir WORKDIR/uninterrupted` with
   --steps steps and a checkpoint every --every steps.
2. The same command in WORKDIR/interrupted, over and over. Each start gets one fault, in a random order:
   SIGKILL (kill -9) or SIGTERM at a random moment of its training (uniform over a window after the step
   is compiled, sized so that the faults spread over the whole run), or, between two starts, the newest
   checkpoint damaged (its data files truncated to half). After the last fault the command runs to the end.
3. The final params and optimizer state of the two runs are compared bit for bit.

It prints a table (fault, count, outcome) and, with --write_docs, puts it in that markdown file between
the lines `<!-- soak:begin -->` and `<!-- soak:end -->` (appended when they are missing).
"""
from __future__ import annotations

import argparse
import glob
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

from amd_jax.train import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position

COMPILED = "step compiled in"   # the loop's log line once the train step is compiled
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="an empty or new folder")
  p.add_argument("--config", default="configs/test_tiny.py")
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--every", type=int, default=100, help="checkpoint (and log) every N steps")
  p.add_argument("--kills", type=int, default=10, help="SIGKILLs at random moments")
  p.add_argument("--sigterms", type=int, default=3, help="SIGTERMs at random moments")
  p.add_argument("--corruptions", type=int, default=2, help="newest checkpoint truncated between two starts")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--write_docs", default="", help="markdown file to put the result table in")
  return p.parse_args()


def ckpt_steps(workdir):
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


def unfinished_saves(workdir):
  return glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp-*"))


class Runner:
  """Starts the training command in a workdir, logging each start to its own file."""

  def __init__(self, args, root):
    self.args = args
    self.env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
                    JAX_COMPILATION_CACHE_DIR=os.path.join(root, "jax_cache"),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    self.root = root
    self.starts = 0

  def command(self, workdir):
    a = self.args
    return [sys.executable, "-m", "amd_jax.main", f"--config={a.config}", f"--workdir={workdir}",
            f"--config.total_steps={a.steps}", f"--config.checkpoint_every_steps={a.every}",
            f"--config.log_every_steps={a.every}", "--config.keep_checkpoints=3"]

  def start(self, workdir):
    self.starts += 1
    log_path = os.path.join(self.root, f"start{self.starts:02d}.log")
    log = open(log_path, "w")
    proc = subprocess.Popen(self.command(workdir), cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log, log_path


def wait_for_compile(proc, log_path, timeout=600.0):
  """Seconds from now until the train step is compiled (None if the process ended first)."""
  t0 = time.time()
  while time.time() - t0 < timeout:
    with open(log_path, errors="replace") as f:
      if COMPILED in f.read():
        return time.time() - t0
    if proc.poll() is not None:
      return None
    time.sleep(0.05)
  return None


def run_to_end(runner, workdir):
  t0 = time.time()
  proc, log, log_path = runner.start(workdir)
  compiled = wait_for_compile(proc, log_path)
  rc = proc.wait()
  log.close()
  if rc != 0:
    sys.exit(f"the run in {workdir} failed (exit {rc}); see {log_path}")
  wall = time.time() - t0
  return dict(wall=wall, train=wall - (compiled or 0.0), log=log_path)


def interrupt(runner, workdir, sig, window, rng):
  """One start killed by `sig` at a random moment of training; what happened."""
  before = ckpt_steps(workdir)
  proc, log, log_path = runner.start(workdir)
  wait_for_compile(proc, log_path)
  delay = rng.uniform(0.0, window)
  deadline = time.time() + delay
  while time.time() < deadline and proc.poll() is None:
    time.sleep(0.01)
  finished = proc.poll() is not None
  if not finished:
    proc.send_signal(sig)
  rc = proc.wait()
  log.close()
  with open(log_path, errors="replace") as f:
    text = f.read()
  return dict(fault=signal.Signals(sig).name, delay=delay, rc=rc, finished_first=finished,
              before=before[-1] if before else 0, after=ckpt_steps(workdir)[-1] if ckpt_steps(workdir) else 0,
              unfinished_save=bool(unfinished_saves(workdir)), fell_back="cannot be restored" in text,
              message=next((line for line in text.splitlines() if "received SIGTERM at step" in line), ""))


def corrupt_latest(workdir):
  """Truncate the newest checkpoint's data files to half (only when an older one exists to fall back to)."""
  steps = ckpt_steps(workdir)
  if len(steps) < 2:
    return dict(fault="corrupt", step=None)
  files = glob.glob(os.path.join(workdir, "checkpoints", str(steps[-1]), "state", "ocdbt.process_0", "d", "*"))
  for f in files:
    os.truncate(f, os.path.getsize(f) // 2)
  return dict(fault="corrupt", step=steps[-1], files=len(files))


def trees_equal(a, b) -> bool:
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  return [p for p, _ in la] == [p for p, _ in lb] and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(la, lb))


def summarise(events, final_equal, args, ref, total_wall):
  kills = [e for e in events if e["fault"] == "SIGKILL"]
  terms = [e for e in events if e["fault"] == "SIGTERM"]
  corrupts = [e for e in events if e["fault"] == "corrupt"]
  rows = []
  if kills:
    mid = [e for e in kills if not e["finished_first"]]
    rows.append(("kill -9 (SIGKILL) at a random moment of training", len(kills),
                 f"{sum(e['rc'] == -9 for e in mid)}/{len(mid)} killed (exit -9) at checkpoint steps "
                 f"{', '.join(str(e['after']) for e in mid)}; {sum(e['unfinished_save'] for e in mid)} left an "
                 "unfinished save (a temporary directory, ignored on restart); every restart resumed"))
  if terms:
    mid = [e for e in terms if not e["finished_first"]]
    ok = [e for e in mid if e["rc"] == 143 and e["message"]]
    rows.append(("SIGTERM at a random moment of training", len(terms),
                 f"{len(ok)}/{len(mid)} exited 143 after checkpointing the step reached (steps "
                 f"{', '.join(str(e['after']) for e in ok)}) with the 'rerun the same command' message"))
  if corrupts:
    done = [e for e in corrupts if e["step"] is not None]
    fell = [e for e in done if e.get("fell_back")]
    rows.append(("newest checkpoint truncated between two starts", len(corrupts),
                 f"{len(fell)}/{len(done)} restarts warned, fell back to the previous step and set the damaged "
                 f"one aside (steps {', '.join(str(e['step']) for e in done)})"))
  finished_first = sum(e.get("finished_first", False) for e in events)
  rows.append(("final run to the end", 1, "final params and optimizer state bitwise equal to the uninterrupted "
               f"run: {'yes' if final_equal else 'NO'}"))
  lines = ["| fault | count | outcome |", "|---|---|---|"] + [f"| {f} | {n} | {o} |" for f, n, o in rows]
  notes = [f"Config `{args.config}`, {args.steps} steps, a checkpoint every {args.every} (3 kept), seed {args.seed}. "
           f"Uninterrupted run {ref['wall']:.0f} s (training after compile {ref['train']:.0f} s); the whole soak "
           f"{total_wall / 60:.1f} min."]
  if finished_first:
    notes.append(f"{finished_first} start(s) finished before their fault was due (not counted as interrupted).")
  return "\n".join(lines + [""] + notes)


def write_docs(path, table):
  block = f"{BEGIN}\n{table}\n{END}"
  text = open(path).read() if os.path.exists(path) else ""
  if BEGIN in text and END in text:
    text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
  else:
    text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
  with open(path, "w") as f:
    f.write(text)


def main():
  args = parse_args()
  root = os.path.abspath(args.workdir)
  if os.path.exists(root) and os.listdir(root):
    sys.exit(f"{root} is not empty: give a new or empty --workdir")
  os.makedirs(root, exist_ok=True)
  rng = random.Random(args.seed)
  runner = Runner(args, root)
  t0 = time.time()
  reference, interrupted = os.path.join(root, "uninterrupted"), os.path.join(root, "interrupted")
  ref = run_to_end(runner, reference)
  print(f"uninterrupted run: {ref['wall']:.0f} s ({ref['train']:.0f} s training)", flush=True)

  faults = ["SIGKILL"] * args.kills + ["SIGTERM"] * args.sigterms + ["corrupt"] * args.corruptions
  rng.shuffle(faults)
  process_faults = args.kills + args.sigterms
  window = 1.5 * ref["train"] / max(process_faults, 1)   # expected progress per start: ~3/4 of a share
  events = []
  for fault in faults:
    if fault == "corrupt":
      event = corrupt_latest(interrupted)
    else:
      event = interrupt(runner, interrupted, signal.Signals[fault], window, rng)
      if events and events[-1]["fault"] == "corrupt" and events[-1]["step"] is not None:
        events[-1]["fell_back"] = event["fell_back"]
    events.append(event)
    print(" ".join(f"{k}={v}" for k, v in event.items() if k != "message"), flush=True)
  last = run_to_end(runner, interrupted)
  if events and events[-1]["fault"] == "corrupt" and events[-1]["step"] is not None:
    with open(last["log"], errors="replace") as f:
      events[-1]["fell_back"] = "cannot be restored" in f.read()

  final_equal = all(trees_equal(checkpoint.load_params(reference, subtree=s),
                                checkpoint.load_params(interrupted, subtree=s)) for s in ("params", "opt_state"))
  table = summarise(events, final_equal, args, ref, time.time() - t0)
  print(table, flush=True)
  if args.write_docs:
    write_docs(args.write_docs, table)
  sys.exit(0 if final_equal else 1)


if __name__ == "__main__":
  main()
