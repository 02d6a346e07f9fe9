"""The seeds' figures from measurements: one function per figure, each returning a Figure.

1. :func:`activations_figure`: the sigmoid and its derivative, the green region, the
   0.25 bound; tanh, ReLU and LeakyReLU beside it.
2. :func:`gradient_per_layer_figure`: delta RMS and weight-gradient norm per layer.
3. :func:`delta_heatmap_figure`: delta RMS over layers x steps.
4. :func:`loss_figure`: loss and accuracy against epochs, "no change in the loss" marked.
5. :func:`weights_figure`: weight norm per layer against epochs, and update ratios.
6. :func:`activation_regions_figure`: saturated, green and dead fractions over training.

Figures 7-9 (fixes, findings, theory) are in :mod:`gradwatch.report.verdicts`. Every
function that draws runs takes a :class:`~gradwatch.report.data.ReportData` (from
:func:`gradwatch.report.load`) and raises :class:`~gradwatch.report.data.NothingToPlot`
when the runs hold none of what it draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure

from gradwatch.activations import Activation, get_activation
from gradwatch.report._plot import (
    GREEN,
    RED,
    binned,
    depth_colors,
    group_colors,
    integer_ticks,
    legends,
    log_mean,
    new_figure,
    parts,
    plain,
    rows_height,
    styled,
    whole_numbers,
    x_axis,
)
from gradwatch.report.data import MAX_POINTS, NothingToPlot, ReportData, RunData

__all__ = [
    "FLAT_LOSS_CHANGE",
    "activation_regions_figure",
    "activations_figure",
    "delta_heatmap_figure",
    "flat_loss_groups",
    "gradient_per_layer_figure",
    "green_intervals",
    "loss_figure",
    "weights_figure",
]

# A loss whose mean over the last tenth of training differs from its mean over the
# first tenth by less than this fraction shows "no change in the loss" (the seeds' sign);
# a stored "loss_plateau" finding (gradwatch.diagnose) marks it too.
FLAT_LOSS_CHANGE = 0.02


# --- 1. activations ------------------------------------------------------------------------


def green_intervals(activation: Activation, x: np.ndarray) -> list[tuple[float, float]]:
    """Intervals of ``x`` where ``phi'(x) >= activation.green_threshold()`` (the green region)."""
    d = activation.derivative(torch.as_tensor(x, dtype=torch.float64)).numpy()
    inside = np.concatenate([[0], (d >= activation.green_threshold()).astype(int), [0]])
    edges = np.flatnonzero(np.diff(inside))  # alternating: first inside, first outside
    return [(float(x[a]), float(x[b - 1])) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _draw_activation(ax, activation: Activation, title: str, x: np.ndarray, ylim: tuple) -> None:
    t = torch.as_tensor(x, dtype=torch.float64)
    ax.plot(x, activation.phi(t).numpy(), color="#1f77b4", lw=2, label="φ(x)")
    ax.plot(x, activation.derivative(t).numpy(), color="#ff7f0e", lw=2, ls="--", label="φ′(x)")
    for i, (a, b) in enumerate(green_intervals(activation, x)):
        ax.axvspan(
            a, b, color=GREEN, alpha=0.15, lw=0, label="green region: φ′ ≥ ½ max φ′" if i == 0 else None
        )
    ax.axhline(0, color="0.6", lw=0.6)
    ax.set_ylim(*ylim)
    ax.set_xlim(x[0], x[-1])
    ax.set_title(title)
    ax.grid(alpha=0.25)


@styled
def activations_figure() -> Figure:
    """Figure 1: the sigmoid and its derivative (green region, 0.25 bound), and three others."""
    fig = new_figure(11, 5.6)
    grid = fig.add_gridspec(3, 3)
    sigmoid = get_activation("sigmoid")
    ax = fig.add_subplot(grid[:, :2])
    x = np.linspace(-8, 8, 3201)
    _draw_activation(
        ax, sigmoid, "sigmoid σ(x) = 1 / (1 + e⁻ˣ) and its derivative σ′ = σ(1 − σ)", x, (-0.05, 1.05)
    )
    ax.axhline(0.25, color=RED, lw=1.2, ls=":")
    ax.annotate(
        "max σ′ = 0.25: a product of n\nderivatives is at most 0.25ⁿ",
        xy=(0, 0.25),
        xytext=(1.6, 0.42),
        color=RED,
        arrowprops={"arrowstyle": "->", "color": RED},
    )
    ((a, b),) = green_intervals(sigmoid, x)
    ax.text(0, 0.06, f"green: |x| ≤ {b:.2f}", ha="center", color=GREEN)
    for side in (-6.2, 6.2):
        ax.text(side, 0.1, "saturated:\nσ′ ≈ 0", color="0.3", ha="center")
    ax.set_xlabel("x (input of the activation)")
    ax.legend(loc="upper left")
    others = [
        (get_activation("tanh"), "tanh (max φ′ = 1)", (-1.15, 1.15)),
        (get_activation("relu"), "ReLU (φ′ = 0 for x < 0: dead side)", (-0.6, 3.1)),
        (get_activation("leaky_relu", negative_slope=0.1), "LeakyReLU, slope 0.1", (-0.6, 3.1)),
    ]
    for row, (act, title, ylim) in enumerate(others):
        small = fig.add_subplot(grid[row, 2])
        _draw_activation(small, act, title, np.linspace(-3, 3, 1201), ylim)
    return fig


# --- 2. gradient per layer -----------------------------------------------------------------


def _profiles(runs: Sequence[RunData], metric: str) -> list[np.ndarray]:
    out = []
    for run in runs:
        p = run.initial_profile
        if not p.empty and p[metric].notna().any():
            out.append(p[metric].to_numpy(float))
    return out


@styled
def gradient_per_layer_figure(data: ReportData) -> Figure:
    """Figure 2: delta RMS and weight-gradient norm per layer at initialisation, log scale.

    One line per configuration (geometric mean over its seeds, band from min to max);
    one row per lab section when there are too many configurations for one legend.
    """
    colors = group_colors(data)
    split = parts(data)
    fig = new_figure(11, rows_height(len(split)))
    axes = fig.subplots(len(split), 2, squeeze=False)
    counts = []
    for (section, groups), (ax_delta, ax_grad) in zip(split, axes, strict=True):
        drawn = 0
        for key, runs in groups.items():
            for ax, metric in ((ax_delta, "delta_rms"), (ax_grad, "grad_norm")):
                values = _profiles(runs, metric)
                if not values:
                    continue
                mean, low, high = log_mean(values)
                layers = np.arange(1, len(mean) + 1)
                label = plain(runs[0].label) if ax is ax_delta else None
                ax.plot(layers, mean, marker="o", ms=3, color=colors[key], label=label)
                if len(values) > 1:
                    ax.fill_between(layers, low, high, color=colors[key], alpha=0.15, lw=0)
            drawn += bool(_profiles(runs, "delta_rms"))
        counts.append(drawn)
        prefix = f"{plain(section)}: " if section else ""
        ax_delta.set_title(prefix + "back-propagated error δ: RMS of dL/d(layer output)")
        ax_grad.set_title(prefix + "weight-gradient norm ‖dL/dW‖")
        ax_delta.set_ylabel("at initialisation")
    if not any(counts):
        raise NothingToPlot("no run recorded delta RMS of a parameterised layer; nothing to draw per layer")
    for ax in axes.ravel():
        ax.set_yscale("log")
        ax.grid(alpha=0.25)
        whole_numbers(ax.xaxis)
    for ax in axes[-1]:
        ax.set_xlabel("weight layer (1 = next to the input)")
    legends(fig, axes, counts)
    return fig


# --- 3. heatmap ----------------------------------------------------------------------------


def _chosen(data: ReportData, runs: Sequence[int] | None) -> list[RunData]:
    if runs is None:
        return data.featured
    by_id = {r.id: r for r in data.runs}
    missing = [r for r in runs if r not in by_id]
    if missing:
        raise NothingToPlot(f"run(s) {missing} are not in this report's data; loaded: {sorted(by_id)}")
    return [by_id[r] for r in runs]


@styled
def delta_heatmap_figure(data: ReportData, runs: Sequence[int] | None = None) -> Figure:
    """Figure 3: log10 delta RMS per weight layer (rows) and logged step (columns).

    Args:
        data: the report's runs.
        runs: run ids to draw. Default: :meth:`ReportData.featured` (worst and a contrast).
    """
    chosen = [r for r in _chosen(data, runs) if r.weight_layers["delta_rms"].notna().any()]
    if not chosen:
        raise NothingToPlot("no run recorded delta RMS; no heatmap to draw")
    grids = []
    for run in chosen:
        w = run.weight_layers
        grid = w.pivot_table(index="layer_id", columns="step", values="delta_rms", aggfunc="first")
        grids.append(np.log10(grid.where(grid > 0)))
    finite = np.concatenate([g.to_numpy().ravel() for g in grids])
    finite = finite[np.isfinite(finite)]
    vmin, vmax = np.percentile(finite, [1, 99]) if len(finite) else (0.0, 1.0)
    fig = new_figure(11, 1.2 + 2.6 * len(chosen))
    axes = np.atleast_1d(fig.subplots(len(chosen), 1, squeeze=False)[:, 0])
    for ax, run, grid in zip(axes, chosen, grids, strict=True):
        steps = grid.columns.to_numpy(float)
        image = ax.pcolormesh(
            steps,
            np.arange(1, len(grid) + 1),
            grid.to_numpy(),
            shading="nearest",
            cmap="magma",
            vmin=vmin,
            vmax=vmax,
        )
        ax.set_title(f"run {run.id}: {plain(run.label)} (first/last δ ratio {run.delta_ratio:.2g})")
        ax.set_ylabel("weight layer\n(1 = input side)")
        whole_numbers(ax.yaxis)
    axes[-1].set_xlabel("step")
    fig.colorbar(image, ax=list(axes), label="log10 δ RMS", shrink=0.9)
    return fig


# --- 4. loss and accuracy ------------------------------------------------------------------


def _loss_curve(run: RunData) -> tuple[np.ndarray, np.ndarray, str] | None:
    s = run.scalars
    if "loss" not in s or s["loss"].notna().sum() == 0:
        return None
    s = s.dropna(subset=["loss"])
    x, unit = x_axis(run, s["step"].to_numpy())
    xs, ys = binned(x, s["loss"].to_numpy(float), MAX_POINTS)
    return xs, ys, unit


def _acc_curve(run: RunData) -> tuple[np.ndarray, np.ndarray] | None:
    s = run.scalars
    if "test_acc" not in s or s["test_acc"].notna().sum() == 0:
        return None
    s = s.dropna(subset=["test_acc"])
    x = s["epoch"].to_numpy(float) if "epoch" in s and s["epoch"].notna().all() else s["step"].to_numpy(float)
    return x, s["test_acc"].to_numpy(float)


def _is_flat(loss: np.ndarray) -> bool:
    loss = loss[np.isfinite(loss)]
    if len(loss) < 4:
        return False
    k = max(1, len(loss) // 10)
    first, last = loss[:k].mean(), loss[-k:].mean()
    return bool(first != 0 and abs(first - last) / abs(first) < FLAT_LOSS_CHANGE)


def _plateau_found(runs: Sequence[RunData]) -> bool:
    return any(
        "plateau" in str(kind).lower()  # gradwatch.diagnose's "loss_plateau"
        for r in runs
        for kind in r.findings.get("kind", [])
    )


def _loss_curves(data: ReportData) -> dict[str, list[tuple[np.ndarray, np.ndarray, str]]]:
    return {k: [c for c in map(_loss_curve, runs) if c is not None] for k, runs in data.groups.items()}


def _flat_keys(data: ReportData, losses: dict[str, list]) -> list[str]:
    return [
        key
        for key, runs in data.groups.items()
        if _plateau_found(runs) or (losses[key] and _is_flat(_mean_band([c[:2] for c in losses[key]])[1]))
    ]


def flat_loss_groups(data: ReportData) -> list[str]:
    """Configurations whose loss shows no change: a stored plateau finding, or a mean
    loss whose last tenth is within :data:`FLAT_LOSS_CHANGE` of its first tenth.
    """
    return _flat_keys(data, _loss_curves(data))


def _mean_band(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    n = min(len(c[1]) for c in curves)
    ys = np.vstack([c[1][:n] for c in curves])
    with np.errstate(all="ignore"):
        return curves[0][0][:n], np.nanmean(ys, axis=0), np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)


def _draw_losses(ax_loss, ax_acc, groups, losses, accs, flat, colors) -> int:
    """One row of figure 4; returns the number of configurations drawn."""
    drawn = 0
    for key, runs in groups.items():
        curves = losses[key]
        if not curves:
            continue
        drawn += 1
        x, mean, low, high = _mean_band([c[:2] for c in curves])
        label = plain(runs[0].label) + (": no change in the loss" if key in flat else "")
        style = "--" if key in flat else "-"
        ax_loss.plot(x, mean, ls=style, color=colors[key], label=label)
        if len(curves) > 1:
            ax_loss.fill_between(x, low, high, color=colors[key], alpha=0.15, lw=0)
        if ax_acc is not None and accs[key]:
            xa, ma, la, ha = _mean_band(accs[key])
            ax_acc.plot(xa, ma, ls=style, marker="o", ms=3, color=colors[key])
            if len(accs[key]) > 1:
                ax_acc.fill_between(xa, la, ha, color=colors[key], alpha=0.15, lw=0)
    if flat & set(groups):
        ax_loss.text(
            0.98,
            0.97,
            "dashed: no change in the loss",
            transform=ax_loss.transAxes,
            ha="right",
            va="top",
            fontsize=8,
            color="0.25",
        )
    lines = [line.get_ydata() for line in ax_loss.get_lines()]
    values = np.concatenate(lines) if lines else np.array([])
    values = values[np.isfinite(values) & (values > 0)]
    if len(values) and values.max() > 100 * values.min():  # an exploding loss would flatten the rest
        ax_loss.set_yscale("log")
    return drawn


@styled
def loss_figure(data: ReportData) -> Figure:
    """Figure 4: training loss (and test accuracy, if logged) against epochs.

    One line per configuration, mean over seeds with a min-max band, one row per lab
    section when there are many; a configuration whose loss does not change
    (:func:`flat_loss_groups`) is dashed and marked. The loss axis turns logarithmic
    when losses differ by more than 100x.
    """
    colors = group_colors(data)
    losses = _loss_curves(data)
    accs = {k: [c for c in map(_acc_curve, runs) if c is not None] for k, runs in data.groups.items()}
    if not any(losses.values()):
        raise NothingToPlot("no run logged a loss (watcher.log(loss=...)); no loss curve to draw")
    has_acc = any(accs.values())
    flat = set(_flat_keys(data, losses))
    split = parts(data)
    fig = new_figure(11, rows_height(len(split)))
    axes = fig.subplots(len(split), 2 if has_acc else 1, squeeze=False)
    counts = []
    for (section, groups), row in zip(split, axes, strict=True):
        counts.append(_draw_losses(row[0], row[1] if has_acc else None, groups, losses, accs, flat, colors))
        n_flat = len(flat & set(groups))
        prefix = f"{plain(section)}: " if section else ""
        row[0].set_title(prefix + "training loss" + (f" ({n_flat} flat)" if n_flat else ""))
        row[0].set_ylabel("loss")
        if has_acc:
            row[1].set_title(prefix + "test accuracy")
            row[1].set_ylim(-0.02, 1.02)
    loss_unit = " / ".join(sorted({c[2] for curves in losses.values() for c in curves}))
    for row in axes:
        for col, ax in enumerate(row):
            ax.grid(alpha=0.25)
            integer_ticks(ax, loss_unit if col == 0 else "epoch")
    for col, ax in enumerate(axes[-1]):
        ax.set_xlabel(loss_unit if col == 0 else "epoch")
    legends(fig, axes, counts)
    return fig


# --- 5. weights against epochs ---------------------------------------------------------------


def _per_layer_lines(ax, run: RunData, rows: pd.DataFrame, value: str, relative: bool = False) -> int:
    """One line per layer, colored from input (dark) to output (light); returns lines drawn."""
    layers = sorted(rows["layer_id"].unique())
    drawn = 0
    for color, lid in zip(depth_colors(len(layers)), layers, strict=True):
        one = rows[rows["layer_id"] == lid].dropna(subset=[value])
        if one.empty:
            continue
        y = one[value].to_numpy(float)
        if relative:
            y = y / y[0] if y[0] else y
        x, _ = x_axis(run, one["step"].to_numpy())
        ax.plot(x, y, color=color, lw=1.2)
        drawn += 1
    return drawn


def _depth_colorbar(fig: Figure, axes, n_layers: int, label: str) -> None:
    cmap = ListedColormap(depth_colors(n_layers))
    norm = BoundaryNorm(np.arange(0.5, n_layers + 1.5), cmap.N)
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), label=label, shrink=0.9)
    bar.set_ticks(np.unique(np.linspace(1, n_layers, min(n_layers, 10)).round()))


