"""Every notebook runs top to bottom on the toy world (nbclient, a dev extra), in order: notebook 2 makes the
quantized model that 3-5 reuse. They run at the reduced setting their first cell reads (QDP_NOTEBOOK_QUICK=1: fewer
AdaRound iterations and training steps, the same cells), so that no cell needs minutes even on a loaded machine;
people get the full setting."""
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_five_stages():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    assert "REAL_CKPT = None" in "".join(c.source for c in nb.cells)     # the toy switch is what CI runs
    assert "QDP_NOTEBOOK_QUICK" in nb.cells[1].source + nb.cells[0].source
    monkeypatch.setenv("OMP_NUM_THREADS", "1")   # the kernel inherits it: one torch thread, as the rest of the suite
    monkeypatch.setenv("QDP_NOTEBOOK_QUICK", "1")
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()                     # raises CellExecutionError, with the failing cell, on any error
