"""Diagnosis: what is wrong with a run's gradient flow, with the numbers that show it.

:func:`diagnose` reads a run's per-layer metrics and scalars (from the store, a
live :class:`~gradwatch.watch.Watcher`, or a DataFrame) and returns
:class:`Finding` objects: vanishing or exploding gradients, saturated
activations, dead units, a loss plateau, non-finite values, updates too small or
too large for the weights, or "not enough data". Each finding carries its steps,
layers, evidence and an explanation in the seeds' terms: backpropagation is a
product of one derivative per layer, the sigmoid's derivative is at most 0.25,
and batch normalisation keeps inputs in the green region where it is not small.

The central quantity is the **delta ratio**: the RMS of ``dL/d(output)`` at the
first parameterised layer divided by that at the last, per logged step. It is
the measured product of derivatives (and weights) between them; 1 is healthy.

Every threshold lives in :class:`Thresholds`; the defaults were chosen from
measurements on grids of MLPs (docs/diagnosis.md has the numbers).
:func:`live_check` is the same judgement on one step, for warnings during training.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from gradwatch.errors import ConfigError
from gradwatch.numbers import delta_ratios_of, delta_table, format_number, layers_over
from gradwatch.store import RunStore
from gradwatch.thresholds import Thresholds, live_alert

__all__ = [
    "KINDS",
    "Thresholds",
    "Prescription",
    "Finding",
    "diagnose",
    "delta_ratios",
    "live_check",
]

KINDS = {
    "nonfinite": "non-finite values",
    "exploding_gradients": "exploding gradients",
    "vanishing_gradients": "vanishing gradients",
    "dead_units": "dead units",
    "saturated_activations": "saturated activations",
    "loss_plateau": "loss plateau",
    "updates_too_small": "updates too small",
    "updates_too_large": "updates too large",
    "not_enough_data": "not enough data",
}
_SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}


@dataclass(frozen=True)
class Prescription:
    """One fix, ranked; measured when it comes from :func:`gradwatch.prescribe`.

    Attributes:
        name: short id, e.g. ``"relu_he"``, ``"batch_norm"``, ``"clip_grad_norm"``.
        description: what the change does, in one line.
        rank: 1 for the best; 0 when not ranked (not applicable or not measured).
        rationale: why it should help, in the seeds' terms.
        verified: True when a what-if trial measured it on this model.
        applicable: False when the change cannot apply to this model (see ``reason``).
        reason: why it is not applicable, or what the trial showed.
        measurements: the trial's numbers (``loss``, ``delta_ratio``, ...), empty if unverified.
    """

    name: str
    description: str
    rank: int = 0
    rationale: str = ""
    verified: bool = False
    applicable: bool = True
    reason: str = ""
    measurements: dict[str, float | int | str | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict."""
        return asdict(self)


@dataclass(frozen=True)
class Finding:
    """One problem found in a run, with the numbers that show it.

    Attributes:
        kind: one of :data:`KINDS` (``"vanishing_gradients"``, ``"dead_units"``, ...).
        severity: ``"critical"``, ``"warning"`` or ``"info"``.
        first_step: first step showing the problem (None when not tied to steps).
        last_step: last step showing it.
        layers: the layers involved, in forward order (or the origin layer first for
            non-finite values).
        evidence: the measured numbers, by name.
        explanation: what is happening and why, in plain language.
        prescriptions: ranked fixes (unverified guidance from :func:`diagnose`,
            measured ones from :func:`gradwatch.prescribe`).
    """

    kind: str
    severity: str
    first_step: int | None
    last_step: int | None
    layers: tuple[str, ...]
    evidence: dict[str, float | int | str | None]
    explanation: str
    prescriptions: tuple[Prescription, ...] = ()

    @property
    def title(self) -> str:
        """Human name of the kind, e.g. ``"vanishing gradients"``."""
        return KINDS.get(self.kind, self.kind)

    @property
    def steps(self) -> tuple[int | None, int | None]:
        """``(first_step, last_step)``."""
        return self.first_step, self.last_step

    def to_dict(self) -> dict[str, Any]:
        """The dict :meth:`RunStore.add_findings` stores."""
        out = asdict(self)
        out["layers"] = list(self.layers)
        out["prescriptions"] = [p.to_dict() for p in self.prescriptions]
        return out

    def with_prescriptions(self, prescriptions: list[Prescription] | tuple[Prescription, ...]) -> Finding:
        """A copy with other prescriptions (e.g. the measured ones)."""
        return Finding(**{**{f.name: getattr(self, f.name) for f in fields(self)},
                          "prescriptions": tuple(prescriptions)})


# --- reading the run ---------------------------------------------------------------------


@runtime_checkable
class WatchedRun(Protocol):
    """What :func:`diagnose` reads of a :class:`gradwatch.Watcher` (or of anything recording like one).

    Its run lives in :attr:`store` under :attr:`run_id`; while :attr:`attached`,
    :meth:`flush` writes what is still queued.
    """

    run_id: int
    store: RunStore

    @property
    def attached(self) -> bool: ...  # noqa: D102

    def flush(self) -> None: ...  # noqa: D102


