"""MAE, AMD, D-MAE, TinyMIM and G2SD students at the same budget on Fashion-MNIST, from the same teacher.

  python benchmarks/distill_study.py --workdir workdirs/distill_study            # the study: hours on 2 cores
  python benchmarks/distill_study.py --workdir /tmp/distill_smoke --smoke        # every stage, a few steps
  python benchmarks/distill_study.py --workdir W --teacher_examples 1800000 \
      --config.data.source=image_folder --config.data.path=P --config.data.mean=auto --config.data.std=auto

What it does, all through amd_jax.train.loop.run and amd_jax.probe (as amd_jax/quickstart.py does):
1. the teacher: configs/quickstart.py `stage=teacher` (a 128-wide 4-deep MAE) trained for --teacher_epochs
   (default 30: the quickstart's 3 do not beat raw pixels, 15 beat them on the linear probe only), or for
   --teacher_examples examples seen (1,800,000 = 30 Fashion-MNIST epochs: a small data set then still gets a
   teacher trained as long), warmup 1% of its run, with a decoder of --teacher_decoder_depth blocks (default 2)
   in WORKDIR/teacher, or an existing teacher workdir given by --teacher;
2. for every method and seed, a student with the quickstart's budget (64 wide, 4 deep, batch 256,
   2 epochs, the same optimizer): `mae` and `amd` from configs/quickstart.py, `dmae`, `tinymim` and
   `g2sd` from configs/distill_fmnist.py, config.seed = the seed (init, masks, data order);
3. frozen-feature evaluation at the end of each run (kNN and linear probe, config.eval);
4. a short fine-tuning of each student's encoder through the train loop (configs/finetune_fmnist.py:
   mean pooling + fc_norm + head, layer decay 0.75, drop path 0.1, light mixup, --finetune_epochs),
   top-1 on the test split;
5. the two controls (the student architecture untrained, raw pixels) through the same probes, after the first
   student (they are read with its run's config: data statistics and classes as the runs resolved them).
--config.a.b=value overrides (as `python -m amd_jax.main` takes them) apply to the teacher, every student, the
fine-tunings and the controls, wherever the field exists (a field none has is an error): the data fields point
the whole study at another data set.
Runs go seed by seed (every method's seed 0, then seed 1, ...), so an interrupted study already compares
every method. It prints and writes, after every run, WORKDIR/results.md (mean and sample standard deviation over seeds, wall times) and
WORKDIR/results.json (every run). Each run lives in WORKDIR/<method>/seed<k>; a finished run's numbers are
kept in its study.json and not recomputed, an interrupted one resumes from its checkpoints. WORKDIR/study_settings.json
records the settings (overrides, teacher budget, ...): a workdir of other settings is refused.
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

from amd_jax import errors, quickstart  # pylint: disable=g-import-not-at-top,wrong-import-position
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


TEACHER_WARMUP_FRACTION = 0.01   # 0.3 of the 30 Fashion-MNIST epochs the studies' teachers were trained with


def student_config(method: str, teacher: str, seed: int, smoke: bool, teacher_decoder_depth: int,
                   overrides=()):
  if method in ("mae", "amd"):
    c = load_config_module("quickstart").get_config(
        _arg(stage=method, teacher=teacher if method == "amd" else "", runlocal=smoke))
  else:
    c = load_config_module("distill_fmnist").get_config(
        _arg(method=method, teacher=teacher, runlocal=smoke, teacher_decoder_depth=teacher_decoder_depth))
  c.seed = seed
  return quickstart.apply_overrides(c, overrides)


def teacher_config(epochs: float, decoder_depth: int, smoke: bool, overrides=(), examples: int = 0):
  """The teacher MAE: `epochs` of the data, or `examples` examples seen when > 0 (steps = examples / batch)."""
  c = load_config_module("quickstart").get_config(_arg(stage="teacher", runlocal=smoke))
  c.decoder.depth = decoder_depth
  c = quickstart.apply_overrides(c, overrides)
  if not smoke:
    if examples > 0:
      c.num_epochs, c.total_steps = -1.0, int(np.ceil(examples / c.batch_size))
    else:
      c.num_epochs, c.total_steps = float(epochs), -1
    c.optim.update(warmup_steps=-1, warmup_epochs=-1.0, warmup_fraction=TEACHER_WARMUP_FRACTION)
  return c


# ------------------------------------------------------------------------------------------ fine-tuning


def finetune(student_workdir: str, workdir: str, *, seed: int, epochs: float, smoke: bool, overrides=()) -> dict:
  """Fine-tune a student's encoder through the train loop (configs/finetune_fmnist.py); test top-1."""
  config = load_config_module("finetune_fmnist").get_config(
      _arg(init=student_workdir, epochs=float(epochs), runlocal=smoke))
  config.seed = seed
  config = quickstart.apply_overrides(config, overrides)
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
  config = teacher_config(args.teacher_epochs, args.teacher_decoder_depth, args.smoke, args.overrides,
                          args.teacher_examples)
  t0 = time.perf_counter()
  final = {k: float(v) for k, v in loop.run(config, workdir).items() if isinstance(v, (int, float))}
  final["wall_seconds"] = time.perf_counter() - t0
  final["epochs"] = float(config.num_epochs)
  final["examples"] = float(final.get("step", config.total_steps) * config.batch_size)
  final["decoder_depth"] = int(config.decoder.depth)
  with open(done, "w") as f:
    json.dump(final, f, indent=2, sort_keys=True)
  return final


