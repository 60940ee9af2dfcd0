"""Every notebook in tutorials/ runs top to bottom (on the small budget the notebooks read from
``VI_FLOWS_TUTORIAL_QUICK``); a cell that raises fails its test."""

from pathlib import Path

import nbclient
import nbformat
import pytest

TUTORIALS = sorted((Path(__file__).parent.parent / "tutorials").glob("*.ipynb"))


def test_every_tutorial_is_collected():
    names = [path.name for path in TUTORIALS]
    assert names == [
        "01_getting_started.ipynb",
        "02_flows_on_2d_energies.ipynb",
        "03_sylvester_variants.ipynb",
        "04_did_it_work.ipynb",
        "05_your_own_flow.ipynb",
        "06_a_vae_with_flow_posteriors.ipynb",
    ]


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda path: path.stem)
def test_committed_notebooks_carry_their_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code_cells), "run the notebook in full before committing"
    assert not any(output.get("output_type") == "error" for cell in code_cells for output in cell.outputs)
    assert any("image/png" in output.get("data", {}) for cell in code_cells for output in cell.outputs)


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=lambda path: path.stem)
def test_tutorial_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("VI_FLOWS_TUTORIAL_QUICK", "1")
    monkeypatch.setenv("VI_FLOWS_CACHE", str(tmp_path))  # NUTS draws of the small run stay out of the user's cache
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError naming the cell that failed
