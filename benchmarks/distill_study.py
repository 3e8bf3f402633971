"""MAE, AMD, D-MAE, TinyMIM and G2SD students at the same budget on Fashion-MNIST, from the same teacher.

  python benchmarks/distill_study.py --workdir workdirs/distill_study            # the study: hours on 2 cores
  python benchmarks/distill_study.py --workdir /tmp/distill_smoke --smoke        # every stage, a few steps

What it does, all through amd_jax.train.loop.run and amd_jax.probe (as amd_jax/quickstart.py does):
1. the teacher: configs/quickstart.py `stage=teacher` (a 128-wide 4-deep MAE, 3 epochs) in WORKDIR/teacher,
   or an existing teacher workdir given by --teacher;
2. for every method and seed, a student with the quickstart's budget (64 wide, 4 deep, batch 256,
   2 epochs, the same optimizer): `mae` and `amd` from configs/quickstart.py, `dmae`, `tinymim` and
   `g2sd` from configs/distill_fmnist.py, config.seed = the seed (init, masks, data order);
3. frozen-feature evaluation at the end of each run (kNN and linear probe, config.eval);
4. a short fine-tuning of each student's encoder (mean-pooled tokens -> LayerNorm -> linear head,
   AdamW with layer decay, --finetune_epochs on the train split with the pre-training augmentation),
   top-1 on the test split.
It prints and writes WORKDIR/results.md (mean and sample standard deviation over seeds, wall times) and
WORKDIR/results.json (every run). Each run lives in WORKDIR/<method>/seed<k>; a finished run's numbers are
kept in its study.json and not recomputed, an interrupted one resumes from its checkpoints.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

from amd_jax import config_base  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax.methods import get_method  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax.models import vit  # pylint: disable=g-import-not-at-top,wrong-import-position
from amd_jax.train import checkpoint, loop, optim  # pylint: disable=g-import-not-at-top,wrong-import-position

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


def student_config(method: str, teacher: str, seed: int, smoke: bool):
  if method in ("mae", "amd"):
    c = load_config_module("quickstart").get_config(
        _arg(stage=method, teacher=teacher if method == "amd" else "", runlocal=smoke))
  else:
    c = load_config_module("distill_fmnist").get_config(_arg(method=method, teacher=teacher, runlocal=smoke))
  c.seed = seed
  return c


# ------------------------------------------------------------------------------------------ fine-tuning


class Classifier(nn.Module):
  """The pre-trained encoder (all tokens) -> mean of the patch tokens -> LayerNorm -> linear head."""
  encoder: vit.Encoder
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    tokens, _ = self.encoder(x, train=train)
    if self.encoder.cls_token:
      tokens = tokens[:, 1:]
    feats = nn.LayerNorm(epsilon=vit.LN_EPS, name="fc_norm")(tokens.mean(axis=1))
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(2e-5), name="head")(feats)


def finetune(method, params, config, *, seed: int, epochs: float, max_steps: int = 0, eval_examples: int = 0,
             batch_size: int = 256, base_lr: float = 1e-3, layer_decay: float = 0.75) -> dict:
  """Short fine-tuning of the student's encoder; returns test top-1 and the wall time."""
  t0 = time.perf_counter()
  encoder_params = getattr(method, "transfer_encoder_params", lambda p: p["encoder"])(params)
  model = Classifier(method.encoder, config.data.num_classes)
  size = config.data.image_size
  x0 = jnp.zeros((2, size, size, config.data.channels))
  variables = model.init(jax.random.PRNGKey(seed), x0)
  init = dict(variables["params"])
  init["encoder"] = encoder_params
  steps_per_epoch = max(pipeline.num_examples(config.data, config.data.split) // batch_size, 1)
  total = max(int(math.ceil(epochs * steps_per_epoch)), 1)
  if max_steps:
    total = min(total, max_steps)
  optim_cfg = config_base.optim_config()
  optim_cfg.update(base_lr=base_lr, b1=0.9, b2=0.999, weight_decay=0.05, min_lr=1e-6)
  depth = method.encoder.depth
  tx, _ = optim.make_optimizer(optim_cfg, batch_size=batch_size, total_steps=total,
                               warmup_steps=max(total // 10, 0),
                               layer_scales=optim.layer_decay_scales(init, depth, layer_decay))
  state = (init, tx.init(init))

  @jax.jit
  def step(state, images, labels, key):
    p, opt_state = state

    def loss_fn(p):
      logits = model.apply({"params": p}, images, train=True, rngs={"dropout": key})
      targets = optax.smooth_labels(jax.nn.one_hot(labels, config.data.num_classes), 0.1)
      return optax.softmax_cross_entropy(logits, targets).mean()

    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), loss

  data = iter(pipeline.make_train_dataset(config.data, global_batch_size=batch_size, seed=seed + 1000))
  key = jax.random.PRNGKey(seed + 2000)
  loss = None
  for i in range(total):
    batch = next(data)
    state, loss = step(state, jnp.asarray(batch["image"]), jnp.asarray(batch["label"]), jax.random.fold_in(key, i))
  close = getattr(data, "close", None)
  if close is not None:
    close()

  predict = jax.jit(lambda p, images: jnp.argmax(model.apply({"params": p}, images), axis=-1))
  correct = count = 0
  for batch in pipeline.make_eval_dataset(config.data, split=config.data.eval_split, batch_size=batch_size,
                                          max_examples=eval_examples):
    pred = np.asarray(predict(state[0], jnp.asarray(batch["image"])))
    real = np.asarray(batch["mask"], bool)
    correct += int((pred[real] == np.asarray(batch["label"])[real]).sum())
    count += int(real.sum())
  return {"finetune_top1": correct / max(count, 1), "finetune_steps": total,
          "finetune_final_loss": float(loss) if loss is not None else float("nan"),
          "finetune_seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------ the study


def run_teacher(workdir: str, smoke: bool) -> dict:
  done = os.path.join(workdir, "study.json")
  if os.path.isfile(done):
    with open(done) as f:
      return json.load(f)
  config = load_config_module("quickstart").get_config(_arg(stage="teacher", runlocal=smoke))
  t0 = time.perf_counter()
  final = {k: float(v) for k, v in loop.run(config, workdir).items() if isinstance(v, (int, float))}
  final["wall_seconds"] = time.perf_counter() - t0
  with open(done, "w") as f:
    json.dump(final, f, indent=2, sort_keys=True)
  return final


def run_student(method: str, seed: int, teacher: str, workdir: str, args) -> dict:
  done = os.path.join(workdir, "study.json")
  if os.path.isfile(done):
    with open(done) as f:
      return json.load(f)
  config = student_config(method, teacher, seed, args.smoke)
  t0 = time.perf_counter()
  final = loop.run(config, workdir)
  result = {k: float(v) for k, v in final.items() if isinstance(v, (int, float))}
  result["pretrain_wall_seconds"] = time.perf_counter() - t0
  m = get_method(config)
  params = checkpoint.load_params(workdir)
  result.update(finetune(m, params, config, seed=seed, epochs=args.finetune_epochs,
                         max_steps=5 if args.smoke else 0, eval_examples=512 if args.smoke else 0))
  result.update(method=method, seed=seed)
  with open(done, "w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
  return result


def mean_spread(values) -> str:
  values = [v for v in values if v is not None and np.isfinite(v)]
  if not values:
    return "-"
  spread = np.std(values, ddof=1) if len(values) > 1 else 0.0
  return f"{np.mean(values):.4f} ± {spread:.4f}"


def format_table(results: dict, teacher: dict | None) -> str:
  rows = ["| method | seeds | kNN top-1 | linear probe top-1 | fine-tune top-1 | pre-training loop (min) | "
          "whole run (min) |", "|---|---|---|---|---|---|---|"]
  for method, runs in results.items():
    get = lambda k: [r.get(k) for r in runs]
    train_min = np.mean([r.get("train_seconds", np.nan) for r in runs]) / 60
    whole_min = np.mean([r["pretrain_wall_seconds"] + r["finetune_seconds"] for r in runs]) / 60
    rows.append(f"| {NAMES[method]} | {len(runs)} | {mean_spread(get('knn_top1'))} | "
                f"{mean_spread(get('linear_probe_top1'))} | {mean_spread(get('finetune_top1'))} | "
                f"{train_min:.2f} | {whole_min:.2f} |")
  if teacher is not None:
    rows.append(f"| teacher MAE (128 wide, 1 seed) | 1 | {teacher.get('knn_top1', float('nan')):.4f} | "
                f"{teacher.get('linear_probe_top1', float('nan')):.4f} | - | "
                f"{teacher.get('train_seconds', float('nan')) / 60:.2f} | {teacher['wall_seconds'] / 60:.2f} |")
  return "\n".join(rows)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="workdirs/distill_study")
  parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
  parser.add_argument("--seeds", type=int, default=0, help="seeds per method (default 3; 2 with --smoke)")
  parser.add_argument("--teacher", default="", help="an existing teacher MAE workdir (default: train one)")
  parser.add_argument("--finetune_epochs", type=float, default=3.0)
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
    teacher_result = run_teacher(teacher, args.smoke)
  results = {}
  for method in methods:
    results[method] = [run_student(method, seed, teacher, os.path.join(args.workdir, method, f"seed{seed}"), args)
                       for seed in range(seeds)]

  table = format_table(results, teacher_result)
  budget = ("smoke (runlocal: 8 pre-training steps, probes on 1,024 train features, 5 fine-tuning steps, 512 test "
            "images)" if args.smoke else
            "students: 2 epochs of Fashion-MNIST train (60k), batch 256, the quickstart optimizer; probes on 20,000 "
            f"train features, 10,000 test; fine-tuning {args.finetune_epochs:g} epochs, batch 256")
  text = (f"Distillation study on Fashion-MNIST: {seeds} seed(s) per method, mean ± sample std; teacher {teacher}.\n"
          f"Budget: {budget}. Device: {jax.devices()[0].device_kind} x{jax.device_count()}, "
          f"{os.cpu_count()} CPU cores. This invocation: {(time.perf_counter() - t0) / 60:.1f} min.\n"
          "'pre-training loop' is the compiled training loop only; 'whole run' adds compilation, the frozen-feature "
          "evaluation and the fine-tuning. Distillation runs exclude the teacher's own pre-training (last row).\n\n"
          f"{table}\n")
  with open(os.path.join(args.workdir, "results.md"), "w") as f:
    f.write(text)
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump({"teacher": teacher_result, "runs": results}, f, indent=2, sort_keys=True, default=float)
  print("\n" + text, flush=True)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()
