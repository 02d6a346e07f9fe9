"""Figures that compare and judge: fixes side by side, findings, theory beside measurement.

7. :func:`fixes_figure`: test accuracy and first/last delta ratio per configuration.
8. :func:`findings_figure`: the stored findings (``gradwatch.diagnose``) on a step axis.
9. :func:`theory_figure`: mean-field theory's per-layer delta profile beside the
   measured one, when :mod:`gradwatch.theory` provides ``predicted_delta_profile``.
"""

from __future__ import annotations

import importlib
import math
import warnings
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from gradwatch.activations import get_activation
from gradwatch.report._plot import (
    RED,
    group_colors,
    legends,
    log_mean,
    new_figure,
    parts,
    plain,
    rows_height,
    styled,
    whole_numbers,
)
from gradwatch.report.data import NothingToPlot, ReportData, RunData

__all__ = [
    "findings_figure",
    "fix_rows",
    "fixes_figure",
    "init_variances",
    "theory_figure",
    "theory_module",
]

FINDINGS_MAX = 60
_SEVERITY_COLORS = {"critical": RED, "error": RED, "high": RED, "warning": "#ff7f0e", "medium": "#ff7f0e"}
_INFO_COLOR = "#1f77b4"


# --- 7. fixes side by side -------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values))


def fix_rows(data: ReportData) -> pd.DataFrame:
    """One row per configuration: label, section, n (seeds), test_acc_mean/std, delta_ratio_mean/std.

    From ``lab.json``'s configs for a lab; otherwise from the runs, grouped by their
    ``lab.config_key`` (each run its own group when it has none).
    """
    columns = [
        "config_key",
        "label",
        "section",
        "n",
        "test_acc_mean",
        "test_acc_std",
        "delta_ratio_mean",
        "delta_ratio_std",
    ]
    if data.lab is not None:
        rows = [
            {
                "config_key": str(c.get("config_key", "")),
                "label": str(c.get("label") or c.get("config_key", "")),
                "section": str(c.get("section", "")),
                "n": len(c.get("run_ids", [])),
                **{k: float(c[k]) if isinstance(c.get(k), (int, float)) else math.nan for k in columns[4:]},
            }
            for c in data.lab.get("configs", [])
            if isinstance(c, dict)
        ]
        return pd.DataFrame(rows, columns=columns)
    rows = []
    for key, runs in data.groups.items():
        acc = _mean_std([r.final("test_acc") for r in runs])
        ratio = _mean_std([r.delta_ratio for r in runs])
        rows.append(
            {
                "config_key": key,
                "label": runs[0].label,
                "section": str(runs[0].lab.get("section", "")),
                "n": len(runs),
                "test_acc_mean": acc[0],
                "test_acc_std": acc[1],
                "delta_ratio_mean": ratio[0],
                "delta_ratio_std": ratio[1],
            }
        )
    return pd.DataFrame(rows, columns=columns)


