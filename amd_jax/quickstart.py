"""The quickstart story on Fashion-MNIST: teacher MAE -> AMD student vs MAE student, then the table.

  python -m amd_jax.quickstart --workdir workdirs/quickstart

Runs configs/quickstart.py's three stages through the one train loop (each in
its own sub-workdir, resuming if it is already there), evaluates every encoder
with kNN and a linear probe on frozen features, adds two controls (the student
architecture untrained, and raw pixels), prints the table and writes it to
WORKDIR/results.md.
"""
from __future__ import annotations

import importlib.util
import os
import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/quickstart", "Parent directory of the three runs.")
_CONFIG = flags.DEFINE_string("config", None, "Quickstart config file (default: configs/quickstart.py of the repo).")
_RUNLOCAL = flags.DEFINE_bool("runlocal", False, "A few steps per stage (smoke test).")


def load_config_module(path: str):
  spec = importlib.util.spec_from_file_location("amd_jax_quickstart_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def default_config_path() -> str:
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.py")


def _arg(**kw) -> str:
  return ",".join(f"{k}={v}" if v is not True else k for k, v in kw.items() if v not in ("", False))


def run_stages(config_module, workdir: str, runlocal: bool) -> dict[str, dict]:
  from amd_jax.train import loop  # pylint: disable=g-import-not-at-top
  results = {}
  teacher_dir = os.path.join(workdir, "teacher")
  for stage, extra in (("teacher", {}), ("mae", {}), ("amd", {"teacher": teacher_dir})):
    config = config_module.get_config(_arg(stage=stage, runlocal=runlocal, **extra))
    t0 = time.perf_counter()
    final = loop.run(config, os.path.join(workdir, stage))
    final["wall_seconds"] = time.perf_counter() - t0
    final["params"] = _count_params(config)
    results[stage] = final
  return results


def _count_params(config) -> int:
  from amd_jax.models import vit  # pylint: disable=g-import-not-at-top
  m = config.model
  enc = vit.encoder_from_config(m)
  x = jnp.zeros((1, config.data.image_size, config.data.image_size, config.data.channels))
  shapes = jax.eval_shape(enc.init, jax.random.PRNGKey(0), x)
  return sum(int(jnp.prod(jnp.array(s.shape))) for s in jax.tree.leaves(shapes))


def run_controls(config_module, runlocal: bool) -> dict[str, dict]:
  """The student architecture with random weights, and the raw pixels, through the same evaluation."""
  from amd_jax import probe  # pylint: disable=g-import-not-at-top
  from amd_jax.methods import get_method  # pylint: disable=g-import-not-at-top
  from amd_jax.train import sharding  # pylint: disable=g-import-not-at-top
  config = config_module.get_config(_arg(stage="mae", runlocal=runlocal))
  mesh = sharding.make_mesh(config.mesh)
  method = get_method(config)
  size = config.data.image_size
  example = {"image": jnp.zeros((2, size, size, config.data.channels))}
  params = jax.jit(method.init)(jax.random.PRNGKey(config.seed), example)
  out = {"untrained student": probe.evaluate(method, params, config, mesh)}
  pixels = lambda batch: batch["image"].reshape(batch["image"].shape[0], -1)
  e = config.eval
  train = probe.extract_features(pixels, config.data, split=config.data.split, batch_size=e.probe_batch_size,
                                 mesh=mesh, max_examples=e.max_train_examples)
  test = probe.extract_features(pixels, config.data, split=config.data.eval_split, batch_size=e.probe_batch_size,
                                mesh=mesh)
  out["raw pixels"] = probe.evaluate_features(train, test, e, config.data.num_classes)
  return out


def format_table(results: dict[str, dict], controls: dict[str, dict]) -> str:
  rows = ["| encoder | params | pre-training | final pixel loss | kNN top-1 | linear probe top-1 |",
          "|---|---|---|---|---|---|"]
  names = {"teacher": "teacher (MAE, 128 wide)", "mae": "student, MAE (64 wide)", "amd": "student, AMD (64 wide)"}
  for stage in ("teacher", "mae", "amd"):
    r = results[stage]
    rows.append(f"| {names[stage]} | {r['params'] / 1e6:.2f}M | {r['wall_seconds'] / 60:.1f} min | "
                f"{r.get('loss_rec', float('nan')):.4f} | {r['knn_top1']:.4f} | {r['linear_probe_top1']:.4f} |")
  for name, r in controls.items():
    rows.append(f"| control: {name} | - | - | - | {r['knn_top1']:.4f} | {r['linear_probe_top1']:.4f} |")
  return "\n".join(rows)


def main(argv):
  del argv
  from amd_jax.train import metrics  # pylint: disable=g-import-not-at-top
  metrics.quiet_library_logs()
  t0 = time.perf_counter()
  module = load_config_module(_CONFIG.value or default_config_path())
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  results = run_stages(module, workdir, _RUNLOCAL.value)
  controls = run_controls(module, _RUNLOCAL.value)
  table = format_table(results, controls)
  total = (time.perf_counter() - t0) / 60
  text = (f"Quickstart on Fashion-MNIST (train 60k / test 10k; probes fit on "
          f"{module.get_config().eval.max_train_examples or 60000} train features), total {total:.1f} min\n\n"
          f"{table}\n")
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(text)
  logging.info("results written to %s", os.path.join(workdir, "results.md"))
  print("\n" + text, flush=True)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)
