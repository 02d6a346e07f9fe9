"""Small plotting helpers shared by the figure modules (no pyplot, no global state)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TypeVar

import matplotlib
import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gradwatch.report.data import ReportData, RunData

LEGEND_MAX = 12  # more entries than this and a legend under a figure hides it: leave it out
SECTION_LEGEND_MAX = 20  # one column right of a row of panels holds this many
LABEL_MAX = 48

GREEN = "#2ca02c"
RED = "#d62728"
F = TypeVar("F", bound=Callable)
FONT = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8}


def rows_height(n_rows: int) -> float:
    """Figure height in inches for ``n_rows`` rows of panels (one row gets room for a legend)."""
    return 4.6 if n_rows == 1 else 0.4 + 2.9 * n_rows


def new_figure(width: float, height: float) -> Figure:
    """A Figure outside pyplot, with constrained layout."""
    fig = Figure(figsize=(width, height), layout="constrained")
    fig.set_facecolor("white")
    return fig


def plain(text: object, limit: int = LABEL_MAX) -> str:
    """User text as matplotlib should show it: typed, not mathtext, and not too long."""
    s = str(text)
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return s.replace("$", r"\$")


def palette(n: int) -> list:
    """``n`` distinguishable colors: tab10, tab20, else samples of viridis."""
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["viridis"](v) for v in np.linspace(0, 0.95, n)]


def parts(data: ReportData) -> list[tuple[str, dict[str, list[RunData]]]]:
    """The configurations as one part, or split by the lab's section when one legend
    could not name them all (the seed preset has 26): ``[(section, {key: runs})]``.
    """
    groups = data.groups
    split: dict[str, dict[str, list[RunData]]] = {}
    for key, runs in groups.items():
        split.setdefault(str(runs[0].lab.get("section", "")), {})[key] = runs
    if len(groups) <= LEGEND_MAX or len(split) == 1:
        return [("", groups)]
    return list(split.items())


def group_colors(data: ReportData) -> dict[str, object]:
    """One color per configuration, distinct within its part, the same in every figure."""
    colors: dict[str, object] = {}
    for _, groups in parts(data):
        colors.update(zip(groups, palette(len(groups)), strict=True))
    return colors


def legends(fig: Figure, axes: np.ndarray, counts: Sequence[int]) -> None:
    """For a rows x columns grid whose first column holds the labelled lines: one legend
    under the figure for a single row, else one right of each row.
    """
    if len(axes) == 1:
        if 0 < counts[0] <= LEGEND_MAX:
            handles, labels = axes[0, 0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="outside lower center", ncols=min(3, counts[0]), frameon=False)
        return
    for row, n in zip(axes, counts, strict=True):
        if 0 < n <= SECTION_LEGEND_MAX:
            handles, labels = row[0].get_legend_handles_labels()
            row[-1].legend(
                handles, labels, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=7
            )


def whole_numbers(axis: Axis) -> None:
    """Ticks at whole numbers only (layers, epochs)."""
    axis.set_major_locator(MaxNLocator(integer=True))


def integer_ticks(ax: Axes, unit: str) -> None:
    """Whole epochs on an epoch axis."""
    if unit == "epoch":
        whole_numbers(ax.xaxis)


def x_axis(run: RunData, steps: np.ndarray, prefer_epochs: bool = True) -> tuple[np.ndarray, str]:
    """Epochs for a run that logged them, else steps; with the axis label."""
    if prefer_epochs:
        epochs = run.epoch_of_steps(steps)
        if epochs is not None:
            return epochs, "epoch"
    return np.asarray(steps, float), "step"


def binned(x: np.ndarray, y: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Means of ``x`` and of the finite ``y`` in ``n`` consecutive bins (per-step noise averaged)."""
    if len(x) <= n:
        return x, y
    starts = np.linspace(0, len(x), n + 1).astype(int)[:-1]  # strictly increasing as len(x) > n
    xs = np.add.reduceat(np.asarray(x, float), starts) / np.diff(np.append(starts, len(x)))
    finite = np.isfinite(y)
    sums = np.add.reduceat(np.where(finite, y, 0.0), starts)
    counts = np.add.reduceat(finite.astype(int), starts)
    with np.errstate(all="ignore"):
        return xs, np.where(counts > 0, sums / counts, np.nan)


def log_mean(values: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Geometric mean, min and max of equal-length positive arrays (truncated to the shortest)."""
    n = min(len(v) for v in values)
    stack = np.vstack([np.asarray(v[:n], float) for v in values])
    stack = np.where(stack > 0, stack, np.nan)
    with np.errstate(all="ignore"):
        mean = 10 ** np.nanmean(np.log10(stack), axis=0)
        return mean, np.nanmin(stack, axis=0), np.nanmax(stack, axis=0)


def depth_colors(n: int) -> list:
    """Colors from input side (dark) to output side (light) for ``n`` layers."""
    cmap = colormaps["viridis"]
    return [cmap(v) for v in np.linspace(0.0, 0.9, max(n, 1))]


def styled(fn: F) -> F:
    """Run a figure function under the report's font sizes (restored afterwards)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(FONT):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
