"""The Colab notebook runs headless on CPU with small sizes, every cell without error."""

import os

import nbformat
from nbclient import NotebookClient
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "cvc_jax_colab.ipynb")


def test_notebook_is_built_from_its_script():
  from notebooks import build_notebook  # pylint: disable=g-import-not-at-top
  saved = nbformat.read(NOTEBOOK, as_version=4)
  built = build_notebook.build()
  assert [(c.cell_type, c.source) for c in saved.cells] == [
      (c.cell_type, c.source) for c in built.cells], (
          "notebooks/cvc_jax_colab.ipynb is stale: run python notebooks/build_notebook.py")
  assert not any(c.get("outputs") for c in saved.cells), "commit the notebook without outputs"


def test_notebook_runs_on_cpu(tmp_path, monkeypatch):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  at = next(i for i, c in enumerate(notebook.cells)
            if "parameters" in c.metadata.get("tags", []))
  # Injected after the parameters cell, as papermill does: the tiny data set,
  # one epoch of two steps, two evaluation clips.
  small = nbformat.v4.new_code_cell("\n".join([
      f"WORKDIR = {str(tmp_path / 'work')!r}",
      f"DATA_DIR = {str(tmp_path / 'tfds')!r}",
      'DATASET = "synthetic_motion/tiny"',
      "NUM_EPOCHS = 1",
      "BATCH_SIZE = 8",
      "NUM_CLIPS = 2",
  ]))
  notebook.cells.insert(at + 1, small)
  # The kernel inherits the test's environment (the shared compile cache) but
  # sees one CPU device, as a user's machine: the 8 fake devices would double the
  # compile time of the train step.
  flags = os.environ.get("XLA_FLAGS", "").split()
  monkeypatch.setenv("XLA_FLAGS", " ".join(
      f for f in flags if not f.startswith("--xla_force_host_platform_device_count")))
  client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
  try:
    client.execute()
  except Exception as e:  # pylint: disable=broad-except
    pytest.fail(f"A notebook cell failed:\n{str(e)[-4000:]}")
  outputs = "\n".join(o.get("text", "") for c in notebook.cells
                      for o in c.get("outputs", []) if o.get("output_type") == "stream")
  assert "Running on CPU: 1 device(s)" in outputs
  assert "most active static concepts" in outputs and "restored" in outputs
  for name in ("concepts/concepts.png", "concepts/concepts.gif", "concepts/histogram.png",
               "encoder/encoder.json", "r2plus1d.safetensors", "demo_results.md"):
    assert os.path.exists(tmp_path / "work" / name), name
