"""Publish a run's executed notebooks into docs/notebooks/ as HTML pages, outputs included, for people to read.

    .venv/bin/python scripts/publish_notebooks.py outputs/cpu            (notebooks 01-05 of a run)
    .venv/bin/python scripts/publish_notebooks.py outputs/cpu-seeds      (notebook 06 of a sweep)

Renders `<run>/notebooks/NN_*.ipynb` to `NN_*.html` (nbconvert's basic template), without what only
a live Jupyter needs (widget state, papermill's per-cell timing metadata), and refuses to write more
than 3 MB in all. Pages, not notebooks: the project commits notebooks without outputs, and these
are what a run showed, to read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "notebooks"
LIMIT_BYTES = 3_000_000
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook without widget state and per-cell papermill metadata; outputs kept."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET_VIEW in data:  # a widget shows nothing without its live state: keep its text form
                data.pop(WIDGET_VIEW)
    return nb


def publish(run: Path, target: Path = TARGET) -> list[Path]:
    from nbconvert import HTMLExporter

    # a run's notebooks 01-05 are in its notebooks/ folder; a sweep's notebook 06 is in the sweep's folder
    sources = sorted((run / "notebooks").glob("[0-9][0-9]_*.ipynb")) + sorted(run.glob("[0-9][0-9]_*.ipynb"))
    if not sources:
        raise SystemExit(f"no executed notebooks in {run / 'notebooks'} or {run}: run ./study.sh first")
    exporter = HTMLExporter(template_name="basic")
    pages = {
        src.with_suffix(".html").name: exporter.from_notebook_node(clean(nbformat.read(src, as_version=4)))[0]
        for src in sources
    }
    total = sum(len(t.encode()) for t in pages.values())
    if total > LIMIT_BYTES:
        raise SystemExit(f"the executed notebooks take {total / 1e6:.1f} MB, over the {LIMIT_BYTES / 1e6:.0f} MB limit")
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in pages.items():
        (target / name).write_text(text)
        written.append(target / name)
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run folder, e.g. outputs/cpu, or a sweep folder")
    args = ap.parse_args(argv)
    written = publish(args.run)
    total = sum(p.stat().st_size for p in written)
    print(f"wrote {len(written)} pages to {TARGET} ({total / 1e6:.2f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main()
