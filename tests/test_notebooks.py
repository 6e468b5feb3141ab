"""The notebooks in ``notebooks/`` run top to bottom in a real kernel, offline, writing only to a temp folder."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT, make_workdir

NOTEBOOKS = ROOT / "notebooks"
NAMES = ["quickstart", "transcribe", "experiments"]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_saved_without_outputs(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name}: saved with outputs"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = make_workdir(tmp_path / "cwd")  # a folder with the assets, as a user running from a checkout would have
    work = tmp_path / "work"
    # The kernel inherits this process's environment.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TINY_AUDIO_WORKDIR", str(work))
    monkeypatch.setenv("TINY_AUDIO_FIGURE", str(tmp_path / "curves.png"))  # read by the experiments notebook
    monkeypatch.delenv("TINY_AUDIO_CKPT", raising=False)  # the transcribe notebook trains its own
    monkeypatch.delenv("TINY_AUDIO_ROOT", raising=False)

    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    assert sorted(p.name for p in cwd.iterdir()) == ["assets"], "the notebook wrote into its working folder"
    assert list(work.glob("**/lightning_logs/version_*/checkpoints/last.ckpt")), "no run under TINY_AUDIO_WORKDIR"
    errors = [out for cell in notebook.cells for out in cell.get("outputs", []) if out.output_type == "error"]
    assert not errors
    if name == "experiments":
        assert (tmp_path / "curves.png").stat().st_size > 0, "the figure was not saved"
