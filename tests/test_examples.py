"""examples/ run and do what they say; generated docs match the code; the public API is importable and cheap."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

# Runs of the same configs compile the same programs: the session's compilation cache (conftest.py) compiles
# each once, here and in the subprocesses started from os.environ.
pytestmark = pytest.mark.usefixtures("compilation_cache")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("XLA_FLAGS", None)
  return env


@pytest.mark.slow
def test_custom_loop_example_trains_and_the_loss_falls():
  cmd = [sys.executable, os.path.join(REPO, "examples", "custom_loop.py"), "--steps", "30", "--batch", "32",
         "--log_every", "5"]
  proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  steps = [(int(s), float(l), float(r), float(d), float(g)) for s, l, d, g, r in re.findall(
      r"step\s+(\d+)\s+loss ([\d.]+)\s+\(dir ([\d.]+)\s+gen ([\d.]+)\s+rec ([\d.]+)\)", proc.stdout)]
  assert [s[0] for s in steps] == [0, 5, 10, 15, 20, 25, 29], proc.stdout
  first, last = steps[0], steps[-1]
  # Each term of L = L_rec + L_dir + L_gen falls, and so does their sum.
  for i in range(1, 5):
    assert last[i] < 0.7 * first[i], (first, last)
  np_sum = last[2] + last[3] + last[4]
  assert abs(np_sum - last[1]) < 1e-3 * max(1.0, last[1])
  summary = re.search(r"first \d+ steps: ([\d.]+); of the last \d+: ([\d.]+)", proc.stdout)
  assert summary and float(summary.group(2)) < 0.5 * float(summary.group(1)), proc.stdout[-2000:]


def _config_reference():
  spec = importlib.util.spec_from_file_location("_config_reference", os.path.join(REPO, "scripts",
                                                                                  "config_reference.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_config_reference_is_up_to_date():
  module = _config_reference()
  with open(module.OUTPUT) as f:
    committed = f.read()
  assert committed == module.render(), "docs/config_reference.md is stale: run python scripts/config_reference.py"


def test_config_reference_reads_meanings_from_the_source():
  module = _config_reference()
  text = module.render()
  # A trailing comment (config_base.py), a comment continued on the next line, a method's extra_config
  # comment, and a field documented in the generator's own table.
  assert "| `mask.kind` | `'random'` | random \\| tube |" in text
  assert re.search(r"\| `image_every_steps` \| `0` \| >0: write .* TensorBoard every N steps; 0 = off \|", text)
  assert "| `amd.student_layers` | `'6,12'` | 1-based student blocks whose outputs are aligned |" in text
  assert "| `seed` | `0` | " + module.DESCRIPTIONS["seed"] + " |" in text
  # The teacher's encoder is one row: the fields of model.* with the defaults that differ.
  assert "| `teacher.model.*` | variant='L' |" in text


def test_comment_parser_on_a_small_source():
  module = _config_reference()
  source = ("def f():\n"
            "  c = dict(\n"
            "      a=1,   # first\n"
            "             # and more\n"
            "      b=dict(x=2),  # nested\n"
            "  )\n"
            "  return c\n")
  comments = module.line_comments(source)
  assert comments == {3: "first and more", 5: "nested"}


def test_import_is_lazy_and_exposes_the_public_names():
  code = ("import sys, amd_jax\n"
          "assert 'jax' not in sys.modules and 'tensorflow' not in sys.modules, 'eager import'\n"
          "from amd_jax import Encoder, MaskedTokenDecoder, masking, get_method, REGISTRY, AMD, MAE, base_config\n"
          "assert 'tensorflow' not in sys.modules, 'models and methods must not import TensorFlow'\n"
          "assert masking.nested_mask is amd_jax.nested_mask\n"
          "assert set(REGISTRY) >= {'mae', 'videomae', 'amd', 'dmae', 'tinymim', 'g2sd'}\n"
          "assert get_method(amd_jax.with_method_fields(base_config(), 'amd')).__class__ is AMD\n"
          "missing = [n for n in amd_jax.__all__ if not hasattr(amd_jax, n)]\n"
          "assert not missing, missing\n"
          "print('ok')\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
