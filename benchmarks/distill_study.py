"""MAE, AMD, D-MAE, TinyMIM and G2SD students at the same budget on Fashion-MNIST, from the same teacher.

  python benchmarks/distill_study.py --workdir workdirs/distill_study            # the study: hours on 2 cores
  python benchmarks/distill_study.py --workdir /tmp/distill_smoke --smoke        # every stage, a few steps

What it does, all through amd_jax.train.loop.run and amd_jax.probe (as amd_jax/quickstart.py does):
1. the teacher: configs/quickstart.py `stage=teacher` (a 128-wide 4-deep MAE) trained for --teacher_epochs
   (default 30: the quickstart's 3 do not beat raw pixels, 15 beat them on the linear probe only) with a decoder of --teacher_decoder_depth blocks
   (default 2) in WORKDIR/teacher, or an existing teacher workdir given by --teacher;
   then the two controls (the student architecture untrained, raw pixels) through the same probes;
2. for every method and seed, a student with the quickstart's budget (64 wide, 4 deep, batch 256,
   2 epochs, the same optimizer): `mae` and `amd` from configs/quickstart.py, `dmae`, `tinymim` and
   `g2sd` from configs/distill_fmnist.py, config.seed = the seed (init, masks, data order);
3. frozen-feature evaluation at the end of each run (kNN and linear probe, config.eval);
4. a short fine-tuning of each student's encoder through the train loop (configs/finetune_fmnist.py:
   mean pooling + fc_norm + head, layer decay 0.75, drop path 0.1, light mixup, --finetune_epochs),
   top-1 on the test split.
Runs go seed by seed (every method's seed 0, then seed 1, ...), so an interrupted study already compares
every method. It prints and writes, after every run, WORKDIR/results.md (mean and sample standard deviation over seeds, wall times) and
WORKDIR/results.json (every run). Each run lives in WORKDIR/<method>/seed<k>; a finished run's numbers are
kept in its study.json and not recomputed, an interrupted one resumes from its checkpoints.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import jax
import numpy as np

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

from amd_jax.train import loop  # pylint: disable=g-import-not-at-top,wrong-import-position

METHODS = ("mae", "amd", "dmae", "tinymim", "g2sd")
NAMES = {"mae": "MAE", "amd": "AMD", "dmae": "D-MAE (MAE-lite)", "tinymim": "TinyMIM", "g2sd": "G2SD"}


def load_config_module(name: str):
  path = os.path.join(REPO, "configs", name + ".py")
  spec = importlib.util.spec_from_file_location(f"distill_study_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _arg(**kw) -> str:
  return ",".join(f"{k}={v}" if v is not True else k for k, v in kw.items() if v not in ("", False, None))


def student_config(method: str, teacher: str, seed: int, smoke: bool, teacher_decoder_depth: int):
  if method in ("mae", "amd"):
    c = load_config_module("quickstart").get_config(
        _arg(stage=method, teacher=teacher if method == "amd" else "", runlocal=smoke))
  else:
    c = load_config_module("distill_fmnist").get_config(
        _arg(method=method, teacher=teacher, runlocal=smoke, teacher_decoder_depth=teacher_decoder_depth))
  c.seed = seed
  return c


def teacher_config(epochs: float, decoder_depth: int, smoke: bool):
  c = load_config_module("quickstart").get_config(_arg(stage="teacher", runlocal=smoke))
  if not smoke:
    c.num_epochs = float(epochs)
  c.decoder.depth = decoder_depth
  return c


# ------------------------------------------------------------------------------------------ fine-tuning


def finetune(student_workdir: str, workdir: str, *, seed: int, epochs: float, smoke: bool) -> dict:
  """Fine-tune a student's encoder through the train loop (configs/finetune_fmnist.py); test top-1."""
  config = load_config_module("finetune_fmnist").get_config(
      _arg(init=student_workdir, epochs=float(epochs), runlocal=smoke))
  config.seed = seed
  t0 = time.perf_counter()
  final = loop.run(config, workdir)
  return {"finetune_top1": final["eval/top1"], "finetune_top5": final["eval/top5"],
          "finetune_final_loss": final.get("loss", float("nan")), "finetune_seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------ the study


def run_teacher(workdir: str, args) -> dict:
  done = os.path.join(workdir, "study.json")
  if os.path.isfile(done):
    with open(done) as f:
      return json.load(f)
  config = teacher_config(args.teacher_epochs, args.teacher_decoder_depth, args.smoke)
  t0 = time.perf_counter()
  final = {k: float(v) for k, v in loop.run(config, workdir).items() if isinstance(v, (int, float))}
  final["wall_seconds"] = time.perf_counter() - t0
  final["epochs"] = float(config.num_epochs)
  final["decoder_depth"] = int(config.decoder.depth)
  with open(done, "w") as f:
    json.dump(final, f, indent=2, sort_keys=True)
  return final


def run_student(method: str, seed: int, teacher: str, workdir: str, args) -> dict:
  done = os.path.join(workdir, "study.json")
  if os.path.isfile(done):
    with open(done) as f:
      return json.load(f)
  config = student_config(method, teacher, seed, args.smoke, args.teacher_decoder_depth)
  t0 = time.perf_counter()
  final = loop.run(config, workdir)
  result = {k: float(v) for k, v in final.items() if isinstance(v, (int, float))}
  result["pretrain_wall_seconds"] = time.perf_counter() - t0
  result.update(finetune(workdir, os.path.join(workdir, "finetune"), seed=seed, epochs=args.finetune_epochs,
                         smoke=args.smoke))
  result.update(method=method, seed=seed)
  with open(done, "w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
  return result


def mean_spread(values) -> str:
  values = [v for v in values if v is not None and np.isfinite(v)]
  if not values:
    return "-"
  if len(values) == 1:
    return f"{values[0]:.4f} (1 seed)"
  return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def run_controls(workdir: str, smoke: bool) -> dict:
  """Untrained student architecture and raw pixels through the students' probes (cached in controls.json)."""
  done = os.path.join(workdir, "controls.json")
  if os.path.isfile(done):
    with open(done) as f:
      return json.load(f)
  from amd_jax import quickstart  # pylint: disable=g-import-not-at-top
  controls = quickstart.run_controls(load_config_module("quickstart"), smoke)
  controls = {name: {k: float(v) for k, v in r.items() if isinstance(v, (int, float))}
              for name, r in controls.items()}
  with open(done, "w") as f:
    json.dump(controls, f, indent=2, sort_keys=True)
  return controls


def format_table(results: dict, teacher: dict | None, controls: dict | None) -> str:
  rows = ["| encoder | seeds | kNN top-1 | linear probe top-1 | fine-tune top-1 | pre-training loop (min) | "
          "whole run (min) |", "|---|---|---|---|---|---|---|"]
  for method, runs in results.items():
    if not runs:
      continue
    get = lambda k, runs=runs: [r.get(k) for r in runs]
    train_min = np.mean([r.get("train_seconds", np.nan) for r in runs]) / 60
    whole_min = np.mean([r["pretrain_wall_seconds"] + r["finetune_seconds"] for r in runs]) / 60
    rows.append(f"| student, {NAMES[method]} | {len(runs)} | {mean_spread(get('knn_top1'))} | "
                f"{mean_spread(get('linear_probe_top1'))} | {mean_spread(get('finetune_top1'))} | "
                f"{train_min:.2f} | {whole_min:.2f} |")
  if teacher is not None:
    rows.append(f"| teacher MAE (128 wide, {teacher.get('epochs', float('nan')):g} epochs, decoder "
                f"{teacher.get('decoder_depth', 1)} deep) | 1 | {teacher.get('knn_top1', float('nan')):.4f} | "
                f"{teacher.get('linear_probe_top1', float('nan')):.4f} | - | "
                f"{teacher.get('train_seconds', float('nan')) / 60:.2f} | {teacher['wall_seconds'] / 60:.2f} |")
  for name, r in (controls or {}).items():
    rows.append(f"| control: {name} | - | {r['knn_top1']:.4f} | {r['linear_probe_top1']:.4f} | - | - | - |")
  return "\n".join(rows)


def write_results(args, seeds: int, teacher: str, teacher_result, controls, results, t0: float) -> str:
  table = format_table(results, teacher_result, controls)
  budget = ("smoke (runlocal: 8 pre-training steps, probes on 1,024 train features, 8 fine-tuning steps, 512 test "
            "images)" if args.smoke else
            "students: 2 epochs of Fashion-MNIST train (60k), batch 256, the quickstart optimizer; probes on 20,000 "
            f"train features, 10,000 test; fine-tuning {args.finetune_epochs:g} epoch(s), batch 256")
  finished = sum(len(r) for r in results.values())
  text = (f"Distillation study on Fashion-MNIST: {seeds} seed(s) per method planned, {finished} run(s) finished; "
          f"mean ± sample std over the finished seeds; teacher {teacher}.\n"
          f"Budget: {budget}. Device: {jax.devices()[0].device_kind} x{jax.device_count()}, "
          f"{os.cpu_count()} CPU cores. This invocation: {(time.perf_counter() - t0) / 60:.1f} min.\n"
          "'pre-training loop' is the compiled training loop only; 'whole run' adds compilation, the frozen-feature "
          "evaluation and the fine-tuning. Distillation runs exclude the teacher's own pre-training (teacher row).\n\n"
          f"{table}\n")
  with open(os.path.join(args.workdir, "results.md"), "w") as f:
    f.write(text)
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump({"teacher": teacher_result, "controls": controls, "runs": results}, f, indent=2, sort_keys=True,
              default=float)
  return text


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="workdirs/distill_study")
  parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
  parser.add_argument("--seeds", type=int, default=0, help="seeds per method (default 3; 2 with --smoke)")
  parser.add_argument("--teacher", default="", help="an existing teacher MAE workdir (default: train one)")
  parser.add_argument("--teacher_epochs", type=float, default=30.0)
  parser.add_argument("--teacher_decoder_depth", type=int, default=2,
                      help="decoder blocks of the teacher MAE (also tells G2SD which teacher decoder block to read)")
  parser.add_argument("--finetune_epochs", type=float, default=1.0)
  parser.add_argument("--smoke", action="store_true", help="every stage for a few steps (runlocal configs)")
  args = parser.parse_args(argv)
  methods = [m for m in args.methods.split(",") if m]
  for m in methods:
    if m not in METHODS:
      parser.error(f"--methods: unknown method {m!r}; allowed: {', '.join(METHODS)}")
  seeds = args.seeds or (2 if args.smoke else 3)
  from amd_jax.train import metrics  # pylint: disable=g-import-not-at-top
  metrics.quiet_library_logs()
  os.makedirs(args.workdir, exist_ok=True)
  t0 = time.perf_counter()

  teacher_result = None
  teacher = args.teacher
  if not teacher:
    teacher = os.path.join(args.workdir, "teacher")
    teacher_result = run_teacher(teacher, args)
  controls = run_controls(args.workdir, args.smoke)
  results = {m: [] for m in methods}
  for seed in range(seeds):  # seed-major: a partial study already has every method
    for method in methods:
      results[method].append(run_student(method, seed, teacher, os.path.join(args.workdir, method, f"seed{seed}"),
                                         args))
      text = write_results(args, seeds, teacher, teacher_result, controls, results, t0)
  print("\n" + text, flush=True)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()
