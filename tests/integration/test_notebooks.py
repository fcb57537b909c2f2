"""Execute every notebook in notebooks/ on the real offline assets, small (``PG_NOTEBOOK_SMALL=1``), so they
never rot. Select with ``-m assets``."""

from pathlib import Path

import pytest

pytestmark = pytest.mark.assets

FOLDER = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = ["01_alignment", "02_attention", "03_grounding_efficiency"]  # named, so a missing one fails


def test_every_notebook_is_tested():
    assert sorted(p.stem for p in FOLDER.glob("*.ipynb")) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    path = FOLDER / f"{name}.ipynb"

    monkeypatch.setenv("PG_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert outputs, "the notebook ran but produced no output"
