"""Soak test of resuming: interrupt a training process at random times until it finishes, then check that
its final weights equal an uninterrupted run's bit for bit.

  python benchmarks/soak.py --workdir /tmp/amd_jax_soak          # about 4 minutes on 2 CPU cores
  python benchmarks/soak.py --workdir /tmp/amd_jax_soak --kills 10 --sigterms 3 --save_kills 2 --corruptions 2 \
      --write_docs docs/reliability.md

1. The uninterrupted run: `python -m amd_jax.main --config CONFIG --workdir WORKDIR/uninterrupted` with
   --steps steps and a checkpoint every --every steps.
2. The same command in WORKDIR/interrupted, over and over. Each start gets one fault, in a random order:
   SIGKILL (kill -9) or SIGTERM at a random moment of its training (uniform over a window after the step
   is compiled, sized so that the faults spread over the whole run), SIGKILL as soon as a checkpoint save
   is seen under way (its temporary directory exists), or, between two starts, the newest checkpoint
   damaged (its data files truncated to half). After the last fault the command runs to the end.
3. The final params and optimizer state of the two runs are compared bit for bit.

It prints a table (fault, count, outcome) and, with --write_docs, puts it in that markdown file between
the lines `<!-- soak:begin -->` and `<!-- soak:end -->` (appended when they are missing).

  python benchmarks/soak.py --workdir /tmp/amd_jax_nan --nan_stops 20

runs the NaN stop instead, N times (a run whose inputs turn every value into Inf/NaN under
nan_policy='stop'): each must print its one-line message and exit 3, with no abort (no 'terminate called',
no core dump, no traceback) from threads or background writers left running.
"""
from __future__ import annotations

import argparse
import glob
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

from amd_jax import weights  # pylint: disable=g-import-not-at-top,wrong-import-position

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
  p.add_argument("--save_kills", type=int, default=2, help="SIGKILLs while a checkpoint is being written")
  p.add_argument("--corruptions", type=int, default=2, help="newest checkpoint truncated between two starts")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--write_docs", default="", help="markdown file to put the result table in")
  p.add_argument("--nan_stops", type=int, default=0, help="instead of the soak: N runs that stop on a NaN")
  return p.parse_args()


def ckpt_steps(workdir):
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


def unfinished_saves(workdir):
  """Orbax's temporary step directories (<step>.orbax-checkpoint-tmp): saves under way or killed."""
  return glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*"))


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