def _load(run: Any, store: RunStore | str | None, scalars: pd.DataFrame | None):
    """(metrics, scalars, store or None, run id or None, whether diagnose opened the store)."""
    if isinstance(run, pd.DataFrame):
        missing = [c for c in ("step", "layer_id", "layer", "kind", "delta_rms") if c not in run.columns]
        if missing:
            raise ConfigError(
                f"diagnose() got a DataFrame without column(s) {', '.join(missing)}; expected the "
                f"per-layer metrics of RunStore.metrics(run_id) or Watcher.metrics()"
            )
        return run, scalars, None, None, False
    if isinstance(run, WatchedRun):
        if run.attached:
            run.flush()
        st, opened = run.store, False
        if st.closed:  # the watcher owned its store and closed it on detach
            st, opened = RunStore(st.path, create=False), True
        return st.metrics(run.run_id), st.scalars(run.run_id), st, run.run_id, opened
    if isinstance(run, bool) or not isinstance(run, (int, str, np.integer)):
        raise ConfigError(
            f"diagnose() got {type(run).__name__}; expected a run id or name, a Watcher, or a "
            f"metrics DataFrame"
        )
    opened = not isinstance(store, RunStore)
    st = store if isinstance(store, RunStore) else RunStore(store, create=False)
    try:
        run_id = st.resolve(int(run) if isinstance(run, np.integer) else run)
        return st.metrics(run_id), st.scalars(run_id), st, run_id, opened
    except BaseException:
        if opened:
            st.close()
        raise


def delta_ratios(metrics: pd.DataFrame) -> pd.Series:
    """First/last weight layer delta RMS per logged step (the product of derivatives).

    ``delta_rms`` is ``sqrt(mean((dL/d output)^2))``; the ratio compares the first weight
    layer (parameterised, not a normalisation layer; forward order) with the last:
    :func:`gradwatch.numbers.delta_ratio_series`, the one definition. NaN where either is
    missing.
    """
    return delta_ratios_of(_delta_table(metrics))


