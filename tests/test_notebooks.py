"""The notebooks in notebooks/: executed end to end (nbclient), stored without outputs, listed in the README.

    pytest -m notebooks          (or: make notebooks)
    WEIGHTOPS_NB_OUT=DIR pytest -m notebooks      # also keep the executed notebooks (with outputs) in DIR

Each notebook builds or reuses the zoo models it names (the fast subset, plus
sentiment-lora-r1 for 05 and v2-base / sentiment-v2-ft for 06) and writes
only under a temporary directory it deletes at the end.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 1800  # s; a first run builds zoo models inside a cell


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 6, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_code_cells_compile(path):
    """A syntax error is caught here in milliseconds, not minutes into the notebook run."""
    nb = nbformat.read(path, as_version=4)
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code":
            compile(c.source, f"{path.name}, cell {i}", "exec")


def test_readme_lists_every_notebook():
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## Notebooks\n(.*?)(?=^## )", readme, re.S | re.M)
    assert section, "README.md has no '## Notebooks' section"
    missing = [p.name for p in NOTEBOOKS if f"notebooks/{p.name}" not in section.group(1)]
    assert not missing, f"README's Notebooks section does not link {missing}"


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    """Every cell runs without error (a failing cell raises CellExecutionError with its traceback)."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    keep = os.environ.get("WEIGHTOPS_NB_OUT")
    try:
        NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, Path(keep) / path.name)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