@styled
def fixes_figure(data: ReportData) -> Figure:
    """Figure 7: test accuracy and first/last delta ratio per configuration, mean +- std over seeds."""
    rows = fix_rows(data)
    rows = rows[rows["test_acc_mean"].notna() | rows["delta_ratio_mean"].notna()].reset_index(drop=True)
    if len(rows) < 2:
        raise NothingToPlot("fewer than two configurations with a test accuracy or a delta ratio to compare")
    colors = group_colors(data)
    fallback = dict(zip(rows["config_key"], [_INFO_COLOR] * len(rows), strict=True))
    color = [colors.get(k, fallback[k]) for k in rows["config_key"]]
    fig = new_figure(11, 1.2 + 0.32 * len(rows))
    ax_acc, ax_ratio = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(rows))
    labels = [
        plain(f"[{s}] {lab}" if s else lab, 44) for s, lab in zip(rows["section"], rows["label"], strict=True)
    ]
    ax_acc.barh(
        y,
        rows["test_acc_mean"].fillna(0),
        xerr=rows["test_acc_std"].fillna(0),
        color=color,
        alpha=0.85,
        error_kw={"elinewidth": 1, "capsize": 2},
    )
    ax_acc.set_yticks(y, labels)
    ax_acc.invert_yaxis()
    ax_acc.set_xlim(0, 1)
    ax_acc.set_xlabel("test accuracy (mean ± std over seeds)")
    mean, std = rows["delta_ratio_mean"].to_numpy(float), rows["delta_ratio_std"].fillna(0).to_numpy(float)
    ok = mean > 0
    low = np.minimum(std, mean * 0.99)
    ax_ratio.errorbar(mean[ok], y[ok], xerr=[low[ok], std[ok]], fmt="none", ecolor="0.4", capsize=2)
    ax_ratio.scatter(mean[ok], y[ok], c=[color[i] for i in np.flatnonzero(ok)], zorder=3)
    ax_ratio.axvline(1.0, color="0.3", lw=1, ls="--")
    ax_ratio.set_xscale("log")
    ax_ratio.set_xlabel("first/last layer δ ratio at initialisation (1 = no vanishing)")
    for ax in (ax_acc, ax_ratio):
        ax.grid(alpha=0.25, axis="x")
    return fig


# --- 8. findings ---------------------------------------------------------------------------


def _finding_span(run: RunData, finding: Any) -> tuple[float, float]:
    lo = float(run.initial["step"].min()) if len(run.initial) else 0.0
    hi = run.last_step if run.last_step > lo else lo + 1.0
    first = finding.first_step if pd.notna(finding.first_step) else lo
    last = finding.last_step if pd.notna(finding.last_step) else hi
    return float(first), max(float(last) - float(first), (hi - lo) * 0.005 or 0.5)


@styled
def findings_figure(data: ReportData) -> Figure:
    """Figure 8: each stored finding as a bar over the steps it covers, colored by severity.

    Findings of severity ``info`` (e.g. "not enough data") are drawn only when a run set
    has nothing worse; the page lists every finding under the figure.
    """
    items = [(run, f) for run in data.runs for f in run.findings.itertuples()]
    if not items:
        raise NothingToPlot("no findings are stored for these runs; run gradwatch.diagnose on them first")
    problems = [(run, f) for run, f in items if str(f.severity).lower() in _SEVERITY_COLORS]
    items = (problems or items)[:FINDINGS_MAX]  # information only where there is nothing worse
    fig = new_figure(11, 1.0 + 0.3 * len(items))
    ax = fig.subplots()
    for i, (run, f) in enumerate(items):
        start, width = _finding_span(run, f)
        color = _SEVERITY_COLORS.get(str(f.severity).lower(), _INFO_COLOR)
        ax.broken_barh([(start, width)], (i - 0.35, 0.7), color=color, alpha=0.8)
        ax.text(start, i, f" {plain(f.kind, 30)} ({plain(f.severity, 12)})", va="center", fontsize=8)
    ax.set_yticks(range(len(items)), [f"run {run.id}: {plain(run.label, 40)}" for run, _ in items])
    ax.invert_yaxis()
    ax.set_xlabel("step")
    ax.grid(alpha=0.25, axis="x")
    return fig


# --- 9. theory beside measurement --------------------------------------------------------------


def theory_module() -> ModuleType | None:
    """:mod:`gradwatch.theory` if it is importable and has ``predicted_delta_profile``, else None."""
    try:
        theory = importlib.import_module("gradwatch.theory")
    except ImportError:
        return None
    return theory if callable(getattr(theory, "predicted_delta_profile", None)) else None


