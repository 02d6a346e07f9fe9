"""The numbers gradient flow is judged by, and the judgement of one step as it is recorded.

:class:`Thresholds` is shared by :func:`gradwatch.diagnose.diagnose` (a whole run) and
:func:`live_alert` (one logged step, while training). The watcher calls :func:`live_alert`
and acts on the :class:`~gradwatch.alerts.Alert` it returns by its kind; nothing parses a
message. This module depends on no part of the watcher or the diagnosis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from gradwatch.alerts import Action, Alert
from gradwatch.errors import ConfigError, check_int
from gradwatch.numbers import format_number, is_norm_type

__all__ = ["Thresholds", "live_alert", "nonfinite_alert", "step_alerts"]


@dataclass(frozen=True)
class Thresholds:
    """Every number :func:`gradwatch.diagnose.diagnose` and :func:`live_alert` judge by.

    The defaults come from a grid of MLPs on digits (sigmoid, tanh, ReLU, LeakyReLU,
    batch norm, residual; depths 2-20; 3-5 seeds; Adam and SGD): docs/diagnosis.md has
    the measured distributions and the margin each value leaves.

    Attributes:
        vanishing_ratio: a layer's delta RMS below this fraction of the last layer's is
            starved of gradient; the run vanishes when the first layer is. Default: 1e-3
            (healthy nets never went below 0.045; sigmoid nets of depth >= 10 never above 2e-9).
        exploding_ratio: first/last delta ratio above which gradients explode on their
            way back. Default: 1e3 (healthy at most 25, from batch norm at depth 20; ReLU
            with sigma_w2 = 8 at depth 20 at least 3.7e3).
        exploding_growth: total gradient norm above this multiple of its median over
            the first tenth of the logged steps is exploding too. Default: 1e3.
        persistence: fraction of logged steps a condition must hold to be persistent
            (critical); vanishing or exploding only at the first logged step
            (initialisation) is a warning. Default: 0.5.
        dead_frac: a layer whose median fraction of dead units (derivative zero on the
            whole batch) exceeds this is reported. Default: 0.6 (ReLU+He at most 0.41; the
            lab's dying net at least 0.625).
        saturated_frac: a layer whose median fraction of inputs in the flat tails
            (phi' < 0.1 max phi') exceeds this is reported. Default: 0.5 (batch-norm and
            Xavier nets at most 0.16).
        plateau_rel_change: the loss is on a plateau while its smoothed value moves by
            less than this fraction of itself. Default: 0.02.
        plateau_min_steps: shortest plateau reported, in training steps. Default: 100.
        plateau_level: only a plateau above this fraction of the starting loss is a
            problem (a converged loss is flat too). Default: 0.5.
        update_ratio_low: median ``||update|| / ||w||`` below this: the layer is frozen.
            Default: 1e-6 (healthy layers at least 9e-5).
        update_ratio_high: median update ratio above this: each step rewrites the layer.
            Default: 0.1 (healthy layers at most 0.013).
        min_logged_steps: fewer logged steps than this yield only a "not enough data"
            finding. Default: 3.
    """

    vanishing_ratio: float = 1e-3
    exploding_ratio: float = 1e3
    exploding_growth: float = 1e3
    persistence: float = 0.5
    dead_frac: float = 0.6
    saturated_frac: float = 0.5
    plateau_rel_change: float = 0.02
    plateau_min_steps: int = 100
    plateau_level: float = 0.5
    update_ratio_low: float = 1e-6
    update_ratio_high: float = 0.1
    min_logged_steps: int = 3

    def __post_init__(self) -> None:
        def check(name: str, low: float, high: float | None = None) -> None:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value <= low or (high is not None and value > high):
                bound = f"> {low}" + (f" and <= {high}" if high is not None else "")
                raise ConfigError(f"Thresholds.{name}={value!r}; expected a finite number {bound}")

        for name in ("vanishing_ratio", "persistence", "dead_frac", "saturated_frac", "plateau_level"):
            check(name, 0.0, 1.0)
        for name in ("exploding_ratio", "exploding_growth"):
            check(name, 1.0)
        check("plateau_rel_change", 0.0)
        check("update_ratio_low", 0.0)
        check("update_ratio_high", self.update_ratio_low if isinstance(self.update_ratio_low, float) else 0.0)
        for name in ("plateau_min_steps", "min_logged_steps"):
            check_int(f"Thresholds.{name}", getattr(self, name), 1)

    def replace(self, **changes: Any) -> Thresholds:
        """A copy with some values changed, e.g. ``Thresholds().replace(vanishing_ratio=1e-4)``."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown threshold(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return Thresholds(**{**asdict(self), **changes})


def live_alert(
    layer_deltas: Mapping[str, float],
    total_grad_norm: float | None,
    nonfinite: int,
    thresholds: Thresholds | None = None,
    *,
    step: int = 0,
    run_id: int | None = None,
    layer_types: Mapping[str, str] | None = None,
) -> Alert | None:
    """What one logged step shows, as an :class:`~gradwatch.alerts.Alert`; None when it looks healthy.

    The judgement is :func:`gradwatch.diagnose.diagnose`'s on a single step: non-finite
    gradients (kind ``"nonfinite"``), or a first/last delta ratio
    (:func:`gradwatch.numbers.delta_ratio`) below ``vanishing_ratio`` (``"vanishing"``,
    its layer where the delta first falls that far below the last layer's) or above
    ``exploding_ratio`` (``"exploding"``, its layer the first one).

    Args:
        layer_deltas: ``delta_rms`` of each parameterised layer, by name, in forward order.
        total_grad_norm: the step's total gradient norm (None if not measured).
        nonfinite: number of parameters whose gradient is inf or NaN.
        thresholds: Default: ``Thresholds()``.
        step: the step, for the alert.
        run_id: named in the message's pointer to ``gradwatch show``.
        layer_types: each layer's type (module class name), by name: the first/last ratio
            then runs over the weight layers only, normalisation layers left out, as
            :func:`gradwatch.numbers.delta_ratio` defines it. Default: every layer given.
    """
    t = thresholds if thresholds is not None else Thresholds()
    where = f"; see `gradwatch show {run_id}`" if run_id is not None else "; see `gradwatch show RUN`"
    grad_bad = total_grad_norm is not None and not math.isfinite(total_grad_norm)
    names = [k for k, v in layer_deltas.items() if v is not None and not math.isnan(v)]
    bad_deltas = [k for k in names if math.isinf(layer_deltas[k])]
    if nonfinite or grad_bad or bad_deltas:
        what = f"{nonfinite} parameter(s)" if nonfinite else "the total gradient norm"
        origin = f", first at layer '{bad_deltas[-1]}' (counting from the output)" if bad_deltas else ""
        text = f"gradwatch: non-finite gradients in {what}{origin}{where}"
        return Alert("nonfinite", step, text, bad_deltas[-1] if bad_deltas else None, run_id)
    if layer_types is not None:
        names = [k for k in names if not is_norm_type(layer_types.get(k, ""))]
    if len(names) < 2:
        return None
    first, last = layer_deltas[names[0]], layer_deltas[names[-1]]
    if last <= 0:
        return None
    ratio = first / last
    if ratio < t.vanishing_ratio:
        onset = next((k for k in reversed(names) if layer_deltas[k] / last < t.vanishing_ratio), names[0])
        text = (f"gradwatch: vanishing gradients: the delta at '{names[0]}' is {_ratio(ratio)} of the "
                f"last layer's; it falls {1 / t.vanishing_ratio:,.0f}x below at '{onset}'{where}")
        return Alert("vanishing", step, text, onset, run_id)
    if ratio > t.exploding_ratio:
        text = (f"gradwatch: exploding gradients: the delta at '{names[0]}' is {_ratio(ratio)} times the "
                f"last layer's ('{names[-1]}'){where}")
        return Alert("exploding", step, text, names[0], run_id)
    return None


def _ratio(value: float) -> str:
    """Two significant digits between 0.01 and 1000, else scientific (``"3.1e-05"``)."""
    return format_number(value, 2, plain=(1e-2, 1e3), missing="nan")


def nonfinite_alert(
    first_bad: Mapping[int, int],
    layer_of: Mapping[int, str],
    layers: Sequence[str],
    broken_weights: Callable[[], list[str]],
    *,
    run_id: int | None = None,
) -> Alert:
    """Where a non-finite gradient first appeared: the step, and the layer it entered at.

    Backward runs from the output, so when some layers' gradients went bad at the first bad
    step, the deepest of them (last in forward order) is where the value entered; when all
    did, a layer whose weights are non-finite is the cause, else the loss or the forward pass.

    Args:
        first_bad: parameter index -> the first step its gradient was non-finite.
        layer_of: parameter index -> the name of the watched layer it belongs to.
        layers: the parameterised layers' names in forward order.
        broken_weights: the names of the layers whose weights are non-finite (asked only when
            every layer's gradient went bad).
        run_id: named in the message's pointer to ``gradwatch show``.
    """
    step = min(first_bad.values())
    touched = {layer_of[i] for i, s in first_bad.items() if s == step and i in layer_of}
    bad_layers = [name for name in layers if name in touched]
    layer = None
    if bad_layers and len(bad_layers) < len(layers):
        layer, where = bad_layers[-1], "the first layer the backward pass reached with it"
    elif bad_layers:
        broken = broken_weights()
        if broken:
            layer, where = broken[0], "its weights are non-finite"
        else:
            where = "every layer's gradient is: the loss or the forward pass went non-finite"
    else:
        where = "in parameters outside the watched layers"
    at = f" in layer '{layer}' ({where})" if layer else f" ({where})"
    text = (
        f"gradwatch: non-finite gradients at step {step}{at}; {len(bad_layers)} of {len(layers)} layers "
        f"affected; see `gradwatch show {run_id}`"
    )
    return Alert("nonfinite", step, text, layer, run_id)


def step_alerts(
    actions: Mapping[str, Action],
    layer_deltas: Mapping[str, float],
    layer_types: Mapping[str, str],
    first_bad: Mapping[int, int],
    layer_of: Mapping[int, str],
    layers: Sequence[str],
    broken_weights: Callable[[], list[str]],
    thresholds: Thresholds | None = None,
    *,
    step: int,
    run_id: int | None = None,
) -> list[Alert]:
    """The alerts of one written step whose action is not ``"ignore"``.

    A non-finite gradient (``first_bad`` not empty) gives :func:`nonfinite_alert`; the
    first/last delta ratio gives :func:`live_alert`'s ``"vanishing"`` or ``"exploding"``
    (its non-finite verdict is the former's, judged per parameter and step).
    """
    found: list[Alert] = []
    if first_bad and actions["nonfinite"] != "ignore":
        found.append(nonfinite_alert(first_bad, layer_of, layers, broken_weights, run_id=run_id))
    judged = [k for k in ("vanishing", "exploding") if actions[k] != "ignore"]
    if judged:
        alert = live_alert(layer_deltas, None, 0, thresholds, step=step, run_id=run_id,
                           layer_types=layer_types)
        if alert is not None and alert.kind in judged:
            found.append(alert)
    return found
