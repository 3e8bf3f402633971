"""notebooks/quickstart.ipynb runs headless from top to bottom (fast mode: a few dozen real steps per run)."""
import os
import re

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


def outputs_of(cell, kind):
  return [o for o in cell.get("outputs", []) if o.get("output_type") == kind]


def text_of(cell) -> str:
  return "".join(o.get("text", "") for o in outputs_of(cell, "stream"))


def test_quickstart_notebook_runs_and_prints_the_probe_table(tmp_path, monkeypatch):
  monkeypatch.setenv("AMD_JAX_NOTEBOOK_FAST", "1")
  monkeypatch.setenv("AMD_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "runs"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # Runs from notebooks/, as a user opening it in the checkout does; any cell error raises here.
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": os.path.join(REPO, "notebooks")}}).execute()

  code = [c for c in nb.cells if c.cell_type == "code"]
  for cell in code:
    assert not outputs_of(cell, "error"), cell.source[:200]
    assert cell.get("execution_count"), f"cell did not run: {cell.source[:80]}"

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
    assert "40" in os.listdir(tmp_path / "runs" / run / "checkpoints"), run

  # The reconstruction picture was shown, and the PyTorch round trip changed nothing.
  picture_cell = next(c for c in code if "reconstruction_grid" in c.source)
  assert any("image/png" in o.get("data", {}) for o in picture_cell.outputs), picture_cell.outputs
  torch_cell = next(c for c in code if "export_torch" in c.source)
  diff = re.search(r"after the round trip: ([0-9.e+-]+)", text_of(torch_cell))
  assert diff and float(diff.group(1)) == 0.0, text_of(torch_cell)
