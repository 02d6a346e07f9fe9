"""The report of a paper preset: our numbers beside the published ones, and its figures.

A lab run of a paper preset (:mod:`gradwatch.lab.papers`) writes, in ``lab.json``,
``paper.citation`` and ``paper.table``: one row per published number with our mean ±
std over seeds (:meth:`gradwatch.lab.presets.PaperRow.to_dict`). :func:`paper_html`
renders that as the report's "Beside the paper" section; the claims' verdicts are the
report's "What the lab checked" table. The table comes from ``lab.json``: the report
never re-runs a preset's metrics.

Figures (each from the runs the report loaded; :class:`NothingToPlot` for other runs):

* :func:`glorot_variance_figure`: Glorot & Bengio (2010), Figures 7-8 as numbers: the
  variance of the back-propagated gradient and of the weight gradient per hidden layer
  at initialisation, standard vs normalised init;
* :func:`he_signal_figure`: He et al. (2015): the forward signal's RMS per hidden layer at
  initialisation against 2^(-(l-1)/2), Xavier vs He, and test accuracy against epochs.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gradwatch.errors import GradwatchError
from gradwatch.report._plot import RED, new_figure, palette, plain, styled
from gradwatch.report.data import NothingToPlot, ReportData, RunData

__all__ = [
    "paper_rows",
    "paper_html",
    "glorot_variance_figure",
    "glorot_variance_caption",
    "he_signal_figure",
    "he_signal_caption",
]

_HEAD = ("metric", "our configuration", "ours: mean ± std", "seeds", "paper's row", "published",
         "source")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def paper_rows(lab: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The rows of ``lab.json``'s ``paper.table`` (dicts), or none for a lab without a paper."""
    paper = lab.get("paper") if isinstance(lab, Mapping) else None
    table = paper.get("table") if isinstance(paper, Mapping) else None
    return [row for row in table if isinstance(row, Mapping)] if isinstance(table, list) else []


