"""The report: the seeds' figures and every finding of a set of runs in one HTML page.

``report(store, runs=None, lab_dir=None, out=None)`` writes a self-contained page
(images inline, no script, no network at view time). Each figure is also a function
returning a matplotlib Figure, for notebooks::

    from gradwatch import report
    data = report.load("gradwatch-runs", runs=[3, 4])
    report.gradient_per_layer_figure(data)
    report.meanfield_figure(report.load(lab_dir="gradwatch-runs/lab-meanfield"))
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from gradwatch.errors import ConfigError
from gradwatch.report.data import NothingToPlot, ReportData, RunData, load, read_lab
from gradwatch.report.figures import (
    activation_regions_figure,
    activations_figure,
    delta_heatmap_figure,
    gradient_per_layer_figure,
    loss_figure,
    weights_figure,
)
from gradwatch.report.html import render
from gradwatch.report.meanfield import meanfield_figure
from gradwatch.report.verdicts import findings_figure, fixes_figure, theory_figure
from gradwatch.store import RunStore

__all__ = [
    "report",
    "load",
    "render",
    "read_lab",
    "ReportData",
    "RunData",
    "NothingToPlot",
    "activations_figure",
    "gradient_per_layer_figure",
    "delta_heatmap_figure",
    "loss_figure",
    "weights_figure",
    "activation_regions_figure",
    "fixes_figure",
    "findings_figure",
    "theory_figure",
    "meanfield_figure",
]

REPORT_FILE = "report.html"


def report(
    store: RunStore | str | os.PathLike | None = None,
    runs: Sequence[int | str] | None = None,
    lab_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
) -> Path:
    """Write the HTML report of some runs (or of a lab) and return its path.

    Args:
        store: a :class:`~gradwatch.store.RunStore` or its path. Default: the lab's
            store for a lab, else ``$GRADWATCH_STORE`` or ``./gradwatch-runs/gradwatch.db``.
        runs: run ids or names. Default: the lab's runs, else every run in the store.
        lab_dir: a lab output directory (with ``lab.json``). Default: none.
        out: the HTML file to write. Default: ``report.html`` in ``lab_dir`` for a lab,
            else in the current directory.

    Raises:
        ConfigError: ``lab_dir`` has no readable ``lab.json``, or ``out`` cannot be written.
        StoreError: no store at the path, or a store with no runs.
        RunNotFoundError: a run id or name the store does not hold.
    """
    data = load(store, runs, lab_dir)
    page = render(data)
    target = Path(out) if out is not None else (data.lab_dir or Path.cwd()) / REPORT_FILE
    target = target.expanduser()
    partial = target.with_name(target.name + ".partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(page, encoding="utf-8")
        partial.replace(target)
    except OSError as err:
        raise ConfigError(
            f"cannot write the report to {target}: {err.strerror}; choose another file with out=PATH (--out)"
        ) from err
    return target
