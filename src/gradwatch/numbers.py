"""The derived numbers of a run, each defined once.

Everything that shows one of these numbers (the lab's ``lab.json``, :mod:`gradwatch.diagnose`,
the report, ``gradwatch show``) calls the function here, so one run has one value of each:

* :func:`delta_ratio` / :func:`delta_ratio_series`: the first over the last *weight
  layer's* delta RMS, the measured product of derivatives (docs/lab-contract.md);
* :func:`dead_fraction` / :func:`saturated_fraction`: the mean over activation layers of
  the fraction of dead units / of inputs in the flat tails, at one logged step;
  :func:`layer_medians` and :func:`layers_over` for the per-layer view diagnose judges;
* :func:`format_number`: how a number is written in tables, captions and messages.

The functions read the per-layer metrics table that :meth:`gradwatch.store.RunStore.metrics`
returns (columns ``step``, ``layer_id``, ``layer``, ``type``, ``kind`` and the metric columns).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = [
    "weight_layers",
    "is_norm_type",
    "is_normalization",
    "delta_table",
    "delta_ratios_of",
    "delta_ratio_series",
    "delta_ratio",
    "activation_fraction",
    "dead_fraction",
    "saturated_fraction",
    "layer_medians",
    "layers_over",
    "format_number",
]


# A layer type naming a normalisation layer: BatchNorm1d/2d, LayerNorm, GroupNorm, InstanceNorm, RMSNorm.
_NORM = "Norm"


def is_norm_type(type_name: str) -> bool:
    """Whether a layer type (the module's class name) is a normalisation layer.

    A normalisation layer rescales its input by statistics of the batch or the features; its
    delta is not one factor of the product of weight matrices and activation derivatives.
    """
    return _NORM in str(type_name)


def is_normalization(types: pd.Series) -> pd.Series:
    """:func:`is_norm_type` of each entry of a ``type`` column."""
    return types.astype(str).str.contains(_NORM, regex=False)


def weight_layers(metrics: pd.DataFrame) -> pd.DataFrame:
    """The rows of parameterised layers that are not normalisation layers: the weight layers
    (Linear, Conv, Embedding, attention projections, ... and the head), the depth axis.
    """
    if metrics.empty:
        return metrics
    return metrics[(metrics["kind"] == "param") & ~is_normalization(metrics["type"])]


def delta_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Step x weight layer (``layer_id``, forward order) table of ``delta_rms``.

    Only the steps and layers with at least one value; a cell is NaN where that layer has no
    delta at that step.
    """
    if metrics.empty or "delta_rms" not in metrics.columns:
        return pd.DataFrame()
    rows = weight_layers(metrics)
    rows = rows[rows["delta_rms"].notna()]
    if rows.empty:
        return pd.DataFrame()
    return rows.pivot_table(index="step", columns="layer_id", values="delta_rms", aggfunc="first")


def delta_ratios_of(deltas: pd.DataFrame) -> pd.Series:
    """:func:`delta_ratio_series` of a step x weight layer table of delta RMS (see :func:`delta_table`).

    ``deltas[first] / deltas[last]`` per step; NaN where either is missing, where the last
    layer receives no error signal (``<= 0``), and everywhere with fewer than two weight layers.
    """
    if deltas.shape[1] < 2:
        return pd.Series(np.nan, index=deltas.index, dtype="float64", name="delta_ratio")
    first = deltas.iloc[:, 0].astype("float64")
    last = deltas.iloc[:, -1].astype("float64")
    return (first / last.where(last > 0)).rename("delta_ratio")


def delta_ratio_series(metrics: pd.DataFrame) -> pd.Series:
    """First/last weight layer delta RMS at each logged step (index: step).

    With ``delta_l = sqrt(mean((dL/d output_l)^2))`` the RMS error signal at the output of
    weight layer ``l`` (forward order ``1..L`` over parameterised layers that are not
    normalisation layers, the head included)::

        ratio(step) = delta_1 / delta_L

    Backpropagation makes ``delta_1`` the product of one weight matrix and one activation
    derivative per layer above it times ``delta_L``, so the ratio is the measured product
    of derivatives: ``<< 1`` vanishing, ``>> 1`` exploding. Normalisation layers
    (BatchNorm, LayerNorm, ...) are not counted: their delta is a rescaled copy of the
    weight layer's next to them, not one more factor. NaN where the ratio is undefined
    (see :func:`delta_ratios_of`).
    """
    return delta_ratios_of(delta_table(metrics))


def delta_ratio(metrics: pd.DataFrame, step: int | None = None) -> float:
    """:func:`delta_ratio_series` at ``step`` (default: the first logged step, initialisation).

    This is the ``delta_ratio`` of ``lab.json``, of the report's tables and of
    ``gradwatch show``. NaN when the run has no such step or no ratio there.
    """
    series = delta_ratio_series(metrics)
    if series.empty:
        return math.nan
    if step is None:
        return float(series.iloc[0])
    return float(series.loc[step]) if step in series.index else math.nan


def _at_step(metrics: pd.DataFrame, column: str, step: int | str | None) -> pd.Series:
    """``column`` of the activation layers with a value, at ``step`` ("first", "last" or a step)."""
    if metrics.empty or column not in metrics.columns:
        return pd.Series(dtype="float64")
    rows = metrics[(metrics["kind"] == "activation") & metrics[column].notna()]
    if rows.empty:
        return pd.Series(dtype="float64")
    if step is None or step == "last":
        step = rows["step"].max()
    elif step == "first":
        step = rows["step"].min()
    return rows.loc[rows["step"] == step, column].astype("float64")


def activation_fraction(metrics: pd.DataFrame, column: str, step: int | str | None = "last") -> float:
    """Mean of an activation statistic (``dead_frac``, ``saturated_frac``, ``green_frac``)
    over the activation layers that have it, at ``step`` ("last", "first" or a step number).

    NaN where no activation layer has a value at that step (``saturated_frac`` is NaN by
    design for activations without flat tails, ReLU and LeakyReLU).
    """
    values = _at_step(metrics, column, step)
    return float(values.mean()) if len(values) else math.nan


def dead_fraction(metrics: pd.DataFrame, step: int | str | None = "last") -> float:
    """Mean dead-unit fraction over the activation layers at ``step`` (default the last logged step).

    A unit of an activation layer is dead on a batch when its derivative ``phi'`` is zero for
    every example; ``dead_frac`` is the fraction of such units, and this is its mean over
    layers: ``mean_l dead_frac_l(step)``.
    """
    return activation_fraction(metrics, "dead_frac", step)


def saturated_fraction(metrics: pd.DataFrame, step: int | str | None = "last") -> float:
    """Mean saturated fraction over the saturating activation layers at ``step`` (default last).

    ``saturated_frac`` is the fraction of inputs where ``phi' < 0.1 max phi'`` (the flat tails
    of sigmoid or tanh); ``mean_l saturated_frac_l(step)`` over the layers where it applies.
    """
    return activation_fraction(metrics, "saturated_frac", step)


def layer_medians(table: pd.DataFrame) -> pd.Series:
    """Per-layer median over logged steps of a step x layer table (NaN cells skipped)."""
    return table.median()


def layers_over(table: pd.DataFrame, threshold: float) -> tuple[pd.Series, list]:
    """``(medians, layers)``: each layer's median over steps and the layers whose median is
    above ``threshold`` (the rule diagnose applies to dead and saturated fractions).
    """
    medians = layer_medians(table)
    return medians, [lid for lid in medians.index if medians[lid] > threshold]


def format_number(value: float | None, digits: int = 3, *, plain: Sequence[float] = (1e-3, 1e4),
                  fixed: bool = False, sci_digits: int | None = None, general: bool = False,
                  missing: str = "-") -> str:
    """A number as tables, captions and messages write it.

    * ``None`` or NaN: ``missing``; infinities: ``"inf"`` / ``"-inf"``;
    * 0, or ``plain[0] <= |value| < plain[1]``: plain notation with ``digits`` significant
      digits (``f"{value:.{digits}g}"``), or with ``fixed=True`` ``digits`` decimals without
      trailing zeros (``0.25``, ``12.5``);
    * otherwise scientific with ``sci_digits`` significant digits (default ``digits``):
      ``f"{value:.{sci_digits - 1}e}"``, e.g. ``"3.1e-05"``; with ``general=True`` Python's
      general format ``f"{value:.{sci_digits}g}"`` (``"0.004"``, ``"1e-05"``, ``"1.2e+04"``).

    Args:
        value: the number.
        digits: significant digits (decimals with ``fixed``) in plain notation.
        plain: the magnitudes ``[low, high)`` written in plain notation.
        fixed: decimals instead of significant digits in plain notation.
        sci_digits: significant digits in scientific notation. Default: ``digits``.
        general: outside ``plain``, the general format rather than always scientific.
        missing: the text for ``None`` and NaN.
    """
    if value is None:
        return missing
    value = float(value)
    if math.isnan(value):
        return missing
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0 or plain[0] <= abs(value) < plain[1]:
        if not fixed:
            return f"{value:.{digits}g}"
        if value == 0:
            return "0"
        text = f"{value:.{digits}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    sci = digits if sci_digits is None else sci_digits
    return f"{value:.{sci}g}" if general else f"{value:.{sci - 1}e}"
