"""Regenerate the stored notebooks: run each top to bottom with full settings in a Jupyter kernel (from notebooks/, as
Jupyter would) and save it with its outputs, so it reads as a page on GitHub.

    OMP_NUM_THREADS=1 python notebooks/run.py                                  # every notebook
    OMP_NUM_THREADS=1 python notebooks/run.py notebooks/train_and_watch.ipynb  # one
"""
import glob
import os
import sys
import time

import nbformat
from nbclient import NotebookClient

here = os.path.dirname(os.path.abspath(__file__))
os.environ.pop("RAL_NOTEBOOK_QUICK", None)      # full settings: the quick ones are for the tests
for path in sys.argv[1:] or sorted(glob.glob(os.path.join(here, "*.ipynb"))):
    t0 = time.time()
    nb = nbformat.read(path, as_version=4)
    # coalesce_streams folds progress bars (\r) into their last state; no timing metadata, so reruns diff cleanly
    NotebookClient(nb, timeout=None, kernel_name="python3", coalesce_streams=True, record_timing=False,
                   resources={"metadata": {"path": here}}).execute()
    nbformat.write(nb, path)
    print(f"{os.path.relpath(path)}: {time.time() - t0:.0f} s")
