"""Figures of the paper presets ioffe2015, resnet2016 and dying_relu, from the lab's runs.

* :func:`ioffe_figure`: Ioffe & Szegedy (2015), Figure 1: (a) test accuracy against
  training steps with and without batch normalisation, (b, c) the 15th, 50th and 85th
  percentiles of a last-hidden-layer sigmoid's inputs over training, over the sigmoid's
  green region (|x| <= 1.76).
* :func:`resnet_figure`: He et al. (2016): test error and final training loss against
  depth for plain and residual stacks, and the first/last delta RMS ratio over training
  (does the plain nets' degradation come with vanishing gradients?).
* :func:`dying_relu_figure`: Lu et al. (2019): the fraction of nets born dead against
  width (our Monte Carlo from ``lab.json`` beside the published ranges and the exact
  one-input bound), and the watcher's dead-unit fraction at initialisation.

Each reads only what the report loaded (runs from the store, ``lab.json``) and raises
:class:`~gradwatch.report.data.NothingToPlot` for a report that is not of its preset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from gradwatch.numbers import delta_ratio_series
from gradwatch.report._plot import GREEN, RED, new_figure, palette, plain, styled
from gradwatch.report.data import NothingToPlot, ReportData, RunData

__all__ = [
    "SIGMOID_GREEN",
    "dying_relu_caption",
    "dying_relu_figure",
    "ioffe_caption",
    "ioffe_figure",
    "resnet_caption",
    "resnet_figure",
]

SIGMOID_GREEN = 1.7627  # |x| where the sigmoid's derivative is half its maximum: 2 acosh(sqrt(2))
_QUANTILES = ("input_q15", "input_q50", "input_q85")


def _preset_runs(data: ReportData, preset: str) -> dict[str, list[RunData]]:
    """The report's runs of ``preset``, grouped by configuration; NothingToPlot if none."""
    groups = {k: runs for k, runs in data.groups.items() if runs[0].lab.get("preset") == preset}
    if not groups:
        raise NothingToPlot(f"only for a lab of the {preset} preset")
    return groups


def _hidden_activation(run: RunData) -> tuple[str, np.ndarray, np.ndarray]:
    """The last hidden activation's name, steps and (steps x 3) input percentiles."""
    m = run.metrics
    acts = m[(m["kind"] == "activation") & m["layer"].str.startswith("hidden.")]
    if acts.empty or not all(q in acts for q in _QUANTILES):
        return "", np.array([]), np.empty((0, 3))
    name = acts.sort_values("layer_id")["layer"].iloc[-1]
    rows = acts[acts["layer"] == name].sort_values("step")
    return name, rows["step"].to_numpy(float), rows[list(_QUANTILES)].to_numpy(float)


def _accuracy_curve(runs: Sequence[RunData]) -> tuple[np.ndarray, np.ndarray]:
    """Steps taken and mean test accuracy over seeds at each epoch's end."""
    curves = []
    for run in runs:
        if "test_acc" not in run.scalars:
            continue
        s = run.scalars.dropna(subset=["test_acc"])
        curves.append((s["step"].to_numpy(float) + 1, s["test_acc"].to_numpy(float)))
    if not curves:
        return np.array([]), np.array([])
    n = min(len(c[0]) for c in curves)
    return curves[0][0][:n], np.mean([c[1][:n] for c in curves], axis=0)


