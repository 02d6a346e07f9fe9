"""``gradwatch report``: the HTML report of some runs, or of a lab."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gradwatch.cli import app, console, handle_errors
from gradwatch.cli.runs import StoreOption
from gradwatch.report import report as write_report


@app.command()
@handle_errors
def report(
    runs: Annotated[
        list[str] | None, typer.Argument(help="Run ids or names (default: the lab's runs, else every run).")
    ] = None,
    lab: Annotated[
        Path | None, typer.Option("--lab", help="A lab output directory (holds lab.json).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="HTML file to write (default: report.html).")
    ] = None,
    store: StoreOption = None,
) -> None:
    """Write a self-contained HTML report: the seeds' figures, findings and theory for runs."""
    path = write_report(store, runs=runs or None, lab_dir=lab, out=out)
    size = path.stat().st_size / 1e6
    console.print(f"report written to {path} ({size:.1f} MB); open it in a browser", highlight=False)