def run_student(method: str, seed: int, teacher: str, workdir: str, args) -> dict:
  done = os.path.join(workdir, "study.json")
  if os.path.isfile(done):
    with open(done) as f:
      return json.load(f)
  config = student_config(method, teacher, seed, args.smoke, args.teacher_decoder_depth, args.overrides)
  t0 = time.perf_counter()
  final = loop.run(config, workdir)
  result = {k: float(v) for k, v in final.items() if isinstance(v, (int, float))}
  result["pretrain_wall_seconds"] = time.perf_counter() - t0
  result.update(finetune(workdir, os.path.join(workdir, "finetune"), seed=seed, epochs=args.finetune_epochs,
                         smoke=args.smoke, overrides=args.overrides))
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


def run_controls(workdir: str, student_workdir: str) -> dict:
  """Untrained student architecture and raw pixels through the students' probes (cached in controls.json)."""
  done = os.path.join(workdir, "controls.json")
  if os.path.isfile(done):
    with open(done) as f:
      return json.load(f)
  controls = quickstart.image_controls(student_workdir)["rows"]
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
    budget = (f"{teacher['epochs']:g} epochs" if teacher.get("epochs", -1) > 0 else
              f"{teacher.get('examples', float('nan')):,.0f} examples")
    rows.append(f"| teacher MAE (128 wide, {budget}, decoder "
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
          "evaluation and the fine-tuning. Distillation runs exclude the teacher's own pre-training (teacher row).\n"
          + (f"Overrides (every run): {' '.join(args.overrides)}\n" if args.overrides else "") + "\n"
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
  parser.add_argument("--teacher_examples", type=int, default=0,
                      help="teacher budget in examples seen (> 0: used instead of --teacher_epochs)")
  parser.add_argument("--teacher_decoder_depth", type=int, default=2,
                      help="decoder blocks of the teacher MAE (also tells G2SD which teacher decoder block to read)")
  parser.add_argument("--finetune_epochs", type=float, default=1.0)
  parser.add_argument("--smoke", action="store_true", help="every stage for a few steps (runlocal configs)")
  args, unknown = parser.parse_known_args(argv)
  unknown, args.overrides = quickstart.split_overrides(unknown)
  if unknown:
    parser.error(f"unrecognised arguments: {' '.join(unknown)}")
  methods = [m for m in args.methods.split(",") if m]
  for m in methods:
    if m not in METHODS:
      parser.error(f"--methods: unknown method {m!r}; allowed: {', '.join(METHODS)}")
  seeds = args.seeds or (2 if args.smoke else 3)
  from amd_jax.train import metrics  # pylint: disable=g-import-not-at-top
  metrics.quiet_library_logs()
  try:
    check_settings(args, methods)
  except errors.ConfigError as e:
    print(f"distill_study: configuration error: {e}", file=sys.stderr, flush=True)
    return 2
  t0 = time.perf_counter()

  teacher_result = None
  teacher = args.teacher
  if not teacher:
    teacher = os.path.join(args.workdir, "teacher")
    teacher_result = run_teacher(teacher, args)
  controls = None
  results = {m: [] for m in methods}
  for seed in range(seeds):  # seed-major: a partial study already has every method
    for method in methods:
      student_dir = os.path.join(args.workdir, method, f"seed{seed}")
      results[method].append(run_student(method, seed, teacher, student_dir, args))
      if controls is None:
        controls = run_controls(args.workdir, student_dir)
      text = write_results(args, seeds, teacher, teacher_result, controls, results, t0)
  print("\n" + text, flush=True)
  return 0


def check_settings(args, methods) -> None:
  """Every override names a field some run has; a workdir of other settings is refused (nothing changed)."""
  configs = [teacher_config(args.teacher_epochs, args.teacher_decoder_depth, args.smoke),
             load_config_module("finetune_fmnist").get_config(_arg(runlocal=args.smoke))]
  configs += [student_config(m, args.teacher or "t", 0, args.smoke, args.teacher_decoder_depth) for m in methods]
  quickstart.check_overrides(configs, args.overrides, "the study's configs")
  settings = {"overrides": args.overrides, "teacher": args.teacher, "teacher_epochs": args.teacher_epochs,
              "teacher_examples": args.teacher_examples, "teacher_decoder_depth": args.teacher_decoder_depth,
              "finetune_epochs": args.finetune_epochs, "smoke": args.smoke}
  path = os.path.join(args.workdir, "study_settings.json")
  if os.path.isfile(path):
    with open(path) as f:
      stored = json.load(f)
    diffs = [f"{k}: {stored.get(k)!r} there, {v!r} now" for k, v in settings.items() if stored.get(k) != v]
    if diffs:
      raise errors.ConfigError(f"--workdir={args.workdir!r} holds a study of other settings ({'; '.join(diffs)}); "
                               "nothing was changed. Use another --workdir.")
  os.makedirs(args.workdir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(settings, f, indent=2, sort_keys=True)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.exit(main())
