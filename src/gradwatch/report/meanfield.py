"""Figure 10: trainability over depth x sigma_w^2 against mean-field theory's 6 xi_c.

Schoenholz et al. 2017 ("Deep information propagation", figure 5) train tanh networks
over a grid of depth and weight variance and draw the test accuracy as a heatmap with
the curve ``6 xi_c`` on top: networks deeper than about six correlation depth scales
do not train, and the deepest trainable ones sit at the edge of chaos (``chi_1 = 1``).
:func:`meanfield_figure` draws the same from any runs with the ``scaled`` init (the
``meanfield`` lab preset's grid), the curve from :func:`gradwatch.theory.trainable_depth_curve`.
"""

from __future__ import annotations

import importlib
import math
from collections import Counter
from types import ModuleType

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from gradwatch.report._plot import RED, new_figure, styled
from gradwatch.report.data import NothingToPlot, ReportData

__all__ = ["meanfield_grid", "meanfield_figure"]

_CURVE_POINTS = 400


def _theory() -> ModuleType | None:
    try:
        theory = importlib.import_module("gradwatch.theory")
    except ImportError:
        return None
    needed = ("trainable_depth_curve", "critical_sigma_w2")
    return theory if all(callable(getattr(theory, n, None)) for n in needed) else None


def meanfield_grid(data: ReportData) -> tuple[str, float, pd.DataFrame]:
    """``(activation, sigma_b2, table)`` of the scaled-init MLP runs, one row per grid cell.

    The table has columns ``sigma_w2``, ``depth``, ``test_acc`` (mean final test accuracy
    over seeds) and ``n`` (runs), for the most common (activation, sigma_b2) among plain
    MLPs (no batch norm, no residual) with ``init='scaled'``.

    Raises:
        NothingToPlot: fewer than two sigma_w2 values or two depths with a test accuracy.
    """
    rows = []
    for run in data.runs:
        m = run.model
        acc = run.final("test_acc")
        if (m.get("kind", "mlp") != "mlp" or m.get("init") != "scaled" or m.get("batch_norm")
                or m.get("residual") or not m.get("depth") or math.isnan(acc)):
            continue
        rows.append((str(m.get("activation")), float(m.get("sigma_b2", 0.0)),
                     float(m.get("sigma_w2", 1.0)), int(m["depth"]), acc))
    if rows:
        (act, b2), _ = Counter((r[0], r[1]) for r in rows).most_common(1)[0]
        frame = pd.DataFrame([r[2:] for r in rows if (r[0], r[1]) == (act, b2)],
                             columns=["sigma_w2", "depth", "test_acc"])
        table = frame.groupby(["sigma_w2", "depth"], as_index=False).agg(
            test_acc=("test_acc", "mean"), n=("test_acc", "size"))
        if table["sigma_w2"].nunique() >= 2 and table["depth"].nunique() >= 2:
            return act, b2, table
    raise NothingToPlot(
        "no depth x sigma_w2 grid: need runs of plain MLPs with the scaled init at two sigma_w2 "
        "values or more and two depths or more, with a test accuracy (the meanfield lab preset)"
    )


def _edges(centres: np.ndarray, log: bool) -> np.ndarray:
    """Cell edges halfway between centres (geometrically for a log axis)."""
    c = np.log(centres) if log else centres
    mid = (c[1:] + c[:-1]) / 2
    edges = np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])
    return np.exp(edges) if log else edges


@styled
def meanfield_figure(data: ReportData) -> Figure:
    """Figure 10: mean test accuracy over (sigma_w^2, depth), with 6 xi_c and chi_1 = 1 on top.

    Each cell is one configuration (mean over seeds, its value written in it); the
    white curve is mean-field theory's trainable depth ``6 xi_c`` (Schoenholz et al.
    2017) for the runs' activation and sigma_b^2, the dashed red line the critical
    sigma_w^2 where ``chi_1 = 1``. Depth is on a log axis.
    """
    act, b2, table = meanfield_grid(data)
    theory = _theory()
    if theory is None:
        raise NothingToPlot("gradwatch.theory with trainable_depth_curve is not available")
    grid = table.pivot(index="depth", columns="sigma_w2", values="test_acc")
    w2s, depths = grid.columns.to_numpy(float), grid.index.to_numpy(float)
    x_edges, y_edges = _edges(w2s, log=False), _edges(depths, log=True)
    fig = new_figure(9, 5.6)
    ax = fig.subplots()
    image = ax.pcolormesh(x_edges, y_edges, grid.to_numpy(float), cmap="viridis", vmin=0, vmax=1)
    for (i, depth), (j, w2) in ((a, b) for a in enumerate(depths) for b in enumerate(w2s)):
        value = grid.iloc[i, j]
        if not math.isnan(value):
            ax.text(w2, depth, f"{100 * value:.0f}", ha="center", va="center", fontsize=8,
                    color="black" if value > 0.6 else "white")
    fine = np.linspace(x_edges[0], x_edges[-1], _CURVE_POINTS)
    fine = fine[fine > 0]
    curve = np.asarray(theory.trainable_depth_curve(act, fine, b2), float)
    # 6 xi_c diverges at chi_1 = 1: clip it above the axis so the line leaves the top cleanly
    ax.plot(fine, np.minimum(curve, y_edges[-1] * 10), color="white", lw=2.2,
            label="6 ξ_c (mean-field theory)")
    try:
        critical = float(theory.critical_sigma_w2(act, b2))
    except Exception:  # noqa: BLE001 - an activation without an edge of chaos: no line to draw
        critical = math.nan
    if x_edges[0] <= critical <= x_edges[-1]:
        ax.axvline(critical, color=RED, lw=1.5, ls="--", label=f"χ₁ = 1 (σw² = {critical:.3g})")
    ax.set_yscale("log")
    ax.set_xlim(x_edges[0], x_edges[-1])
    ax.set_ylim(y_edges[0], y_edges[-1])
    ax.set_yticks(depths, [f"{d:g}" for d in depths])
    ax.minorticks_off()
    ax.set_xlabel("σw² (weight variance × fan-in)")
    ax.set_ylabel("depth (hidden layers)")
    ax.set_title(f"{act}, σb² = {b2:g}: test accuracy (%) after training, with the trainable depth 6 ξ_c")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    fig.colorbar(image, ax=ax, label="test accuracy (mean over seeds)")
    return fig
