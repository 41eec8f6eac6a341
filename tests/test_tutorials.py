"""Every tutorial runs top to bottom as a notebook, on small settings.

Tutorials are stored as jupytext "percent" scripts (``tutorials/NN_name.py``; open them in Jupyter
with jupytext, or ``jupytext --to ipynb``). Each is converted to a notebook and executed with
nbclient; any cell error fails the test. ``PYROFLOWS_TUTORIAL_FAST=1`` makes them use small
settings.
"""

from __future__ import annotations

import glob
import os

import jupytext
import nbclient
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIALS = sorted(glob.glob(os.path.join(ROOT, "tutorials", "[0-9][0-9]_*.py")))


@pytest.mark.parametrize("path", TUTORIALS, ids=[os.path.basename(p) for p in TUTORIALS])
def test_tutorial_runs(path, monkeypatch):
    monkeypatch.setenv("PYROFLOWS_TUTORIAL_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # one thread, as the suite's own tests: the small settings' networks gain nothing from more,
    # and on a machine with other work the threads' waits made 03_density 35 times slower
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = jupytext.read(path)
    folder = os.path.dirname(path)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": folder}}
    )
    client.execute()


def test_there_are_tutorials():
    assert TUTORIALS, "tutorials/ holds no NN_name.py notebooks"
