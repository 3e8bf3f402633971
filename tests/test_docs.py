"""Every code block of README.md, docs/api.md and docs/getting_started.md runs as written.

Python blocks run in order, one namespace per page (as a reader pastes them into one session), in a fresh
folder. Shell blocks are split into commands; each command is either run here (in a fresh folder, with the
substitutions listed in RUN: a file or folder the docs assume is made by a fixture, a long training gets its
`:runlocal` form) or named in COVERED with the test or reason that covers it. A command in no list fails the test:
new docs commands must be run or accounted for.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

# Runs of the same configs compile the same programs: the session's compilation cache (conftest.py) compiles
# each once, here and in the subprocesses started from os.environ.
pytestmark = pytest.mark.usefixtures("compilation_cache")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ("README.md", "docs/api.md", "docs/getting_started.md")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

# Commands run by test_shell_commands_run: the command as the docs write it (prefix match) -> substitutions
# applied before running it ({tmp}: the test's folder; {flowers}: a small image folder the fixture makes).
RUN = {
    "python -m amd_jax.main --config amd_vit_s_ssv2:runlocal --workdir /tmp/smoke": {"/tmp/smoke": "{tmp}/smoke"},
    "python -m amd_jax.convert to_torch --workdir RUN --output student.pth": {"RUN": "{tmp}/smoke"},
    "python -m amd_jax.data.stats --config configs/quickstart.py": {"/data/flowers": "{flowers}"},
    # Three epochs of the quickstart's teacher on the folder: its 8-step smoke form.
    "python -m amd_jax.main --config configs/quickstart.py --workdir /tmp/flowers_mae": {
        "configs/quickstart.py": "configs/quickstart.py:runlocal", "/data/flowers": "{flowers}",
        "/tmp/flowers_mae": "{tmp}/flowers_mae"},
}
# Commands covered elsewhere (prefix -> where, or why they do not run here).
COVERED = {
    "bash scripts/test.sh": "the whole test suite: CI's own command (.ci/run)",
    "bash scripts/quickstart.sh": "the 13-minute quickstart; its smoke mode runs in tests/test_quickstart.py and "
                                  "tests/test_install.py",
    "python -m amd_jax.quickstart --runlocal": "tests/test_install.py runs it from the installed wheel",
    "python -m amd_jax.quickstart --workdir workdirs/quickstart": "the 13-minute quickstart (smoke mode: "
                                                                  "tests/test_quickstart.py, tests/test_install.py)",
    "bash scripts/setup.sh": "scripts/test.sh (CI) runs it",
    ". .venv/bin/activate": "shell state only",
    'pip install "amd_jax': "tests/test_install.py installs the wheel into a fresh venv; the URL is the published "
                            "address",
    "pip wheel --no-deps": "tests/test_install.py builds the wheel this way",
    "python -m venv /tmp/v": "the install-size measurement of the install section (tests/test_install.py makes "
                             "the same venv)",
    "python -X importtime": "the import-time measurement of the install section",
    "pip download": "the platform check of the install section: downloads wheels for other platforms from PyPI",
    "python -m amd_jax.main --config <": "a template",
    "python -m amd_jax.main --config configs/<": "a template",
    "python -m amd_jax.convert to_flax --arch vit_l": "tests/test_convert.py runs to_flax on small official files",
    "tensorboard --logdir": "a server; event files are read back in tests/test_train.py and tests/test_cli.py",
    "python -m amd_jax.visualize --workdir": "tests/test_visualize.py runs the command line on a trained run",
    "python -m amd_jax.main --config configs/quickstart_video.py:stage=videomae": "tests/test_video_quickstart.py "
                                                                                 "trains it on generated clips",
}


def blocks(page: str) -> list[tuple[str, str]]:
  """(language, code) of every fenced block of a page, in order."""
  with open(os.path.join(REPO, page), encoding="utf-8") as f:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(f.read())]


def commands(code: str) -> list[str]:
  """The shell commands of a block: continuation lines joined, comments dropped."""
  out, current = [], ""
  for line in code.splitlines():
    current += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
    if not line.rstrip().endswith("\\"):
      command = current.split(" #", 1)[0].strip() if not current.lstrip().startswith("#") else ""
      current = ""
      if command:
        out.append(" ".join(command.split()))
  return out


def all_commands() -> list[tuple[str, str]]:
  return [(page, c) for page in PAGES for lang, code in blocks(page) if lang in ("bash", "sh", "")
          for c in commands(code)]


def test_every_page_has_code_and_every_shell_command_is_run_or_covered():
  assert all(blocks(page) for page in PAGES)
  unaccounted = [f"{page}: {c}" for page, c in all_commands()
                 if not any(c.startswith(p) for p in (*RUN, *COVERED))]
  assert not unaccounted, "docs commands neither run by this test nor covered:\n" + "\n".join(unaccounted)
  run_here = {p for _, c in all_commands() for p in RUN if c.startswith(p)}
  assert run_here == set(RUN), f"RUN entries matching no docs command: {set(RUN) - run_here}"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  return tmp_path


def run_python_blocks(page: str) -> dict:
  namespace: dict = {"__name__": "__docs__"}
  for i, (lang, code) in enumerate(blocks(page)):
    if lang == "python":
      exec(compile(code, f"{page} (python block {i + 1})", "exec"), namespace)  # pylint: disable=exec-used
  return namespace


def test_readme_python_runs(in_tmp):
  ns = run_python_blocks("README.md")
  assert ns["out"]["block_6"].shape == ns["out"]["block_12"].shape == (2, 160, 384)   # 10% of 1568 tokens
  assert ns["tokens"].shape == (2, 160, 384)


@pytest.mark.slow
def test_api_page_python_runs(in_tmp):
  ns = run_python_blocks("docs/api.md")
  assert ns["tokens"].shape == (8, 50, 64)
  assert ns["out"]["block_2"].shape == (8, 50, 64) and ns["out"]["attn_logits_4"].shape == (8, 2, 50, 50)
  assert ns["hidden"].shape == (8, 37, 16)
  assert {"loss_rec", "loss_dir", "loss_gen"} <= set(ns["metrics"])
  assert ns["final"]["step"] == 8 and "knn_top1" in ns["final"]
  assert set(ns["run_params"]) >= {"encoder", "decoder"}
  assert ns["logits"].shape == (8, 10) and np.isfinite(float(ns["loss"]))
  loaded, exported = ns["loaded"], ns["enc_params"]   # the PyTorch round trip gives the same encoder
  assert jax.tree.structure(loaded) == jax.tree.structure(exported)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(exported)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert ns["grid"].dtype == np.uint8 and ns["grid"].ndim == 3
  assert ns["maps"].shape == (8, 7, 7)


@pytest.fixture
def flowers(tmp_path):
  """A small image folder as the docs' /data/flowers: train/ and test/, three classes of coloured images."""
  rng = np.random.default_rng(0)
  root = tmp_path / "flowers"
  for split, count in (("train", 20), ("test", 8)):
    for label, name in enumerate(("daisy", "rose", "tulip")):
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(count):
        pixels = np.clip(rng.normal(60 + 70 * label, 30, (36, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
  return str(root)


@pytest.mark.slow
def test_shell_commands_run(tmp_path, flowers, monkeypatch):
  """The RUN commands, in page order, from a folder outside the checkout (configs/ paths made absolute)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
         "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
  env.pop("XLA_FLAGS", None)
  values = {"{tmp}": str(tmp_path), "{flowers}": flowers}
  done = []
  for page, command in all_commands():
    prefix = next((p for p in RUN if command.startswith(p)), None)
    if prefix is None or prefix in done:
      continue
    for old, new in RUN[prefix].items():
      for key, value in values.items():
        new = new.replace(key, value)
      command = command.replace(old, new)
    command = command.replace("configs/", os.path.join(REPO, "configs") + "/")
    args = shlex.split(command)
    assert args[0] == "python"
    result = subprocess.run([sys.executable, *args[1:]], cwd=str(tmp_path), env=env, capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, f"{page}: {command}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    done.append(prefix)
  assert (tmp_path / "smoke" / "config.json").is_file() and (tmp_path / "student.pth").is_file()
  assert (tmp_path / "flowers_mae" / "config.json").is_file()