@styled
def ioffe_figure(data: ReportData) -> Figure:
    """Ioffe & Szegedy (2015), Figure 1, from the ``ioffe2015`` lab's runs.

    Panel (a): test accuracy (mean over seeds) against training steps, one line per
    configuration. Then one panel per configuration: the 15th, 50th and 85th percentiles
    of the inputs of the last hidden sigmoid over training (the first seed's run; the
    watcher's ``input_q15/q50/q85``), over the green band |x| <= 1.76 where the sigmoid's
    derivative is at least half its maximum of 0.25.
    """
    groups = _preset_runs(data, "ioffe2015")
    colors = dict(zip(groups, palette(len(groups)), strict=True))
    panels = [(k, runs) for k, runs in groups.items() if len(_hidden_activation(runs[0])[1])]
    fig = new_figure(11, 3.4 * math.ceil((1 + len(panels)) / 3) + 0.6)
    n_cols = 3
    axes = fig.subplots(math.ceil((1 + len(panels)) / n_cols), n_cols, squeeze=False).ravel()
    ax = axes[0]
    for key, runs in groups.items():
        steps, acc = _accuracy_curve(runs)
        if len(steps):
            ax.plot(steps, acc, color=colors[key], lw=1.6, label=plain(runs[0].label, 60))
    ax.set_xlabel("training steps")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.set_title("(a) test accuracy")
    ax.grid(alpha=0.25)
    limit = SIGMOID_GREEN
    for ax, (key, runs) in zip(axes[1:], panels, strict=False):
        name, steps, q = _hidden_activation(runs[0])
        ax.axhspan(-limit, limit, color=GREEN, alpha=0.12, lw=0)
        ax.fill_between(steps, q[:, 0], q[:, 2], color=colors[key], alpha=0.25, lw=0)
        ax.plot(steps, q[:, 1], color=colors[key], lw=1.6)
        ax.plot(steps, q[:, 0], color=colors[key], lw=0.8, ls="--")
        ax.plot(steps, q[:, 2], color=colors[key], lw=0.8, ls="--")
        ax.set_title(plain(f"inputs of {name}: {runs[0].label}", 58), fontsize=8)
        ax.set_xlabel("training step")
        ax.set_ylabel("15th / 50th / 85th percentile")
        ax.grid(alpha=0.25)
    for ax in axes[1 + len(panels):]:
        ax.set_axis_off()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, frameon=False)
    return fig


def _by_depth(groups: dict[str, list[RunData]], residual: bool) -> list[tuple[int, list[RunData]]]:
    rows = [(int(runs[0].model.get("depth", 0)) + 1, runs) for runs in groups.values()  # + the head
            if bool(runs[0].model.get("residual")) == residual]
    return sorted(rows, key=lambda r: r[0])


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def _ratio_series(run: RunData) -> tuple[np.ndarray, np.ndarray]:
    """Steps and first/last weight layer delta RMS (:func:`gradwatch.numbers.delta_ratio_series`)."""
    ratio = delta_ratio_series(run.metrics)
    return ratio.index.to_numpy(float), ratio.to_numpy(float)


@styled
def resnet_figure(data: ReportData) -> Figure:
    """He et al. (2016) from the ``resnet2016`` lab's runs: the degradation problem.

    Left: final test error (%) against depth (weight layers as the paper counts them: hidden
    layers + the head), plain and residual, mean ± std over seeds.
    Middle: the last epoch's training loss against depth. Right: the first over the last
    hidden layer's delta RMS over training (first seed of each configuration; log scale):
    below the shaded band [0.1, 10] the gradient vanishes toward the input, above it grows.
    """
    groups = _preset_runs(data, "resnet2016")
    fig = new_figure(12, 4.4)
    ax_err, ax_loss, ax_ratio = fig.subplots(1, 3)
    styles = {False: ("plain", RED, "-"), True: ("residual", "#1f77b4", "--")}
    depths_seen: list[int] = []
    for residual, (name, color, ls) in styles.items():
        rows = _by_depth(groups, residual)
        if not rows:
            continue
        depths = [d for d, _ in rows]
        depths_seen += depths
        err = [_mean_std([100 * (1 - r.final("test_acc")) for r in runs]) for _, runs in rows]
        loss = [_mean_std([r.final("train_loss") for r in runs]) for _, runs in rows]
        ax_err.errorbar(depths, [e[0] for e in err], yerr=[e[1] for e in err], color=color, ls=ls,
                        marker="o", capsize=3, label=name)
        ax_loss.errorbar(depths, [v[0] for v in loss], yerr=[v[1] for v in loss], color=color, ls=ls,
                         marker="o", capsize=3, label=name)
        shades = np.linspace(0.45, 1.0, len(rows))
        for (depth, runs), alpha in zip(rows, shades, strict=True):
            steps, ratio = _ratio_series(runs[0])
            if len(steps):
                ax_ratio.plot(steps, ratio, color=color, ls=ls, alpha=float(alpha), lw=1.4,
                              label=f"{name} {depth}")
    if not depths_seen:
        raise NothingToPlot("the resnet2016 lab holds no finished runs")
    for ax in (ax_err, ax_loss):
        ax.set_xscale("log")
        ax.set_xticks(sorted(set(depths_seen)), [str(d) for d in sorted(set(depths_seen))])
        ax.minorticks_off()
        ax.set_xlabel("layers (hidden conv layers + head)")
        ax.grid(alpha=0.25)
        ax.legend(frameon=False)
    ax_err.set_ylabel("test error (%)")
    ax_err.set_title("test error at the end")
    ax_loss.set_ylabel("training loss (last epoch)")
    ax_loss.set_title("training loss at the end")
    ax_ratio.axhspan(0.1, 10, color=GREEN, alpha=0.12, lw=0)
    ax_ratio.axhline(1.0, color="0.4", lw=0.8, ls=":")
    ax_ratio.set_yscale("log")
    ax_ratio.set_xlabel("training step")
    ax_ratio.set_ylabel("δ RMS first / last weight layer")
    ax_ratio.set_title("gradient reaching the input (first seed)")
    ax_ratio.grid(alpha=0.25)
    ax_ratio.legend(frameon=False, fontsize=7, ncols=2)
    return fig