def _delta_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Step x weight layer table of ``delta_rms`` (steps and layers with a value)."""
    return delta_table(metrics)


def _names(metrics: pd.DataFrame) -> dict[int, str]:
    return dict(zip(metrics["layer_id"].tolist(), metrics["layer"].tolist(), strict=True))


def _pivot(metrics: pd.DataFrame, kind: str, column: str, *, dropna: bool = False,
           steps: Any = None, kinds: np.ndarray | None = None) -> pd.DataFrame:
    """Step x layer_id table of ``column`` over the rows of ``kind`` (empty when it has no value).

    It is ``rows.pivot_table(index="step", columns="layer_id", values=column,
    aggfunc="first", dropna=dropna)``: each cell holds the first non-NaN value of its
    (step, layer_id); ``dropna`` keeps only the steps and layers with at least one value.
    ``steps`` restricts the rows to those steps; ``kinds`` is ``metrics["kind"]`` as an
    array, when the caller has it already. Float columns with integer keys (what
    the store and the watcher give) are arranged by numpy in one pass, without pandas'
    groupby (a few hundredths of a second per call, several calls per run); other
    columns go through ``pivot_table`` itself.
    """
    if column not in metrics.columns:
        return pd.DataFrame()
    rows = (metrics["kind"].to_numpy() if kinds is None else kinds) == kind
    if steps is not None:
        rows = rows & metrics["step"].isin(steps).to_numpy(dtype=bool)
    values = metrics[column]
    keys = _is_dtype(metrics["step"], "iu") and _is_dtype(metrics["layer_id"], "iu")
    if not (keys and _is_dtype(values, "f")):
        selected = metrics[rows]
        if dropna:
            selected = selected[selected[column].notna()]
        if selected[column].isna().all():
            return pd.DataFrame()
        return _pivot_table(selected, column, dropna=dropna)
    numbers = values.to_numpy()[rows]
    present = ~np.isnan(numbers)
    if not present.any():
        return pd.DataFrame()
    step = metrics["step"].to_numpy()[rows]
    layer = metrics["layer_id"].to_numpy()[rows]
    if dropna:
        step, layer, numbers, present = step[present], layer[present], numbers[present], present[present]
    return _grid(step, layer, numbers, present)


def _is_dtype(series: pd.Series, kinds: str) -> bool:
    """Whether ``series`` is a plain numpy column of one of the dtype ``kinds`` ("f", "iu")."""
    return isinstance(series.dtype, np.dtype) and series.dtype.kind in kinds


def _grid(step: np.ndarray, layer: np.ndarray, values: np.ndarray, present: np.ndarray) -> pd.DataFrame:
    """The table of ``values`` by (step, layer): sorted unique steps x sorted unique layers.

    A cell gets the first of its rows whose value is ``present`` (not NaN), as
    ``groupby(...).first()`` does; NaN where none is.
    """
    step_index, step_of = np.unique(step, return_inverse=True)
    layer_index, layer_of = np.unique(layer, return_inverse=True)
    table = np.full((len(step_index), len(layer_index)), np.nan, dtype=values.dtype)
    cell = (step_of * len(layer_index) + layer_of)[present]
    cells, first = np.unique(cell, return_index=True)  # a stable sort: the first row of each cell
    table.flat[cells] = values[present][first]
    return pd.DataFrame(table, index=pd.Index(step_index, name="step"),
                        columns=pd.Index(layer_index, name="layer_id"))


def _pivot_table(rows: pd.DataFrame, column: str, *, dropna: bool) -> pd.DataFrame:
    """The pivot by pandas: what :func:`_pivot` equals, and its path for other dtypes."""
    return rows.pivot_table(index="step", columns="layer_id", values=column, aggfunc="first", dropna=dropna)


def _activation_types(metrics: pd.DataFrame) -> dict[int, str]:
    acts = (metrics["kind"] == "activation").to_numpy(dtype=bool)
    return dict(zip(metrics["layer_id"].to_numpy()[acts].tolist(), metrics["type"].to_numpy()[acts].tolist(),
                    strict=True))


def _fmt(value: float) -> str:
    """Two significant digits between 0.01 and 1000, else scientific (``"3.1e-05"``)."""
    return format_number(value, 2, plain=(1e-2, 1e3), missing="nan")


def _layer_list(names: list[str], limit: int = 4) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:2])}, ..., {names[-1]} ({len(names)} layers)"


# --- the fixes diagnose recommends (prescribe measures the same names) ---------------------

FIXES: dict[str, tuple[str, str]] = {
    "relu_he": (
        "swap the activation to ReLU and re-initialise He (Var W = 2 / fan_in)",
        "ReLU's derivative is 1 wherever a unit is active, so the product of derivatives "
        "no longer shrinks; He init keeps the signal's scale through each layer",
    ),
    "leaky_relu": (
        "swap the activation to LeakyReLU(0.01) with He init",
        "like ReLU, but a small slope on the negative side keeps units from dying",
    ),
    "tanh": (
        "swap the activation to tanh with Xavier init",
        "tanh's derivative reaches 1 at 0 (the sigmoid's only 0.25)",
    ),
    "relu": (
        "swap the activation to ReLU, keeping the initialisation",
        "ReLU's derivative is 1 where the unit is active",
    ),
    "reinit": (
        "re-initialise to match the activation (He for ReLU-like, Xavier for sigmoid/tanh)",
        "weights scaled to the activation keep the delta's size from layer to layer",
    ),
    "batch_norm": (
        "insert BatchNorm before each activation",
        "normalised inputs stay in the green region, where the activation's derivative is "
        "not small",
    ),
    "residual": (
        "add residual connections around equal-width blocks",
        "a shortcut h + f(h) passes the gradient back unchanged, around the product of derivatives",
    ),
    "fewer_layers": (
        "remove equal-width blocks (keep a quarter of them)",
        "fewer layers, fewer factors in the product of derivatives",
    ),
    "clip_grad_norm": (
        "clip the total gradient norm at 1",
        "bounds each step whatever the gradient's size",
    ),
    "lower_lr": (
        "lower the learning rate 10x",
        "smaller steps keep weights, activations and gradients from blowing up",
    ),
}

_SATURATING = {"Sigmoid", "Tanh", "Softsign", "Hardtanh", "ELU", "GELU", "SiLU"}
_RECTIFIERS = {"ReLU", "LeakyReLU", "ReLU6"}


def _advice(kind: str, activation_types: set[str], found: set[str]) -> tuple[Prescription, ...]:
    """Fixes for one kind of finding, best first, before any trial has measured them."""
    saturating = bool(activation_types & _SATURATING)
    if kind in ("vanishing_gradients", "loss_plateau", "updates_too_small"):
        if kind != "vanishing_gradients" and "vanishing_gradients" not in found and "dead_units" in found:
            names = ["leaky_relu", "reinit", "batch_norm", "lower_lr"]
        elif saturating or not activation_types:
            names = ["relu_he", "batch_norm", "residual", "reinit", "fewer_layers"]
        else:
            names = ["reinit", "batch_norm", "residual", "leaky_relu", "fewer_layers"]
    elif kind in ("exploding_gradients", "nonfinite"):
        names = ["clip_grad_norm", "lower_lr", "reinit", "batch_norm"]
    elif kind == "dead_units":
        names = ["leaky_relu", "reinit", "batch_norm", "lower_lr"]
    elif kind == "saturated_activations":
        names = ["batch_norm", "reinit", "relu_he"]
    elif kind == "updates_too_large":
        names = ["lower_lr", "clip_grad_norm"]
    else:
        return ()
    return tuple(
        Prescription(name, FIXES[name][0], rank=i + 1, rationale=FIXES[name][1],
                     reason="not measured on this model; gradwatch.prescribe() or `gradwatch probe` tries it")
        for i, name in enumerate(names)
    )


# --- the checks --------------------------------------------------------------------------


@dataclass
class _Run:
    metrics: pd.DataFrame
    scalars: pd.DataFrame
    t: Thresholds
    names: dict[int, str]
    deltas: pd.DataFrame  # step x param layer_id
    ratios: pd.Series  # first/last delta per step
    act_types: dict[int, str]
    kinds: np.ndarray = field(init=False)  # metrics["kind"], once

    def __post_init__(self) -> None:
        self.kinds = self.metrics["kind"].to_numpy()

    def label(self, ids) -> list[str]:
        return [self.names[i] for i in ids]

    def table(self, kind: str, column: str, steps: Any = None) -> pd.DataFrame:
        """Step x layer_id table of ``column`` over the layers of ``kind`` (see :func:`_pivot`)."""
        return _pivot(self.metrics, kind, column, steps=steps, kinds=self.kinds)

    def by_step(self, name: str) -> pd.Series:
        """Scalar ``name`` indexed by step: ``scalars.set_index("step")[name]``, without the frame's copy."""
        return self.scalars[name].set_axis(pd.Index(self.scalars["step"]))


