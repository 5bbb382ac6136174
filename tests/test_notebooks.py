"""The three notebooks run top to bottom on CPU (nbclient), in a scratch copy of the folder."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", ["01_basics", "02_systems", "05_alignment"])
def test_notebook_runs(name, tmp_path, monkeypatch):
    src = NOTEBOOKS / f"{name}.ipynb"
    nb = nbformat.read(src, as_version=4)
    # Run from a copy one level below a fake repo root, so that nothing is written into notebooks/.
    (tmp_path / "notebooks").mkdir()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CPU, as CI
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path / "notebooks")}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    # Every notebook draws at least one plot.
    assert any(o.get("data", {}).get("image/png") for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))
