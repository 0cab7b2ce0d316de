"""The notebooks run: every code cell of every notebook in notebooks/, in order, in one namespace, from notebooks/.
The notebooks assert what they teach (capture == eager, JSD bounds, zero JSD on the first mini-batch), so a change
in the project's code that breaks the lesson fails here."""
import glob
import json
import linecache
import os

import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_clean_nbformat4(path):
    nb = json.load(open(path, encoding="utf-8"))
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["cell_type"] in ("code", "markdown") for c in nb["cells"])
    for c in code:  # saved without outputs, so diffs stay small
        assert c["outputs"] == [] and c["execution_count"] is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch):
    matplotlib.use("Agg")
    threads = torch.get_num_threads()
    nb = json.load(open(path, encoding="utf-8"))
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    source = "\n\n".join(f"# --- code cell {k + 1} ---\n{cell}" for k, cell in enumerate(cells))
    name = f"<{os.path.basename(path)}, code cells joined>"
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)   # tracebacks show the cell's code
    monkeypatch.chdir(os.path.dirname(path))
    try:
        exec(compile(source, name, "exec"), {"__name__": "__main__"})
    finally:
        plt.close("all")
        torch.set_num_threads(threads)    # what a notebook changes must not leak into other tests