def init_variances(model: dict[str, Any]) -> tuple[float, float] | None:
    """``(sigma_w2, sigma_b2)`` of a lab model config whose init mean-field theory covers, else None.

    Covered: plain MLP stacks (no batch norm, no residual) with ``scaled`` (the config's
    sigma_w2, sigma_b2), ``xavier`` (1, 0 for equal widths), ``standard`` (1/3, 0),
    ``default`` (1/3, 1/(3 width)) and ``he`` (gain^2, 0) initialisations.
    """
    if model.get("kind", "mlp") != "mlp" or model.get("batch_norm") or model.get("residual"):
        return None
    init = model.get("init")
    if init == "scaled":
        return float(model.get("sigma_w2", 1.0)), float(model.get("sigma_b2", 0.0))
    if init == "xavier":
        return 1.0, 0.0
    if init == "standard":
        return 1.0 / 3.0, 0.0
    if init == "default" and model.get("width"):
        return 1.0 / 3.0, 1.0 / (3.0 * float(model["width"]))
    if init == "he":
        try:
            from gradwatch.lab.models import activation_gain
        except ImportError:
            return None
        return activation_gain(_activation(model)) ** 2, 0.0
    return None


def _activation(model: dict[str, Any]):
    params = model.get("activation_params") or {}
    return get_activation(str(model.get("activation")), **dict(params))


def _theory_lines(
    groups: dict[str, list[RunData]], theory: ModuleType
) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(group, legend label, measured, predicted), both relative to the last hidden layer."""
    lines = []
    for key, runs in groups.items():
        model = runs[0].model
        variances = init_variances(model)
        depth = model.get("depth")
        if variances is None or not depth:
            continue
        measured = [
            p["delta_rms"].to_numpy(float)[: int(depth)]
            for p in (r.initial_profile for r in runs)
            if len(p) > int(depth)
        ]
        if not measured:
            continue
        act = _activation(model)
        try:
            raw = theory.predicted_delta_profile(act, *variances, int(depth))
            predicted = np.asarray(raw, float).ravel()
        except Exception as err:  # noqa: BLE001 - the theory module is another team's; report, go on
            warnings.warn(f"theory gave no profile for {key!r}: {err}", RuntimeWarning, stacklevel=2)
            continue
        mean = log_mean(measured)[0]
        n = min(len(mean), len(predicted))
        label = f"{runs[0].label} (σw²={variances[0]:.3g}, σb²={variances[1]:.3g})"
        lines.append((key, label, mean[-n:] / mean[-1], predicted[-n:] / predicted[-1]))
    return lines


@styled
def theory_figure(data: ReportData) -> Figure:
    """Figure 9: predicted (mean-field) and measured delta RMS per hidden layer at initialisation.

    Both are divided by their value at the last hidden layer, so the lines show the
    decay (or growth) towards the input that theory predicts and the network showed.
    One row per lab section when there are many configurations.
    """
    theory = theory_module()
    if theory is None:
        raise NothingToPlot("gradwatch.theory with predicted_delta_profile is not available")
    rows = [(section, lines) for section, groups in parts(data) if (lines := _theory_lines(groups, theory))]
    if not rows:
        raise NothingToPlot(
            "no configuration has an initialisation the theory covers (scaled, xavier, standard, "
            "default or he, in a plain MLP without batch norm or residual connections)"
        )
    colors = group_colors(data)
    fig = new_figure(11, rows_height(len(rows)))
    axes = fig.subplots(len(rows), 1, squeeze=False)
    for (section, lines), (ax,) in zip(rows, axes, strict=True):
        for key, label, measured, predicted in lines:
            layers = np.arange(1, len(measured) + 1)
            ax.plot(layers, predicted, ls="--", color=colors[key])
            ax.plot(layers, measured, ls="none", marker="o", ms=4, color=colors[key], label=plain(label, 60))
        ax.plot([], [], ls="--", color="0.3", label="theory (dashed)")
        ax.set_yscale("log")
        ax.set_ylabel("δ RMS / δ RMS last")
        ax.set_title(
            (f"{plain(section)}: " if section else "") + "mean-field prediction (dashed) and "
            "measurement (dots) at initialisation"
        )
        ax.grid(alpha=0.25)
        whole_numbers(ax.xaxis)
    axes[-1, 0].set_xlabel("hidden layer (1 = next to the input)")
    legends(fig, axes, [len(lines) + 1 for _, lines in rows])
    return fig
