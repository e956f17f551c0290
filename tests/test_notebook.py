"""examples/pkd_math.ipynb: committed with its outputs, and it runs end to end.

The notebook is executed with nbclient in the ``python3`` kernel, which
jupyter_client starts with this interpreter (``sys.executable``); the kernel
inherits the environment, so ``PYTHONPATH`` is set to this checkout and the
notebook's first cell prints which ``pkd`` it imported.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("sklearn")  # section 5 trains the demo's networks on the digits

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "pkd_math.ipynb"
BUDGET_S = 60.0  # on an idle machine; see _budget


def _budget() -> float:
    """60 s, stretched by the run-queue share when more runnable tasks than cores compete."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return BUDGET_S * max(1.0, load / cores)


def _outputs(nb, kind: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == kind]


def test_the_committed_notebook_reads_without_running():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs for c in code), "a code cell was committed without output"
    assert not _outputs(nb, "error")
    images = [o for kind in ("display_data", "execute_result") for o in _outputs(nb, kind)
              if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # the geometry, the spectrum, the heatmap, as figures
    # Modest figures: the whole notebook stays small enough to read on GitHub.
    assert NOTEBOOK.stat().st_size < 600_000
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1))  # executed in order, top to bottom


def test_the_notebook_runs_end_to_end_without_a_cell_error(monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:  # run from a clean slate
        if cell.cell_type == "code":
            cell.outputs = []
    # Which pkd the kernel imports: asked by a cell of the test's own, not printed in the
    # committed notebook (a reader has no use for the path of the checkout that ran it).
    nb.cells.insert(0, nbformat.v4.new_code_cell("import pkd; print(pkd.__file__)"))
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("MPLBACKEND", "Agg")  # the inline backend overrides it in the kernel
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT / "examples")}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    elapsed = time.perf_counter() - start
    assert not _outputs(nb, "error")
    first = "".join(o.text for o in nb.cells[0].outputs if o.output_type == "stream")
    assert str(ROOT / "pkd" / "__init__.py") in first  # the kernel imported this checkout
    assert elapsed <= _budget(), f"the notebook took {elapsed:.1f} s (budget {_budget():.0f} s)"


def test_section_5_chooses_the_mapping_by_the_recommended_measure():
    """The heatmap and the mapping use RBF CKA with σ = 0.2 × median distance, maximised."""
    from pkd.demo.experiment import MAPPING_MEASURE, RBF_BANDWIDTH

    nb = nbformat.read(NOTEBOOK, as_version=4)
    starts = [i for i, c in enumerate(nb.cells)
              if c.cell_type == "markdown" and c.source.lstrip().startswith("## 5.")]
    assert len(starts) == 1
    code = "\n".join(c.source for c in nb.cells[starts[0]:] if c.cell_type == "code")
    assert MAPPING_MEASURE == "rbf-cka" and RBF_BANDWIDTH == 0.2  # what the demo uses too
    assert f"bandwidth={RBF_BANDWIDTH}" in code and "rbf_cka_matrix(" in code
    assert "maximize=True" in code
    assert "layer_matching.md" in nb.cells[starts[0]].source