def _nonfinite(r: _Run) -> Finding | None:
    m = r.metrics
    inf = np.zeros(len(m), dtype=bool)
    for column in ("grad_norm", "delta_rms", "output_mean", "output_std"):
        if column in m.columns:
            inf |= np.isinf(m[column].to_numpy(dtype="float64", na_value=np.nan))
    # A stored NaN sets the row's flag; activations without flat tails (ReLU) record
    # saturated_frac as NaN by design, so their rows count only with a NaN elsewhere.
    flagged = m["nonfinite"].to_numpy(dtype=bool) if "nonfinite" in m.columns else np.zeros(len(m), bool)
    is_act = r.kinds == "activation"
    any_nan, any_value = np.zeros(len(m), dtype=bool), np.zeros(len(m), dtype=bool)
    for column in ("green_frac", "dead_frac", "mean_derivative"):
        if column in m.columns:
            missing = m[column].isna().to_numpy(dtype=bool)
            any_nan |= missing
            any_value |= ~missing
    flagged = np.where(is_act, flagged & any_nan & any_value, flagged)
    bad = inf | flagged
    bad_rows = m[bad] if bad.any() else None  # most runs have none: no copy of the frame
    steps: list[int] = []
    if bad_rows is not None:
        steps.append(int(bad_rows["step"].min()))
    s = r.scalars
    if "nonfinite_grads" in s.columns:
        bad_grads = s["nonfinite_grads"].fillna(0) > 0
        if bad_grads.any():
            steps.append(int(s["step"][bad_grads].min()))
    loss_step = None
    if "loss" in s.columns and s["loss"].notna().any():
        loss, loss_steps = s["loss"].to_numpy(dtype="float64"), s["step"].to_numpy()
        finite = np.isfinite(loss)
        if np.isinf(loss).any():
            loss_step = int(loss_steps[np.isinf(loss)][0])
        elif not finite[-1] and finite.any():  # NaN from some step to the end, finite before
            last_finite = int(np.flatnonzero(finite)[-1])
            loss_step = int(loss_steps[last_finite + 1])
        if loss_step is not None:
            steps.append(loss_step)
    if not steps:
        return None
    first = min(steps)
    at = m[m["step"] == first]
    origin, where = None, ""
    if not at.empty:
        out = at[["output_mean", "output_std"]].to_numpy(dtype="float64", na_value=np.nan)
        bad_out = at[(~np.isfinite(out)).any(axis=1) & (at["kind"] == "param")]
        delta = at["delta_rms"].to_numpy(dtype="float64", na_value=np.nan)
        grad = at["grad_norm"].to_numpy(dtype="float64", na_value=np.nan)
        bad_back = at[(np.isinf(delta) | np.isinf(grad) | (at["nonfinite"].to_numpy(bool)
                       & (np.isnan(delta) | np.isnan(grad)))) & (at["kind"] == "param")]
        if not bad_out.empty:
            origin = str(bad_out.sort_values("layer_id")["layer"].iloc[0])
            where = (f"the forward signal first overflows at '{origin}' (its output is non-finite, "
                     f"and every later layer inherits it)")
        elif not bad_back.empty:
            origin = str(bad_back.sort_values("layer_id")["layer"].iloc[-1])
            where = (f"the forward pass is finite; the backward pass first goes non-finite at "
                     f"'{origin}' (counting from the output), an exploding gradient")
    layers = [origin] if origin else []
    later = sorted(set(bad_rows["layer"]) - set(layers)) if bad_rows is not None else []
    evidence: dict[str, Any] = {"first_step": first, "origin_layer": origin,
                                "layers_affected": len(set(bad_rows["layer"])) if bad_rows is not None else 0}
    if loss_step is not None:
        evidence["first_nonfinite_loss_step"] = loss_step
    if "nonfinite_grads" in s.columns:
        evidence["max_nonfinite_parameters"] = float(s["nonfinite_grads"].max())
    last = int(max(bad_rows["step"].max() if bad_rows is not None else first, first))
    text = (f"Non-finite values (inf or NaN) appear at step {first}"
            + (f"; {where}" if where else "") + ". From then on the weights they touch are lost: an "
            "update with a NaN gradient turns the weight into NaN. Usual causes: a learning rate too "
            "high or an initialisation too large (the product of derivatives above 1 at every layer "
            "grows without bound), or a log/division of zero in the loss.")
    return Finding("nonfinite", "critical", first, last, tuple(layers + later), evidence, text)


def _activation_summary(r: _Run, steps) -> dict[str, Any]:
    """The activation layers at the first of ``steps``: their mean derivative and green fraction."""
    m = r.metrics
    rows = (r.kinds == "activation") & m["step"].isin(steps).to_numpy(dtype=bool)
    derivative = m["mean_derivative"].to_numpy(dtype="float64", na_value=np.nan)[rows]
    if np.isnan(derivative).all():  # also when no activation row is left
        return {}
    step = m["step"].to_numpy()[rows]
    first = step == step.min()
    d = derivative[first]
    green = m["green_frac"].to_numpy(dtype="float64", na_value=np.nan)[rows][first]
    return {
        "activation_layers": int(first.sum()),
        "activation_types": ", ".join(sorted(set(m["type"].to_numpy()[rows][first].tolist()))),
        "mean_derivative": float(np.nanmean(d)),
        "derivative_product": float(np.nanprod(d)),
        "green_frac": float(np.nanmean(green)),
    }