def _paper_points(data: ReportData, metric: str) -> list[dict]:
    paper = (data.lab or {}).get("paper")
    table = paper.get("table") if isinstance(paper, dict) else None
    return [r for r in table or [] if isinstance(r, dict) and r.get("metric") == metric]


@styled
def dying_relu_figure(data: ReportData) -> Figure:
    """Lu et al. (2019) from the ``dying_relu`` lab: nets born dead against width.

    Left: our Monte Carlo born-dead fraction (mean ± std over seeds, from ``lab.json``)
    beside the published ranges, and the exact probability that one input dies,
    ``1 - (1 - 2^-width)^depth``, an upper bound. Right: the watcher's dead-unit
    fraction of each hidden ReLU layer at initialisation (mean over seeds), per width.
    """
    groups = _preset_runs(data, "dying_relu")
    rows = sorted(((int(runs[0].model.get("width", 0)), int(runs[0].model.get("depth", 0)), runs)
                   for runs in groups.values()), key=lambda r: r[0])
    fig = new_figure(11, 4.4)
    ax_mc, ax_dead = fig.subplots(1, 2)
    widths = np.array([w for w, _, _ in rows], float)
    depth = rows[0][1]
    fine = np.linspace(widths.min(), widths.max(), 200)
    ax_mc.plot(fine, 1 - (1 - 2.0 ** -fine) ** depth, color="0.5", ls=":",
               label=f"one input dies: 1 - (1 - 2^-w)^{depth}")
    points = _paper_points(data, "born_dead_frac")
    label_ours, label_paper = "ours (Monte Carlo, mean ± std)", "published range"
    for r in points:
        width = next((w for w, _, runs in rows if runs[0].group == r.get("config_key")), None)
        if width is None:
            continue
        value = r.get("published_value")
        low, high = value if isinstance(value, list) else (value, value)
        ax_mc.plot([width, width], [low, high], color=RED, lw=6, alpha=0.35, solid_capstyle="butt",
                   label=label_paper)
        if r.get("mean") is not None:
            ax_mc.errorbar([width], [r["mean"]], yerr=[r.get("std") or 0.0], color="black", marker="o",
                           capsize=3, ls="none", label=label_ours)
        label_ours = label_paper = None  # type: ignore[assignment]
    ax_mc.set_xlabel("width (units per hidden layer)")
    ax_mc.set_ylabel("fraction of nets born dead")
    ax_mc.set_title(f"born dead at {depth} hidden layers, He init")
    ax_mc.set_xticks(widths, [f"{w:g}" for w in widths])
    ax_mc.grid(alpha=0.25)
    ax_mc.legend(frameon=False)
    colors = palette(len(rows))
    for (width, _, runs), color in zip(rows, colors, strict=True):
        profiles = []
        for run in runs:
            init = run.initial
            a = init[(init["kind"] == "activation") & init["layer"].str.startswith("hidden.")]
            if not a.empty:
                profiles.append(a.sort_values("layer_id")["dead_frac"].to_numpy(float))
        if profiles:
            n = min(len(p) for p in profiles)
            mean = np.mean([p[:n] for p in profiles], axis=0)
            ax_dead.plot(np.arange(1, n + 1), mean, color=color, marker="o", ms=3, label=f"width {width}")
    ax_dead.set_ylim(-0.03, 1.03)
    ax_dead.set_xlabel("hidden layer (1 = input side)")
    ax_dead.set_ylabel("dead units at step 0 (mean over seeds)")
    ax_dead.set_title("the watcher at initialisation (first batch)")
    ax_dead.grid(alpha=0.25)
    ax_dead.legend(frameon=False)
    return fig


