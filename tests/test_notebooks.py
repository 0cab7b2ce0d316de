"""The notebooks run, as notebooks: each one is executed cell by cell in a real Jupyter kernel (nbclient), from
notebooks/, with RAL_NOTEBOOK_QUICK=1 so it trains for a few steps only. A cell that raises fails the test. The
notebooks assert what they teach (capture == eager, JSD bounds, zero JSD on the first mini-batch, the JSD to the
teacher falling), so a change in the project's code that breaks the lesson fails here. The executed copy stays in
memory: the stored notebook, with the outputs of its full run, is never rewritten."""
import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(FOLDER, "*.ipynb")))


def test_there_are_notebooks():
    assert {"ral_walkthrough.ipynb", "train_and_watch.ipynb", "attention_distillation.ipynb"} <= \
        set(map(os.path.basename, NOTEBOOKS))


def outputs_text(cell):
    return "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/plain", "")) for o in cell.outputs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_stored_executed(path):
    """Stored as a page to read: valid nbformat 4, every code cell run once, in order, without an error, with the
    figures in it, and from a full run (a quick run says so in its first cell's output)."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.cell_type in ("code", "markdown") for c in nb.cells)
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "run it top to bottom, once"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), "no figure in the outputs"
    assert "quick settings" not in outputs_text(code[0]), "stored from a quick run (regenerate: see README, Notebooks)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("RAL_NOTEBOOK_QUICK", "1")      # read by each notebook's first code cell: a few steps only
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": FOLDER}})
    client.execute()                                    # raises CellExecutionError (with the cell) on any error
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    if "RAL_NOTEBOOK_QUICK" in code[0].source:
        assert "quick settings" in outputs_text(code[0])   # the notebook saw the variable, so it ran small