def _why(types: set[str], acts: dict[str, Any]) -> str:
    """The seeds' reason, for the activations this model uses."""
    n = acts.get("activation_layers", 0)
    if not acts:
        return ""
    md, green, prod = acts["mean_derivative"], acts["green_frac"], acts["derivative_product"]
    if "Sigmoid" in types:
        text = (f" The sigmoid's derivative is at most 0.25 (at x = 0), so {n} sigmoid layers "
                f"multiply the gradient by at most 0.25^{n} = {_fmt(0.25 ** n)}; measured, their mean "
                f"derivative is {md:.3f} (product {_fmt(prod)}) and {green:.0%} of their inputs lie in "
                f"the green region, where the derivative is at least half its maximum.")
        if green >= 0.5:
            text += (" So this is not saturation: even at its best the sigmoid passes back a quarter "
                     "of the gradient per layer.")
        return text
    if types & _SATURATING:
        return (f" These activations' derivatives average {md:.3f} at the actual inputs "
                f"(product over {n} layers {_fmt(prod)}); {green:.0%} of the inputs are in the green "
                f"region, where the derivative is at least half its maximum.")
    return (f" The activations' derivatives average {md:.2f} ({green:.0%} of units active), so "
            f"the shrinking comes mostly from the weights: an initialisation that is too small "
            f"for these activations (He init, Var W = 2 / fan_in, keeps ReLU layers at scale 1).")


def _vanishing(r: _Run) -> Finding | None:
    ratios = r.ratios.dropna()
    if ratios.empty or r.deltas.shape[1] < 2:
        return None
    t = r.t
    below = ratios < t.vanishing_ratio
    frac = float(below.mean())
    if frac >= t.persistence:
        severity = "critical"
    elif bool(below.iloc[0]):
        severity = "warning"
    else:
        return None
    steps = ratios.index[below]
    rel = r.deltas.loc[steps].div(r.deltas.loc[steps].iloc[:, -1], axis=0).median()
    onset = None
    for lid in reversed(list(rel.index)):
        if rel[lid] < t.vanishing_ratio:
            onset = lid
            break
    if onset is None:  # the median profile never crosses the threshold: too noisy to name a layer
        onset = rel.index[0]
    starved = [lid for lid in rel.index if rel[lid] < t.vanishing_ratio] or [onset]
    median = float(ratios[steps].median())
    n = r.deltas.shape[1]
    factor = median ** (1.0 / (n - 1)) if median > 0 else 0.0
    first_name, last_name = r.names[r.deltas.columns[0]], r.names[r.deltas.columns[-1]]
    acts = _activation_summary(r, steps)
    grads = r.table("param", "grad_norm", steps=steps)
    evidence: dict[str, Any] = {
        "delta_ratio": median,
        "delta_ratio_first_step": float(ratios.iloc[0]),
        "delta_ratio_last_step": float(ratios.iloc[-1]),
        "steps_below": int(below.sum()),
        "logged_steps": int(len(ratios)),
        "per_layer_factor": factor,
        "onset_layer": r.names[onset] if onset is not None else None,
        "onset_ratio": float(rel[onset]) if onset is not None else None,
        "threshold": t.vanishing_ratio,
    }
    if not grads.empty and grads.shape[1] >= 2:
        evidence["weight_grad_ratio"] = float((grads.iloc[:, 0] / grads.iloc[:, -1]).median())
    evidence.update(acts)
    when = (f"in {frac:.0%} of {len(ratios)} logged steps" if severity == "critical" else
            f"at the first logged step (step {int(ratios.index[0])}), then recovers "
            f"(below in {frac:.0%} of logged steps)")
    text = (
        f"The gradient vanishes on its way back to the input. Backpropagation is the chain rule: "
        f"the error signal (delta) reaching a layer is the product of one weight matrix and one "
        f"activation derivative for every layer above it, so it shrinks exponentially with depth "
        f"when those factors are below 1. Here the delta at '{first_name}' is {_fmt(median)} of the "
        f"last layer's ('{last_name}') {when}; it first falls {1 / t.vanishing_ratio:,.0f}x below "
        f"the last layer's at '{r.names[onset]}', and each layer multiplies it by {factor:.2f} on "
        f"average." + _why(set(r.act_types.values()), acts)
    )
    if severity == "warning":
        text += (" The optimiser has compensated since (Adam rescales small gradients), but the "
                 "initialisation is poor for this depth.")
    else:
        text += " The early layers' weights therefore barely change, and the loss hardly moves."
    return Finding("vanishing_gradients", severity, int(steps[0]), int(steps[-1]),
                   tuple(r.label(starved)), evidence, text)