# --- captions: what to see, with the lab's own numbers ----------------------------------------


def _row_mean(data: ReportData, metric: str, config_key: str) -> float:
    for r in _paper_points(data, metric):
        if r.get("config_key") == config_key and r.get("mean") is not None:
            return float(r["mean"])
    return math.nan


def ioffe_caption(data: ReportData) -> str:
    """Caption of :func:`ioffe_figure`, with the lab's steps-to-match ratio."""
    text = (
        "As the paper's Figure 1 (MNIST there, digits here): (a) test accuracy against training steps, "
        "mean over seeds; then, for each configuration, the 15th, 50th and 85th percentiles of the last "
        "hidden sigmoid's inputs over training (first seed) over the green band |x| ≤ 1.76, where the "
        "sigmoid's derivative is at least half its maximum. With batch normalisation the inputs start as "
        "N(0, 1) and their percentiles stay put; without it they move as the layers below them learn "
        "(the paper's internal covariate shift)."
    )
    ratio = _row_mean(data, "steps_to_match", "mnist-mlp/sigmoid-bn")
    if math.isfinite(ratio):
        text += (f" With BN the net reaches the no-BN net's best accuracy in {ratio:.2g} of the steps "
                 "the no-BN net needs (paper, ImageNet: 13.3e6 / 31.0e6 = 0.43).")
    return text


def resnet_caption(data: ReportData) -> str:
    """Caption of :func:`resnet_figure`, with the deepest plain net's delta ratio at initialisation."""
    text = (
        "Left and middle: the degradation problem. Plain stacks (red) end with a higher test error and "
        "training loss as they get deeper; residual stacks (blue, dashed) should not. Right: the first "
        "hidden layer's δ RMS over the last one's during training, first seed of each configuration; in "
        "the green band [0.1, 10] the gradient reaching the input neither vanishes nor explodes."
    )
    groups = _preset_runs(data, "resnet2016")
    plain_rows = _by_depth(groups, residual=False)
    if plain_rows:
        depth, runs = plain_rows[-1]
        inits = [r[0] for r in (_ratio_series(run)[1] for run in runs) if len(r) and math.isfinite(r[0])]
        if inits:
            g = math.exp(float(np.mean(np.log(inits))))
            word = "grows" if g > 1 else "shrinks"
            text += (f" In the {depth}-layer plain net the δ {word} toward the input: first/last ratio "
                     f"{g:.2g} at initialisation (geometric mean over seeds).")
            if g >= 0.1:
                text += " Its degradation is not vanishing gradients, as the paper argues;"
                text += (" nor are its norms healthy, though: batch normalisation itself makes a deep plain "
                         "net's gradients explode toward the input at initialisation (Yang et al. 2019)."
                         if g > 10 else ".")
    return text


def dying_relu_caption(data: ReportData) -> str:
    """Caption of :func:`dying_relu_figure`."""
    return (
        "Left: the fraction of He-initialised ReLU nets born dead (some hidden layer zero for every input, "
        "so the net is constant), our Monte Carlo with one-dimensional inputs beside the ranges published "
        "by Lu et al. (2019), and the exact probability that a single input dies, an upper bound. Right: "
        "what the watcher sees in the lab's short runs on digits at step 0: the share of dead units per "
        "hidden layer grows with depth and is largest in the narrowest nets."
    )
