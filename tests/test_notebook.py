"""notebooks/quickstart.ipynb runs headless from top to bottom, installing amd_jax as its first cell does on Colab.

The first cell pip-installs its target (the git URL on Colab; here AMD_JAX_INSTALL names this checkout) into the
kernel's environment. So that the install neither touches the test venv nor downloads anything, the kernel runs
in a fresh venv that sees the test venv's packages through a .pth line (as Colab comes with JAX, PyTorch and
TensorFlow) but not its amd_jax: the notebook finds no amd_jax until its first cell installs one.
Fast mode (AMD_JAX_NOTEBOOK_FAST=1): a few dozen real steps per run.
"""
import json
import os
import re
import subprocess
import sys
import sysconfig

import nbformat
from nbclient import NotebookClient
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")
KERNEL = "amd_jax_notebook_test"
FAST_STEPS = 40


def outputs_of(cell, kind):
  return [o for o in cell.get("outputs", []) if o.get("output_type") == kind]


def text_of(cell, stream: str | None = None) -> str:
  return "".join(o.get("text", "") for o in outputs_of(cell, "stream") if stream in (None, o.get("name")))


def code_cells(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


def test_notebook_installs_from_one_url_without_path_edits():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = code_cells(nb)
  sources = "\n".join(c.source for c in code)
  assert len(re.findall(r"^REPO_URL = ", sources, flags=re.M)) == 1
  assert re.search(r'^REPO_URL = "[^"]+"', code[0].source, flags=re.M), "REPO_URL belongs to the first cell"
  assert 'f"git+{REPO_URL}"' in code[0].source and "pip" in code[0].source
  assert not re.search(r"sys\.path\s*(\.|\[|\+=|=)", sources), "the notebook edits sys.path"
  assert "git clone" not in sources and "apt-get" not in sources
  torch_cell = next(c for c in code if "export_torch" in c.source)
  assert 'find_spec("torch") is None' in torch_cell.source   # guarded: skipped with a message without PyTorch


def kernel_venv(folder) -> str:
  """A venv (no pip of its own) whose interpreter also sees this test venv's site-packages, minus amd_jax's
  editable finder (a .pth path line adds the folder; the .pth files inside it are not run). Its python."""
  subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(folder)],
                 check=True)
  python = os.path.join(str(folder), "bin", "python")
  site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                        capture_output=True, text=True).stdout.strip()
  with open(os.path.join(site, "test_venv_packages.pth"), "w", encoding="utf-8") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  return python


def kernel_spec(folder, python: str) -> str:
  """A Jupyter kernelspec named KERNEL that starts `python`; the JUPYTER_PATH entry that holds it."""
  spec_dir = os.path.join(str(folder), "kernels", KERNEL)
  os.makedirs(spec_dir)
  with open(os.path.join(spec_dir, "kernel.json"), "w", encoding="utf-8") as f:
    json.dump({"argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
               "display_name": "amd_jax notebook test", "language": "python"}, f)
  return str(folder)


@pytest.mark.slow
def test_quickstart_notebook_installs_runs_and_shows_progress(tmp_path, monkeypatch):
  venv = tmp_path / "kernel_venv"
  python = kernel_venv(venv)
  monkeypatch.setenv("JUPYTER_PATH", kernel_spec(tmp_path / "jupyter", python))
  monkeypatch.setenv("AMD_JAX_INSTALL", REPO)
  monkeypatch.setenv("AMD_JAX_NOTEBOOK_FAST", "1")
  monkeypatch.setenv("AMD_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "runs"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.delenv("PYTHONPATH", raising=False)
  monkeypatch.delenv("AMD_JAX_PROGRESS", raising=False)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  workspace = tmp_path / "colab"   # the kernel's folder: not the checkout, as on Colab
  workspace.mkdir()
  # Any cell error raises here.
  NotebookClient(nb, timeout=1200, kernel_name=KERNEL, resources={"metadata": {"path": str(workspace)}}).execute()

  code = code_cells(nb)
  for cell in code:
    assert not outputs_of(cell, "error"), cell.source[:200]
    assert cell.get("execution_count"), f"cell did not run: {cell.source[:80]}"

  # The first cell installed this checkout into the kernel's venv, and the notebook used that copy.
  setup = text_of(code[0])
  assert f"pip install {REPO}" in setup, setup
  where = re.search(r"amd_jax \S+ from (\S+)", setup)
  assert where and where.group(1).startswith(str(venv)), setup
  data_cell = next(c for c in code if "DATA = dict(" in c.source)
  assert "'source': 'fashion_mnist'" in text_of(data_cell)   # Debian's package is on this machine

  # Progress in every training cell: the library's log line per window and the tqdm bar of the steps.
  training = [c for c in code if "run_stage(" in c.source and "def run_stage" not in c.source]
  training.insert(0, next(c for c in code if "def run_stage" in c.source))
  for cell, runs in zip(training, (1, 2)):
    log = text_of(cell, "stderr")
    windows = re.findall(rf"step (\d+)/{FAST_STEPS}: .*loss", log)
    assert len(windows) >= 4 * runs, log[-3000:]   # log_every_steps=10 of 40 steps, per run
    assert log.count(f"finished at step {FAST_STEPS}") == runs, log[-3000:]
    assert re.search(r"train: +\d+%\|", log), log[-3000:]

  # The probe table: header and one row per encoder, with accuracies in [0, 1].
  table_cell = next(c for c in code if "linear probe top-1" in text_of(c))
  rows = [l for l in text_of(table_cell).splitlines() if l.startswith("| ") and "top-1" not in l]
  assert [r.split(" | ")[0] for r in rows] == ["| teacher, MAE (128 wide)", "| student, MAE (64 wide)",
                                               "| student, AMD (64 wide)", "| control: raw pixels"]
  for row in rows:
    knn, linear = (float(v) for v in row.rstrip(" |").split(" | ")[-2:])
    assert 0.1 < knn <= 1.0 and 0.1 < linear <= 1.0, row  # ten classes: chance is 0.1
  # Raw pixels are a strong control on Fashion-MNIST (about 0.83 linear).
  assert float(rows[-1].rstrip(" |").split(" | ")[-1]) > 0.7

  # Training really ran: each run wrote its final checkpoint at the fast mode's 40 steps.
  for run in ("teacher", "mae", "amd"):
    assert str(FAST_STEPS) in os.listdir(tmp_path / "runs" / run / "checkpoints"), run

  # The reconstruction picture was shown, and the PyTorch round trip changed nothing.
  picture_cell = next(c for c in code if "reconstruction_grid" in c.source)
  assert any("image/png" in o.get("data", {}) for o in picture_cell.outputs), picture_cell.outputs
  torch_cell = next(c for c in code if "export_torch" in c.source)
  diff = re.search(r"after the round trip: ([0-9.e+-]+)", text_of(torch_cell))
  assert diff and float(diff.group(1)) == 0.0, text_of(torch_cell)