def _exploding(r: _Run) -> Finding | None:
    t = r.t
    ratios = r.ratios.dropna()
    above = ratios > t.exploding_ratio
    growth = pd.Series(dtype="float64")
    if "total_grad_norm" in r.scalars.columns:
        norms = r.by_step("total_grad_norm").dropna()
        norms = norms[np.isfinite(norms.to_numpy())]
        # Growth against the early steps' median, not the first step's value; and not when
        # those steps vanished: a net that starts with tiny gradients and recovers (Adam
        # rescales them) grows its norm a thousandfold without exploding.
        n_early = max(3, len(norms) // 10)
        early = float(norms.iloc[:n_early].median()) if len(norms) >= 6 else 0.0
        early_ratio = float(ratios.iloc[:n_early].median()) if len(ratios) else 1.0
        if early > 0 and not early_ratio < t.vanishing_ratio:
            growth = norms / early
    grew = growth > t.exploding_growth
    frac = float(above.mean()) if len(above) else 0.0
    if frac >= t.persistence or bool(grew.any()):
        severity = "critical"
    elif len(above) and bool(above.iloc[0]):
        severity = "warning"
    else:
        return None
    steps = sorted(set(ratios.index[above]) | set(growth.index[grew]))
    evidence: dict[str, Any] = {
        "delta_ratio": float(ratios[above].median()) if above.any() else float(ratios.median()),
        "delta_ratio_first_step": float(ratios.iloc[0]) if len(ratios) else None,
        "steps_above": int(above.sum()),
        "logged_steps": int(len(ratios)),
        "threshold": t.exploding_ratio,
    }
    if len(growth):
        evidence["grad_norm_growth"] = float(growth.max())
        evidence["grad_norm_early_median"] = early
        evidence["grad_norm_max"] = float(norms.max())
    n = r.deltas.shape[1]
    ref = evidence["delta_ratio"]
    factor = ref ** (1.0 / (n - 1)) if n > 1 and ref > 0 else float("nan")
    evidence["per_layer_factor"] = factor
    rel = r.deltas.div(r.deltas.iloc[:, -1], axis=0).median()
    grown = [lid for lid in rel.index if rel[lid] > t.exploding_ratio]
    parts = []
    if above.any():
        parts.append(
            f"the delta at the first layer is {_fmt(evidence['delta_ratio'])} times the last layer's "
            f"in {above.mean():.0%} of {len(ratios)} logged steps (each layer multiplies it by "
            f"{factor:.2f} on average)")
    if grew.any():
        parts.append(f"the total gradient norm grows to {_fmt(float(growth.max()))} times its median "
                     f"over the first logged steps")
    text = (
        "The gradient explodes: " + "; ".join(parts) + ". Backpropagation multiplies one weight "
        "matrix and one activation derivative per layer; when their product is above 1 the delta "
        "grows exponentially towards the input, the early layers take huge steps and training "
        "diverges (often into inf/NaN). Typical causes: weights initialised too large for the "
        "activation, or a learning rate too high."
    )
    if severity == "warning":
        text += " Here it happens at initialisation and the optimiser has tamed it since."
    return Finding("exploding_gradients", severity, int(steps[0]), int(steps[-1]),
                   tuple(r.label(grown)), evidence, text)


def _dead(r: _Run) -> Finding | None:
    dead = r.table("activation", "dead_frac")
    if dead.empty:
        return None
    median, bad = layers_over(dead, r.t.dead_frac)
    if not bad:
        return None
    worst = max(bad, key=lambda lid: median[lid])
    over = (dead[bad] > r.t.dead_frac).any(axis=1)
    steps = over.index[over]
    full = [lid for lid in bad if median[lid] >= 1.0]
    evidence = {
        "layers_over_threshold": len(bad),
        "activation_layers": int(dead.shape[1]),
        "worst_layer": r.names[worst],
        "worst_dead_frac": float(median[worst]),
        "mean_dead_frac": float(median.mean()),
        "fully_dead_layers": len(full),
        "threshold": r.t.dead_frac,
    }
    text = (
        f"Dead units: in {len(bad)} of {dead.shape[1]} activation layers more than "
        f"{r.t.dead_frac:.0%} of the units output zero for every example of the batch (median over "
        f"logged steps; worst '{r.names[worst]}' with {median[worst]:.0%}). A ReLU's derivative is 0 "
        f"wherever its input is negative, so a dead unit passes no gradient back and never "
        f"recovers (\"dying ReLU\"); its weights stop learning, and when most of a layer is dead "
        f"the layers before it receive almost nothing."
        + (f" {len(full)} layer(s) are entirely dead: no gradient reaches anything before them."
           if full else "")
        + " LeakyReLU keeps a small slope on the negative side; He init and batch norm keep inputs "
        "from sitting on the negative side."
    )
    severity = "critical" if full else "warning"
    return Finding("dead_units", severity, int(steps[0]), int(steps[-1]), tuple(r.label(bad)),
                   evidence, text)


def _saturated(r: _Run) -> Finding | None:
    sat = r.table("activation", "saturated_frac").dropna(axis=1, how="all")
    if sat.empty:
        return None
    median, bad = layers_over(sat, r.t.saturated_frac)
    if not bad:
        return None
    green = r.table("activation", "green_frac")
    worst = max(bad, key=lambda lid: median[lid])
    over = (sat[bad] > r.t.saturated_frac).any(axis=1)
    steps = over.index[over]
    green_mean = float(green[bad].median().mean()) if not green.empty else float("nan")
    evidence = {
        "layers_over_threshold": len(bad),
        "activation_layers": int(sat.shape[1]),
        "worst_layer": r.names[worst],
        "worst_saturated_frac": float(median[worst]),
        "green_frac": green_mean,
        "threshold": r.t.saturated_frac,
    }
    text = (
        f"Saturated activations: in {len(bad)} of {sat.shape[1]} layers more than "
        f"{r.t.saturated_frac:.0%} of the inputs sit in the flat tails, where the derivative is "
        f"below a tenth of its maximum (worst '{r.names[worst]}', {median[worst]:.0%}); only "
        f"{green_mean:.0%} are in the green region, where it is at least half its maximum. A "
        f"large input change there makes a tiny output change, so the derivative, one factor "
        f"of the gradient's product per layer, is close to zero. Batch normalisation keeps the "
        f"inputs near zero, in the green region; so does a smaller initialisation."
    )
    return Finding("saturated_activations", "warning", int(steps[0]), int(steps[-1]),
                   tuple(r.label(bad)), evidence, text)


def _plateau(r: _Run) -> Finding | None:
    t = r.t
    if "loss" not in r.scalars.columns:
        return None
    loss = r.by_step("loss").dropna()
    loss = loss[np.isfinite(loss.to_numpy())]
    if len(loss) < t.plateau_min_steps:
        return None
    window = max(5, min(t.plateau_min_steps // 5, len(loss) // 10))
    smooth = loss.rolling(window, min_periods=window).mean().dropna()
    values, steps = smooth.to_numpy(), smooth.index.to_numpy()
    start_level = float(values[0])
    best: tuple[int, int] | None = None
    a = 0
    while a < len(values):  # greedy segments: O(n)
        b = a
        band = t.plateau_rel_change * abs(values[a])
        while b + 1 < len(values) and abs(values[b + 1] - values[a]) <= band:
            b += 1
        length = int(steps[b] - steps[a]) + window
        level_ok = values[a] >= t.plateau_level * start_level
        if length >= t.plateau_min_steps and level_ok and (best is None or b - a > best[1] - best[0]):
            best = (a, b)
        a = b + 1
    if best is None:
        return None
    a, b = best
    first, last = int(steps[a]) - window + 1, int(steps[b])
    first = max(first, int(loss.index[0]))
    level = float(values[a:b + 1].mean())
    change = float(values[b] - values[a])
    evidence = {
        "plateau_steps": last - first + 1,
        "loss_level": level,
        "loss_change": change,
        "relative_change": change / level if level else float("nan"),
        "loss_start": start_level,
        "loss_end": float(values[-1]),
        "threshold": t.plateau_rel_change,
    }
    to_end = b == len(values) - 1
    text = (
        f"The loss does not move: from step {first} to {last} it stays at {level:.3g}, changing by "
        f"{change:+.2g} ({abs(change) / level:.1%}, under {t.plateau_rel_change:.0%})"
        + (" until the end of the run" if to_end else "")
        + ". That is the first sign the seeds name for vanishing gradients (\"no changes to "
        "loss\"): when the early layers receive almost no gradient, nothing they compute improves. "
        "It can also mean a learning rate far too low or units that died."
    )
    return Finding("loss_plateau", "warning", first, last, (), evidence, text)


def _updates(r: _Run) -> list[Finding]:
    t = r.t
    upd = r.table("param", "update_ratio")
    if upd.empty:
        return []
    upd = upd.replace([np.inf], np.nan)
    median = upd.median().dropna()
    out = []
    for kind, bad, word in (
        ("updates_too_small", [lid for lid in median.index if median[lid] < t.update_ratio_low], "small"),
        ("updates_too_large", [lid for lid in median.index if median[lid] > t.update_ratio_high], "large"),
    ):
        if not bad:
            continue
        worst = min(bad, key=lambda i: median[i]) if word == "small" else max(bad, key=lambda i: median[i])
        evidence = {
            "layers": len(bad),
            "param_layers": int(len(median)),
            "worst_layer": r.names[worst],
            "worst_update_ratio": float(median[worst]),
            "median_update_ratio_all_layers": float(median.median()),
            "threshold": t.update_ratio_low if word == "small" else t.update_ratio_high,
        }
        if word == "small":
            text = (
                f"Updates too small: in {len(bad)} of {len(median)} layers a step changes the weights "
                f"by less than {t.update_ratio_low:g} of their norm (median ||update|| / ||w||; worst "
                f"'{r.names[worst]}' at {_fmt(float(median[worst]))}, while the run's median layer "
                f"moves {_fmt(float(median.median()))}). These weights are effectively frozen, as the "
                f"seeds' \"plots of the weights against epochs\" would show: flat lines. With a "
                f"vanishing gradient even Adam stalls, since gradients below its epsilon (1e-8) "
                f"give steps far below the learning rate."
            )
        else:
            text = (
                f"Updates too large: in {len(bad)} of {len(median)} layers one step changes the weights "
                f"by more than {t.update_ratio_high:g} of their norm (worst '{r.names[worst]}' at "
                f"{_fmt(float(median[worst]))}). Each step rewrites much of what the layer knew; "
                f"training is unstable and may diverge. A lower learning rate or gradient clipping "
                f"bounds the step."
            )
        steps = upd.index[(upd[bad] < t.update_ratio_low).any(axis=1) if word == "small"
                          else (upd[bad] > t.update_ratio_high).any(axis=1)]
        first = int(steps[0]) if len(steps) else None
        last = int(steps[-1]) if len(steps) else None
        out.append(Finding(kind, "warning", first, last, tuple(r.label(bad)), evidence, text))
    return out


def _not_enough(what: str, got: int, need: int, checks: str) -> Finding:
    return Finding(
        "not_enough_data", "info", None, None, (),
        {"got": got, "needed": need, "what": what},
        f"Not enough data for {checks}: the run has {got} {what}, the check needs at least {need}. "
        f"Train longer or log more often (watch(..., every=N) with a smaller N).",
    )


# --- entry points ------------------------------------------------------------------------


def diagnose(
    run: Any,
    store: RunStore | str | None = None,
    thresholds: Thresholds | None = None,
    *,
    scalars: pd.DataFrame | None = None,
    save: bool = True,
) -> list[Finding]:
    """Findings about a run's gradient flow, most severe first.

    Args:
        run: a run id or name (read from ``store``), a :class:`~gradwatch.watch.Watcher`
            (flushed first), or a metrics DataFrame as :meth:`RunStore.metrics` returns.
        store: the store holding ``run`` (a :class:`RunStore` or a path). Default: the
            watcher's store, else ``$GRADWATCH_STORE`` or ``./gradwatch-runs``.
        thresholds: the numbers to judge by. Default: ``Thresholds()``.
        scalars: with a DataFrame ``run``, its scalars (loss, total_grad_norm, ...) as
            :meth:`RunStore.scalars` returns; without them the plateau and gradient-norm
            checks are skipped.
        save: store the findings in the run store (replacing earlier ones), so that
            ``gradwatch show`` and the report list them. Ignored for a DataFrame.

    Returns:
        The findings, each with its ranked (unverified) prescriptions; an empty list
        when nothing is wrong; a single ``"not_enough_data"`` finding (plus any
        non-finite values) when fewer than ``thresholds.min_logged_steps`` steps were logged.

    Raises:
        ConfigError: ``run`` or ``thresholds`` of the wrong type.
        RunNotFoundError: no such run in the store.
    """
    t = thresholds if thresholds is not None else Thresholds()
    if not isinstance(t, Thresholds):
        raise ConfigError(f"thresholds must be a gradwatch.diagnose.Thresholds; got {type(t).__name__}")
    metrics, scalar_df, st, run_id, opened = _load(run, store, scalars)
    try:
        findings = _diagnose(metrics, scalar_df, t)
        if save and st is not None and run_id is not None:
            st.add_findings(run_id, [f.to_dict() for f in findings])
    finally:
        if opened:
            st.close()
    return findings


def _diagnose(metrics: pd.DataFrame, scalar_df: pd.DataFrame | None, t: Thresholds) -> list[Finding]:
    scalar_df = scalar_df if scalar_df is not None else pd.DataFrame({"step": pd.Series(dtype="int64")})
    if "nonfinite" not in metrics.columns:
        metrics = metrics.assign(nonfinite=False)
    deltas = _delta_table(metrics)
    r = _Run(metrics, scalar_df, t, _names(metrics), deltas, delta_ratios_of(deltas),
             _activation_types(metrics))
    findings: list[Finding] = []
    nonfinite = _nonfinite(r)
    if nonfinite is not None:
        findings.append(nonfinite)
        # What follows a NaN (dead-looking units, absurd updates) is its echo: judge the
        # steps before it.
        first = nonfinite.first_step
        metrics = metrics[metrics["step"] < first]
        scalar_df = scalar_df[scalar_df["step"] < first]
        deltas = _delta_table(metrics)
        r = _Run(metrics, scalar_df, t, r.names, deltas, delta_ratios_of(deltas), r.act_types)
    logged = int(metrics["step"].nunique()) if not metrics.empty else 0
    if logged < t.min_logged_steps:
        what = "logged steps" if nonfinite is None else "logged steps before the first non-finite value"
        findings.append(_not_enough(what, logged, t.min_logged_steps, "a diagnosis"))
    else:
        for check in (_exploding, _vanishing, _dead, _saturated, _plateau):
            found = check(r)
            if found is not None:
                findings.append(found)
        findings.extend(_updates(r))
        n_loss = int(scalar_df["loss"].notna().sum()) if "loss" in scalar_df.columns else 0
        if 0 < n_loss < t.plateau_min_steps and nonfinite is None:
            findings.append(_not_enough("loss values", n_loss, t.plateau_min_steps, "the loss-plateau check"))
    kinds = {f.kind for f in findings}
    types = set(r.act_types.values())
    findings = [f.with_prescriptions(_advice(f.kind, types, kinds)) for f in findings]
    order = list(KINDS)
    findings.sort(key=lambda f: (_SEVERITY_ORDER.get(f.severity, 3), order.index(f.kind)))
    return findings


def live_check(
    layer_deltas: dict[str, float],
    total_grad_norm: float | None,
    nonfinite: int,
    thresholds: Thresholds | None = None,
    *,
    run_id: int | None = None,
    layer_types: Mapping[str, str] | None = None,
) -> str | None:
    """The message of :func:`gradwatch.thresholds.live_alert` (same arguments), or None."""
    alert = live_alert(layer_deltas, total_grad_norm, nonfinite, thresholds, run_id=run_id,
                       layer_types=layer_types)
    return alert.message if alert is not None else None
