"""examples/privacy_flat.ipynb runs end to end (real MiniLM, real data), so it cannot rot."""
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "privacy_flat.ipynb"


def test_notebook_trains_audits_and_plots(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
    )
    assert "| DP-SGD | 7.9" in text or "| DP-SGD | 8.000" in text, text[-2000:]
    assert "| Privacy-Flat (strict DP) |" in text and "Formal (epsilon, delta) guarantee: holds" in text
    images = [output for cell in notebook.cells for output in cell.get("outputs", [])
              if "image/png" in output.get("data", {})]
    assert len(images) == 6, "two ROC curves, two sharpness curves, two 2-D slices shown inline"
    assert (tmp_path / "runs" / "notebook" / "dp").is_dir()