@styled
def weights_figure(data: ReportData, runs: Sequence[int] | None = None) -> Figure:
    """Figure 5: individual weights, weight norm per layer and update ratio, against epochs.

    The seeds' detection plot: a few tracked weights of the first, middle and last
    layer (``watch(weight_samples=...)``), then every layer's weight norm relative to
    its start and its update ratio. Layers the gradient does not reach keep their
    weights: flat lines, norms at 1, tiny update ratios.

    Args:
        data: the report's runs.
        runs: run ids to draw. Default: :meth:`ReportData.featured`.
    """
    chosen = [r for r in _chosen(data, runs) if r.weight_layers["weight_norm"].notna().any()]
    if not chosen:
        raise NothingToPlot("no run recorded weight norms (with an optimizer passed to watch())")
    has_update = any(r.weight_layers["update_ratio"].notna().any() for r in chosen)
    has_samples = any(not r.weight_samples.empty for r in chosen)
    rows = 1 + int(has_update) + int(has_samples)
    fig = new_figure(11, 3.0 * rows + 0.6)
    axes = fig.subplots(rows, len(chosen), squeeze=False, sharex="col")
    n_layers = 1
    for col, run in enumerate(chosen):
        w = run.weight_layers
        n_layers = max(n_layers, w["layer_id"].nunique())
        row = 0
        if has_samples:
            _tracked_weight_lines(axes[row, col], run, sorted(w["layer_id"].unique()))
            axes[row, col].set_title(f"run {run.id}: {plain(run.label, 36)}")
            row += 1
        _per_layer_lines(axes[row, col], run, w, "weight_norm", relative=True)
        if not has_samples:
            axes[row, col].set_title(f"run {run.id}: {plain(run.label, 36)}")
        if has_update:
            _per_layer_lines(axes[row + 1, col], run, w, "update_ratio")
            axes[row + 1, col].set_yscale("log")
        unit = x_axis(run, w["step"].to_numpy()[:1])[1]
        axes[-1, col].set_xlabel(unit)
        integer_ticks(axes[-1, col], unit)
    row = 0
    if has_samples:
        axes[0, 0].set_ylabel("individual weights\n(first, middle, last layer)")
        row = 1
    axes[row, 0].set_ylabel("‖W‖ / ‖W at start‖")
    if has_update:
        axes[row + 1, 0].set_ylabel("update ratio ‖ΔW‖ / ‖W‖")
    for ax in axes.ravel():
        ax.grid(alpha=0.25)
    _depth_colorbar(fig, axes.ravel(), n_layers, "weight layer (1 = input side)")
    return fig


