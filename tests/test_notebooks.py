"""Every notebook runs top to bottom on the toy world (nbclient, a dev extra), in order: notebook 2 makes the
quantized model that 3-5 reuse."""
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
    monkeypatch.setenv("OMP_NUM_THREADS", "1")   # the kernel inherits it: one torch thread, as the rest of the suite
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()                     # raises CellExecutionError, with the failing cell, on any error
