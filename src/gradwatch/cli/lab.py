"""``gradwatch lab``: run a preset's grid, print the summary and the claims, write the report.

The report is :func:`gradwatch.report.report` of the lab's directory (``OUT/report.html``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from gradwatch.cli import app, console, err_console, handle_errors
from gradwatch.integrations.ray import cli_backend
from gradwatch.lab.presets import PRESETS, get_preset
from gradwatch.lab.runner import LabInterrupted, LabResult, RunEvent, run_lab
from gradwatch.numbers import format_number
from gradwatch.report import report


class _Display:
    """One rich progress display: the grid overall and a row per running run."""

    def __init__(self, progress: Progress, total: int, title: str) -> None:
        self.progress = progress
        self.overall = progress.add_task(title, total=total)
        self.rows: dict[int, int] = {}

    def __call__(self, event: RunEvent) -> None:
        p = self.progress
        if event.kind == "start":
            self.rows[event.index] = p.add_task(f"  {event.name}", total=event.epochs)
        elif event.kind == "epoch" and event.index in self.rows:
            p.update(self.rows[event.index], completed=event.epoch,
                     description=f"  {event.name}: test acc {event.test_acc:.2f}")
        elif event.kind == "resumed":
            p.advance(self.overall)
        elif event.kind == "end":
            row = self.rows.pop(event.index, None)
            if row is not None:
                p.remove_task(row)
            if event.result is None or event.result.status != "stopped":
                p.advance(self.overall)


def _fmt(x: float) -> str:
    """Ratios: two decimals between 0.01 and 100 (trailing zeros dropped), else two
    significant digits; ``"-"`` for None, NaN and infinities.
    """
    if x is not None and math.isinf(x):
        return "-"
    return format_number(x, 2, plain=(0.01, 100), fixed=True)


_HEALTHY = ("healthy", "no problem found")


def _summary_table(result: LabResult) -> Table:
    table = Table(title=f"lab '{result.preset.name}' on {result.dataset}: {result.seeds} seed(s), "
                        f"{result.epochs} epochs")
    for col, just in (("section", "left"), ("configuration", "left"), ("test acc", "right"),
                      ("δ first/last", "right"), ("main finding", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    rows = result.summaries
    for i, s in enumerate(rows):
        first = i == 0 or rows[i - 1].entry.section != s.entry.section
        last = i == len(rows) - 1 or rows[i + 1].entry.section != s.entry.section
        acc = "-" if not s.run_ids else f"{s.test_acc_mean:.2f} ± {s.test_acc_std:.2f}"
        style = "green" if s.main_finding in _HEALTHY else "yellow"
        table.add_row(s.entry.section if first else "", Text(s.label), acc, _fmt(s.delta_ratio_mean),
                      Text(s.main_finding, style=style), end_section=last)
    return table


def _claims_table(result: LabResult) -> Table:
    table = Table(title="claims", show_lines=True)
    table.add_column("verdict", justify="center")
    table.add_column("claim")
    table.add_column("evidence")
    for text, verdict in result.claims:
        mark = Text("held", style="bold green") if verdict.held else Text("NOT HELD", style="bold red")
        table.add_row(mark, Text(text), Text(verdict.evidence))
    return table


def _paper_table(result: LabResult) -> Table:
    """Our mean ± std over seeds beside each number the paper published."""
    paper = result.preset.paper
    table = Table(title=f"beside the paper: {paper}" if paper else "beside the paper")
    for col, just in (("metric", "left"), ("ours", "left"), ("mean ± std", "right"), ("paper", "left"),
                      ("published", "right"), ("source", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for row in result.paper_rows:
        metric, label, ours, paper_label, published = row.cells()
        table.add_row(metric, Text(label), ours, Text(paper_label), published, Text(row.published.source))
    return table


def _list_presets() -> None:
    table = Table(title="presets (gradwatch lab --preset NAME)")
    for col in ("name", "configurations", "seeds", "description"):
        table.add_column(col, justify="right" if col in ("configurations", "seeds") else "left")
    for p in PRESETS.values():
        table.add_row(p.name, str(len(p.grid)), str(p.seeds), Text(p.description))
    console.print(table)


@app.command()
@handle_errors
def lab(
    preset: Annotated[str, typer.Option("--preset", "-p", help="Preset name (see --list) or a .json grid.")]
    = "seed",
    dataset: Annotated[str | None, typer.Option(help="digits, mnist1d, shapeset, or a .npz/.csv file.")]
    = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds per configuration [default: the preset's].")]
    = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs of every run [default: the preset's].")]
    = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes [default: the number of cores].")]
    = None,
    out: Annotated[Path | None, typer.Option(help="Output directory [default: gradwatch-runs/lab-PRESET].")]
    = None,
    backend: Annotated[str, typer.Option(help="Where runs execute: local (processes) or ray.")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster: auto or HOST:PORT [default: local].")]
    = None,
    vectorize: Annotated[bool | None, typer.Option(
        "--vectorize/--no-vectorize",
        help="Train the seeds of each MLP configuration together as one batched network: the same "
             "numbers, several times faster. Default: on with the local backend when a configuration "
             "has 2+ seeds to run; CNNs, and --backend ray, run seed by seed.")]
    = None,
    list_presets: Annotated[bool, typer.Option("--list", help="List the presets and exit.")] = False,
) -> None:
    """Run a preset's grid of watched trainings, check its claims and write the report."""
    if list_presets:
        _list_presets()
        return
    runner = cli_backend(backend, address, workers)
    spec = get_preset(preset)
    n_seeds = spec.seeds if seeds is None else seeds
    total = len(spec.grid) * n_seeds if isinstance(n_seeds, int) and n_seeds > 0 else 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as progress:
            display = _Display(progress, total, f"lab '{spec.name}'")
            result = run_lab(spec, dataset=dataset, seeds=seeds, epochs=epochs, workers=workers, out=out,
                             backend=runner, notify=display, vectorize=vectorize)
    except LabInterrupted as err:
        err_console.print(f"[bold yellow]{err}[/]", highlight=False)
        raise typer.Exit(130) from None
    console.print(_summary_table(result))
    held = sum(v.held for _, v in result.claims)
    if result.paper_rows:
        console.print(_paper_table(result))
    if result.claims:
        console.print(_claims_table(result))
    console.print((f"{held} of {len(result.claims)} claims held; " if result.claims else "")
                  + f"{result.ran} runs in {result.seconds:.0f} s"
                  + (f", {result.resumed} resumed from the store" if result.resumed else ""))
    for failure in result.failed:
        err_console.print(f"[red]run {failure.task.run_name} failed:[/] {failure.error}", highlight=False)
    console.print(f"lab summary: {result.out / 'lab.json'}")
    console.print(f"report: {report(result.store, lab_dir=result.out, out=result.out / 'report.html')}")
    if result.failed:
        raise typer.Exit(1)