def interrupt(runner, workdir, fault, window, rng):
  """One start ended by `fault` (SIGKILL, SIGTERM: at a random moment of training; save_kill: SIGKILL
  once a checkpoint is being written); what happened."""
  before = ckpt_steps(workdir)
  old_tmp = set(unfinished_saves(workdir))
  proc, log, log_path = runner.start(workdir)
  wait_for_compile(proc, log_path)
  t0 = time.time()
  caught_save = False
  if fault == "save_kill":   # poll for a save under way; give up (and kill anyway) after `window`
    while proc.poll() is None and time.time() < t0 + window and not caught_save:
      caught_save = bool(set(unfinished_saves(workdir)) - old_tmp)
      time.sleep(0.001)
  else:
    deadline = t0 + rng.uniform(0.0, window)
    while proc.poll() is None and time.time() < deadline:
      time.sleep(0.01)
  finished = proc.poll() is not None
  if not finished:
    proc.send_signal(signal.SIGTERM if fault == "SIGTERM" else signal.SIGKILL)
  rc = proc.wait()
  log.close()
  with open(log_path, errors="replace") as f:
    text = f.read()
  resumed = re.search(r"resumed from step (\d+)", text)
  return dict(fault=fault, after_compile_s=round(time.time() - t0, 2), rc=rc, finished_first=finished,
              caught_save=caught_save,
              before=before[-1] if before else 0, resumed=int(resumed.group(1)) if resumed else 0,
              after=ckpt_steps(workdir)[-1] if ckpt_steps(workdir) else 0,
              unfinished_save=bool(set(unfinished_saves(workdir)) - old_tmp), fell_back="cannot be restored" in text,
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


def resumed_right(events) -> tuple[int, int]:
  """(starts that resumed where they should, starts that had a checkpoint to resume from): from the newest
  checkpoint, or from the one before it when the newest had been damaged."""
  good = total = 0
  for prev, e in zip([None] + events[:-1], events):
    if e["fault"] == "corrupt" or not e["before"]:
      continue
    total += 1
    after_damage = prev is not None and prev["fault"] == "corrupt" and prev["step"] is not None
    good += e["resumed"] < e["before"] if after_damage else e["resumed"] == e["before"]
  return good, total


def summarise(events, final_equal, args, ref, total_wall):
  by = lambda fault: [e for e in events if e["fault"] == fault]   # pylint: disable=unnecessary-lambda-assignment
  rows = []
  kills = by("SIGKILL")
  if kills:
    mid = [e for e in kills if not e["finished_first"]]
    rows.append(("kill -9 (SIGKILL) at a random moment of training", len(kills),
                 f"{sum(e['rc'] == -9 for e in mid)}/{len(mid)} killed (exit -9); newest checkpoint then: step "
                 f"{', '.join(str(e['after']) for e in mid)}"))
  save_kills = by("save_kill")
  if save_kills:
    mid = [e for e in save_kills if not e["finished_first"]]
    caught = [e for e in mid if e["caught_save"]]
    rows.append(("kill -9 while a checkpoint is being written", len(save_kills),
                 f"{sum(e['rc'] == -9 for e in caught)}/{len(mid)} killed (exit -9) with a save under way"
                 + (f" (the other {len(mid) - len(caught)}: no save seen within the window, killed anyway)"
                    if len(caught) < len(mid) else "") + "; "
                 f"{sum(e['unfinished_save'] for e in caught)} of them left the save's temporary directory behind, "
                 "never taken for a checkpoint (orbax replaces it when that step is saved again)"))
  terms = by("SIGTERM")
  if terms:
    mid = [e for e in terms if not e["finished_first"]]
    ok = [e for e in mid if e["rc"] == 143 and e["message"]]
    rows.append(("SIGTERM at a random moment of training", len(terms),
                 f"{len(ok)}/{len(mid)} exited 143 after checkpointing the step reached (steps "
                 f"{', '.join(str(e['after']) for e in ok)}) with the 'rerun the same command' message"))
  corrupts = by("corrupt")
  if corrupts:
    done = [e for e in corrupts if e["step"] is not None]
    fell = [e for e in done if e.get("fell_back")]
    rows.append(("newest checkpoint truncated between two starts", len(corrupts),
                 f"{len(fell)}/{len(done)} restarts warned, fell back to the previous step and set the damaged "
                 f"one aside (steps {', '.join(str(e['step']) for e in done)})"))
  good, total = resumed_right(events)
  rows.append(("restart (the same command)", total, f"{good}/{total} resumed from the newest complete checkpoint "
               "(from the one before it after a truncation)"))
  rows.append(("final run to the end", 1, "final params and optimizer state bitwise equal to the uninterrupted "
               f"run: {'yes' if final_equal else 'NO'}"))
  lines = ["| fault | count | outcome |", "|---|---|---|"] + [f"| {f} | {n} | {o} |" for f, n, o in rows]
  notes = [f"Config `{args.config}`, {args.steps} steps, a checkpoint every {args.every} (3 kept), seed "
           f"{args.seed}: `python benchmarks/soak.py --workdir WORKDIR --kills {args.kills} --sigterms "
           f"{args.sigterms} --save_kills {args.save_kills} --corruptions {args.corruptions} --seed {args.seed}`. "
           f"Uninterrupted run {ref['wall']:.0f} s (training after compile {ref['train']:.0f} s); the whole soak "
           f"{total_wall / 60:.1f} min."]
  finished_first = sum(e.get("finished_first", False) for e in events)
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


ABORT_SIGNS = ("terminate called", "Aborted", "core dumped", "Traceback", "Fatal Python error")


def nan_stops(args, root) -> int:
  """args.nan_stops runs stopping on a NaN: (clean exit 3 with the message) counted, the table printed."""
  runner = Runner(args, root)
  outcomes = []
  for i in range(args.nan_stops):
    workdir = os.path.join(root, f"nan{i:02d}")
    cmd = runner.command(workdir) + ["--config.data.std=1e-45"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=runner.env, capture_output=True, text=True)
    clean = (proc.returncode == 3 and "amd_jax: stopped: non-finite values" in proc.stderr
             and not any(sign in proc.stderr for sign in ABORT_SIGNS))
    outcomes.append(clean)
    print(f"run {i + 1}: exit {proc.returncode}, {'clean' if clean else 'NOT CLEAN'}, {time.time() - t0:.0f} s",
          flush=True)
    if not clean:
      print(proc.stderr[-2000:], flush=True)
  table = "\n".join(["| fault | count | outcome |", "|---|---|---|",
                      f"| a NaN/Inf under nan_policy='stop' (data.std=1e-45) | {len(outcomes)} | {sum(outcomes)}/"
                      f"{len(outcomes)} printed the stop message once and exited 3 with no abort or traceback |",
                      "", f"`python benchmarks/soak.py --workdir WORKDIR --nan_stops {args.nan_stops}` "
                      f"(config `{args.config}`)."])
  print(table, flush=True)
  return 0 if all(outcomes) else 1


def main():
  args = parse_args()
  root = os.path.abspath(args.workdir)
  if os.path.exists(root) and os.listdir(root):
    sys.exit(f"{root} is not empty: give a new or empty --workdir")
  os.makedirs(root, exist_ok=True)
  if args.nan_stops:
    sys.exit(nan_stops(args, root))
  rng = random.Random(args.seed)
  runner = Runner(args, root)
  t0 = time.time()
  reference, interrupted = os.path.join(root, "uninterrupted"), os.path.join(root, "interrupted")
  ref = run_to_end(runner, reference)
  print(f"uninterrupted run: {ref['wall']:.0f} s ({ref['train']:.0f} s training)", flush=True)

  faults = (["SIGKILL"] * args.kills + ["SIGTERM"] * args.sigterms + ["save_kill"] * args.save_kills
            + ["corrupt"] * args.corruptions)
  rng.shuffle(faults)
  process_faults = args.kills + args.sigterms + args.save_kills
  window = 1.4 * ref["train"] / max(process_faults, 1)   # expected progress per start: ~0.7 of a share
  events = []
  while faults:
    fault = faults.pop(0)
    if fault == "corrupt" and len(ckpt_steps(interrupted)) < 2 and set(faults) - {"corrupt"}:
      faults.insert(1, fault)   # nothing older to fall back to yet: after the next start
      continue
    event = corrupt_latest(interrupted) if fault == "corrupt" else interrupt(runner, interrupted, fault, window, rng)
    if events and events[-1]["fault"] == "corrupt" and "fell_back" in event:
      events[-1]["fell_back"] = event["fell_back"]
    events.append(event)
    print(" ".join(f"{k}={v}" for k, v in event.items() if k != "message"), flush=True)
  before = ckpt_steps(interrupted)
  last = run_to_end(runner, interrupted)
  with open(last["log"], errors="replace") as f:
    text = f.read()
  if events and events[-1]["fault"] == "corrupt":
    events[-1]["fell_back"] = "cannot be restored" in text
  resumed = re.search(r"resumed from step (\d+)", text)
  events.append(dict(fault="final", before=before[-1] if before else 0,
                     resumed=int(resumed.group(1)) if resumed else 0))

  final_equal = all(trees_equal(weights.load_params(reference, subtree=s),
                                weights.load_params(interrupted, subtree=s)) for s in ("params", "opt_state"))
  table = summarise(events, final_equal, args, ref, time.time() - t0)
  print(table, flush=True)
  if args.write_docs:
    write_docs(args.write_docs, table)
  sys.exit(0 if final_equal else 1)


if __name__ == "__main__":
  main()
