"""VideoMAE and AMD video students on moving garments, over seeds, next to the controls: does a video student learn
motion, and does AMD's asymmetric teacher view help?

  python benchmarks/video_study.py --workdir workdirs/video_study              # the study: about 1-2 h on 2 idle cores
  python benchmarks/video_study.py --workdir /tmp/video_smoke --smoke          # every stage, a few steps
  python benchmarks/video_study.py --teacher workdirs/quickstart_video/teacher --data workdirs/quickstart_video/data

Everything runs through amd_jax.train.loop.run and amd_jax.quickstart's evaluation, with configs/quickstart_video.py:
1. the data: the moving-garments set (amd_jax.data.make_moving, configs/quickstart_video.py's DATA) in
   WORKDIR/data, or --data; generated when absent;
2. one teacher VideoMAE (`stage=teacher`, seed 0) in WORKDIR/teacher, or an existing one given by --teacher;
3. for every seed (config.seed: initialisation, masks, data order), seed-major: a VideoMAE student and an AMD
   student at the quickstart's budget; then ONE decoding pass of the train and test clips feeds both students,
   the untrained student of that seed, and each student's single-frame control (its middle frame repeated over
   time: the garment without its motion), plus at seed 0 the teacher and raw pixels; kNN and linear probe on
   both labels (direction of motion, garment class);
4. a short fine-tuning (`stage=finetune`, --finetune_epochs) of each student's encoder, and of the same
   architecture from scratch, on each of --finetune_labels, scored on 2 clips x 3 crops per test video (softmax
   averaged), through the train loop.
It prints and writes, after every run, WORKDIR/results.md (mean ± sample std over the finished seeds, wall times,
and the comparisons the study is about, each with its spread) and WORKDIR/results.json (every number). Each run
lives in WORKDIR/<what>/seed<k> and keeps its numbers in study.json once finished (never recomputed); an
interrupted run resumes from its checkpoints. WORKDIR/study_settings.json holds the settings: a workdir of other
settings is refused. --config.a.b=value overrides (as `python -m amd_jax.main` takes them) apply to every run
whose config has the field.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

from amd_jax import errors, quickstart  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax.data import make_moving  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax.train import loop  # pylint: disable=g-import-not-at-top,wrong-import-position

STUDENTS = ("videomae", "amd")
NAMES = {"videomae": "VideoMAE", "amd": "AMD", "teacher": "teacher VideoMAE", "scratch": "from scratch"}
CONFIG = os.path.join(REPO, "configs", "quickstart_video.py")
SETTINGS_FILE = "study_settings.json"


# ------------------------------------------------------------------------------------------ configs


def stage_config(module, stage: str, args, *, seed: int = 0, teacher: str = "", init: str = "", label: str = ""):
  kw = dict(stage=stage, data=args.data, runlocal=args.smoke, teacher=teacher, init=init, label=label)
  config = module.get_config(quickstart._arg(**kw))  # pylint: disable=protected-access
  config.seed = seed
  if stage != "finetune":
    config.eval.probe = False   # scored in one pass per seed (step 3)
  return quickstart.apply_overrides(config, args.overrides)


def _read(path: str):
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  return None


def _write(path: str, value) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, default=float)   # row order is meaningful
  os.replace(tmp, path)


def _once(path: str, compute):
  """The record at `path`, or compute() timed and recorded there."""
  stored = _read(path)
  if stored is not None:
    return stored
  t0 = time.perf_counter()
  value = compute()
  value.setdefault("wall_seconds", time.perf_counter() - t0)
  _write(path, value)
  return value


def _numbers(final: dict) -> dict:
  return {k: float(v) for k, v in final.items() if isinstance(v, (int, float, np.number))}


# ------------------------------------------------------------------------------------------ runs


def pretrain(module, stage: str, workdir: str, args, *, seed: int, teacher: str = "") -> dict:
  def compute():
    return _numbers(loop.run(stage_config(module, stage, args, seed=seed, teacher=teacher), workdir))
  return _once(os.path.join(workdir, "study.json"), compute)


def finetune(module, init: str, label: str, workdir: str, args, *, seed: int) -> dict:
  def compute():
    config = stage_config(module, "finetune", args, seed=seed, init=init, label=label)
    if not args.smoke:
      config.num_epochs = float(args.finetune_epochs)
    final = loop.run(config, workdir)
    return {"top1": float(final["eval/top1"]), "views": int(config.data.test_num_clips * config.data.test_num_crops),
            "train_seconds": float(final.get("train_seconds", np.nan))}
  return _once(os.path.join(workdir, "study.json"), compute)


def evaluate_seed(module, args, seed: int, teacher: str) -> dict:
  """Both students of `seed`, its untrained student and single frames (seed 0: also the teacher and raw pixels)."""
  dirs = {s: os.path.join(args.workdir, s, f"seed{seed}") for s in STUDENTS}
  if seed == 0:
    dirs = {"teacher": teacher, **dirs}
  joint = module.data_fields(args.data, "joint") if is_moving(module, args) else None
  return _once(os.path.join(args.workdir, "evaluation", f"seed{seed}.json"),
               lambda: quickstart.evaluate_video(dirs, "videomae", joint_data=joint, pixels=seed == 0,
                                                 single_frame=STUDENTS))


def is_moving(module, args) -> bool:
  """Whether the runs read the moving-garments folder (not a video list given by override)."""
  config = stage_config(module, "videomae", args)
  fields = module.data_fields(args.data)
  return config.data.path == fields["path"] and config.data.video_root == fields["video_root"]


# ------------------------------------------------------------------------------------------ tables


def mean_spread(values) -> str:
  values = [v for v in values if v is not None and np.isfinite(v)]
  if not values:
    return "-"
  if len(values) == 1:
    return f"{values[0]:.4f} (1 seed)"
  return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def collect(evaluations: list[dict], row: str, label: str, metric: str) -> list[float]:
  return [e["rows"][row][label][metric] for e in evaluations if row in e["rows"] and label in e["rows"][row]]


ROWS = (("videomae", "student, VideoMAE"), ("amd", "student, AMD"), ("teacher", "teacher VideoMAE (seed 0)"),
        ("untrained student", "control: untrained student"), ("raw pixels", "control: raw pixels"),
        ("single frame, videomae", "control: single frame, VideoMAE student"),
        ("single frame, amd", "control: single frame, AMD student"))


def probe_table(evaluations: list[dict], pretraining: dict) -> str:
  labels = evaluations[0]["labels"]
  head = "".join(f" {l} kNN | {l} linear probe |" for l in labels)
  rows = [f"| encoder | seeds |{head} pre-training loop (min) | whole run (min) |",
          "|---" * (4 + 2 * len(labels)) + "|"]
  for key, title in ROWS:
    seeds = sum(key in e["rows"] for e in evaluations)
    if not seeds:
      continue
    cells = "".join(f" {mean_spread(collect(evaluations, key, l, 'knn_top1'))} | "
                    f"{mean_spread(collect(evaluations, key, l, 'linear_probe_top1'))} |" for l in labels)
    runs = pretraining.get(key, [])
    loop_min = f"{np.mean([r['train_seconds'] for r in runs]) / 60:.2f}" if runs else "-"
    whole_min = f"{np.mean([r['wall_seconds'] for r in runs]) / 60:.2f}" if runs else "-"
    rows.append(f"| {title} | {seeds} |{cells} {loop_min} | {whole_min} |")
  return "\n".join(rows)


def finetune_table(finetunes: dict) -> str:
  labels = sorted({label for runs in finetunes.values() for label in runs})
  if not labels:
    return ""
  rows = ["| encoder fine-tuned | " + " | ".join(f"{l} top-1 (seeds)" for l in labels) + " | minutes per run |",
          "|---" * (2 + len(labels)) + "|"]
  for key in ("videomae", "amd", "scratch"):
    if key not in finetunes:
      continue
    cells = []
    for l in labels:
      runs = finetunes[key].get(l, [])
      cells.append(f"{mean_spread([r['top1'] for r in runs])} ({len(runs)})")
    minutes = np.mean([r["wall_seconds"] for l in labels for r in finetunes[key].get(l, [])] or [np.nan]) / 60
    rows.append(f"| {NAMES[key]} | " + " | ".join(cells) + f" | {minutes:.2f} |")
  return "\n".join(rows)


def _compare(a: list[float], b: list[float]) -> str:
  """'mean(a) - mean(b) = d; spreads sa, sb' with a verdict against twice the larger spread."""
  if len(a) < 2 or len(b) < 1:
    return "too few seeds yet"
  diff = np.mean(a) - np.mean(b)
  spread = max(np.std(a, ddof=1), np.std(b, ddof=1) if len(b) > 1 else 0.0)
  verdict = "beyond" if abs(diff) > 2 * spread else "within"
  return f"{diff:+.4f} (seed std {spread:.4f}: {verdict} twice the spread)"


def findings(evaluations: list[dict], finetunes: dict) -> str:
  if "direction" not in evaluations[0]["labels"]:
    return ""
  lines = []
  for metric, name in (("linear_probe_top1", "linear probe"), ("knn_top1", "kNN")):
    get = lambda row, label="direction", m=metric: collect(evaluations, row, label, m)
    for student in STUDENTS:
      lines.append(f"- direction, {name}: {NAMES[student]} student minus untrained student "
                   f"{_compare(get(student), get('untrained student'))}; minus its single-frame control "
                   f"{_compare(get(student), get(f'single frame, {student}'))}")
    lines.append(f"- direction, {name}: AMD minus VideoMAE {_compare(get('amd'), get('videomae'))}; "
                 f"garment: {_compare(get('amd', 'garment'), get('videomae', 'garment'))}")
  for label in sorted({l for runs in finetunes.values() for l in runs}):
    top1 = lambda key, label=label: [r["top1"] for r in finetunes.get(key, {}).get(label, [])]
    lines.append(f"- fine-tuning on {label}: AMD minus VideoMAE {_compare(top1('amd'), top1('videomae'))}; "
                 f"VideoMAE minus from scratch {_compare(top1('videomae'), top1('scratch'))}")
  return "\n".join(lines)


def describe_data(moving: dict | None, args) -> str:
  if moving is None:
    return f"the video list of the overrides {' '.join(args.overrides)}"
  n, s = moving["num_examples"], moving["spec"]
  return (f"moving garments in {args.data}: {n['train']} train / {n['test']} test clips of {s['frames']} frames, "
          f"{s['size']}x{s['size']}, garments {s['garment_size']} px at {s['min_speed']:g}-{s['max_speed']:g} px/frame, "
          f"seed {s['seed']}")


def write_results(args, seeds: int, moving: dict | None, evaluations: list[dict], pretraining: dict,
                  finetunes: dict, t0: float) -> str:
  if not evaluations:
    return ""
  finished = len(evaluations)
  data = describe_data(moving, args)
  text = "\n".join([
      f"Video study: {seeds} seed(s) planned, {finished} evaluated; mean ± sample std over the finished seeds.",
      f"Data: {data}; teacher {args.teacher or os.path.join(args.workdir, 'teacher')}.",
      f"Device: {jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPU cores. "
      f"This invocation: {(time.perf_counter() - t0) / 60:.1f} min. 'pre-training loop' is the compiled loop only; "
      "'whole run' adds compiling and data start-up. Frozen features: the mean of the final-normed tokens, kNN (k=20) "
      "and linear probe; single frame = the student applied to its middle frame repeated over time.", "",
      probe_table(evaluations, pretraining), "",
      f"Fine-tuning ({'8 steps (smoke)' if args.smoke else f'{args.finetune_epochs:g} epochs'}, test on 2 clips x "
      "3 crops per video, softmax averaged):", "",
      finetune_table(finetunes), "",
      "What the numbers say (differences of means; 'beyond' = larger than twice the larger seed std):",
      findings(evaluations, finetunes), ""])
  with open(os.path.join(args.workdir, "results.md"), "w") as f:
    f.write(text)
  _write(os.path.join(args.workdir, "results.json"), {"evaluations": evaluations, "pretraining": pretraining,
                                                       "finetunes": finetunes, "moving_data": moving})
  return text


# ------------------------------------------------------------------------------------------ main


def check_settings(module, args) -> None:
  configs = [stage_config(module, s, argparse.Namespace(**{**vars(args), "overrides": []}), teacher="t", init="i")
             for s in module.STAGES]
  quickstart.check_overrides(configs, args.overrides, "the study's configs")
  settings = {k: getattr(args, k) for k in ("overrides", "data", "teacher", "finetune_epochs", "finetune_labels",
                                            "smoke")}
  path = os.path.join(args.workdir, SETTINGS_FILE)
  stored = _read(path)
  if stored is not None:
    diffs = [f"{k}: {stored.get(k)!r} there, {v!r} now" for k, v in settings.items() if stored.get(k) != v]
    if diffs:
      raise errors.ConfigError(f"--workdir={args.workdir!r} holds a study of other settings ({'; '.join(diffs)}); "
                               "nothing was changed. Use another --workdir.")
  _write(path, settings)


def ensure_data(module, args) -> dict | None:
  if not is_moving(module, args):
    return None
  spec = dict(module.moving_data(args.smoke))
  counts = [spec.pop(k) for k in ("num_train", "num_test")]
  return make_moving.generate(args.data, *counts, make_moving.MovingSpec(**spec))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="workdirs/video_study")
  parser.add_argument("--data", default="", help="moving-garments folder (default WORKDIR/data, generated if absent)")
  parser.add_argument("--teacher", default="", help="an existing teacher VideoMAE workdir (default: train one)")
  parser.add_argument("--seeds", type=int, default=0, help="seeds per student (default 3; 2 with --smoke)")
  parser.add_argument("--finetune_epochs", type=float, default=3.0)
  parser.add_argument("--finetune_labels", default="direction", help="comma-separated: direction,garment ('' = none)")
  parser.add_argument("--smoke", action="store_true", help="every stage for a few steps on a tiny set (runlocal)")
  args, unknown = parser.parse_known_args(argv)
  unknown, args.overrides = quickstart.split_overrides(unknown)
  if unknown:
    parser.error(f"unrecognised arguments: {' '.join(unknown)}")
  args.data = args.data or os.path.join(args.workdir, "data")
  labels = [l for l in args.finetune_labels.split(",") if l]
  for label in labels:
    if label not in ("direction", "garment"):
      parser.error(f"--finetune_labels: unknown label {label!r}; allowed: direction, garment")
  seeds = args.seeds or (2 if args.smoke else 3)
  from amd_jax.train import metrics  # pylint: disable=g-import-not-at-top
  metrics.quiet_library_logs()
  module = quickstart.load_config_module(CONFIG)
  try:
    check_settings(module, args)
    moving = ensure_data(module, args)
  except errors.ConfigError as e:
    print(f"video_study: configuration error: {e}", file=sys.stderr, flush=True)
    return 2
  t0 = time.perf_counter()
  teacher = args.teacher or os.path.join(args.workdir, "teacher")
  pretraining = {}
  if not args.teacher:
    pretraining["teacher"] = [pretrain(module, "teacher", teacher, args, seed=0)]
  evaluations, finetunes, text = [], {}, ""
  for seed in range(seeds):   # seed-major: a partial study already compares everything
    for student in STUDENTS:
      workdir = os.path.join(args.workdir, student, f"seed{seed}")
      record = pretrain(module, student, workdir, args, seed=seed, teacher=teacher if student == "amd" else "")
      pretraining.setdefault(student, []).append(record)
    evaluations.append(evaluate_seed(module, args, seed, teacher))
    text = write_results(args, seeds, moving, evaluations, pretraining, finetunes, t0)
    for label in labels:
      for key in STUDENTS + ("scratch",):
        init = "" if key == "scratch" else os.path.join(args.workdir, key, f"seed{seed}")
        workdir = os.path.join(args.workdir, "finetune", label, key, f"seed{seed}")
        finetunes.setdefault(key, {}).setdefault(label, []).append(
            finetune(module, init, label, workdir, args, seed=seed))
        text = write_results(args, seeds, moving, evaluations, pretraining, finetunes, t0)
  print("\n" + text, flush=True)
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.exit(main())
