"""``gradwatch export``: a run as TensorBoard events, CSV or Parquet files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gradwatch.cli import app, console, handle_errors
from gradwatch.cli.runs import StoreOption
from gradwatch.integrations.export import FORMATS, export_run


@app.command()
@handle_errors
def export(
    run: Annotated[str, typer.Argument(metavar="RUN", help="Run id or name.")],
    out: Annotated[Path, typer.Argument(metavar="DIR", help="Directory that receives <id>-<name>/.")],
    to: Annotated[str, typer.Option("--to", help=f"Format: {', '.join(FORMATS)}.")] = "tensorboard",
    store: StoreOption = None,
) -> None:
    """Export a run: TensorBoard (scalars per layer and metric, histograms), CSV or Parquet."""
    folder = export_run(store, run, to, out)
    console.print(f"exported run {run} to {folder}", highlight=False)
    if to == "tensorboard":
        console.print(f"view it with: tensorboard --logdir {out}", highlight=False)