def _tracked_weight_lines(ax, run: RunData, layer_ids: list[int]) -> None:
    """The seeds' plot: a few individual weights of the first, middle and last layer over training."""
    samples = run.weight_samples
    colors = depth_colors(len(layer_ids))
    picks = sorted({0, len(layer_ids) // 2, len(layer_ids) - 1})
    for k in picks:
        lid = layer_ids[k]
        one = samples[samples["layer_id"] == lid]
        for _, series in one.groupby("index"):
            x, _ = x_axis(run, series["step"].to_numpy())
            ax.plot(x, series["value"].to_numpy(float), color=colors[k], lw=0.9, alpha=0.85)


# --- 6. activation regions -------------------------------------------------------------------


@styled
def activation_regions_figure(data: ReportData, runs: Sequence[int] | None = None) -> Figure:
    """Figure 6: saturated, green and dead fractions per activation layer over training.

    Args:
        data: the report's runs.
        runs: run ids to draw. Default: :meth:`ReportData.featured`.
    """
    chosen = [r for r in _chosen(data, runs) if (r.metrics["kind"] == "activation").any()]
    if not chosen:
        raise NothingToPlot("no run recorded activation layers (known activation modules)")
    metrics = (
        ("saturated_frac", "saturated (φ′ < 0.1 max)"),
        ("green_frac", "green (φ′ ≥ ½ max)"),
        ("dead_frac", "dead units (φ′ = 0 on the batch)"),
    )
    fig = new_figure(11, 0.6 + 2.8 * len(chosen))
    axes = fig.subplots(len(chosen), 3, squeeze=False, sharey=True)
    n_layers = 1
    for row, run in enumerate(chosen):
        acts = run.metrics[run.metrics["kind"] == "activation"]
        n_layers = max(n_layers, acts["layer_id"].nunique())
        for col, (metric, title) in enumerate(metrics):
            ax = axes[row, col]
            if not _per_layer_lines(ax, run, acts, metric):
                ax.text(
                    0.5,
                    0.5,
                    "not measured for\nthis activation",
                    transform=ax.transAxes,
                    ha="center",
                    va="center",
                    color="0.45",
                )
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.25)
            ax.set_title(title if row == 0 else "")
            unit = x_axis(run, acts["step"].to_numpy()[:1])[1]
            ax.set_xlabel(unit if row == len(chosen) - 1 else "")
            integer_ticks(ax, unit)
        axes[row, 0].set_ylabel(f"run {run.id}: {plain(run.label, 28)}\nfraction")
    _depth_colorbar(fig, axes.ravel(), n_layers, "activation layer (1 = input side)")
    return fig