def paper_html(lab: Mapping[str, Any] | None) -> str:
    """The "Beside the paper" section (escaped HTML), or "" when the lab has no paper table."""
    rows = paper_rows(lab)
    paper = lab.get("paper") if isinstance(lab, Mapping) else None
    citation = str(paper.get("citation", "")) if isinstance(paper, Mapping) else ""
    if not rows:
        return ""
    body = []
    for row in rows:
        ours = row.get("ours", "-")
        cells = [
            (_e(row.get("metric", "")), False),
            (_e(row.get("label") or "(reference only)"), False),
            (_e(ours), True),
            (_e(row.get("n", 0)), True),
            (_e(row.get("published_label", "")), False),
            (_e(row.get("published", "")), True),
            (_e(row.get("source", "")), False),
        ]
        body.append("<tr>" + "".join(f"<td class='num'>{c}</td>" if num else f"<td>{c}</td>"
                                     for c, num in cells) + "</tr>")
    head = "".join(f"<th scope='col'>{h}</th>" for h in _HEAD)
    lead = (f"<p>{_e(citation)}</p>" if citation else "") + (
        "<p class='note'>Our mean ± sample standard deviation over seeds beside the number the paper "
        "published. Our runs are scaled down to a few minutes on two cores (the preset's description "
        "says how), so expect the ordering, not the values, to match; the claims below say which "
        "orderings held.</p>"
    )
    return (f"<section id='paper'><h2>Beside the paper</h2>{lead}<div class='table-wrap'><table>"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div></section>")


# --- figures ----------------------------------------------------------------------------------

_BLUE = "#1f77b4"
_INIT_NAMES = {"standard": "standard", "xavier": "normalised"}


def _plain_mlp(run: RunData) -> bool:
    m = run.model
    return m.get("kind", "mlp") == "mlp" and not m.get("batch_norm") and not m.get("residual")


def _geomean(profiles: list[np.ndarray]) -> np.ndarray:
    """Geometric mean over seeds of equal-length positive profiles."""
    return np.exp(np.mean(np.log(np.stack(profiles)), axis=0))


Profiles = dict[str, list[tuple[np.ndarray, np.ndarray]]]


def glorot_variances(data: ReportData) -> dict[tuple[str, str], Profiles]:
    """(data set, activation) -> init -> per seed (back-propagated, weight-gradient) variance
    per hidden layer at initialisation, each relative to the last hidden layer's.

    Only plain tanh/softsign MLPs with the standard and the xavier (normalised) init, and
    only pairs that have both inits.
    """
    from gradwatch.lab.models import ModelConfig
    from gradwatch.lab.papers.glorot2010 import gradient_variances

    found: dict[tuple[str, str], Profiles] = {}
    for run in data.runs:
        m = run.model
        wanted = m.get("init") in _INIT_NAMES and m.get("activation") in ("tanh", "softsign")
        if not (_plain_mlp(run) and wanted):
            continue
        dataset = str(run.config.get("dataset", ""))
        try:
            delta, weight = gradient_variances(run.initial, ModelConfig.from_dict(m), dataset)
        except (ValueError, KeyError, TypeError, GradwatchError):
            continue  # not enough recorded to say
        if not (np.all(delta > 0) and np.all(weight > 0)):
            continue
        found.setdefault((dataset, m["activation"]), {}).setdefault(m["init"], []).append(
            (delta / delta[-1], weight / weight[-1]))
    return {k: v for k, v in found.items() if set(v) == set(_INIT_NAMES)}


@styled
def glorot_variance_figure(data: ReportData) -> Figure:
    """Per hidden layer at initialisation (input at the left), relative to the last hidden
    layer, geometric mean over seeds: the back-propagated gradient's variance (left) and the
    weight gradient's (right), standard init (red) vs normalised (blue), tanh solid and
    softsign dashed, one row per data set; dotted, the standard init's theory
    ``(1/3)^(L - l)`` (Glorot & Bengio 2010, eq. 13-14).

    Raises:
        NothingToPlot: no tanh/softsign MLP pair with both inits (the glorot2010 preset).
    """
    groups = glorot_variances(data)
    if not groups:
        raise NothingToPlot("needs plain tanh or softsign MLPs with both the standard and the xavier "
                            "(normalised) init (the glorot2010 lab preset)")
    datasets = sorted({ds for ds, _ in groups})
    fig = new_figure(10, 3.2 * len(datasets))
    axes = fig.subplots(len(datasets), 2, squeeze=False, sharey="row")  # same scale: compare slopes
    for row, ds in enumerate(datasets):
        for col, title in enumerate(("back-propagated gradient Var[dC/ds]", "weight gradient Var[dC/dW]")):
            ax = axes[row, col]
            depth = 0
            for (d, act), by_init in groups.items():
                if d != ds:
                    continue
                for init, seeds in by_init.items():
                    profile = _geomean([p[col] for p in seeds])
                    depth = len(profile)
                    ax.plot(np.arange(1, depth + 1), profile, marker="o", ms=3,
                            color=RED if init == "standard" else _BLUE, ls="-" if act == "tanh" else "--",
                            label=f"{act}, {_INIT_NAMES[init]} init")
            if col == 0 and depth:
                layers = np.arange(1, depth + 1)
                ax.plot(layers, (1 / 3) ** (depth - layers), ":", color="grey", label="(1/3) per layer")
            ax.set_yscale("log")
            ax.set_xticks(np.arange(1, depth + 1))
            ax.set_xlabel("hidden layer (1 = input side)")
            if col == 0:
                ax.set_ylabel("variance / last hidden layer's")
            ax.set_title(f"{plain(ds)}: {title}")
            ax.legend(loc="best")
    return fig


def glorot_variance_caption(data: ReportData) -> str:
    """What to see in :func:`glorot_variance_figure`, with the first data set's tanh numbers."""
    from gradwatch.lab.papers.glorot2010 import per_layer_factor

    text = ("Glorot & Bengio's Figures 7-8 as numbers, at initialisation: with the standard init "
            "U[-1/sqrt(n), 1/sqrt(n)] each layer multiplies the back-propagated gradient's variance by "
            "n Var(W) = 1/3, so it shrinks toward the input (dotted line); the normalised init keeps "
            "n Var(W) = 1. The weight gradient's variance, the product of the forward and backward "
            "variances, stays nearly level with both (eq. 15); the first layer, fed by the standardised "
            "data instead of an activation, can stand apart.")
    parts = []
    for (ds, act), by_init in glorot_variances(data).items():
        if act != "tanh":
            continue
        factors = {init: per_layer_factor(_geomean([p[0] for p in seeds])) for init, seeds in by_init.items()}
        parts.append(f"{ds}: back-propagated variance per layer toward the input x{factors['standard']:.2f} "
                     f"(standard) vs x{factors['xavier']:.2f} (normalised)")
    return text + (" Measured for tanh: " + "; ".join(parts) + "." if parts else "")


def _rms_profile(run: RunData) -> np.ndarray | None:
    """RMS of each hidden Linear layer's output at initialisation, over the first one's."""
    m = run.initial
    m = m[(m["kind"] == "param") & m["layer"].str.startswith("hidden.")].sort_values("layer_id")
    if len(m) < 2 or "output_std" not in m:
        return None
    rms = np.sqrt(m["output_mean"].to_numpy(float) ** 2 + m["output_std"].to_numpy(float) ** 2)
    return rms / rms[0] if rms[0] > 0 and np.all(np.isfinite(rms)) else None


def _he_groups(data: ReportData) -> dict[tuple[int, str], list[RunData]]:
    groups: dict[tuple[int, str], list[RunData]] = {}
    for run in data.runs:
        m = run.model
        if _plain_mlp(run) and m.get("activation") == "relu" and m.get("init") in ("xavier", "he"):
            groups.setdefault((int(m["depth"]), str(m["init"])), []).append(run)
    inits = {init for _, init in groups}
    if inits != {"xavier", "he"}:
        raise NothingToPlot("needs plain ReLU MLPs with both the xavier and the he init "
                            "(the he2015 lab preset)")
    return dict(sorted(groups.items()))


@styled
def he_signal_figure(data: ReportData) -> Figure:
    """Left: the RMS of each hidden layer's pre-activation at initialisation relative to the
    first hidden layer's (log2 axis, geometric mean over seeds), Xavier dashed and He solid,
    with He et al.'s 2^(-(l-1)/2) for Xavier (dotted). Right: test accuracy against epochs,
    mean over seeds.

    Raises:
        NothingToPlot: no pair of ReLU MLPs with Xavier and He init (the he2015 preset).
    """
    groups = _he_groups(data)
    depths = sorted({d for d, _ in groups})
    colors = dict(zip(depths, palette(len(depths)), strict=True))
    fig = new_figure(10, 3.6)
    left, right = fig.subplots(1, 2)
    for (depth, init), runs in groups.items():
        style = "--" if init == "xavier" else "-"
        label = f"{'Xavier' if init == 'xavier' else 'He'}, {depth} layers"
        profiles = [p for p in map(_rms_profile, runs) if p is not None]
        if profiles and len({len(p) for p in profiles}) == 1:
            profile = _geomean(profiles)
            left.plot(np.arange(1, len(profile) + 1), profile, style, color=colors[depth], label=label)
        curves = []
        for run in runs:
            s = run.scalars.dropna(subset=["test_acc"]) if "test_acc" in run.scalars else None
            if s is not None and len(s):
                curves.append(s["test_acc"].to_numpy(float))
        if curves:
            n = min(len(c) for c in curves)
            right.plot(np.arange(1, n + 1), np.mean([c[:n] for c in curves], axis=0), style,
                       color=colors[depth], marker="o" if n <= 30 else None, ms=3, label=label)
    for depth in depths:
        layers = np.arange(1, depth + 1)
        left.plot(layers, 2.0 ** (-(layers - 1) / 2), ":", color=colors[depth], lw=1)
    left.plot([], [], ":", color="grey", label="2^(-(l-1)/2)")
    left.set_yscale("log", base=2)
    left.set_xlabel("hidden layer l")
    left.set_ylabel("RMS of the layer's output / layer 1's")
    left.set_title("forward signal at initialisation")
    left.legend(loc="lower left")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("epoch")
    right.set_ylabel("test accuracy")
    right.set_ylim(0, 1)
    right.set_title("training")
    right.legend(loc="best")
    return fig


def he_signal_caption(data: ReportData) -> str:
    """What to see in :func:`he_signal_figure`, with the deepest Xavier net's measured ratio."""
    text = ("He et al. (2015): with Xavier's Var(W) = 1/n each ReLU layer halves the signal's second "
            "moment, so its RMS falls by 2^(-1/2) per layer (dotted lines); He init, Var(W) = 2/n, keeps it "
            "level. Right: whether the nets train.")
    groups = _he_groups(data)
    deepest = max(d for d, init in groups if init == "xavier")
    profiles = [p for p in map(_rms_profile, groups[(deepest, "xavier")]) if p is not None]
    if profiles:
        ratio = float(_geomean([p[-1:] for p in profiles])[0])
        text += (f" Measured at {deepest} layers with Xavier: last/first {ratio:.2g} = "
                 f"2^{math.log2(ratio):.1f} against 2^{-(deepest - 1) / 2:.1f}.")
    return text
