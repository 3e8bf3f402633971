"""Fine-tuning, linear-probe and kNN accuracy of the quickstart's encoders on Fashion-MNIST.

Takes the workdir of a finished quickstart (`python -m amd_jax.quickstart --workdir QS`,
holding teacher/, mae/ and amd/) and, for each encoder:
  - kNN (k=20, T=0.07) and linear probe on frozen features, with the pre-training run's
    own eval settings (amd_jax.probe.evaluate);
  - fine-tuning through the train loop (configs/finetune_fmnist.py) and its test top-1/top-5.
Plus two rows that need fine-tuning to exist: the student trained from scratch (control),
and G2SD specific distillation of the AMD student from the fine-tuned teacher.

  python benchmarks/finetune_table.py --quickstart_workdir /tmp/qs --workdir /tmp/qs_ft --write_docs

Every run is a normal amd_jax workdir under --workdir (resumable; rerunning the script
skips finished runs). Use --smoke for an 8-step check of the whole script.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

FINETUNE_CONFIG = os.path.join(REPO, "configs", "finetune_fmnist.py")


def load_config_module(path: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("finetune_fmnist", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def probe_encoder(workdir: str) -> dict:
  """kNN / linear probe of a pre-training run's encoder, with that run's own eval settings."""
  from amd_jax import evaluate  # pylint: disable=g-import-not-at-top
  return evaluate.evaluate_workdir(workdir)


def finetune(arg: str, workdir: str) -> dict:
  from amd_jax.train import loop  # pylint: disable=g-import-not-at-top
  config = load_config_module(FINETUNE_CONFIG).get_config(arg)
  t0 = time.perf_counter()
  result = loop.run(config, workdir)
  result["wall_seconds"] = time.perf_counter() - t0
  result["command"] = f"python -m amd_jax.main --config configs/finetune_fmnist.py:{arg} --workdir {workdir}"
  return result


def fmt(value) -> str:
  return "-" if value is None else f"{value:.4f}"


def format_table(rows: list[dict], epochs: float) -> str:
  lines = [f"| encoder | pre-training | kNN top-1 | linear probe top-1 | fine-tune top-1 ({epochs:g} ep) | "
           "fine-tune top-5 | fine-tune min |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    ft = r.get("finetune", {})
    minutes = ft.get("wall_seconds")
    lines.append(f"| {r['name']} | {r['pretrain']} | {fmt(r.get('probe', {}).get('knn_top1'))} | "
                 f"{fmt(r.get('probe', {}).get('linear_probe_top1'))} | {fmt(ft.get('eval/top1'))} | "
                 f"{fmt(ft.get('eval/top5'))} | {'-' if minutes is None else f'{minutes / 60:.1f}'} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quickstart_workdir", required=True)
  parser.add_argument("--workdir", required=True, help="where the fine-tuning runs go")
  parser.add_argument("--epochs", type=float, default=2.0)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--write_docs", action="store_true", help="rewrite the table in docs/finetune.md")
  args = parser.parse_args(argv)
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()
  qs, out = os.path.abspath(args.quickstart_workdir), os.path.abspath(args.workdir)
  for stage in ("teacher", "mae", "amd"):
    if not os.path.isdir(os.path.join(qs, stage, "checkpoints")):
      raise SystemExit(f"{qs}/{stage} holds no finished run: run the quickstart first "
                       f"(python -m amd_jax.quickstart --workdir {qs})")
  extra = f",epochs={args.epochs:g}" + (",runlocal" if args.smoke else "")
  t0 = time.perf_counter()
  rows = [
      dict(name="teacher (MAE, 128 wide)", pretrain="MAE", stage="teacher", arg=f"size=teacher,init={qs}/teacher"),
      dict(name="student (64 wide)", pretrain="MAE", stage="mae", arg=f"init={qs}/mae"),
      dict(name="student (64 wide)", pretrain="AMD", stage="amd", arg=f"init={qs}/amd"),
      dict(name="student (64 wide)", pretrain="none (scratch)", stage=None, arg="init="),
      dict(name="student (64 wide)", pretrain="AMD + G2SD specific distillation from the fine-tuned teacher",
           stage=None, arg=f"init={qs}/amd,method=g2sd_sd,teacher={out}/teacher"),
  ]
  names = ["teacher", "mae", "amd", "scratch", "amd_sd"]
  for name, row in zip(names, rows):
    if row["stage"] and not args.smoke:
      row["probe"] = probe_encoder(os.path.join(qs, row["stage"]))
    row["finetune"] = finetune(row["arg"] + extra, os.path.join(out, name))
    print(f"{row['name']} / {row['pretrain']}: {row.get('probe')} "
          f"fine-tune top-1 {row['finetune'].get('eval/top1'):.4f}", flush=True)
  table = format_table(rows, args.epochs)
  total = (time.perf_counter() - t0) / 60
  commands = "\n".join(f"    {r['finetune']['command']}" for r in rows)
  report = (f"Fashion-MNIST (train 60k / test 10k), encoders from the quickstart in {qs}; "
            f"{'SMOKE RUN; ' if args.smoke else ''}script total {total:.1f} min.\n\n{table}\n\n"
            f"Fine-tuning commands (made by `python benchmarks/finetune_table.py --quickstart_workdir {qs} "
            f"--workdir {out}`):\n\n{commands}\n")
  print(report)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(report)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(rows, f, indent=2, default=str)
  if args.write_docs:
    path = os.path.join(REPO, "docs", "finetune.md")
    text = open(path).read() if os.path.exists(path) else ""
    begin, end = "<!-- finetune-table:begin -->", "<!-- finetune-table:end -->"
    if begin in text and end in text:
      text = text[:text.index(begin) + len(begin)] + "\n" + report + text[text.index(end):]
    else:
      text += f"\n{begin}\n{report}{end}\n"
    with open(path, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
